"""Triton kernels that move 2-bit codes from KIVI's packed layout into the fragment order of :mod:`.frag`.

The graph layer's prefill in layout ``"frag"`` quantizes with :func:`.quant_pack.quantize_pack` (the same codes,
scales and zeros as layout ``"kivi"``) and then reorders the codes here: a pure bit permutation, one pass over the
packed bytes, where the torch reorder (:func:`.frag.pack_keys`) takes int64 temporaries 32x the codes' size.
Reference: :func:`.frag.pack_keys` / :func:`.frag.pack_values` on the unpacked codes (tests compare bit for bit).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    @triton.jit
    def _repack_keys_kernel(SRC, ss_b, ss_h, ss_g, DST, sd_b, sd_h, H, KG: tl.constexpr, D: tl.constexpr):
        """One 16-token key tile per program: word ``w`` of lane ``4g + q`` gathers its 16 codes (t8, c0, c3, c4)
        from KIVI's bytes (channel ``c``, token ``t`` of group ``t // KG``: byte ``(t % KG) // 4``, slot
        ``t % 4``)."""
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        b = pid // H
        h = pid % H
        KW: tl.constexpr = D // 32
        wi = tl.arange(0, 32 * KW)[:, None]  # flat (lane, word)
        j = tl.arange(0, 16)[None, :]         # field bits: c0 (half), then c3, c4, t8
        lane = wi // KW
        g = lane // 4
        q = lane % 4
        c0 = j // 8
        c3 = j % 2
        c4 = (j // 2) % 2
        t8 = (j // 4) % 2
        t = tile * 16 + 8 * t8 + g
        c = 32 * (wi % KW) + 16 * c4 + 8 * c3 + 2 * q + c0
        byte = tl.load(SRC + b * ss_b + h * ss_h + (t // KG) * ss_g + c * (KG // 4) + (t % KG) // 4)
        code = (byte.to(tl.int32) >> (2 * (t % 4))) & 3
        word = tl.sum(code << (16 * c0 + 2 * (c3 + 2 * c4 + 4 * t8)), axis=1)
        tl.store(DST + b * sd_b + h * sd_h + tile * (32 * KW) + tl.arange(0, 32 * KW), word)

    @triton.jit
    def _repack_values_kernel(SRC, ss_b, ss_h, ss_t, DST, sd_b, sd_h, H, N, D: tl.constexpr):
        """One 32-token value tile per program: word ``w`` of lane ``4g + q`` gathers its 16 codes (t0, t3, t4,
        c3) from KIVI's bytes (token ``t``: byte ``c // 4``, slot ``c % 4``); tokens at or past ``N`` give 0."""
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        b = pid // H
        h = pid % H
        VW: tl.constexpr = D // 16
        wi = tl.arange(0, 32 * VW)[:, None]
        j = tl.arange(0, 16)[None, :]         # field bits: t0 (half), then t3, t4, c3
        lane = wi // VW
        g = lane // 4
        q = lane % 4
        t0 = j // 8
        t3 = j % 2
        t4 = (j // 2) % 2
        c3 = (j // 4) % 2
        t = tile * 32 + 16 * t4 + 8 * t3 + 2 * q + t0
        c = 16 * (wi % VW) + 8 * c3 + g
        live = t < N
        byte = tl.load(SRC + b * ss_b + h * ss_h + t * ss_t + c // 4, mask=live, other=0)
        code = (byte.to(tl.int32) >> (2 * (c % 4))) & 3
        word = tl.sum(code << (16 * t0 + 2 * (t3 + 2 * t4 + 4 * c3)), axis=1)
        tl.store(DST + b * sd_b + h * sd_h + tile * (32 * VW) + tl.arange(0, 32 * VW), word)


def repack_keys(packed: torch.Tensor, group: int, out: torch.Tensor) -> torch.Tensor:
    """KIVI's 2-bit key bytes ``(B, H, T/group, D, group/4)`` -> fragment words ``out (B, H, T/16, 32, D/32)``
    (may be a view into a capacity buffer; its last three dims contiguous)."""
    B, H, G, D, _ = packed.shape
    if packed.stride(-1) != 1 or packed.stride(-2) != group // 4:
        raise ValueError("repack_keys needs KIVI key bytes with contiguous (channel, byte) dims")
    _repack_keys_kernel[(B * H, G * group // 16)](packed, packed.stride(0), packed.stride(1), packed.stride(2),
                                                  out, out.stride(0), out.stride(1), H, KG=group, D=D, num_warps=4)
    return out


def repack_values(packed: torch.Tensor, tokens: int, out: torch.Tensor) -> torch.Tensor:
    """KIVI's 2-bit value bytes ``(B, H, >= tokens, D/4)`` -> fragment words ``out (B, H, ceil(tokens/32), 32,
    D/16)``; codes of the last tile past ``tokens`` are 0 (decode steps OR theirs in)."""
    B, H, _, Dp = packed.shape
    if packed.stride(-1) != 1:
        raise ValueError("repack_values needs KIVI value bytes with a contiguous last dim")
    _repack_values_kernel[(B * H, -(-tokens // 32))](packed, packed.stride(0), packed.stride(1), packed.stride(2),
                                                     out, out.stride(0), out.stride(1), H, tokens, D=4 * Dp,
                                                     num_warps=4)
    return out
