"""WindowKV: task-adaptive selection of windows of consecutive tokens, shared within groups of layers.

Zuo, Wei, Zhang, Liu, Lu, Song. "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for
Efficient LLM Inference" (arXiv 2503.17922). At prefill:

* the prompt minus its last ``suffix`` tokens (the observation window, always kept) is cut into *review
  windows* of ``review`` consecutive tokens (8 in the reference code), so that kept context stays
  semantically coherent;
* each window is scored from the suffix queries' attention: for *localization* tasks (find a fact) by the
  mean of its ``review // 2`` largest token scores ("max", suffix 32), for *aggregation* tasks (summarise)
  by its mean score ("average", suffix 16); the lowest-scoring windows are dropped until the layer's budget
  is met (a layer keeps whole windows, best first while they fit: at most its budget);
* layers are taken in groups of ``group`` (8): the first layer of a group selects, the others reuse its
  window indices (intra-group index sharing); group budgets decrease arithmetically with depth from
  ``2b - b*group/beta`` to ``b*group/beta`` (beta = 14), averaging the per-layer budget ``b``.

The paper's task classifier (a fine-tuned BERT on the question) is not reproduced: pass ``task`` yourself.
As in the reference, one selection serves every head and batch row (scores averaged over them; GQA: mean
over the query heads of a group), so storage is dense without per-head indices. Left padding is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import SpecError
from ..policy import HookedPolicy, PolicyLayer, check_budget, install_policy_hooks, is_count, resolve_budget
from ..registry import register
from .base import check_choice, require

SUFFIX = {"localization": 32, "aggregation": 16}  # the reference script's suffix_max / suffix_avg


def group_budgets(avg: int, groups: list[int], beta: float) -> list[int]:
    """Per-group budgets decreasing arithmetically, averaging ``avg`` over layers (``groups``: group sizes)."""
    if len(groups) == 1:
        return [avg]
    low = min(avg, avg * groups[0] / beta)
    high = 2 * avg - low
    n = len(groups)
    raw = [high - i * (high - low) / (n - 1) for i in range(n)]
    # rescale so that the layer-weighted mean is exactly avg (groups may differ in size)
    mean = sum(r * g for r, g in zip(raw, groups)) / sum(groups)
    return [max(1, int(r * avg / mean)) for r in raw]


class WindowShare:
    """Shared by the WindowKV layers of one cache: each group's selected token indices."""

    def __init__(self) -> None:
        self.selected: dict[int, torch.Tensor | None] = {}


class WindowKVLayer(PolicyLayer):
    def __init__(self, inner, layer_idx, info, budget, task, review, group, beta, position, layers) -> None:
        super().__init__(inner, layer_idx, info)
        self.budget, self.task, self.review, self.beta = budget, task, review, beta
        self.suffix = SUFFIX[task]
        self.group_id, self.leader = position // group, position % group == 0
        sizes = [min(group, layers - s) for s in range(0, layers, group)]
        self.sizes = sizes
        self.share: WindowShare | None = None

    def queries_needed(self, n: int) -> int:
        return self.suffix if (n > 1 and self.active and self.leader) else 0

    def choose(self, K, V, n, valid):
        if n <= 1:
            return None
        if valid is not None:
            raise SpecError("windowkv selects one set of windows for the whole batch and does not support left "
                            "padding; run rows one at a time")
        if self.share is None:
            self.require_queries("windowkv")
        T = K.shape[-2]
        avg = resolve_budget(self.budget, self.seen + n)
        s = min(self.suffix, n)
        cap = group_budgets(max(1, avg - s), self.sizes, self.beta)[self.group_id]  # prefix tokens kept
        pre = T - s
        if pre <= cap:
            if self.leader:
                self.share.selected[self.group_id] = None
            return None
        if self.leader:
            votes = self.group_mass(K, None, n, s)[..., :pre]  # (B, H, pre)
            nwin = math.ceil(pre / self.review)
            padded = torch.nn.functional.pad(votes, (0, nwin * self.review - pre), value=float("nan"))
            win = padded.view(*votes.shape[:2], nwin, self.review)
            if self.task == "aggregation":
                score = win.nanmean(-1).mean((0, 1))
            else:
                k = max(1, self.review // 2)
                top = win.nan_to_num(float("-inf")).topk(k, dim=-1).values
                score = top.masked_fill(torch.isinf(top), float("nan")).nanmean(-1).mean((0, 1))
            # best windows first, as many as fit in the budget (the last window may be shorter)
            order = score.argsort(descending=True)
            lengths = torch.full((nwin,), self.review, device=K.device)
            lengths[-1] = pre - (nwin - 1) * self.review
            fits = lengths[order].cumsum(0) <= cap
            kept = order[fits].sort().values
            tok = (kept[:, None] * self.review + torch.arange(self.review, device=K.device)).flatten()
            tok = tok[tok < pre]
            self.share.selected[self.group_id] = torch.cat([tok, torch.arange(pre, T, device=K.device)])
        sel = self.share.selected.get(self.group_id)
        if sel is None or int(sel.max()) >= T:
            raise SpecError("windowkv: a layer of a group saw other tokens than its group's first layer")
        return sel.expand(K.shape[0], K.shape[1], -1)


@register
@dataclass
class WindowKV(HookedPolicy):
    """Task-adaptive selection of windows of consecutive tokens, shared within layer groups (Zuo et al. 2025)."""

    name = "windowkv"
    paper = "Zuo et al. 2025, WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection (arXiv 2503.17922)"

    budget: float = field(default=1024, metadata={"help": "average tokens per layer (suffix included): a count (> 1) or a fraction of the prompt"})
    task: str = field(default="localization", metadata={
        "help": "localization (max window scores, suffix 32) or aggregation (average, suffix 16); the paper's classifier picks it"})
    review: int = field(default=8, metadata={"help": "tokens per review window (reference: 8)"})
    group: int = field(default=8, metadata={"help": "layers sharing one window selection (reference: 8)"})
    beta: float = field(default=14.0, metadata={"help": "the last group keeps budget*group/beta (reference: 14)"})

    def __post_init__(self) -> None:
        check_budget("windowkv", self.budget)
        check_choice("windowkv", "task", self.task, tuple(SUFFIX))
        require(self.review >= 1 and self.group >= 1, "windowkv: review and group must be >= 1")
        require(self.beta >= 1, f"windowkv: beta={self.beta} must be >= 1")
        if is_count(self.budget):
            require(self.budget > SUFFIX[self.task],
                    f"windowkv: budget={int(self.budget)} must exceed the {self.task} suffix of {SUFFIX[self.task]} tokens")

    def wrap(self, inner, layer_idx, info):
        pos, count = self.full_layer_position(layer_idx, info)
        return WindowKVLayer(inner, layer_idx, info, self.budget, self.task, self.review, self.group, self.beta,
                             pos, count)

    def attach(self, model, cache) -> list:
        share = WindowShare()
        for layer in cache.layers:
            if isinstance(layer, WindowKVLayer):
                layer.share = share
        return install_policy_hooks(model, cache)
