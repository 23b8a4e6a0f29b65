"""LM-Infinite: Λ-shaped attention and a ceiling on relative distance, to run past the trained length.

Han, Wang, Peng, Xiong, Chen, Ji, Wang. "LM-Infinite: Zero-Shot Extreme Length Generalization for Large
Language Models", NAACL 2024 (arXiv 2308.16137), Sec. 4: each query attends only to the first
``globals`` tokens (n_global) and the ``local`` most recent ones (n_local = the pre-training length), and
any relative distance larger than ``cap`` (d = the pre-training length) is replaced by ``cap``.

As a KV cache: the global tokens and a window of ``local`` recent tokens are held, everything between is
evicted (as in StreamingLLM). Keys are stored after RoPE; before each step the global tokens' keys are
rotated from their own position ``p`` to ``max(p, s - cap)``, with ``s`` the position of the chunk's
first query, so that their distance to it is at most ``cap`` (RoPE's rotation composes:
``R(p') k_pre = R(p' - p) R(p) k_pre``). Positions come from the ``position_ids`` that the attention
module receives (a pre-hook, ``Method.attach``); the rotation uses the model's own ``inv_freq``.

Decoding (one query) is exact. A chunk of ``c`` queries sees the global tokens at distances ``cap`` to
``cap + c - 1`` and local ones up to ``local + c - 1``: feed text longer than the trained length in
chunks with ``local + c`` within it (``examples/lminfinite_demo.py`` does). The local window lives in the
quantizer's layer when composed; global tokens stay in full precision (``globals`` tokens per head,
counted in ``nbytes()``). Left padding is refused (positions per row would differ).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SpecError
from ..policy import HookedPolicy, PolicyLayer, apply_rope, install_policy_hooks, push, select_held
from ..registry import register
from .base import require


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys ``x (B, H, G, D)`` further by ``delta (B, G)`` positions (RoPE composes)."""
    freqs = delta[..., None].float() * inv_freq.to(x.device, torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    return apply_rope(x.float(), emb.cos(), emb.sin()).to(x.dtype)


class LMInfiniteLayer(PolicyLayer):
    state_fields = ("gk", "gv", "gpos")

    def __init__(self, inner, layer_idx, info, globals_: int, local: int, cap: int) -> None:
        super().__init__(inner, layer_idx, info)
        self.globals, self.local, self.cap = globals_, local, cap
        self.gk = self.gv = self.gpos = None
        self.inv_freq: torch.Tensor | None = None  # set by LMInfinite.attach

    def n_globals(self) -> int:
        return 0 if self.gk is None else self.gk.shape[2]

    def held(self) -> int:
        return self.n_globals() + self.inner.held()

    def chunk_positions(self, n: int, batch: int, device) -> torch.Tensor:
        if self.positions is not None:
            return self.positions.to(device).expand(batch, -1)[:, -n:]
        return (torch.arange(n, device=device) + self.seen).expand(batch, n)

    def dense(self):
        lk, lv = self.inner.dense()
        if self.gk is None:
            return lk, lv
        gk = self.gk
        if self.positions is not None:
            if self.inv_freq is None:
                raise SpecError("lminfinite needs the model's RoPE frequencies: build the cache with make_cache(model, ...)")
            s = self.positions.to(gk.device).expand(gk.shape[0], -1)[:, :1]  # first query of the chunk
            delta = (s - self.cap - self.gpos).clamp_min(0)  # move to max(p, s - cap)
            if bool(delta.any()):
                gk = rotate_by(gk, delta, self.inv_freq)
        if lk is None:
            return gk, self.gv
        return torch.cat([gk, lk], dim=-2), torch.cat([self.gv, lv], dim=-2)

    def _store(self, K, V, k, v):
        pm = self.padding_mask
        if pm is not None and not bool(pm.all()):
            raise SpecError("lminfinite does not support padded batches (each row would need its own positions); "
                            "run rows one at a time")
        n = k.shape[-2]
        take = min(self.globals - self.n_globals(), n)
        if take > 0:
            pos = self.chunk_positions(n, k.shape[0], k.device)[:, :take]
            gk, gv = k[:, :, :take], v[:, :, :take]
            self.gk = gk.clone() if self.gk is None else torch.cat([self.gk, gk], dim=-2)
            self.gv = gv.clone() if self.gv is None else torch.cat([self.gv, gv], dim=-2)
            self.gpos = pos.clone() if self.gpos is None else torch.cat([self.gpos, pos], dim=-1)
        if not self.active:
            push(self.inner, k[:, :, take:], v[:, :, take:])
            return
        rest_k, rest_v = k[:, :, take:], v[:, :, take:]
        if rest_k.shape[-2] > self.local:  # never store what would be evicted at once
            rest_k, rest_v = rest_k[:, :, -self.local:], rest_v[:, :, -self.local:]
        push(self.inner, rest_k, rest_v)
        h = self.inner.held()
        if h > self.local:
            idx = torch.arange(h - self.local, h, device=k.device).expand(k.shape[0], k.shape[1], self.local)
            select_held(self.inner, idx)

    def clear_tokens(self) -> None:
        self.gk = self.gv = self.gpos = None
        super().clear_tokens()


@register
@dataclass
class LMInfinite(HookedPolicy):
    """Λ-shaped attention (global + local tokens) with relative distances capped (Han et al. 2024)."""

    name = "lminfinite"
    paper = "Han et al. 2024, LM-Infinite: Zero-Shot Extreme Length Generalization for LLMs (arXiv 2308.16137)"

    globals: int = field(default=10, metadata={"help": "first tokens every query attends to (n_global; paper: 10)"})
    local: int = field(default=0, metadata={"help": "recent tokens held (n_local); 0 = the model's trained length"})
    cap: int = field(default=0, metadata={"help": "ceiling on relative distance (d); 0 = the model's trained length"})

    def __post_init__(self) -> None:
        require(self.globals >= 0, f"lminfinite: globals={self.globals} must be >= 0")
        require(self.local >= 0 and self.cap >= 0,
                f"lminfinite: local={self.local} and cap={self.cap} must be >= 0 (0 = the model's trained length)")

    def trained_length(self, info) -> int:
        n = getattr(info.config, "max_position_embeddings", None)
        if not n:
            raise SpecError("lminfinite: this model's config has no max_position_embeddings; give local= and cap=")
        return int(n)

    def validate(self, info) -> None:
        local = self.local or self.trained_length(info)
        require(local >= 1, "lminfinite: local must be >= 1")

    def wrap(self, inner, layer_idx, info):
        local = self.local or self.trained_length(info)
        cap = self.cap or self.trained_length(info)
        return LMInfiniteLayer(inner, layer_idx, info, self.globals, local, cap)

    def attach(self, model, cache) -> list:
        freqs = [m.inv_freq for _, m in model.named_modules()
                 if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        if not freqs:
            raise SpecError("lminfinite: no rotary embedding (inv_freq) found on this model; it needs RoPE")
        if any(f.shape != freqs[0].shape or not torch.equal(f, freqs[0]) for f in freqs[1:]):
            raise SpecError("lminfinite: this model uses several RoPE frequency sets (e.g. Gemma3's local/global "
                            "layers); not supported")
        for layer in cache.layers:
            if isinstance(layer, LMInfiniteLayer):
                layer.inv_freq = freqs[0].detach()
        return install_policy_hooks(model, cache)
