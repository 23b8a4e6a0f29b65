"""KVMerger: merging runs of consecutive similar keys with Gaussian-kernel weights.

Wang, Jin, Yu, Zhang. "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context
Tasks" (arXiv 2407.08454). Sec. 4.1: key states of neighbouring tokens are highly similar, so merging
sets are runs of *consecutive* tokens whose keys have cosine similarity at least ``threshold``.
Sec. 4.2 (Gaussian kernel weighted merging): in each set the pivotal state ``p`` is the one with the
largest attention score; every member ``i`` is weighted by ``g_i = exp(-||k_i - k_p||^2 / (2 sigma^2))``
and the set becomes one state ``k = sum_i g_i k_i / sum_i g_i``, ``v = sum_i g_i v_i / sum_i g_i``.

kvshrink's budget-exact reading (so that storage stays dense per head): the prompt's last ``window``
tokens are kept as they are; the rest is cut at every link with similarity below ``threshold`` and, if
that gives fewer than ``budget - window`` sets, also at the weakest remaining links; if it gives more,
the sets whose pivots score lowest are evicted. Every head thus holds exactly ``budget`` states.
Attention scores are the observation window's votes (as SnapKV; GQA: mean over the group).
``sigma=0`` (default) sets ``sigma^2`` per set to the mean squared distance of its members to the pivot,
so the kernel follows each set's spread (the paper's sigma value is not reproduced here). Prefill only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..policy import HookedPolicy, PolicyLayer, check_budget, is_count, resolve_budget
from ..registry import register
from .base import require


def merge_runs(K: torch.Tensor, V: torch.Tensor, score: torch.Tensor, valid: torch.Tensor | None, slots: int,
               threshold: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``K, V (B, H, P, D)`` into exactly ``slots`` states per head.

    Returns merged ``(K', V')`` of ``(B, H, slots, D)``, the set id of every token ``(B, H, P)`` and the
    ids of the kept sets ``(B, H, slots)`` (in text order). ``score (B, H, P)`` picks pivots and ranks sets."""
    B, H, P, D = K.shape
    kf, vf = K.float(), V.float()
    sim = F.cosine_similarity(kf[:, :, 1:], kf[:, :, :-1], dim=-1)  # link i joins tokens i and i+1
    if valid is not None:  # padding never merges with anything
        sim = sim.masked_fill(~(valid[..., 1:] & valid[..., :-1]), -2.0)
    cut = sim < threshold
    need = min(slots - 1, P - 1)
    if need > 0:
        weakest = sim.topk(need, dim=-1, largest=False).indices
        cut = cut | torch.zeros_like(cut).scatter_(-1, weakest, True)
    seg = torch.cat([torch.zeros(B, H, 1, dtype=torch.long, device=K.device), cut.long().cumsum(-1)], dim=-1)
    S = P  # upper bound on sets
    sc = score.float()
    if valid is not None:
        sc = sc.masked_fill(~valid, float("-inf"))
    best = torch.full((B, H, S), float("-inf"), device=K.device).scatter_reduce(-1, seg, sc, "amax")
    is_pivot = sc == best.gather(-1, seg)
    # the first maximal token of each set is its pivot
    first = torch.full((B, H, S), P, dtype=torch.long, device=K.device)
    pos = torch.arange(P, device=K.device).expand(B, H, P)
    first = first.scatter_reduce(-1, seg, torch.where(is_pivot, pos, P), "amin")
    piv = first.gather(-1, seg)  # pivot index of each token's set
    kp = kf.gather(2, piv.unsqueeze(-1).expand(B, H, P, D))
    d2 = (kf - kp).pow(2).sum(-1)  # ||k_i - k_p||^2
    if sigma > 0:
        s2 = torch.full_like(d2, sigma * sigma)
    else:
        count = torch.zeros(B, H, S, device=K.device).scatter_add_(-1, seg, torch.ones_like(d2))
        mean = torch.zeros(B, H, S, device=K.device).scatter_add_(-1, seg, d2) / count.clamp_min(1)
        s2 = mean.gather(-1, seg).clamp_min(1e-12)
    g = torch.exp(-d2 / (2 * s2))
    den = torch.zeros(B, H, S, device=K.device).scatter_add_(-1, seg, g)
    idx = seg.unsqueeze(-1).expand(B, H, P, D)
    mk = torch.zeros(B, H, S, D, device=K.device).scatter_add_(2, idx, g.unsqueeze(-1) * kf)
    mv = torch.zeros(B, H, S, D, device=K.device).scatter_add_(2, idx, g.unsqueeze(-1) * vf)
    mk, mv = mk / den.clamp_min(1e-30).unsqueeze(-1), mv / den.clamp_min(1e-30).unsqueeze(-1)
    n_sets = seg[..., -1:] + 1
    set_score = best.masked_fill(torch.arange(S, device=K.device) >= n_sets, float("-inf"))
    set_score = torch.where(torch.isneginf(set_score) & (torch.arange(S, device=K.device) < n_sets),
                            torch.full_like(set_score, -1e30), set_score)  # padding sets rank last but exist
    keep = set_score.topk(min(slots, S), dim=-1).indices.sort(-1).values
    gidx = keep.unsqueeze(-1).expand(*keep.shape, D)
    return mk.gather(2, gidx).to(K.dtype), mv.gather(2, gidx).to(V.dtype), seg, keep


