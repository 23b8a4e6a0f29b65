"""What the kernels read, and the torch references they are tested against.

:class:`PackedKV` is one layer's KIVI cache as the decode kernel sees it, for ``T`` tokens:

* keys ``[0, Tkq)`` quantized per channel over token groups (``kq``, ``axis="token"``), keys
  ``[Tkq, T)`` in full precision (``k_res``);
* values ``[0, Tvq)`` quantized per token (``vq``, ``axis="channel"``), values ``[Tvq, T)`` in full
  precision (``v_res``). KIVI's two streams flush at different times, so ``Tkq != Tvq`` in general.

The quantize reference is :func:`kvshrink.storage.quantize` itself; the attention reference
dequantizes with :meth:`QuantizedTensor.dequantize` and runs plain attention in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..storage import QuantizedTensor, dequantize_codes


@dataclass
class PackedKV:
    """One layer's packed KIVI cache (see module docstring); tensors may be views into larger buffers."""

    kq: QuantizedTensor | None
    k_res: torch.Tensor | None
    vq: QuantizedTensor | None
    v_res: torch.Tensor | None

    @property
    def tkq(self) -> int:
        return 0 if self.kq is None else self.kq.tokens

    @property
    def tvq(self) -> int:
        return 0 if self.vq is None else self.vq.tokens

    @property
    def tokens(self) -> int:
        return self.tkq + (0 if self.k_res is None else self.k_res.shape[-2])

    def __post_init__(self) -> None:
        tv = self.tvq + (0 if self.v_res is None else self.v_res.shape[-2])
        if self.tokens != tv:
            raise ValueError(f"keys cover {self.tokens} tokens but values cover {tv}")
        if self.kq is not None and (self.kq.axis != "token" or self.kq.zero is None):
            raise ValueError("PackedKV keys must be asymmetric, quantized along tokens (KIVI's per-channel keys)")
        if self.vq is not None and (self.vq.axis != "channel" or self.vq.zero is None):
            raise ValueError("PackedKV values must be asymmetric, quantized along channels (KIVI's per-token values)")

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``T`` tokens' keys and values, dequantized, as ``dtype``."""
        ks = [t for t in (_deq(self.kq, dtype), self.k_res) if t is not None]
        vs = [t for t in (_deq(self.vq, dtype), self.v_res) if t is not None]
        return torch.cat([k.to(dtype) for k in ks], -2), torch.cat([v.to(dtype) for v in vs], -2)

    def nbytes(self) -> int:
        """Bytes the decode kernel reads: codes, scales, zeros and residuals of these tokens."""
        n = 0
        for q in (self.kq, self.vq):
            if q is not None:
                n += sum(t.numel() * t.element_size() for t in q.tensors())
        for r in (self.k_res, self.v_res):
            if r is not None:
                n += r.numel() * r.element_size()
        return n


def _deq(q: QuantizedTensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Codes * scale + zero computed in float32 and cast once to ``dtype`` (no detour through the dtype the
    codes were quantized from: a layer may quantize from 16-bit values yet serve a float32 model)."""
    if q is None:
        return None
    if q.slots is not None:  # groups formed in another channel order: the tensor's own reader
        return q.dequantize(dtype)
    return dequantize_codes(q.codes(), q.scale, q.zero, q.bits, q.axis, q.group, dtype)


def decode_attention_ref(q: torch.Tensor, kv: PackedKV, mask: torch.Tensor | None = None,
                         scale: float | None = None) -> torch.Tensor:
    """Reference decode attention in float32: ``q (B, Hq, D)`` over the ``T`` cached tokens.

    ``mask (B, T)`` bool, True where a token may be attended (padding is False). GQA: query head
    ``i`` reads KV head ``i // (Hq // Hkv)``. Returns float32 ``(B, Hq, D)``; a row with no token to
    attend gives zeros (the kernel's convention too).
    """
    B, Hq, D = q.shape
    k, v = kv.dense(torch.float32)
    Hkv = k.shape[1]
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k) * (D ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bht,bhtd->bhd", p, v)


def chunk_attention_ref(q: torch.Tensor, kv: PackedKV, mask: torch.Tensor | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """Reference chunked prefill in float32: ``q (B, Hq, C, D)`` are the queries of the last ``C`` of the ``T``
    cached tokens; query ``c`` attends to tokens ``[0, T - C + c]`` where ``mask (B, T)`` allows. Returns float32
    ``(B, Hq, C, D)``; a row with no token to attend gives zeros."""
    B, Hq, C, D = q.shape
    k, v = kv.dense(torch.float32)
    T, rep = k.shape[2], Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.einsum("bhcd,bhtd->bhct", q.float(), k) * (D ** -0.5 if scale is None else scale)
    causal = torch.arange(T, device=q.device)[None, :] <= (T - C + torch.arange(C, device=q.device))[:, None]
    allowed = causal[None, None] if mask is None else causal[None, None] & mask.bool()[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhct,bhtd->bhcd", p, v)
