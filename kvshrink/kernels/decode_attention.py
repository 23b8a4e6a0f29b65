"""Decode attention that reads KIVI's packed cache directly (flash-decoding, Triton).

One query token per sequence attends to ``T`` cached tokens (see :class:`~.reference.PackedKV`).
Grid ``(B * Hkv, splits)``: each program takes one KV head and *all* its query heads (GQA: the packed
bytes are read and unpacked once per KV head, not once per query head) over one slice of the tokens,
runs the online softmax over blocks of ``BLOCK_N`` tokens, and writes its partial (max, sum, output);
a second small kernel merges the splits. Splits make enough programs to fill the GPU when ``B * Hkv``
is small (decode at batch 1 has only 8 KV heads to spread over 132 SMs).

Dequantization happens in registers, never in device memory: a key is
``code * scale[group, channel] + zero[group, channel]``, a value ``code * scale[token, group] + zero``.
Codes become floats by the exponent trick (``bitcast(code | 0x4B000000) - 2**23``), which costs integer
and float ALU slots instead of the GPU's much scarcer int->float conversion units.

Tokens past the quantized part of each stream come from its full-precision residual; ``mask (B, T)``
(True = attend) handles padding.
"""
from __future__ import annotations

import functools
import math

import torch

from ..storage import QuantizedTensor
from ._triton import HAS_TRITON, INTERPRET, dot_in_f32, next_pow2, tl, triton
from .quant_pack import kernel_supports
from .reference import PackedKV

#: code widths the decode kernel reads (1-bit would need eight per-slot accumulators)
DECODE_BITS = (2, 4, 8)


def _unpack_ptx(bits: int, shift: int) -> str:
    """PTX for :func:`_codes_to_half_asm`: two codes per register (``$1``: the bytes of two elements in its 16-bit
    lanes, :data:`_SPREAD_PTX`) -> the codes at bit ``shift`` as exact fp16 in ``$0``: one shift, one ``lop3``
    ((x & mask) | 0x6400, i.e. 1024 + code) and one ``sub.f16x2``, two codes per instruction, where Triton's int16
    elementwise code shifts each code on its own and packs the pairs afterwards."""
    mask = ((1 << bits) - 1) * 0x00010001
    shr = f"shr.b32 t, $1, {shift}; " if shift else "mov.b32 t, $1; "
    return ("{ .reg .b32 t, k; mov.b32 k, 0x64006400; " + shr +
            f"lop3.b32 t, t, {mask:#x}, k, 0xea; sub.rn.f16x2 $0, t, k; }}")


#: four packed bytes (``$2``) spread over the 16-bit lanes of two registers (``$0``: bytes 0, 1; ``$1``: 2, 3), what
#: ``.to(tl.int16)`` means, two byte permutes for four elements
_SPREAD_PTX = ("{ .reg .b32 z; mov.b32 z, 0; prmt.b32 $0, $2, z, 0x4140; prmt.b32 $1, $2, z, 0x4342; }")


