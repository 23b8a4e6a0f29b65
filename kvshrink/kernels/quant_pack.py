"""Triton kernels that quantize new K/V and write bit-packed codes straight into KIVI's storage layout.

One launch per stream replaces :func:`kvshrink.storage.quantize` (min/max, scale, rounding, packing:
several torch ops, each a pass over memory) for the two layouts of ``kivi``
(see ``kvshrink/storage/quantize.py`` and ``docs/ARCHITECTURE.md``):

* keys, ``axis="token"`` (per-channel over groups of ``group`` tokens):
  ``packed (B, H, T//g, D, packed_size(g, bits))``, ``scale/zero (B, H, T//g, D)``;
* values, ``axis="channel"`` (per-token over groups of ``group`` channels):
  ``packed (B, H, T, packed_size(D, bits))``, ``scale/zero (B, H, T, D//g)``.

Same arithmetic as the reference, in the same order (fp32 min/max; zero and scale rounded to the
16-bit scale dtype first; codes from the *stored* scale, ``round-half-even((x - zero) / scale)``,
clamped), so codes are bit-exact except where the reference's division lands on a rounding tie.
Outputs may be views into larger (capacity) buffers: the kernels write through strides, so a decode
step writes its token in place instead of concatenating the whole cache.

Kernel constraints (else callers fall back to the torch reference): asymmetric, bits in {1, 2, 4, 8},
head_dim and group powers of two.
"""
from __future__ import annotations

import torch

from ..storage import QuantizedTensor, packed_size
from ._triton import HAS_TRITON, next_pow2, tl, triton

KERNEL_BITS = (1, 2, 4, 8)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def kernel_supports(bits: int, group: int, head_dim: int, symmetric: bool = False) -> bool:
    """Whether the Triton quantize/attention kernels handle this layout (else use the torch path)."""
    return bool(HAS_TRITON and not symmetric and bits in KERNEL_BITS and _pow2(group) and _pow2(head_dim)
                and 8 <= group <= 256 and head_dim % group == 0)


if HAS_TRITON:

    @triton.jit
    def _round_half_even(y):
        # y >= 0 and far below 2**22 here: adding 1.5 * 2**23 leaves no fraction bits, so the fp32 add
        # rounds to nearest-even exactly as torch.round does; the subtraction is then exact.
        return (y + 12582912.0) - 12582912.0

    @triton.jit
    def _quantize_asym(x, S, HI: tl.constexpr, AXIS: tl.constexpr):
        """``storage.quantize``'s arithmetic over ``AXIS`` of float32 ``x``: fp32 min/max, zero and scale rounded
        to ``S``'s dtype first, codes from the *stored* scale by IEEE division, round-half-even, clamped.
        Returns ``(zero, scale)`` in ``S``'s dtype and int32 codes shaped like ``x``."""
        zero = tl.min(x, axis=AXIS).to(S.dtype.element_ty)
        scale = tl.math.div_rn(tl.max(x, axis=AXIS) - zero.to(tl.float32), HI * 1.0).to(S.dtype.element_ty)
        s = scale.to(tl.float32)
        s = tl.where(s > 0, s, 1.0)
        y = tl.math.div_rn(x - tl.expand_dims(zero.to(tl.float32), AXIS), tl.expand_dims(s, AXIS))
        return zero, scale, tl.minimum(tl.maximum(_round_half_even(y), 0.0), HI * 1.0).to(tl.int32)

    # outputs are views at a new token offset every call: specializing on their alignment would recompile
    # (~1 s) the first time each alignment class shows up, in the middle of generation
    @triton.jit(do_not_specialize=["P", "S", "Z"])
    def _quant_token_kernel(X, sxb, sxh, sxt,  # input (B, H, n, D), last dim contiguous
                            P, spb, sph, spg,  # packed (B, H, G, D, GB), last two dims contiguous
                            S, Z, ssb, ssh, ssg,  # scale/zero (B, H, G, D), last dim contiguous
                            H, D: tl.constexpr, G_TOK: tl.constexpr, BITS: tl.constexpr):
        PPB: tl.constexpr = 8 // BITS  # codes per byte
        GB: tl.constexpr = G_TOK // PPB  # bytes per channel per group
        HI: tl.constexpr = (1 << BITS) - 1
        pid_bh = tl.program_id(0)
        grp = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        t = tl.arange(0, G_TOK)
        d = tl.arange(0, D)
        x = tl.load(X + b * sxb + h * sxh + (grp * G_TOK + t)[:, None] * sxt + d[None, :]).to(tl.float32)
        zero, scale, codes = _quantize_asym(x, S, HI, 0)  # codes (G_TOK, D)
        # token j of the group sits in byte j // PPB at bit BITS * (j % PPB)
        codes = tl.reshape(codes, [GB, PPB, D])
        shifts = (tl.arange(0, PPB) * BITS)[None, :, None]
        packed = tl.sum(codes << shifts, axis=1).to(tl.uint8)  # (GB, D)
        k = tl.arange(0, GB)
        tl.store(P + b * spb + h * sph + grp * spg + d[None, :] * GB + k[:, None], packed)
        off = b * ssb + h * ssh + grp * ssg + d
        tl.store(S + off, scale)
        tl.store(Z + off, zero)

    @triton.jit(do_not_specialize=["P", "S", "Z", "n"])
    def _quant_channel_kernel(X, sxb, sxh, sxt,  # input (B, H, n, D)
                              P, spb, sph, spt,  # packed (B, H, n, DP)
                              S, Z, ssb, ssh, sst,  # scale/zero (B, H, n, D // G_CH)
                              H, n, D: tl.constexpr, G_CH: tl.constexpr, BITS: tl.constexpr,
                              BLOCK_T: tl.constexpr):
        PPB: tl.constexpr = 8 // BITS
        DP: tl.constexpr = D // PPB
        NG: tl.constexpr = D // G_CH
        HI: tl.constexpr = (1 << BITS) - 1
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < n
        d = tl.arange(0, D)
        x = tl.load(X + b * sxb + h * sxh + t[:, None] * sxt + d[None, :], mask=tmask[:, None], other=0.0)
        xg = tl.reshape(x.to(tl.float32), [BLOCK_T, NG, G_CH])
        zero, scale, codes = _quantize_asym(xg, S, HI, 2)
        codes = tl.reshape(codes, [BLOCK_T, DP, PPB])  # channel c sits in byte c // PPB at bit BITS*(c % PPB)
        shifts = (tl.arange(0, PPB) * BITS)[None, None, :]
        packed = tl.sum(codes << shifts, axis=2).to(tl.uint8)  # (BLOCK_T, DP)
        k = tl.arange(0, DP)
        tl.store(P + b * spb + h * sph + t[:, None] * spt + k[None, :], packed, mask=tmask[:, None])
        g = tl.arange(0, NG)
        off = b * ssb + h * ssh + t[:, None] * sst + g[None, :]
        tl.store(S + off, scale, mask=tmask[:, None])
        tl.store(Z + off, zero, mask=tmask[:, None])


