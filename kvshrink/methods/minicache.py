"""MiniCache: cross-layer merging of the KV cache in the deeper half of the model.

Liu, Liu, Pan, He, Haffari, Zhuang. "MiniCache: KV Cache Compression in Depth Dimension for Large Language
Models", NeurIPS 2024 (arXiv 2405.14366). Sec. 4.1: in the middle-to-deep layers, KV states of adjacent
layers ``l-1, l`` are close in direction. Each token's pair ``(x_{l-1}, x_l)`` is split into magnitudes
``||x||`` and directions; the directions are merged by SLERP,
``e = sin((1-t) W)/sin W * x_{l-1}/||x_{l-1}|| + sin(t W)/sin W * x_l/||x_l||`` with ``W`` the angle between
them (``t = 0.6``), stored once for both layers; each layer restores ``x ~ ||x|| e``. Sec. 4.2: tokens whose
pair is far apart in angle are retained unmerged in both layers.

Here: full-attention layers from ``start`` of the depth on are paired ``(p, p+1), (p+2, p+3), ...``; the
shared directions ``e`` (keys and values) live in the first layer's quantizer layer (quantized if composed
with a quantizer), magnitudes (one per token, head, K/V, per layer) and the retained tokens in full
precision, all counted in ``nbytes()``. Retention keeps the ``retain`` share of each chunk's tokens with
the largest angular distance (max of keys' and values') per head (the paper thresholds the distance; a
fixed share keeps storage dense). Applied to every chunk, prefill and decoding. MiniCache merges across
layers, so it cannot be composed with token-eviction policies (each layer would keep other tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import SpecError
from ..policy import HookedPolicy, PolicyLayer, gather_tokens, install_policy_hooks, push
from ..registry import register
from .base import require


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP between unit vectors ``a, b (..., D)`` (linear interpolation where they are nearly parallel)."""
    dot = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - t) * omega) / torch.where(safe, so, 1.0), torch.full_like(so, 1 - t))
    wb = torch.where(safe, torch.sin(t * omega) / torch.where(safe, so, 1.0), torch.full_like(so, t))
    return wa * a + wb * b


class MiniCacheLayer(PolicyLayer):
    """One layer of a merged pair. The first holds the shared directions in its inner layer."""

    state_fields = ("mag_k", "mag_v", "ret_idx", "ret_k", "ret_v")

    def __init__(self, inner, layer_idx, info, t: float, retain: float, first: "MiniCacheLayer | None") -> None:
        super().__init__(inner, layer_idx, info)
        self.t, self.retain = t, retain
        self.first = first  # None for the first layer of the pair
        self.mag_k = self.mag_v = self.ret_idx = self.ret_k = self.ret_v = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # first layer: this step's K/V

    def held(self) -> int:
        return self.directions().held()

    def directions(self):
        return self.inner if self.first is None else self.first.inner

    def retained_index(self):
        return self.ret_idx if self.first is None else self.first.ret_idx

    def dense(self):
        ek, ev = self.directions().dense()
        if ek is None:
            return None, None
        k = (self.mag_k.unsqueeze(-1) * ek.float()).to(ek.dtype)
        v = (self.mag_v.unsqueeze(-1) * ev.float()).to(ev.dtype)
        idx = self.retained_index()
        if idx is not None and idx.shape[-1]:
            ix = idx.long().unsqueeze(-1).expand(*idx.shape, k.shape[-1])
            k = k.scatter(2, ix, self.ret_k.to(k.dtype))
            v = v.scatter(2, ix, self.ret_v.to(v.dtype))
        return k, v

    def _store(self, K, V, k, v):
        if self.padding_mask is not None and not bool(self.padding_mask.all()):
            raise SpecError("minicache does not support padded batches yet; run rows one at a time")
        if self.first is None:
            self.pending = (k, v)  # merged when the second layer of the pair sees the same tokens
            return
        a_k, a_v = self.first.pending
        self.first.pending = None
        n = k.shape[-2]
        ak, av, bk, bv = a_k.float(), a_v.float(), k.float(), v.float()
        na_k, na_v, nb_k, nb_v = ak.norm(dim=-1), av.norm(dim=-1), bk.norm(dim=-1), bv.norm(dim=-1)
        uak, uav = F.normalize(ak, dim=-1), F.normalize(av, dim=-1)
        ubk, ubv = F.normalize(bk, dim=-1), F.normalize(bv, dim=-1)
        ek, ev = slerp(uak, ubk, self.t), slerp(uav, ubv, self.t)
        push(self.first.inner, ek.to(k.dtype), ev.to(v.dtype))
        dt = k.dtype
        for layer, mk, mv in ((self.first, na_k, na_v), (self, nb_k, nb_v)):
            layer.mag_k = mk.to(dt) if layer.mag_k is None else torch.cat([layer.mag_k, mk.to(dt)], -1)
            layer.mag_v = mv.to(dt) if layer.mag_v is None else torch.cat([layer.mag_v, mv.to(dt)], -1)
        # compression off (e.g. a question after a compressed context): every token is retained unmerged
        r = int(math.floor(self.retain * n)) if self.active else n
        if r > 0:
            dist = torch.maximum(torch.arccos((uak * ubk).sum(-1).clamp(-1, 1)),
                                 torch.arccos((uav * ubv).sum(-1).clamp(-1, 1)))  # angular distance
            idx = dist.topk(r, dim=-1).indices.sort(-1).values
            base = self.held() - n  # position of this chunk in the shared storage
            gidx = (idx + base).to(torch.int32)
            self.first.ret_idx = gidx if self.first.ret_idx is None else torch.cat([self.first.ret_idx, gidx], -1)
            for layer, kk, vv in ((self.first, a_k, a_v), (self, k, v)):
                rk, rv = gather_tokens(kk, idx), gather_tokens(vv, idx)
                layer.ret_k = rk if layer.ret_k is None else torch.cat([layer.ret_k, rk], -2)
                layer.ret_v = rv if layer.ret_v is None else torch.cat([layer.ret_v, rv], -2)

    def clear_tokens(self) -> None:
        raise SpecError("minicache merges across layers: its tokens cannot be evicted by another policy")