class KVMergerLayer(PolicyLayer):
    def __init__(self, inner, layer_idx, info, budget, window, threshold, sigma) -> None:
        super().__init__(inner, layer_idx, info)
        self.budget, self.window, self.threshold, self.sigma = budget, window, threshold, sigma
        self.last_sets: tuple[torch.Tensor, torch.Tensor] | None = None  # (set ids, kept set ids) for inspection

    def queries_needed(self, n: int) -> int:
        return self.window if (n > 1 and self.active) else 0

    def choose(self, K, V, n, valid):
        return None  # merging replaces choose: see _store

    def _store(self, K, V, k, v):
        from ..policy import clear_tokens, push

        n, held, T = k.shape[-2], self.held(), K.shape[-2]
        valid = self._valid(held, n, K.shape[0], K.device)
        cap = resolve_budget(self.budget, self.seen + n)
        if not self.active or n <= 1 or T <= cap:
            self._count_padding(valid)
            push(self.inner, k, v)
            return
        w = min(self.window, n, cap - 1)
        votes = self.group_mass(K, valid, n, max(w, 1))
        pre = T - w
        vp = None if valid is None else valid[..., :pre]
        mk, mv, seg, keep = merge_runs(K[:, :, :pre], V[:, :, :pre], votes[..., :pre], vp, cap - w,
                                       self.threshold, self.sigma)
        self.last_sets = (seg, keep)
        if valid is not None:  # kept padding sets are single padding tokens, at the front
            pad_set = torch.zeros(seg.shape[:2] + (pre,), dtype=torch.bool, device=K.device)
            pad_set = pad_set.scatter(-1, seg, ~vp)
            npad = pad_set.gather(-1, keep).sum(-1)
            self.npad = npad if bool(npad.any()) else None
        clear_tokens(self.inner)
        push(self.inner, torch.cat([mk, K[:, :, pre:]], dim=2), torch.cat([mv, V[:, :, pre:]], dim=2))


@register
@dataclass
class KVMerger(HookedPolicy):
    """Merge runs of consecutive similar keys into Gaussian-weighted states around a pivot (Wang et al. 2024)."""

    name = "kvmerger"
    paper = "Wang et al. 2024, Model Tells You Where to Merge: Adaptive KV Cache Merging (arXiv 2407.08454)"

    budget: float = field(default=0.5, metadata={
        "help": "states kept per layer and head after merging: a fraction of the prompt (paper: 0.5, 0.35) or a count"})
    window: int = field(default=32, metadata={"help": "last prompt tokens kept unmerged; their queries score pivots"})
    threshold: float = field(default=0.75, metadata={"help": "cosine similarity of neighbouring keys above which they may merge"})
    sigma: float = field(default=0.0, metadata={"help": "Gaussian kernel width; 0 = per set, from its spread"})

    def __post_init__(self) -> None:
        check_budget("kvmerger", self.budget)
        require(self.window >= 1, f"kvmerger: window={self.window} must be >= 1")
        require(-1.0 <= self.threshold <= 1.0, f"kvmerger: threshold={self.threshold} is a cosine similarity; use -1..1")
        require(self.sigma >= 0, f"kvmerger: sigma={self.sigma} must be >= 0 (0 = from each set's spread)")
        if is_count(self.budget):
            require(self.budget > self.window,
                    f"kvmerger: budget={int(self.budget)} must exceed window={self.window} (the window is kept unmerged)")

    def wrap(self, inner, layer_idx, info):
        return KVMergerLayer(inner, layer_idx, info, self.budget, self.window, self.threshold, self.sigma)