def _check_out(t: torch.Tensor, shape: tuple, dtype: torch.dtype, what: str, contiguous_tail: int) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{what}: expected {dtype} of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    expect = 1
    for dim in range(t.dim() - 1, t.dim() - 1 - contiguous_tail, -1):
        if t.shape[dim] > 1 and t.stride(dim) != expect:
            raise ValueError(f"{what}: its last {contiguous_tail} dims must be contiguous (a view along dims 0-2 is fine)")
        expect *= t.shape[dim]


def quantize_pack(x: torch.Tensor, bits: int, axis: str, group: int,
                  scale_dtype: torch.dtype = torch.float16,
                  out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """Asymmetric quantization of ``x`` (B, H, n, D) into KIVI's packed layout, by a Triton kernel.

    Same result as ``kvshrink.storage.quantize(x, bits, axis, group, symmetric=False, scale_dtype)``.
    ``out = (packed, scale, zero)``, if given, are written in place (views into capacity buffers).
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_pack needs Triton; use kvshrink.storage.quantize on this machine")
    B, H, n, D = x.shape
    if not kernel_supports(bits, group, D):
        raise ValueError(f"quantize_pack handles asymmetric {KERNEL_BITS}-bit codes with power-of-two group and "
                         f"head_dim (group dividing head_dim), got bits={bits}, group={group}, head_dim={D}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if axis == "token":
        if n % group:
            raise ValueError(f"keys are quantized in whole groups: {n} tokens is not a multiple of group={group}")
        G = n // group
        shapes = ((B, H, G, D, packed_size(group, bits)), (B, H, G, D))
    elif axis == "channel":
        shapes = ((B, H, n, packed_size(D, bits)), (B, H, n, D // group))
    else:
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    if out is None:
        packed = torch.empty(shapes[0], dtype=torch.uint8, device=x.device)
        scale = torch.empty(shapes[1], dtype=scale_dtype, device=x.device)
        zero = torch.empty(shapes[1], dtype=scale_dtype, device=x.device)
    else:
        packed, scale, zero = out
        _check_out(packed, shapes[0], torch.uint8, "packed", 2 if axis == "token" else 1)
        _check_out(scale, shapes[1], scale_dtype, "scale", 1)
        _check_out(zero, shapes[1], scale_dtype, "zero", 1)
        if scale.stride() != zero.stride():
            raise ValueError("scale and zero must have the same strides")
    if n and B * H:
        if axis == "token":
            _quant_token_kernel[(B * H, n // group)](
                x, x.stride(0), x.stride(1), x.stride(2),
                packed, packed.stride(0), packed.stride(1), packed.stride(2),
                scale, zero, scale.stride(0), scale.stride(1), scale.stride(2),
                H, D=D, G_TOK=group, BITS=bits, num_warps=4)
        else:
            block_t = max(1, min(next_pow2(n), max(1, 4096 // D)))
            _quant_channel_kernel[(B * H, triton.cdiv(n, block_t))](
                x, x.stride(0), x.stride(1), x.stride(2),
                packed, packed.stride(0), packed.stride(1), packed.stride(2),
                scale, zero, scale.stride(0), scale.stride(1), scale.stride(2),
                H, n, D=D, G_CH=group, BITS=bits, BLOCK_T=block_t, num_warps=4)
    return QuantizedTensor(packed, scale, zero, bits, axis, group, n, D, x.dtype)  # type: ignore[arg-type]
