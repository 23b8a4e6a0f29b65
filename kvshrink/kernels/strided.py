"""The kernel layer's "channel-strided" packed layout, its torch reference, and its quantize kernel.

KIVI's storage layout (``kvshrink/storage``) packs key codes along *tokens* (four consecutive tokens of
one channel per byte, at 2 bits) and value codes along *consecutive channels*. The decode kernel's matrix
products reduce over channels (scores) and over tokens (output), and unpacking either layout into the
operand tiles of ``tl.dot`` needs the codes moved between threads. The kernel layer therefore stores
the same bytes in another order, for keys and values alike:

* every token's ``D`` codes are packed along its channels, ``D // PPB`` bytes (``PPB = 8 // bits``),
  and byte ``b`` holds channels ``b, b + D/PPB, b + 2D/PPB, ...`` in bit slots ``0, 1, 2, ...``.
  Slot ``j`` of a (tokens x bytes) tile is thus the contiguous channel slice ``[j*D/PPB, (j+1)*D/PPB)``
  of those tokens: one shift + mask per code gives a ready ``tl.dot`` operand, no reordering.
* scales/zeros are unchanged: keys ``(B, H, T // group, D)`` (per channel over token groups),
  values ``(B, H, T, D // group)`` (per token over channel groups).

Packed shapes: keys and values both ``(B, H, T, D // PPB)``; bytes per token are KIVI's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..storage import QuantizedTensor, quantize
from ._triton import HAS_TRITON, next_pow2, tl, triton

#: widths of the strided layout (one byte holds a whole number of codes)
STRIDED_BITS = (2, 4, 8)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def strided_supported(bits: int, group: int, axis: str, head_dim: int, symmetric: bool = False) -> bool:
    """Whether a stream can use the strided layout with the strided decode kernel.

    Values (per-token groups of channels) need each slot's channel slice inside one scale group, so that
    the scale folds into the attention weights: ``group >= head_dim // PPB``.
    """
    if symmetric or bits not in STRIDED_BITS or not (_pow2(group) and _pow2(head_dim)) or head_dim < 16:
        return False
    dp = head_dim * bits // 8
    if dp < 16:  # tl.dot needs >= 16 along the reduction dim
        return False
    if axis == "token":
        return 16 <= group <= 256
    return group <= head_dim and head_dim % group == 0 and group >= dp


def pack_strided(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) uint8 codes -> (..., D // PPB) bytes, byte ``b`` slot ``j`` = channel ``b + j * D/PPB``."""
    ppb = 8 // bits
    *lead, d = codes.shape
    c = codes.to(torch.int32).reshape(*lead, ppb, d // ppb)
    shifts = (torch.arange(ppb, device=codes.device, dtype=torch.int32) * bits).view(ppb, 1)
    return (c << shifts).sum(-2).to(torch.uint8)


def unpack_strided(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_strided`: (..., D // PPB) -> (..., D) uint8 codes."""
    ppb = 8 // bits
    shifts = (torch.arange(ppb, device=packed.device, dtype=torch.int32) * bits).view(ppb, 1)
    c = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & ((1 << bits) - 1)  # (..., PPB, DP)
    return c.flatten(-2).to(torch.uint8)


@dataclass
class StridedQuantizedTensor(QuantizedTensor):
    """A :class:`QuantizedTensor` whose ``packed`` is the strided layout ``(B, H, T, D // PPB)`` (both axes).

    ``codes()`` returns what the base class returns for the same ``axis`` (so ``dequantize`` — the torch
    reference — is the base class's), ``cat``/``map`` work along dim 2 as before.
    """

    def codes(self) -> torch.Tensor:
        c = unpack_strided(self.packed, self.bits)  # (B, H, T, D), natural channel order
        if self.axis == "channel":
            return c
        B, H, T, D = c.shape
        return c.reshape(B, H, T // self.group, self.group, D).transpose(-1, -2)  # (B, H, G, D, g)

    @classmethod
    def from_kivi(cls, q: QuantizedTensor) -> "StridedQuantizedTensor":
        """Repack a storage-layout tensor (same scales, same codes)."""
        if q.slots is not None:
            raise ValueError("the strided layout has no channel-order slots (a RotateKV key tensor?)")
        c = q.codes()
        if q.axis == "token":
            B, H, G, D, g = c.shape
            c = c.transpose(-1, -2).reshape(B, H, G * g, D)
        return cls(pack_strided(c, q.bits), q.scale, q.zero, q.bits, q.axis, q.group, q.tokens, q.head_dim, q.dtype)


def quantize_strided_ref(x: torch.Tensor, bits: int, axis: str, group: int,
                         scale_dtype: torch.dtype = torch.float16) -> StridedQuantizedTensor:
    """Torch reference of :func:`quantize_pack_strided`: storage's quantizer, codes repacked."""
    return StridedQuantizedTensor.from_kivi(quantize(x, bits, axis, group, False, scale_dtype))  # type: ignore[arg-type]


if HAS_TRITON:
    from .quant_pack import _quantize_asym

    @triton.jit
    def _pack_slots(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
        # channel c = j * DP + b -> byte b, bit slot j
        PPB: tl.constexpr = 8 // BITS
        DP: tl.constexpr = D // PPB
        c3 = tl.reshape(codes, [ROWS, PPB, DP])
        shifts = (tl.arange(0, PPB) * BITS)[None, :, None]
        return tl.sum(c3 << shifts, axis=1).to(tl.uint8)  # (ROWS, DP)

    @triton.jit(do_not_specialize=["P", "S", "Z"])
    def _quant_token_strided(X, sxb, sxh, sxt, P, spb, sph, spt, S, Z, ssb, ssh, ssg,
                             H, D: tl.constexpr, G_TOK: tl.constexpr, BITS: tl.constexpr):
        """Keys: one program per (b, h, token group); per-channel min/max over the group's tokens."""
        HI: tl.constexpr = (1 << BITS) - 1
        DP: tl.constexpr = D * BITS // 8
        pid_bh = tl.program_id(0)
        grp = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        t = tl.arange(0, G_TOK)
        d = tl.arange(0, D)
        x = tl.load(X + b * sxb + h * sxh + (grp * G_TOK + t)[:, None] * sxt + d[None, :]).to(tl.float32)
        zero, scale, codes = _quantize_asym(x, S, HI, 0)
        packed = _pack_slots(codes, G_TOK, D, BITS)
        k = tl.arange(0, DP)
        tl.store(P + b * spb + h * sph + (grp * G_TOK + t)[:, None] * spt + k[None, :], packed)
        off = b * ssb + h * ssh + grp * ssg + d
        tl.store(S + off, scale)
        tl.store(Z + off, zero)

    @triton.jit(do_not_specialize=["P", "S", "Z", "n"])
    def _quant_channel_strided(X, sxb, sxh, sxt, P, spb, sph, spt, S, Z, ssb, ssh, sst,
                               H, n, D: tl.constexpr, G_CH: tl.constexpr, BITS: tl.constexpr,
                               BLOCK_T: tl.constexpr):
        """Values: per-token groups of ``G_CH`` channels."""
        HI: tl.constexpr = (1 << BITS) - 1
        NG: tl.constexpr = D // G_CH
        DP: tl.constexpr = D * BITS // 8
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < n
        d = tl.arange(0, D)
        x = tl.load(X + b * sxb + h * sxh + t[:, None] * sxt + d[None, :], mask=tmask[:, None], other=0.0)
        xg = tl.reshape(x.to(tl.float32), [BLOCK_T, NG, G_CH])
        zero, scale, codes = _quantize_asym(xg, S, HI, 2)
        codes = tl.reshape(codes, [BLOCK_T, D])
        packed = _pack_slots(codes, BLOCK_T, D, BITS)
        k = tl.arange(0, DP)
        tl.store(P + b * spb + h * sph + t[:, None] * spt + k[None, :], packed, mask=tmask[:, None])
        g = tl.arange(0, NG)
        off = b * ssb + h * ssh + t[:, None] * sst + g[None, :]
        tl.store(S + off, scale, mask=tmask[:, None])
        tl.store(Z + off, zero, mask=tmask[:, None])


def quantize_pack_strided(x: torch.Tensor, bits: int, axis: str, group: int,
                          scale_dtype: torch.dtype = torch.float16,
                          out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> StridedQuantizedTensor:
    """Asymmetric quantization of ``x (B, H, n, D)`` into the strided layout (Triton).

    Same scales, zeros and codes as ``kvshrink.storage.quantize`` (up to rounding ties), packed as
    :func:`pack_strided`. ``out = (packed, scale, zero)`` are written in place (views into buffers).
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_pack_strided needs Triton; use quantize_strided_ref on this machine")
    B, H, n, D = x.shape
    if not strided_supported(bits, group, axis, D):
        raise ValueError(f"strided layout does not handle bits={bits}, axis={axis}, group={group}, head_dim={D}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    dp = D * bits // 8
    if axis == "token":
        if n % group:
            raise ValueError(f"keys are quantized in whole groups: {n} tokens is not a multiple of group={group}")
        sshape = (B, H, n // group, D)
    else:
        sshape = (B, H, n, D // group)
    if out is None:
        packed = torch.empty(B, H, n, dp, dtype=torch.uint8, device=x.device)
        scale = torch.empty(sshape, dtype=scale_dtype, device=x.device)
        zero = torch.empty(sshape, dtype=scale_dtype, device=x.device)
    else:
        packed, scale, zero = out
        if tuple(packed.shape) != (B, H, n, dp) or tuple(scale.shape) != sshape or scale.stride() != zero.stride():
            raise ValueError("out tensors do not match the strided layout's shapes")
        if packed.stride(-1) != 1 or scale.stride(-1) != 1:
            raise ValueError("out tensors need a contiguous last dim")
    if n and B * H:
        if axis == "token":
            _quant_token_strided[(B * H, n // group)](
                x, x.stride(0), x.stride(1), x.stride(2), packed, packed.stride(0), packed.stride(1), packed.stride(2),
                scale, zero, scale.stride(0), scale.stride(1), scale.stride(2), H, D=D, G_TOK=group, BITS=bits,
                num_warps=4)
        else:
            block_t = max(1, min(next_pow2(n), max(1, 4096 // D)))
            _quant_channel_strided[(B * H, triton.cdiv(n, block_t))](
                x, x.stride(0), x.stride(1), x.stride(2), packed, packed.stride(0), packed.stride(1), packed.stride(2),
                scale, zero, scale.stride(0), scale.stride(1), scale.stride(2), H, n, D=D, G_CH=group, BITS=bits,
                BLOCK_T=block_t, num_warps=4)
    return StridedQuantizedTensor(packed, scale, zero, bits, axis, group, n, D, x.dtype)  # type: ignore[arg-type]


__all__ = ["STRIDED_BITS", "strided_supported", "pack_strided", "unpack_strided", "StridedQuantizedTensor",
           "quantize_strided_ref", "quantize_pack_strided"]