if HAS_TRITON:
    # one constant per (bits, shift): inline asm takes a compile-time string
    _U2_0, _U2_2, _U2_4, _U2_6 = (tl.constexpr(_unpack_ptx(2, s)) for s in (0, 2, 4, 6))
    _U4_0, _U4_4 = (tl.constexpr(_unpack_ptx(4, s)) for s in (0, 4))
    _U8_0 = tl.constexpr(_unpack_ptx(8, 0))
    _SPREAD = tl.constexpr(_SPREAD_PTX)

    @triton.jit
    def _spread_bytes(bytes8):
        """uint8 tile -> int16 tile (zero-extended) by byte permutes (:data:`_SPREAD_PTX`). Compiled GPUs only."""
        return tl.inline_asm_elementwise(_SPREAD, "=r,=r,r", [bytes8], dtype=tl.int16, is_pure=True, pack=4)

    @triton.jit
    def _codes_to_half_asm(bytes16, shift: tl.constexpr, MASK: tl.constexpr):
        """:func:`_codes_to_half` by inline PTX, two codes per instruction (see :func:`_unpack_ptx`); ``bytes16``
        from :func:`_spread_bytes`. Compiled GPUs only: Triton's interpreter runs no PTX (``ASM=False`` there)."""
        if MASK == 3:
            if shift == 0:
                ptx: tl.constexpr = _U2_0
            elif shift == 2:
                ptx: tl.constexpr = _U2_2
            elif shift == 4:
                ptx: tl.constexpr = _U2_4
            else:
                ptx: tl.constexpr = _U2_6
        elif MASK == 15:
            if shift == 0:
                ptx: tl.constexpr = _U4_0
            else:
                ptx: tl.constexpr = _U4_4
        else:
            ptx: tl.constexpr = _U8_0
        return tl.inline_asm_elementwise(ptx, "=r,r", [bytes16], dtype=tl.float16, is_pure=True, pack=2)

    @triton.jit
    def _codes_to_float(codes):
        # int32 codes in [0, 2**23) -> exact fp32 without an int->float conversion instruction
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _codes_to_half(bytes16, shift: tl.constexpr, MASK: tl.constexpr):
        # one code of each byte (int16 lanes) -> exact fp16: 0x6400 is 1024.0, so the bits read 1024 + code
        return (((bytes16 >> shift) & MASK) | 0x6400).to(tl.float16, bitcast=True) - 1024.0

    @triton.jit
    def _deq(bytes16, shift: tl.constexpr, MASK: tl.constexpr, sc, ze, DOT_F32: tl.constexpr,
             ASM: tl.constexpr = False):
        """code * scale + zero: in fp16 for the matrix units, in fp32 when the model runs in fp32. ``ASM``: codes
        unpacked by inline PTX (:func:`_codes_to_half_asm`)."""
        if DOT_F32:
            return _codes_to_float(((bytes16 >> shift) & MASK).to(tl.int32)) * sc.to(tl.float32) + ze.to(tl.float32)
        elif ASM:
            return _codes_to_half_asm(bytes16, shift, MASK) * sc + ze
        else:
            return _codes_to_half(bytes16, shift, MASK) * sc + ze

    @triton.jit
    def _rescale(m_i, l_i, s, ok):
        """Online-softmax bookkeeping for one block of scores (log2 units); rows with nothing seen keep -inf."""
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        return m_new, l_i, p, alpha

    @triton.jit
    def _rescale_t(m_i, l_i, sT):
        """:func:`_rescale` for scores laid out (tokens, rows), already masked with -inf."""
        m_new = tl.maximum(m_i, tl.max(sT, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pT = tl.exp2(sT - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(pT, axis=0)
        return m_new, l_i, pT, alpha

    @triton.jit
    def _pv(p, v, DOT_F32: tl.constexpr):
        if DOT_F32:
            return tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(p.to(tl.float16), v.to(tl.float16))

    @triton.jit
    def _qk(qd, kb, shift: tl.constexpr, KMASK: tl.constexpr, ksc, kze, DOT_F32: tl.constexpr, t, hi, mask_row,
            HAS_MASK: tl.constexpr, ASM: tl.constexpr = False):
        """Scores (log2 units) of one code slot of a key block: tokens ``t``; -inf where not attended."""
        k = _deq(kb, shift, KMASK, ksc, kze, DOT_F32, ASM)  # (D, KNB)
        if DOT_F32:
            s = tl.dot(qd, k, input_precision="ieee")
        else:
            s = tl.dot(qd, k)
        ok = t < hi
        if HAS_MASK:
            ok = ok & (tl.load(mask_row + t) != 0)
        return tl.where(ok[None, :], s, float("-inf"))

    @triton.jit
    def _split_range(split, LENS, T, TKQ, TVQ, FAST_END, tokens_per_split, TAIL_CHUNK, num_splits, MAIN_SPLITS,
                     BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, HAS_LENS: tl.constexpr):
        """This program's tokens ``[lo, hi)`` and the lengths ``(T, TKQ, TVQ, FAST_END)``: as the host planned
        them (:func:`plan_splits`), or in graph mode derived the same way from ``LENS`` on the device (fixed
        split count). Splits ``[0, MAIN_SPLITS)`` share the whole quantized blocks ``[0, FAST_END)`` evenly;
        the rest take the tail (residuals, partial blocks) in chunks of ``TAIL_CHUNK`` tokens, so that the
        slower general loop is spread over several programs instead of lengthening the last split."""
        if HAS_LENS:
            T = tl.load(LENS)
            TKQ = tl.load(LENS + 1)
            TVQ = tl.load(LENS + 2)
            FAST_END = (tl.minimum(TKQ, TVQ) // BLOCK_N) * BLOCK_N
            tokens_per_split = tl.cdiv(tl.cdiv(FAST_END, MAIN_SPLITS), BLOCK_N) * BLOCK_N
            TAIL_CHUNK = tl.cdiv(tl.cdiv(tl.maximum(T - FAST_END, 1), num_splits - MAIN_SPLITS), TAIL_N) * TAIL_N
        if split < MAIN_SPLITS:
            lo = split * tokens_per_split
            hi = tl.minimum(lo + tokens_per_split, FAST_END)
        else:
            lo = FAST_END + (split - MAIN_SPLITS) * TAIL_CHUNK
            hi = tl.minimum(lo + TAIL_CHUNK, T)
        return lo, hi, T, TKQ, TVQ, FAST_END

    @triton.jit
    def _store_partials(M_OUT, L_OUT, ACC_OUT, o, rows, m_i, l_i, acc0, acc1, acc2, acc3, cb, D: tl.constexpr,
                        VPPB: tl.constexpr):
        """A split's partial result for its query rows (slot offsets ``o``): running max, sum, and the value
        accumulators, kept per code slot (``acc<j>[:, cb]`` is channel ``cb * VPPB + j``) and interleaved here."""
        tl.store(M_OUT + o, m_i, mask=rows)
        tl.store(L_OUT + o, l_i, mask=rows)
        optr = ACC_OUT + o[:, None] * D + (cb * VPPB)[None, :]
        tl.store(optr, acc0, mask=rows[:, None])
        if VPPB > 1:
            tl.store(optr + 1, acc1, mask=rows[:, None])
        if VPPB > 2:
            tl.store(optr + 2, acc2, mask=rows[:, None])
            tl.store(optr + 3, acc3, mask=rows[:, None])

    @triton.jit
    def _pv_slot(p, vp_base, svp_t, VS, VZ, vs_off, svs_t, t, cb, acc0, acc1, acc2, acc3, D: tl.constexpr,
                 VBITS: tl.constexpr, VG: tl.constexpr, DOT_F32: tl.constexpr, ASM: tl.constexpr = False):
        """acc<j> += p @ (values of tokens ``t``, channels cb * VPPB + j), unpacked from packed bytes."""
        VPPB: tl.constexpr = 8 // VBITS
        VMASK: tl.constexpr = (1 << VBITS) - 1
        vb = tl.load(vp_base + t[:, None] * svp_t + cb[None, :])  # (tokens, VDP)
        vb = _spread_bytes(vb) if ASM else vb.to(tl.int16)
        if VG == D:
            vsc = tl.load(VS + vs_off + t * svs_t)[:, None]
            vze = tl.load(VZ + vs_off + t * svs_t)[:, None]
        else:
            voff = vs_off + t[:, None] * svs_t + ((cb * VPPB) // VG)[None, :]
            vsc = tl.load(VS + voff)
            vze = tl.load(VZ + voff)
        if not DOT_F32:
            vsc = vsc.to(tl.float16)
            vze = vze.to(tl.float16)
        acc0 += _pv(p, _deq(vb, 0, VMASK, vsc, vze, DOT_F32, ASM), DOT_F32)
        if VPPB > 1:
            acc1 += _pv(p, _deq(vb, VBITS, VMASK, vsc, vze, DOT_F32, ASM), DOT_F32)
        if VPPB > 2:
            acc2 += _pv(p, _deq(vb, 2 * VBITS, VMASK, vsc, vze, DOT_F32, ASM), DOT_F32)
            acc3 += _pv(p, _deq(vb, 3 * VBITS, VMASK, vsc, vze, DOT_F32, ASM), DOT_F32)
        return acc0, acc1, acc2, acc3

    # T and friends change every decode step: specializing on their divisibility would recompile mid-generation
    @triton.jit(do_not_specialize=["T", "TKQ", "TVQ", "tokens_per_split", "num_splits", "smask_b", "FAST_END",
                                   "MAIN_SPLITS", "TAIL_CHUNK"])
    def _decode_split_kernel(
            Q, sqb, sqh,  # (B, Hq, D)
            KP, skp_b, skp_h, skp_g,  # key codes (B, H, Gk, D, KGB)
            KS, KZ, sks_b, sks_h, sks_g,  # key scale/zero (B, H, Gk, D)
            KR, skr_b, skr_h, skr_t,  # key residual (B, H, T - TKQ, D)
            VP, svp_b, svp_h, svp_t,  # value codes (B, H, TVQ, VDP)
            VS, VZ, svs_b, svs_h, svs_t,  # value scale/zero (B, H, TVQ, D // VG)
            VR, svr_b, svr_h, svr_t,  # value residual (B, H, T - TVQ, D)
            MASK, smask_b,  # (B, T) int8, 1 = attend
            LENS,  # graph mode: [T, TKQ, TVQ] int32 on the device (see decode_strided.py)
            M_OUT, L_OUT, ACC_OUT,  # (B, Hq, S), (B, Hq, S), (B, Hq, S, D) fp32
            H, T, TKQ, TVQ, tokens_per_split, num_splits, qk_scale, FAST_END, MAIN_SPLITS, TAIL_CHUNK,
            HG: tl.constexpr, HG_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
            TAIL_N: tl.constexpr, KBITS: tl.constexpr, KG: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr,
            HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, FAST: tl.constexpr, HAS_LENS: tl.constexpr = False,
            RING: tl.constexpr = 0, ASM: tl.constexpr = False):
        KPPB: tl.constexpr = 8 // KBITS  # codes per byte
        KGB: tl.constexpr = KG // KPPB  # key bytes per channel per group
        KMASK: tl.constexpr = (1 << KBITS) - 1
        VPPB: tl.constexpr = 8 // VBITS
        VDP: tl.constexpr = D // VPPB  # value bytes per token
        VMASK: tl.constexpr = (1 << VBITS) - 1
        KNB: tl.constexpr = BLOCK_N // KPPB  # key bytes per channel per main-loop block

        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        d = tl.arange(0, D)
        hh = tl.arange(0, HG_PAD)
        hmask = hh < HG
        qrow = h * HG + hh
        q = tl.load(Q + b * sqb + qrow[:, None] * sqh + d[None, :], mask=hmask[:, None], other=0.0)
        q = q.to(tl.float32) * qk_scale  # folds 1/sqrt(D) and log2(e): the softmax runs in exp2
        if DOT_F32:
            qd = q
        else:
            qd = q.to(tl.float16)  # fp16 operands for bf16 models too: codes and fp16 scales are exact in it

        m_i = tl.full([HG_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HG_PAD], tl.float32)
        # The output is accumulated per code slot: acc<j>[:, c] is channel c * VPPB + j. Each packed value
        # byte then feeds the matrix units as VPPB separate (tokens x VDP) tiles, unpacked by a shift and
        # a mask each, with no shuffle of codes into channel order; the store puts channels in place.
        acc0 = tl.zeros([HG_PAD, VDP], tl.float32)
        acc1 = tl.zeros([HG_PAD, VDP], tl.float32)
        acc2 = tl.zeros([HG_PAD, VDP], tl.float32)
        acc3 = tl.zeros([HG_PAD, VDP], tl.float32)

        lo, hi, T, TKQ, TVQ, FAST_END = _split_range(split, LENS, T, TKQ, TVQ, FAST_END, tokens_per_split,
                                                     TAIL_CHUNK, num_splits, MAIN_SPLITS, BLOCK_N, TAIL_N, HAS_LENS)
        kp_base = KP + b * skp_b + h * skp_h
        ks_off = b * sks_b + h * sks_h
        kr_base = KR + b * skr_b + h * skr_h
        vp_base = VP + b * svp_b + h * svp_h
        vs_off = b * svs_b + h * svs_h
        vr_base = VR + b * svr_b + h * svr_h
        cb = tl.arange(0, VDP)

        # ---- main loop: whole blocks where both streams are quantized. Byte nb of a key block holds
        # tokens start + nb*KPPB + j (j < KPPB); slot j is processed as its own sub-block of KNB tokens,
        # whose values are then read from the same tokens. Dequantization runs in fp16 (exact codes).
        fast_hi = lo
        if FAST:
            fast_hi = tl.maximum(lo, tl.minimum(hi, (tl.minimum(TKQ, TVQ) // BLOCK_N) * BLOCK_N))
        nb = tl.arange(0, KNB)
        for start in range(lo, fast_hi, BLOCK_N):
            tok0 = start + nb * KPPB
            if BLOCK_N <= KG:  # one key group per block: contiguous bytes per channel, one scale vector
                g0 = start // KG
                b0 = tl.multiple_of((start % KG) // KPPB, KNB)  # start is a multiple of BLOCK_N
                kb = tl.load(kp_base + g0 * skp_g + d[:, None] * KGB + (b0 + nb)[None, :])
                ksc = tl.load(KS + ks_off + g0 * sks_g + d)[:, None]
                kze = tl.load(KZ + ks_off + g0 * sks_g + d)[:, None]
            elif BLOCK_N == 2 * KG:  # two key groups: two scale vectors, picked per byte by a select
                g0 = start // KG
                kb = tl.load(kp_base + g0 * skp_g + d[:, None] * KGB + ((nb // KGB) * skp_g + nb % KGB)[None, :])
                first = (nb < KGB)[None, :]
                ksc = tl.where(first, tl.load(KS + ks_off + g0 * sks_g + d)[:, None],
                               tl.load(KS + ks_off + (g0 + 1) * sks_g + d)[:, None])
                kze = tl.where(first, tl.load(KZ + ks_off + g0 * sks_g + d)[:, None],
                               tl.load(KZ + ks_off + (g0 + 1) * sks_g + d)[:, None])
            else:  # several groups: KGB contiguous bytes per channel and group
                grp = tok0 // KG
                kb = tl.load(kp_base + grp[None, :] * skp_g + d[:, None] * KGB + (nb % KGB)[None, :])
                soff = ks_off + grp[None, :] * sks_g + d[:, None]
                ksc = tl.load(KS + soff)
                kze = tl.load(KZ + soff)
            kb = _spread_bytes(kb) if ASM else kb.to(tl.int16)
            if not DOT_F32:
                ksc = ksc.to(tl.float16)
                kze = kze.to(tl.float16)
            # scores of every code slot first, so the softmax bookkeeping (row max, rescale of the
            # accumulators) runs once per block rather than once per slot
            s0 = _qk(qd, kb, 0, KMASK, ksc, kze, DOT_F32, tok0, hi, MASK + b * smask_b, HAS_MASK, ASM)
            mx = s0
            if KPPB > 1:
                s1 = _qk(qd, kb, KBITS, KMASK, ksc, kze, DOT_F32, tok0 + 1, hi, MASK + b * smask_b, HAS_MASK, ASM)
                mx = tl.maximum(mx, s1)
            if KPPB > 2:
                s2 = _qk(qd, kb, 2 * KBITS, KMASK, ksc, kze, DOT_F32, tok0 + 2, hi, MASK + b * smask_b, HAS_MASK, ASM)
                s3 = _qk(qd, kb, 3 * KBITS, KMASK, ksc, kze, DOT_F32, tok0 + 3, hi, MASK + b * smask_b, HAS_MASK, ASM)
                mx = tl.maximum(mx, tl.maximum(s2, s3))
            m_new = tl.maximum(m_i, tl.max(mx, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)[:, None]
            m_i = m_new
            acc0 = acc0 * alpha
            acc1 = acc1 * alpha
            acc2 = acc2 * alpha
            acc3 = acc3 * alpha
            p = tl.exp2(s0 - m_safe[:, None])
            psum = p
            acc0, acc1, acc2, acc3 = _pv_slot(p, vp_base, svp_t, VS, VZ, vs_off, svs_t, tok0, cb, acc0, acc1, acc2,
                                              acc3, D, VBITS, VG, DOT_F32, ASM)
            if KPPB > 1:
                p = tl.exp2(s1 - m_safe[:, None])
                psum += p
                acc0, acc1, acc2, acc3 = _pv_slot(p, vp_base, svp_t, VS, VZ, vs_off, svs_t, tok0 + 1, cb, acc0, acc1,
                                                  acc2, acc3, D, VBITS, VG, DOT_F32, ASM)
            if KPPB > 2:
                p = tl.exp2(s2 - m_safe[:, None])
                psum += p
                acc0, acc1, acc2, acc3 = _pv_slot(p, vp_base, svp_t, VS, VZ, vs_off, svs_t, tok0 + 2, cb, acc0, acc1,
                                                  acc2, acc3, D, VBITS, VG, DOT_F32, ASM)
                p = tl.exp2(s3 - m_safe[:, None])
                psum += p
                acc0, acc1, acc2, acc3 = _pv_slot(p, vp_base, svp_t, VS, VZ, vs_off, svs_t, tok0 + 3, cb, acc0, acc1,
                                                  acc2, acc3, D, VBITS, VG, DOT_F32, ASM)
            l_i = l_i * tl.reshape(alpha, [HG_PAD]) + tl.sum(psum, axis=1)

        # ---- tail: blocks that touch a residual or the end of the split (or everything, FAST off);
        # tokens in natural order, each element from the packed part or the residual by a mask.
        dt = tl.arange(0, TAIL_N)
        for start in range(fast_hi, hi, TAIL_N):
            t = start + dt
            live = t < hi
            kq = live & (t < TKQ)
            kr = live & (t >= TKQ)
            grp = t // KG
            j = t % KG
            kb = tl.load(kp_base + grp[None, :] * skp_g + d[:, None] * KGB + (j // KPPB)[None, :],
                         mask=kq[None, :], other=0)
            kc = (kb.to(tl.int32) >> ((j % KPPB) * KBITS)[None, :]) & KMASK
            soff = ks_off + grp[None, :] * sks_g + d[:, None]
            ksc = tl.load(KS + soff, mask=kq[None, :], other=0.0).to(tl.float32)
            kze = tl.load(KZ + soff, mask=kq[None, :], other=0.0).to(tl.float32)
            if RING > 0:  # residual rings: token t at row t % RING
                krow = t % RING
                vrow = krow
            else:
                krow = t - TKQ
                vrow = t - TVQ
            kres = tl.load(kr_base + krow[None, :] * skr_t + d[:, None], mask=kr[None, :], other=0.0)
            k = tl.where(kq[None, :], _codes_to_float(kc) * ksc + kze, kres.to(tl.float32))
            if DOT_F32:
                s = tl.dot(qd, k, input_precision="ieee")
            else:
                s = tl.dot(qd, k.to(tl.float16))
            ok = live
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * smask_b + t, mask=live, other=0) != 0)
            m_i, l_i, p, alpha = _rescale(m_i, l_i, s, ok)
            vq = live & (t < TVQ)
            vr = live & (t >= TVQ)
            vb = tl.load(vp_base + t[:, None] * svp_t + cb[None, :], mask=vq[:, None], other=0).to(tl.int32)
            voff = vs_off + t[:, None] * svs_t + ((cb * VPPB) // VG)[None, :]
            vsc = tl.load(VS + voff, mask=vq[:, None], other=0.0).to(tl.float32)
            vze = tl.load(VZ + voff, mask=vq[:, None], other=0.0).to(tl.float32)
            vrp = vr_base + vrow[:, None] * svr_t + (cb * VPPB)[None, :]
            a2 = alpha[:, None]
            v = tl.where(vq[:, None], _codes_to_float(vb & VMASK) * vsc + vze,
                         tl.load(vrp, mask=vr[:, None], other=0.0).to(tl.float32))
            acc0 = acc0 * a2 + _pv(p, v, DOT_F32)
            if VPPB > 1:
                v = tl.where(vq[:, None], _codes_to_float((vb >> VBITS) & VMASK) * vsc + vze,
                             tl.load(vrp + 1, mask=vr[:, None], other=0.0).to(tl.float32))
                acc1 = acc1 * a2 + _pv(p, v, DOT_F32)
            if VPPB > 2:
                v = tl.where(vq[:, None], _codes_to_float((vb >> (2 * VBITS)) & VMASK) * vsc + vze,
                             tl.load(vrp + 2, mask=vr[:, None], other=0.0).to(tl.float32))
                acc2 = acc2 * a2 + _pv(p, v, DOT_F32)
                v = tl.where(vq[:, None], _codes_to_float((vb >> (3 * VBITS)) & VMASK) * vsc + vze,
                             tl.load(vrp + 3, mask=vr[:, None], other=0.0).to(tl.float32))
                acc3 = acc3 * a2 + _pv(p, v, DOT_F32)

        _store_partials(M_OUT, L_OUT, ACC_OUT, (b * H * HG + qrow) * num_splits + split, hmask, m_i, l_i,
                        acc0, acc1, acc2, acc3, cb, D, VPPB)

    @triton.jit(do_not_specialize=["num_splits"])
    def _decode_reduce_kernel(M_IN, L_IN, ACC_IN, OUT, so_b, so_h, HQ, num_splits,
                              D: tl.constexpr, S_PAD: tl.constexpr):
        pid = tl.program_id(0)  # b * HQ + head
        b = pid // HQ
        hq = pid % HQ
        o = _merge_splits(M_IN, L_IN, ACC_IN, pid, num_splits, D, S_PAD)
        tl.store(OUT + b * so_b + hq * so_h + tl.arange(0, D), o.to(OUT.dtype.element_ty))

    @triton.jit
    def _merge_splits(M_IN, L_IN, ACC_IN, pid, num_splits, D: tl.constexpr, S_PAD: tl.constexpr):
        """Log-sum-exp merge of one query row's ``num_splits`` partials (max, sum, acc in exp2 units): ``(D,)``."""
        s = tl.arange(0, S_PAD)
        smask = s < num_splits
        m = tl.load(M_IN + pid * num_splits + s, mask=smask, other=float("-inf"))
        l = tl.load(L_IN + pid * num_splits + s, mask=smask, other=0.0)
        m_max = tl.max(m, axis=0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe)  # splits that saw no token have m = -inf -> weight 0
        total = tl.sum(w * l, axis=0)
        d = tl.arange(0, D)
        acc = tl.load(ACC_IN + (pid * num_splits + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        return tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_DUMMIES: dict = {}


def mask_arg(mask: torch.Tensor | None, B: int, T: int, graph: bool, dev) -> tuple[torch.Tensor, int]:
    """A padding mask as the decode kernels read it: ``(B, T)`` int8 with contiguous rows, and its row stride (a
    dummy and 0 for None). Graph mode (lengths on the device): ``(B, >= T)`` where ``T`` is the capacity, so one
    buffer written once (the prompt's padding, then ones) serves every replayed step."""
    if mask is None:
        return _dummy(dev, torch.int8), 0
    maskt = mask if mask.dtype == torch.int8 else mask.to(torch.int8)
    if maskt.stride(-1) != 1:
        maskt = maskt.contiguous()
    if maskt.dim() != 2 or maskt.shape[0] != B or (maskt.shape[1] < T if graph else maskt.shape[1] != T):
        want = f"(batch, >= capacity) = ({B}, >= {T})" if graph else f"(batch, tokens) = {(B, T)}"
        raise ValueError(f"mask must be {want}, got {tuple(maskt.shape)}")
    return maskt, maskt.stride(0)


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for pointer arguments a launch never reads (cached: no allocation per step)."""
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


#: launch settings used when a call does not name them (benchmarks/bench_kernels.py picks them on the GPU)
#: (block_n None: 128 tokens when a key group holds >= 128 tokens, else 64 -- fastest in runs 4 and 6 on the H100)
#: (asm: the main loop unpacks codes by inline PTX, two per instruction, on compiled GPUs; the interpreter and fp32
#: models take the Triton-only path)
LAUNCH: dict = {"block_n": None, "num_warps": 2, "num_stages": 2, "maxnreg": 168, "waves": 8, "asm": True}


def partials_workspace(B: int, Hq: int, slots: int, D: int, device) -> tuple[torch.Tensor, ...]:
    """Float32 ``(max, sum, acc)`` of every split's partial result, per query row: ``(B, Hq, slots)`` twice and
    ``(B, Hq, slots, D)``, what the split kernels write and :func:`_merge_splits` reads."""
    return (torch.empty(B, Hq, slots, dtype=torch.float32, device=device),
            torch.empty(B, Hq, slots, dtype=torch.float32, device=device),
            torch.empty(B, Hq, slots, D, dtype=torch.float32, device=device))


def choose_splits(batch_kv_heads: int, tokens: int, block_n: int, sms: int, waves: int = 4) -> int:
    """Splits per KV head: enough programs for ~4 waves of the GPU, never below one block per split."""
    blocks = max(1, -(-tokens // block_n))
    want = max(1, -(-waves * sms // max(1, batch_kv_heads)))
    return max(1, min(want, blocks, 512))


def packed_decode_supported(kv: PackedKV, head_dim: int) -> bool:
    """Whether :func:`decode_attention` handles this cache (else dequantize and use dense attention)."""
    for q in (kv.kq, kv.vq):
        if q is not None and (q.bits not in DECODE_BITS or not kernel_supports(q.bits, q.group, head_dim, q.symmetric)):
            return False
        if q is not None and q.packed.stride(-1) != 1:
            return False
    return HAS_TRITON


def plan_splits(programs: int, T: int, tkq: int, tvq: int, block_n: int, tail_n: int, fast: bool,
                num_splits: int | None, waves: float, dev: torch.device,
                max_tail_splits: int = 16) -> tuple[int, int, int, int, int]:
    """How a split-K decode divides ``T`` tokens (host mode): whole ``block_n`` blocks where both streams are
    quantized go to ``main_splits`` programs per head (``per_split`` tokens each, ``num_splits`` chosen to fill
    the SMs unless given), the rest (residuals, ragged end) to at most ``max_tail_splits`` tail programs of
    ``tail_chunk`` tokens.
    Returns ``(fast_end, per_split, main_splits, tail_chunk, num_splits)``; shared by both decode kernels."""
    fast_end = (min(tkq, tvq) // block_n) * block_n if fast else 0
    if fast_end:
        if num_splits is None:
            sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) \
                if dev.type == "cuda" else 4
            num_splits = choose_splits(programs, fast_end, block_n, sms, waves)
        per_split = -(-fast_end // num_splits)
        per_split = -(-per_split // block_n) * block_n
        main_splits = -(-fast_end // per_split)
    else:
        per_split, main_splits = block_n, 0
    tail = T - fast_end
    tail_splits = min(-(-tail // (2 * tail_n)), max_tail_splits) if tail > 0 else 0
    tail_chunk = -(-max(tail, 1) // max(tail_splits, 1))
    tail_chunk = -(-tail_chunk // tail_n) * tail_n
    tail_splits = -(-tail // tail_chunk) if tail > 0 else 0
    return fast_end, per_split, main_splits, tail_chunk, max(1, main_splits + tail_splits)


def decode_attention(q: torch.Tensor, kv: PackedKV, mask: torch.Tensor | None = None, scale: float | None = None,
                     out: torch.Tensor | None = None, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     fast: bool = True, tail_n: int = 32, maxnreg: int | None = None,
                     waves: int | None = None, lens: torch.Tensor | None = None, ring: int = 0,
                     main_splits: int | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     asm: bool | None = None) -> torch.Tensor:
    """Attention of ``q (B, Hq, D)`` (one token per sequence) over the packed cache ``kv``.

    ``mask (B, T)`` bool/int, nonzero where a token may be attended. Returns ``(B, Hq, D)`` in
    ``q.dtype`` (or writes ``out``, any tensor with that shape and a contiguous last dim).
    Graph mode (``lens``, ``ring``, fixed ``num_splits``/``main_splits``, ``workspace``): as
    :func:`~.decode_strided.decode_attention_strided`; ``mask`` then covers the capacity (:func:`mask_arg`).
    """
    if not HAS_TRITON:
        raise RuntimeError("decode_attention needs Triton; use reference.decode_attention_ref on this machine")
    kg_auto = kv.kq.group if kv.kq is not None else 32
    block_n = block_n or LAUNCH["block_n"] or (128 if kg_auto >= 128 else 64)
    num_warps = num_warps or LAUNCH["num_warps"]
    num_stages = num_stages or LAUNCH["num_stages"]
    maxnreg = maxnreg if maxnreg is not None else LAUNCH["maxnreg"]
    waves = waves or LAUNCH["waves"]
    asm = LAUNCH["asm"] if asm is None else asm
    B, Hq, D = q.shape
    T = kv.tokens
    ref = kv.k_res if kv.k_res is not None else kv.kq.packed  # type: ignore[union-attr]
    Hkv = ref.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads is not a multiple of {Hkv} KV heads")
    if not packed_decode_supported(kv, D):
        raise ValueError("this cache layout is not handled by the packed decode kernel")
    HG = Hq // Hkv
    dev = q.device
    # the matrix units need >= 16 along every dot dimension: a main-loop block must hold 16 key bytes per channel
    block_n = max(block_n, 16 * (8 // (kv.kq.bits if kv.kq is not None else 2)))
    if q.stride(-1) != 1:
        q = q.contiguous()
    u8, f16 = _dummy(dev, torch.uint8), _dummy(dev, torch.float16)
    kq, vq = kv.kq, kv.vq
    kbits, kg = (kq.bits, kq.group) if kq is not None else (2, 32)
    vbits, vg = (vq.bits, vq.group) if vq is not None else (2, min(32, D))
    if kq is not None:
        kp, ks, kz = kq.packed, kq.scale, kq.zero
        kp_st, ks_st = kp.stride()[:3], ks.stride()[:3]
    else:
        kp, ks, kz, kp_st, ks_st = u8, f16, f16, (0, 0, 0), (0, 0, 0)
    if vq is not None:
        vp, vs, vz = vq.packed, vq.scale, vq.zero
        vp_st, vs_st = vp.stride()[:3], vs.stride()[:3]
    else:
        vp, vs, vz, vp_st, vs_st = u8, f16, f16, (0, 0, 0), (0, 0, 0)
    kr = kv.k_res if kv.k_res is not None else _dummy(dev, q.dtype)
    vr = kv.v_res if kv.v_res is not None else _dummy(dev, q.dtype)
    kr_st = kr.stride()[:3] if kv.k_res is not None else (0, 0, 0)
    vr_st = vr.stride()[:3] if kv.v_res is not None else (0, 0, 0)
    for name, tns in (("k_res", kv.k_res), ("v_res", kv.v_res)):
        if tns is not None and tns.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    # graph mode: the mask covers the capacity (kv.tkq: the whole quantized buffer), every index a step can read
    maskt, sm_b = mask_arg(mask, B, kv.tkq if lens is not None else T, lens is not None, dev)
    if lens is not None:
        if num_splits is None or main_splits is None or not 0 < main_splits < num_splits:
            raise ValueError("graph mode needs fixed num_splits > main_splits > 0")
        fast_end = per_split = tail_chunk = 0
    else:
        fast_end, per_split, main_splits, tail_chunk, num_splits = plan_splits(
            B * Hkv, T, kv.tkq, kv.tvq, block_n, tail_n, fast, num_splits, waves, dev)
    m_ws, l_ws, acc_ws = workspace if workspace is not None else partials_workspace(B, Hq, num_splits, D, dev)
    sc = D ** -0.5 if scale is None else scale
    dot_f32 = dot_in_f32(q.dtype)
    _decode_split_kernel[(B * Hkv, num_splits)](
        q, q.stride(0), q.stride(1),
        kp, *kp_st, ks, kz, *ks_st, kr, *kr_st,
        vp, *vp_st, vs, vz, *vs_st, vr, *vr_st,
        maskt, sm_b, lens if lens is not None else _dummy(dev, torch.int32), m_ws, l_ws, acc_ws,
        Hkv, T if lens is None else 0, kv.tkq if lens is None else 0, kv.tvq if lens is None else 0, per_split,
        num_splits, sc * math.log2(math.e), fast_end, main_splits, tail_chunk,
        HG=HG, HG_PAD=max(16, next_pow2(HG)), D=D, BLOCK_N=block_n, TAIL_N=tail_n, KBITS=kbits, KG=kg, VBITS=vbits, VG=vg,
        HAS_MASK=mask is not None, DOT_F32=dot_f32, FAST=fast, HAS_LENS=lens is not None, RING=ring,
        ASM=bool(asm) and dev.type == "cuda" and torch.version.hip is None and not INTERPRET and not dot_f32,
        num_warps=num_warps, num_stages=num_stages,
        # register cap only on the fp16 path, where it was tuned and measured
        **({"maxnreg": maxnreg} if maxnreg and dev.type == "cuda" and not dot_f32 else {}))
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    if out.stride(-1) != 1 or tuple(out.shape) != (B, Hq, D):
        raise ValueError("out must be (B, Hq, D) with a contiguous last dim")
    _decode_reduce_kernel[(B * Hq,)](m_ws, l_ws, acc_ws, out, out.stride(0), out.stride(1), Hq, num_splits,
                                     D=D, S_PAD=next_pow2(num_splits), num_warps=4)
    return out


__all__ = ["decode_attention", "packed_decode_supported", "choose_splits", "PackedKV", "QuantizedTensor"]
