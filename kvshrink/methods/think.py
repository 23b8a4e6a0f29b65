"""ThinK: query-driven pruning of key channels.

Xu, Jie, Wang, Chen, Huang, Zhang, Sun, Zhu, Kong, Chen. "ThinK: Thinner Key Cache by Query-Driven
Pruning", ICLR 2025 (arXiv 2407.21118), Sec. 3.2, Eq. 3: for each head, channel ``c`` is scored by
``||Q_w[:, c] K[:, c]^T||_F = ||Q_w[:, c]|| * ||K[:, c]||`` with ``Q_w`` the last ``window`` prompt
queries; the ``floor(ratio * D)`` lowest-scoring channels are pruned from the stored keys (values are
untouched). Attention then runs on the kept channels only, which equals re-expanding the keys with zeros.

Storage: keys ``(B, H, T, D - floor(ratio*D))`` in the inner layer (quantized if composed with a quantizer)
plus the kept channel indices ``(B, H, D')`` as int16, counted in ``nbytes()``. GQA: a key head's query
scores are the mean of its query heads' squared norms.

Difference from the paper's code: the channel set is chosen once at prefill and also applied to decoded
tokens (the reference keeps the newest tokens' keys whole); one channel set per head keeps storage
dense and composable with any quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layer import UniformLayer
from ..policy import HookedPolicy, PolicyLayer, push, select_held
from ..registry import register
from .base import require


class ThinKLayer(PolicyLayer):
    state_fields = ("npad", "channels")

    def __init__(self, inner, layer_idx, info, ratio: float, window: int) -> None:
        super().__init__(inner, layer_idx, info)
        self.ratio, self.window = ratio, window
        self.kept = info.head_dim - int(ratio * info.head_dim)
        self.channels: torch.Tensor | None = None

    def queries_needed(self, n: int) -> int:
        return self.window if self.channels is None else 0

    def clear_tokens(self) -> None:  # the channel set is configuration, not per-token state
        clear = self.channels
        super().clear_tokens()
        self.channels = clear

    def select_channels(self, k: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        q = self.require_queries("think")  # (B, Hq, w, D)
        B, Hq, w, D = q.shape
        H = k.shape[1]
        qn = q.float().pow(2).sum(2).view(B, H, Hq // H, D).mean(2)  # ||Q_w[:, c]||^2, mean over the GQA group
        kf = k.float().pow(2)
        if valid is not None:
            kf = kf * valid[..., -k.shape[-2]:, None]
        kn = kf.sum(2)  # ||K[:, c]||^2
        score = qn * kn  # squared Frobenius norm of Q_c K_c^T
        return score.topk(self.kept, dim=-1).indices.sort(dim=-1).values.to(torch.int16)

    def _store(self, K, V, k, v):
        valid = self._valid(self.held(), k.shape[-2], K.shape[0], K.device)
        if self.channels is None:
            self.channels = self.select_channels(k, valid)
        idx = self.channels.long()[:, :, None, :].expand(*k.shape[:3], self.kept)
        push(self.inner, k.gather(-1, idx), v)

    def select(self, idx):
        select_held(self.inner, idx)
        self.seen = idx.shape[-1]

    def dense(self):
        kp, v = self.inner.dense()
        if kp is None:
            return None, None
        full = kp.new_zeros(*kp.shape[:3], self.head_dim)
        idx = self.channels.long()[:, :, None, :].expand(*kp.shape[:3], self.kept)
        return full.scatter_(-1, idx, kp), v


@register
@dataclass
class ThinK(HookedPolicy):
    """Query-driven pruning of the least important key channels per head (Xu et al. 2025)."""

    name = "think"
    paper = "Xu et al. 2025, ThinK: Thinner Key Cache by Query-Driven Pruning (arXiv 2407.21118)"

    ratio: float = field(default=0.4, metadata={"help": "fraction of key channels pruned per head (paper: 0.4 or 0.5)"})
    window: int = field(default=32, metadata={"help": "last prompt queries that score the channels (paper: 32)"})

    def __post_init__(self) -> None:
        require(0.0 <= self.ratio < 1.0, f"think: ratio={self.ratio} is the fraction of key channels pruned; use 0 <= ratio < 1")
        require(self.window >= 1, f"think: window={self.window} must be >= 1")

    def wrap(self, inner, layer_idx, info):
        require(not isinstance(inner, PolicyLayer),
                "think prunes key channels, so token policies must see whole keys: write it after them, "
                "e.g. 'snapkv:budget=0.25+think:ratio=0.4+kivi:bits=2'")
        kept = info.head_dim - int(self.ratio * info.head_dim)
        require(kept >= 1, f"think: ratio={self.ratio} prunes every channel of head_dim={info.head_dim}")
        if isinstance(inner, UniformLayer) and inner.key_axis == "channel":
            require(kept % inner.key_group == 0,
                    f"think keeps {kept} of {info.head_dim} key channels, which the quantizer's per-token key groups of "
                    f"{inner.key_group} channels do not divide; compose with kivi (per-channel keys) or a quantizer "
                    f"group that divides {kept}")
        return ThinKLayer(inner, layer_idx, info, self.ratio, self.window)