@register
@dataclass
class MiniCache(HookedPolicy):
    """Cross-layer SLERP merging of adjacent layers' KV directions in the deeper half (Liu et al. 2024)."""

    name = "minicache"
    paper = "Liu et al. 2024, MiniCache: KV Cache Compression in Depth Dimension for LLMs (arXiv 2405.14366)"

    t: float = field(default=0.6, metadata={"help": "SLERP interpolation parameter (paper: 0.6)"})
    start: float = field(default=0.5, metadata={"help": "fraction of the depth where merging starts (paper: the middle)"})
    retain: float = field(default=0.05, metadata={"help": "share of tokens per head kept unmerged (largest angular distance)"})

    def __post_init__(self) -> None:
        require(0.0 <= self.t <= 1.0, f"minicache: t={self.t} must be in [0, 1]")
        require(0.0 <= self.start < 1.0, f"minicache: start={self.start} must be in [0, 1)")
        require(0.0 <= self.retain < 1.0, f"minicache: retain={self.retain} must be in [0, 1)")

    def wrap(self, inner, layer_idx, info):
        require(not isinstance(inner, PolicyLayer),
                "minicache merges whole layers: it cannot be composed with other policies (use it with a quantizer only)")
        pos, count = self.full_layer_position(layer_idx, info)
        first_merged = int(math.ceil(self.start * count))
        if pos < first_merged or (pos - first_merged) // 2 * 2 + first_merged + 1 >= count:
            return inner  # shallow layers (and a last unpaired layer) are stored as they are
        if (pos - first_merged) % 2 == 0:
            layer = MiniCacheLayer(inner, layer_idx, info, self.t, self.retain, None)
            self._first = layer
            return layer
        return MiniCacheLayer(inner, layer_idx, info, self.t, self.retain, self._first)

    def attach(self, model, cache) -> list:
        for layer in cache.layers:
            chain = []
            while isinstance(layer, PolicyLayer):
                chain.append(layer)
                layer = layer.inner
            if any(isinstance(p, MiniCacheLayer) for p in chain[1:]) or (
                    chain and isinstance(chain[0], MiniCacheLayer) and len(chain) > 1):
                raise SpecError("minicache cannot be composed with other policies")
        return install_policy_hooks(model, cache)
