"""CAKE: cascading and adaptive KV cache eviction with layer preferences.

Qin, Cao, Ding, Zhang, Jin, Wang, Huang, Chen, Wei. "CAKE: Cascading and Adaptive KV Cache Eviction with
Layer Preferences", ICLR 2025 (arXiv 2503.12491).

* Sec. 3.2, layer preference: from the observation window's attention ``A (w, T)`` of a layer, the
  spatial dispersion ``H = -sum_j a_j log a_j`` (entropy of the window's mean attention ``a``) and the
  temporal shift ``V = sum_j Var_i A[i, j]`` (variance over the window's queries) give
  ``P = H^(1/tau1) * V^(1/tau2)``; layer ``l`` gets ``P_l / sum_k P_k`` of the total budget.
* Sec. 3.3, cascading: layers are prefilled one after another, so after layer ``m`` the total budget is
  divided among the first ``m+1`` layers by their preferences and layers already done are evicted down to
  their new share: memory never exceeds the total budget, and the last layer fixes the final shares.
* Sec. 3.4, eviction indicator: ``I_j = mean_i A[i, j] + gamma * Var_i A[i, j]`` (gamma = 200), pooled as in
  SnapKV; the window is always kept.

Budgets: ``budget`` is the per-layer average (count, or fraction of the prompt); the total is
``budget * layers``, divided between layers (never below the window, never above the prompt), exactly.
Preferences are averaged over the batch and heads so that a layer holds the same count in every row.
Until the last layer is prefilled, kept tokens wait in full precision inside the policy layer (counted in
``nbytes()``); then each layer hands its share to the quantizer once, so nothing is quantized twice.
Prefill only; decoded tokens are all kept. GQA: statistics are averaged over a key head's query heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policy import (HookedPolicy, PolicyLayer, check_budget, clear_tokens, force, gather_tokens, install_policy_hooks,
                      is_count, pool1d, push, resolve_budget, topk_keep, attention_mass)
from ..registry import register
from .base import require


def allocate(prefs: list[float], total: int, low: list[int], high: list[int]) -> list[int]:
    """Integers proportional to ``prefs`` summing to ``total`` within ``[low, high]`` (water-filling)."""
    n = len(prefs)
    total = max(sum(low), min(total, sum(high)))
    out = [0] * n
    free = list(range(n))
    left = total
    fixed: dict[int, int] = {}
    while True:
        weight = sum(max(prefs[i], 1e-12) for i in free)
        share = {i: left * max(prefs[i], 1e-12) / weight for i in free}
        over = [i for i in free if share[i] > high[i]]
        under = [i for i in free if share[i] < low[i]]
        if not over and not under:
            break
        for i in over:
            fixed[i] = high[i]
        for i in under:
            fixed[i] = low[i]
        free = [i for i in free if i not in fixed]
        left = total - sum(fixed.values())
        if not free:
            break
    for i, v in fixed.items():
        out[i] = v
    if free:
        floors = {i: int(share[i]) for i in free}
        for i in free:
            out[i] = floors[i]
        rest = left - sum(floors.values())
        for i in sorted(free, key=lambda i: share[i] - floors[i], reverse=True)[:max(0, rest)]:
            out[i] += 1
    return out


class CakeCoordinator:
    """Shared by the CAKE layers of one cache: preferences seen so far and the cascading re-division."""

    def __init__(self, layers: list["CakeLayer"]) -> None:
        self.layers = layers
        self.prefs: dict[int, float] = {}

    def layer_done(self, layer: "CakeLayer", total_per_layer: int) -> None:
        m = self.layers.index(layer)
        self.prefs[m] = layer.pref
        done = [i for i in range(m + 1) if i in self.prefs and self.layers[i].pending_len() > 0]
        if not done:
            return
        total = total_per_layer * len(self.layers)  # the whole budget, re-divided among the layers done so far
        lows = [min(self.layers[i].window_kept, self.layers[i].pending_len()) for i in done]
        highs = [self.layers[i].pending_len() for i in done]
        alloc = allocate([self.prefs[i] for i in done], total, lows, highs)
        for i, a in zip(done, alloc):
            self.layers[i].shrink_pending(a)
        if m == len(self.layers) - 1:
            for lay in self.layers:
                lay.flush()
            self.prefs.clear()


class CakeLayer(PolicyLayer):
    state_fields = ("npad", "pk", "pv", "pscore")

    def __init__(self, inner, layer_idx, info, budget, window, kernel, gamma, tau1, tau2) -> None:
        super().__init__(inner, layer_idx, info)
        self.budget, self.window, self.kernel, self.gamma, self.tau1, self.tau2 = budget, window, kernel, gamma, tau1, tau2
        self.pk = self.pv = self.pscore = None
        self.coordinator: CakeCoordinator | None = None
        self.pref = 0.0
        self.window_kept = 0
        self.pending_valid: torch.Tensor | None = None

    def queries_needed(self, n: int) -> int:
        return self.window if (n > 1 and self.active) else 0

    def pending_len(self) -> int:
        return 0 if self.pk is None else self.pk.shape[2]

    def held(self) -> int:
        return self.inner.held() + self.pending_len()

    def dense(self):
        k, v = self.inner.dense()
        if self.pk is None:
            return k, v
        if k is None:
            return self.pk, self.pv
        return torch.cat([k, self.pk], dim=-2), torch.cat([v, self.pv], dim=-2)

    def clear_tokens(self) -> None:
        self.pk = self.pv = self.pscore = self.pending_valid = None
        super().clear_tokens()

    def shrink_pending(self, count: int) -> None:
        if self.pk is None or count >= self.pending_len():
            return
        keep = topk_keep(self.pscore, count, self.pending_valid)
        self.pk, self.pv = gather_tokens(self.pk, keep), gather_tokens(self.pv, keep)
        self.pscore = self.pscore.gather(2, keep)
        if self.pending_valid is not None:
            self.pending_valid = self.pending_valid.gather(2, keep)
            npad = (~self.pending_valid).sum(-1)
            self.npad = npad if bool(npad.any()) else None

    def flush(self) -> None:
        if self.pk is None:
            return
        pk, pv = self.pk, self.pv
        self.pk = self.pv = self.pscore = self.pending_valid = None
        push(self.inner, pk, pv)

    def _store(self, K, V, k, v):
        held, n, T = self.held(), k.shape[-2], K.shape[-2]
        valid = self._valid(held, n, K.shape[0], K.device)
        if not self.active or n <= 1 or self.coordinator is None:
            if self.active and n > 1:
                self.require_queries("cake")
            self._count_padding(valid)
            self.flush()
            push(self.inner, k, v)
            return
        cap = resolve_budget(self.budget, self.seen + n)
        w = min(self.window, n, cap)
        q = self.require_queries("cake")[:, :, -w:]
        s, sq = attention_mass(q, K, self.scaling, valid, T - w, self.softcap, squares=True)  # (B, H, G, T)
        mean, var = s / w, (sq / w - (s / w).pow(2)).clamp_min(0)
        pre = T - w
        # layer preference (Sec. 3.2), averaged over batch and heads
        a = mean[..., :pre]
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        entropy = -(a * a.clamp_min(1e-12).log()).sum(-1).mean()
        shift = var[..., :pre].sum(-1).mean()
        self.pref = float(entropy.clamp_min(1e-12) ** (1 / self.tau1) * shift.clamp_min(1e-12) ** (1 / self.tau2))
        # eviction indicator (Sec. 3.4)
        ind = (mean + self.gamma * var).mean(2)
        ind = torch.cat([pool1d(ind[..., :pre], self.kernel, "avgpool", None if valid is None else valid[..., :pre]),
                         ind[..., pre:]], dim=-1)
        score = force(ind, (torch.arange(T, device=K.device) >= pre).expand_as(ind))
        clear_tokens(self.inner)  # every held token is re-ranked with the new ones
        self.pk, self.pv, self.pscore, self.pending_valid = K, V, score, valid
        self.window_kept = w
        self.coordinator.layer_done(self, cap)


@register
@dataclass
class CAKE(HookedPolicy):
    """Layer budgets from attention dispersion and shift, cascading eviction by mean + variance (Qin et al. 2025)."""

    name = "cake"
    paper = "Qin et al. 2025, CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences (arXiv 2503.12491)"

    budget: float = field(default=1024, metadata={"help": "average tokens per layer and head: a count (> 1) or a fraction of the prompt"})
    window: int = field(default=32, metadata={"help": "observation window (paper: 32)"})
    kernel: int = field(default=5, metadata={"help": "pooling kernel over tokens (odd)"})
    gamma: float = field(default=200.0, metadata={"help": "weight of the attention variance in the eviction indicator (paper: 200)"})
    tau1: float = field(default=1.0, metadata={"help": "temperature of the spatial dispersion in the layer preference"})
    tau2: float = field(default=1.0, metadata={"help": "temperature of the temporal shift in the layer preference"})

    def __post_init__(self) -> None:
        check_budget("cake", self.budget)
        require(self.window >= 1, f"cake: window={self.window} must be >= 1")
        require(self.kernel >= 1 and self.kernel % 2 == 1, f"cake: kernel={self.kernel} must be an odd number >= 1")
        require(self.gamma >= 0, f"cake: gamma={self.gamma} must be >= 0")
        require(self.tau1 > 0 and self.tau2 > 0, "cake: tau1 and tau2 must be positive")
        if is_count(self.budget):
            require(self.budget > self.window, f"cake: budget={int(self.budget)} must exceed window={self.window}")

    def wrap(self, inner, layer_idx, info):
        return CakeLayer(inner, layer_idx, info, self.budget, self.window, self.kernel, self.gamma, self.tau1, self.tau2)

    def attach(self, model, cache) -> list:
        layers = [layer for layer in cache.layers if isinstance(layer, CakeLayer)]
        coordinator = CakeCoordinator(layers)
        for layer in layers:
            layer.coordinator = coordinator
        return install_policy_hooks(model, cache)
