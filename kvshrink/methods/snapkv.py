"""SnapKV: observation-window voting at prefill, with pooling.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen. "SnapKV: LLM Knows What You are Looking for
Before Generation", NeurIPS 2024 (arXiv 2404.14469), Sec. 4.2 / Listing 1: the last ``window`` prompt
queries vote (attention probabilities summed over the window) for prefix tokens; votes are smoothed by a
1-D pooling of ``kernel`` tokens; the top ``budget - window`` prefix tokens per head are kept together
with the window itself. Applied once per prompt (prefill); decoded tokens are all kept.

GQA: a key head's votes are the mean over the query heads that read it. Queries are recomputed from
the attention module's input (kvshrink.policy), so the model keeps SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policy import HookedPolicy, PolicyLayer, check_budget, force, is_count, pool1d, resolve_budget, topk_keep
from ..registry import register
from .base import check_choice, require


class SnapKVLayer(PolicyLayer):
    def __init__(self, inner, layer_idx, info, budget: float, window: int, kernel: int, pooling: str) -> None:
        super().__init__(inner, layer_idx, info)
        self.budget, self.window, self.kernel, self.pooling = budget, window, kernel, pooling

    def queries_needed(self, n: int) -> int:
        return self.window if (n > 1 and self.active) else 0

    def capacity(self, total: int) -> int:
        """Tokens this layer keeps out of ``total`` (window included)."""
        return resolve_budget(self.budget, total)

    def choose(self, K, V, n, valid):
        if n <= 1:
            return None  # decoding: SnapKV compresses the prompt only
        T = K.shape[-2]
        cap = self.capacity(self.seen + n)
        if T <= cap:
            return None
        w = min(self.window, n, cap)
        votes = self.group_mass(K, valid, n, w)  # (B, H, T)
        pre = T - w
        scores = torch.cat([pool1d(votes[..., :pre], self.kernel, self.pooling,
                                   None if valid is None else valid[..., :pre]), votes[..., pre:]], dim=-1)
        window = torch.arange(T, device=K.device) >= pre
        return topk_keep(force(scores, window.expand_as(scores)), cap, valid)


@register
@dataclass
class SnapKV(HookedPolicy):
    """Observation-window votes at prefill, pooled, top-k per head (Li et al. 2024)."""

    name = "snapkv"
    paper = "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation (arXiv 2404.14469)"

    budget: float = field(default=1024, metadata={
        "help": "prompt tokens kept per layer and head, window included: a count (> 1) or a fraction of the prompt"})
    window: int = field(default=32, metadata={"help": "observation window: last prompt queries that vote (paper: 32)"})
    kernel: int = field(default=5, metadata={"help": "pooling kernel over tokens (odd; 1 = no pooling; reference code: 5)"})
    pooling: str = field(default="avgpool", metadata={"help": "avgpool or maxpool (reference code: avgpool)"})

    def __post_init__(self) -> None:
        check_budget(self.name, self.budget)
        require(self.window >= 1, f"{self.name}: window={self.window} must be >= 1")
        require(self.kernel >= 1 and self.kernel % 2 == 1, f"{self.name}: kernel={self.kernel} must be an odd number >= 1")
        check_choice(self.name, "pooling", self.pooling, ("avgpool", "maxpool"))
        if is_count(self.budget):
            require(self.budget > self.window,
                    f"{self.name}: budget={int(self.budget)} must exceed window={self.window} "
                    "(the window is always kept); raise the budget or lower the window")

    def wrap(self, inner, layer_idx, info):
        return SnapKVLayer(inner, layer_idx, info, self.budget, self.window, self.kernel, self.pooling)
