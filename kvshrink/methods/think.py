"""ThinK: query-driven pruning of key channels.

Xu, Jie, Wang, Chen, Huang, Zhang, Sun, Zhu, Kong, Chen. "ThinK: Thinner Key Cache by Query-Driven
Pruning", ICLR 2025 (arXiv 2407.21118), Sec. 3.2, Eq. 3: for each head, channel ``c`` is scored by
``||Q_w[:, c] K[:, c]^T||_F = ||Q_w[:, c]|| * ||K[:, c]||`` with ``Q_w`` the last ``window`` prompt
queries; the ``floor(ratio * D)`` lowest-scoring channels are pruned from the stored keys (values are
untouched). Attention then runs on the kept channels only, which equals re-expanding the keys with zeros.

Which tokens are pruned: the prompt. Chunks of more than one token (prefill, chunked prefill) are stored
with the kept channels only; tokens decoded one at a time afterwards are kept whole in a separate ``tail``
layer of the same quantizer, as the paper's code does (it prunes the prefilled cache and leaves newly
generated keys whole). Once the tail holds tokens, later chunks go to the tail too, so stored tokens stay in
text order. A question appended while the policy is inactive (the kv-compression pipeline) is kept whole.

Storage: pruned keys ``(B, H, T, D - floor(ratio*D))`` in the inner layer (quantized if composed with a
quantizer), whole keys of decoded tokens in the tail, plus the kept channel indices ``(B, H, D')`` as
int16; all counted in ``nbytes()``. GQA: a key head's query scores are the mean of its query heads'
squared norms.

Deviations: one channel set per head, chosen at the first prefill chunk (storage stays dense and composable
with any quantizer). When a policy in front evicts tokens (h2o, streamingllm) the kept tokens are folded
back into pruned storage, whole-key tail included; with a quantizer that keeps per-token positions
(rotatekv, kvquant: ``takes_index``) there is no tail: decoded tokens are pruned like the prompt.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..layer import UniformLayer
from ..policy import HookedPolicy, PolicyLayer, clear_tokens, gather_tokens, push, select_held
from ..registry import register
from .base import require


class ThinKLayer(PolicyLayer):
    state_fields = ("npad", "channels")

    def __init__(self, inner, layer_idx, info, ratio: float, window: int) -> None:
        super().__init__(inner, layer_idx, info)
        self.ratio, self.window = ratio, window
        self.kept = info.head_dim - int(ratio * info.head_dim)
        self.channels: torch.Tensor | None = None
        # decoded tokens, whole: an empty copy of the quantizer's layer (none for per-token-position layers)
        self.tail = None if inner.takes_index else copy.deepcopy(inner)

    def queries_needed(self, n: int) -> int:
        return self.window if self.channels is None else 0

    # -- composition: the tail is part of this layer's storage ------------------------------------------
    def held(self) -> int:
        return self.inner.held() + (self.tail.held() if self.tail is not None else 0)

    def stored(self):
        yield from super().stored()
        if self.tail is not None:
            yield from self.tail.stored()

    def map_state(self, fn) -> None:
        super().map_state(fn)
        if self.tail is not None:
            self.tail.map_state(fn)

    def reset(self) -> None:
        super().reset()
        if self.tail is not None:
            self.tail.reset()

    def clear_tokens(self) -> None:  # the channel set is configuration, not per-token state
        keep = self.channels
        super().clear_tokens()
        if self.tail is not None:
            clear_tokens(self.tail)
        self.channels = keep

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

    def _prune(self, k: torch.Tensor) -> torch.Tensor:
        return k.gather(-1, self.channels.long()[:, :, None, :].expand(*k.shape[:3], self.kept))

    def _store(self, K, V, k, v, index=None):
        valid = self._valid(self.held(), k.shape[-2], K.shape[0], K.device)
        if self.channels is None:
            self.channels = self.select_channels(k, valid)
        self._count_padding(valid)
        whole = self.tail is not None and (k.shape[-2] == 1 or not self.active or self.tail.held() > 0)
        if whole:
            push(self.tail, k, v, index)
        else:
            push(self.inner, self._prune(k), v, index)

    def select(self, idx):
        self._gather_meta(idx, None)
        if self.tail is None or self.tail.held() == 0:
            select_held(self.inner, idx)
        else:  # fold the kept tokens, whole-key tail included, back into pruned storage
            K, V = self.dense()
            K, V = gather_tokens(K, idx), gather_tokens(V, idx)
            clear_tokens(self.inner)
            clear_tokens(self.tail)
            push(self.inner, self._prune(K), V)
        self.seen = idx.shape[-1]

    def dense(self):
        kp, v = self.inner.dense()
        tk, tv = self.tail.dense() if self.tail is not None and self.tail.held() > 0 else (None, None)
        if kp is None:
            return tk, tv
        full = kp.new_zeros(*kp.shape[:3], self.head_dim)
        idx = self.channels.long()[:, :, None, :].expand(*kp.shape[:3], self.kept)
        full.scatter_(-1, idx, kp)
        if tk is None:
            return full, v
        return torch.cat([full, tk.to(full.dtype)], dim=-2), torch.cat([v, tv.to(v.dtype)], dim=-2)


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
