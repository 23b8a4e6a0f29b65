"""Decode attention over the channel-strided packed cache (see ``strided.py``): flash-decoding, Triton.

Grid ``(B * Hkv, splits)`` as in ``decode_attention.py``: one program per KV head serves all its query
heads (GQA) over one slice of tokens; a second kernel merges the splits. What differs is the algebra,
which the strided layout makes possible without moving codes between threads:

* keys (scale ``s``/zero ``z`` per channel over a token group): ``q . k_t = sum_j (q*s)[slice j] .
  codes_j[t] + sum_c q_c z_c``. The scale folds into the query once per block, so a code costs one
  shift/mask (+ the fp16 conversion) and its share of a ``tl.dot`` -- no dequantizing FMA. The code
  tile ``(tokens x D/PPB)`` is the dot's *first* operand (``S^T = codes_j @ (q*s)_j^T``), where tokens
  are the M dimension and channels (contiguous bytes) the reduction.
* values (scale/zero per token and channel group): ``out[:, slice j] = sum_t (p_t s_t) codes_j[t] +
  sum_t p_t z_t``: the scale folds into the attention weights, the zero into one running sum per slot.

Lengths may come from a device tensor (``lens = [T, Tkq, Tvq]``) with a fixed split count, and the
residuals from ring buffers (token ``t`` at row ``t % ring``): then a launch depends on no host value
that changes per step and can be captured in a CUDA graph (``graph.py``).
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, dot_in_f32, next_pow2, tl, triton
from . import decode_attention as _da  # its merge kernel exists only with Triton: looked up at call time
from .decode_attention import _dummy, mask_arg, partials_workspace, plan_splits
from .reference import PackedKV
from .strided import StridedQuantizedTensor, strided_supported

if HAS_TRITON:
    from .decode_attention import _rescale_t, _split_range

    @triton.jit
    def _slot(bytes16, shift: tl.constexpr, MASK: tl.constexpr, F32: tl.constexpr):
        """Codes of one bit slot as exact floats: fp16 via 0x6400 (= 1024.0) + code - 1024, or fp32.
        (Keeping 1024 + code as the operand and subtracting 1024 x the other operand's sums afterwards was
        tried: exact under the interpreter, but relative errors of 0.16-0.34 on the H100's tensor cores.)"""
        c = (bytes16 >> shift) & MASK
        if F32:
            r = (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            r = (c | 0x6400).to(tl.float16, bitcast=True) - 1024.0
        return r

    @triton.jit
    def _mm(a, b, F32: tl.constexpr):
        if F32:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            r = tl.dot(a.to(tl.float16), b.to(tl.float16))
        return r

    @triton.jit
    def _key_slot(kb, qT, KS, ks_row, j: tl.constexpr, KDP: tl.constexpr, KBITS: tl.constexpr, F32: tl.constexpr):
        """S^T contribution of key slot j for one block (one key group)."""
        kc = tl.arange(0, KDP)
        ks = tl.load(KS + ks_row + j * KDP + kc).to(tl.float32)
        qs = qT * ks[:, None]  # (KDP, HG_PAD): the scale folded into the query
        return _mm(_slot(kb, j * KBITS, (1 << KBITS) - 1, F32), qs, F32)

    @triton.jit
    def _key_zero(qT, KZ, ks_row, j: tl.constexpr, KDP: tl.constexpr):
        kc = tl.arange(0, KDP)
        kz = tl.load(KZ + ks_row + j * KDP + kc).to(tl.float32)
        return tl.sum(qT * kz[:, None], axis=0)

    @triton.jit
    def _pv(acc, pT, v, PV_ROWS: tl.constexpr, F32: tl.constexpr):
        """acc += p @ v: as (HG_PAD, VDP) = p (HG_PAD, N) @ v (N, VDP) with the code tile as the second operand
        (PV_ROWS), or transposed, (VDP, HG_PAD) = v^T @ p^T with the code tile as the first."""
        if PV_ROWS:
            r = acc + _mm(tl.trans(pT), v, F32)
        else:
            r = acc + _mm(tl.trans(v), pT, F32)
        return r

    @triton.jit
    def _val_slot(acc, z, vb, pT, VS, VZ, vs_rows, j: tl.constexpr, VDP: tl.constexpr, VBITS: tl.constexpr,
                  VG: tl.constexpr, F32: tl.constexpr, PV_ROWS: tl.constexpr):
        """acc += (p * s_t) with codes_j; z (HG_PAD) += sum_t p z_t (slot j's scale group)."""
        gv = (j * VDP) // VG
        vs = tl.load(VS + vs_rows + gv).to(tl.float32)
        vz = tl.load(VZ + vs_rows + gv).to(tl.float32)
        acc = _pv(acc, pT * vs[:, None], _slot(vb, j * VBITS, (1 << VBITS) - 1, F32), PV_ROWS, F32)
        z += tl.sum(pT * vz[:, None], axis=0)
        return acc, z

    @triton.jit
    def _tail_key(qT, kb, t, kq, kr, g, KS, KZ, ks_off, sks_g, kr_base, rrow, skr_t,
                  j: tl.constexpr, KDP: tl.constexpr, KBITS: tl.constexpr, F32: tl.constexpr):
        """General path: key slot j of tokens t dequantized (or from the residual), times the query slice."""
        ch = j * KDP + tl.arange(0, KDP)
        soff = ks_off + g[:, None] * sks_g + ch[None, :]
        ksc = tl.load(KS + soff, mask=kq[:, None], other=0.0).to(tl.float32)
        kze = tl.load(KZ + soff, mask=kq[:, None], other=0.0).to(tl.float32)
        kres = tl.load(kr_base + rrow[:, None] * skr_t + ch[None, :], mask=kr[:, None], other=0.0).to(tl.float32)
        k = tl.where(kq[:, None], _slot(kb, j * KBITS, (1 << KBITS) - 1, True) * ksc + kze, kres)
        return _mm(k, qT, F32)

    @triton.jit
    def _tail_val(acc, vb, pT, vq, vr, VS, VZ, vs_rows, vr_base, rrow, svr_t,
                  j: tl.constexpr, VDP: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr, F32: tl.constexpr,
                  PV_ROWS: tl.constexpr):
        ch = j * VDP + tl.arange(0, VDP)
        gv = (j * VDP) // VG
        vsc = tl.load(VS + vs_rows + gv, mask=vq, other=0.0).to(tl.float32)
        vze = tl.load(VZ + vs_rows + gv, mask=vq, other=0.0).to(tl.float32)
        vres = tl.load(vr_base + rrow[:, None] * svr_t + ch[None, :], mask=vr[:, None], other=0.0).to(tl.float32)
        v = tl.where(vq[:, None], _slot(vb, j * VBITS, (1 << VBITS) - 1, True) * vsc[:, None] + vze[:, None], vres)
        return _pv(acc, pT, v, PV_ROWS, F32)

    @triton.jit(do_not_specialize=["T", "TKQ", "TVQ", "tokens_per_split", "num_splits", "smask_b", "FAST_END",
                                   "MAIN_SPLITS", "TAIL_CHUNK"])
    def _decode_strided_kernel(
            Q, sqb, sqh,  # (B, Hq, D)
            KP, skp_b, skp_h, skp_t,  # key codes (B, H, Tk, KDP)
            KS, KZ, sks_b, sks_h, sks_g,  # key scale/zero (B, H, Gk, D)
            KR, skr_b, skr_h, skr_t,  # key residual: rows t - TKQ, or t % RING
            VP, svp_b, svp_h, svp_t,  # value codes (B, H, Tv, VDP)
            VS, VZ, svs_b, svs_h, svs_t,  # value scale/zero (B, H, Tv, D // VG)
            VR, svr_b, svr_h, svr_t,  # value residual: rows t - TVQ, or t % RING
            MASK, smask_b, LENS,
            M_OUT, L_OUT, ACC_OUT,
            H, T, TKQ, TVQ, tokens_per_split, num_splits, qk_scale, FAST_END, MAIN_SPLITS, TAIL_CHUNK,
            HG: tl.constexpr, HG_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
            KBITS: tl.constexpr, KG: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr,
            HAS_MASK: tl.constexpr, F32: tl.constexpr, FAST: tl.constexpr, HAS_LENS: tl.constexpr,
            RING: tl.constexpr, PV_ROWS: tl.constexpr):
        KPPB: tl.constexpr = 8 // KBITS
        KDP: tl.constexpr = D // KPPB
        VPPB: tl.constexpr = 8 // VBITS
        VDP: tl.constexpr = D // VPPB
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H

        lo, hi, T, TKQ, TVQ, FAST_END = _split_range(split, LENS, T, TKQ, TVQ, FAST_END, tokens_per_split,
                                                     TAIL_CHUNK, num_splits, MAIN_SPLITS, BLOCK_N, TAIL_N, HAS_LENS)

        hh = tl.arange(0, HG_PAD)
        hmask = hh < HG
        qrow = h * HG + hh
        q_base = Q + b * sqb + qrow[None, :] * sqh
        # the query, transposed and split by slot: qT<j> (KDP, HG_PAD) holds channels j*KDP + [0, KDP)
        kc = tl.arange(0, KDP)
        qT0 = tl.load(q_base + kc[:, None], mask=hmask[None, :], other=0.0).to(tl.float32) * qk_scale
        qT1 = qT0
        qT2 = qT0
        qT3 = qT0
        if KPPB > 1:
            qT1 = tl.load(q_base + (KDP + kc)[:, None], mask=hmask[None, :], other=0.0).to(tl.float32) * qk_scale
        if KPPB > 2:
            qT2 = tl.load(q_base + (2 * KDP + kc)[:, None], mask=hmask[None, :], other=0.0).to(tl.float32) * qk_scale
            qT3 = tl.load(q_base + (3 * KDP + kc)[:, None], mask=hmask[None, :], other=0.0).to(tl.float32) * qk_scale

        m_i = tl.full([HG_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HG_PAD], tl.float32)
        # value slot j = channels j*VDP + [0, VDP): out (HG_PAD, VDP) if PV_ROWS, else out^T (VDP, HG_PAD)
        if PV_ROWS:
            acc0 = tl.zeros([HG_PAD, VDP], tl.float32)
        else:
            acc0 = tl.zeros([VDP, HG_PAD], tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        z0 = tl.zeros([HG_PAD], tl.float32)  # sum_t p_t * value zero, per slot
        z1 = tl.zeros([HG_PAD], tl.float32)
        z2 = tl.zeros([HG_PAD], tl.float32)
        z3 = tl.zeros([HG_PAD], tl.float32)

        kp_base = KP + b * skp_b + h * skp_h
        ks_off = b * sks_b + h * sks_h
        kr_base = KR + b * skr_b + h * skr_h
        vp_base = VP + b * svp_b + h * svp_h
        vs_off = b * svs_b + h * svs_h
        vr_base = VR + b * svr_b + h * svr_h
        vcol = tl.arange(0, VDP)

        # ---- main loop: whole blocks of one key group where both streams are quantized
        fast_hi = lo
        if FAST:
            fast_hi = tl.maximum(lo, tl.minimum(hi, FAST_END))
        n = tl.arange(0, BLOCK_N)
        for start in range(lo, fast_hi, BLOCK_N):
            t = start + n
            ks_row = ks_off + (start // KG) * sks_g
            kb = tl.load(kp_base + t[:, None] * skp_t + kc[None, :]).to(tl.int16)  # (BLOCK_N, KDP)
            sT = _key_slot(kb, qT0, KS, ks_row, 0, KDP, KBITS, F32)
            zq = _key_zero(qT0, KZ, ks_row, 0, KDP)
            if KPPB > 1:
                sT += _key_slot(kb, qT1, KS, ks_row, 1, KDP, KBITS, F32)
                zq += _key_zero(qT1, KZ, ks_row, 1, KDP)
            if KPPB > 2:
                sT += _key_slot(kb, qT2, KS, ks_row, 2, KDP, KBITS, F32)
                sT += _key_slot(kb, qT3, KS, ks_row, 3, KDP, KBITS, F32)
                zq += _key_zero(qT2, KZ, ks_row, 2, KDP) + _key_zero(qT3, KZ, ks_row, 3, KDP)
            sT += zq[None, :]
            if HAS_MASK:
                sT = tl.where((tl.load(MASK + b * smask_b + t) != 0)[:, None], sT, float("-inf"))
            m_i, l_i, pT, alpha = _rescale_t(m_i, l_i, sT)  # pT: (BLOCK_N, HG_PAD)
            vb = tl.load(vp_base + t[:, None] * svp_t + vcol[None, :]).to(tl.int16)  # (BLOCK_N, VDP)
            vs_rows = vs_off + t * svs_t
            if PV_ROWS:
                a2 = alpha[:, None]
            else:
                a2 = alpha[None, :]
            acc0, z0 = _val_slot(acc0 * a2, z0 * alpha, vb, pT, VS, VZ, vs_rows, 0, VDP, VBITS, VG, F32, PV_ROWS)
            if VPPB > 1:
                acc1, z1 = _val_slot(acc1 * a2, z1 * alpha, vb, pT, VS, VZ, vs_rows, 1, VDP, VBITS, VG, F32, PV_ROWS)
            if VPPB > 2:
                acc2, z2 = _val_slot(acc2 * a2, z2 * alpha, vb, pT, VS, VZ, vs_rows, 2, VDP, VBITS, VG, F32, PV_ROWS)
                acc3, z3 = _val_slot(acc3 * a2, z3 * alpha, vb, pT, VS, VZ, vs_rows, 3, VDP, VBITS, VG, F32, PV_ROWS)

        # ---- tail: residual tokens, partial blocks, padding; every element from codes or residual by a mask
        dt = tl.arange(0, TAIL_N)
        for start in range(fast_hi, hi, TAIL_N):
            t = start + dt
            live = t < hi
            kq = live & (t < TKQ)
            kr = live & (t >= TKQ)
            if RING > 0:
                krow = t % RING
                vrow = krow
            else:
                krow = t - TKQ
                vrow = t - TVQ
            g = t // KG
            kb = tl.load(kp_base + t[:, None] * skp_t + kc[None, :], mask=kq[:, None], other=0).to(tl.int16)
            sT = _tail_key(qT0, kb, t, kq, kr, g, KS, KZ, ks_off, sks_g, kr_base, krow, skr_t, 0, KDP, KBITS, F32)
            if KPPB > 1:
                sT += _tail_key(qT1, kb, t, kq, kr, g, KS, KZ, ks_off, sks_g, kr_base, krow, skr_t, 1, KDP, KBITS, F32)
            if KPPB > 2:
                sT += _tail_key(qT2, kb, t, kq, kr, g, KS, KZ, ks_off, sks_g, kr_base, krow, skr_t, 2, KDP, KBITS, F32)
                sT += _tail_key(qT3, kb, t, kq, kr, g, KS, KZ, ks_off, sks_g, kr_base, krow, skr_t, 3, KDP, KBITS, F32)
            ok = live
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * smask_b + t, mask=live, other=0) != 0)
            sT = tl.where(ok[:, None], sT, float("-inf"))
            m_i, l_i, pT, alpha = _rescale_t(m_i, l_i, sT)
            vq = live & (t < TVQ)
            vr = live & (t >= TVQ)
            vb = tl.load(vp_base + t[:, None] * svp_t + vcol[None, :], mask=vq[:, None], other=0).to(tl.int16)
            vs_rows = vs_off + t * svs_t
            if PV_ROWS:
                a2 = alpha[:, None]
            else:
                a2 = alpha[None, :]
            z0 = z0 * alpha
            z1 = z1 * alpha
            z2 = z2 * alpha
            z3 = z3 * alpha
            acc0 = _tail_val(acc0 * a2, vb, pT, vq, vr, VS, VZ, vs_rows, vr_base, vrow, svr_t, 0, VDP, VBITS, VG, F32,
                             PV_ROWS)
            if VPPB > 1:
                acc1 = _tail_val(acc1 * a2, vb, pT, vq, vr, VS, VZ, vs_rows, vr_base, vrow, svr_t, 1, VDP, VBITS, VG,
                                 F32, PV_ROWS)
            if VPPB > 2:
                acc2 = _tail_val(acc2 * a2, vb, pT, vq, vr, VS, VZ, vs_rows, vr_base, vrow, svr_t, 2, VDP, VBITS, VG,
                                 F32, PV_ROWS)
                acc3 = _tail_val(acc3 * a2, vb, pT, vq, vr, VS, VZ, vs_rows, vr_base, vrow, svr_t, 3, VDP, VBITS, VG,
                                 F32, PV_ROWS)

        o = (b * H * HG + qrow) * num_splits + split
        tl.store(M_OUT + o, m_i, mask=hmask)
        tl.store(L_OUT + o, l_i, mask=hmask)
        if PV_ROWS:
            optr = ACC_OUT + o[:, None] * D + vcol[None, :]
            omask = hmask[:, None]
            z0 = z0[:, None]
            z1 = z1[:, None]
            z2 = z2[:, None]
            z3 = z3[:, None]
        else:
            optr = ACC_OUT + o[None, :] * D + vcol[:, None]
            omask = hmask[None, :]
            z0 = z0[None, :]
            z1 = z1[None, :]
            z2 = z2[None, :]
            z3 = z3[None, :]
        tl.store(optr, acc0 + z0, mask=omask)
        if VPPB > 1:
            tl.store(optr + VDP, acc1 + z1, mask=omask)
        if VPPB > 2:
            tl.store(optr + 2 * VDP, acc2 + z2, mask=omask)
            tl.store(optr + 3 * VDP, acc3 + z3, mask=omask)


#: launch settings when a call names none (benchmarks/bench_kernels.py measures variants on the GPU)
LAUNCH: dict = {"block_n": 128, "num_warps": 4, "num_stages": 3, "maxnreg": 0, "waves": 8, "pv_rows": 1}


def strided_decode_supported(kv: PackedKV, head_dim: int) -> bool:
    """Whether a decode step goes to :func:`decode_attention_strided`: strided streams it can read, at least one (a
    cache with nothing quantized yet goes to the KIVI-layout kernel, which also serves head dims the strided one
    cannot compile, e.g. 32 at 2 bits)."""
    return (kv.kq is not None or kv.vq is not None) and _strided_readable(kv, head_dim)


def _strided_readable(kv: PackedKV, head_dim: int) -> bool:
    """Every quantized stream of ``kv`` is strided and readable by the strided kernel (none at all is readable)."""
    for q in (kv.kq, kv.vq):
        if q is None:
            continue
        if not isinstance(q, StridedQuantizedTensor) or not strided_supported(q.bits, q.group, q.axis, head_dim):
            return False
        if q.packed.stride(-1) != 1:
            return False
    return HAS_TRITON


def _stream_args(q, dev):
    u8, f16 = _dummy(dev, torch.uint8), _dummy(dev, torch.float16)
    if q is None:
        return (u8, 0, 0, 0), (f16, f16, 0, 0, 0)
    return (q.packed, *q.packed.stride()[:3]), (q.scale, q.zero, *q.scale.stride()[:3])


def decode_attention_strided(q: torch.Tensor, kv: PackedKV, mask: torch.Tensor | None = None,
                             scale: float | None = None, out: torch.Tensor | None = None,
                             num_splits: int | None = None, block_n: int | None = None,
                             num_warps: int | None = None, num_stages: int | None = None, fast: bool = True,
                             tail_n: int = 32, maxnreg: int | None = None, waves: int | None = None,
                             lens: torch.Tensor | None = None, ring: int = 0, main_splits: int | None = None,
                             workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                             pv_rows: int | None = None) -> torch.Tensor:
    """Attention of ``q (B, Hq, D)`` over the strided packed cache ``kv`` (see module docstring).

    Host mode (default): token counts from ``kv``, splits chosen per call. Graph mode (``lens`` given):
    ``lens = [T, Tkq, Tvq]`` int32 on the device, ``num_splits`` and ``main_splits`` fixed, the
    residuals are rings of ``ring`` rows (``kv.k_res``/``kv.v_res`` are the whole rings), ``kv.kq``/
    ``kv.vq`` the whole capacity buffers; ``mask``, if any, covers the capacity (``(B, >= capacity)``: the
    prompt's padding, then ones). ``workspace`` = (m, l, acc) buffers of
    shapes (B, Hq, S), (B, Hq, S), (B, Hq, S, D) fp32, reused across calls.
    """
    if not HAS_TRITON:
        raise RuntimeError("decode_attention_strided needs Triton; use reference.decode_attention_ref here")
    B, Hq, D = q.shape
    if not _strided_readable(kv, D):
        raise ValueError("this cache is not in the strided layout the strided decode kernel reads")
    block_n = block_n or LAUNCH["block_n"]
    num_warps = num_warps or LAUNCH["num_warps"]
    num_stages = num_stages or LAUNCH["num_stages"]
    maxnreg = maxnreg if maxnreg is not None else LAUNCH["maxnreg"]
    waves = waves or LAUNCH["waves"]
    pv_rows = LAUNCH["pv_rows"] if pv_rows is None else pv_rows
    kq, vq = kv.kq, kv.vq
    kbits, kg = (kq.bits, kq.group) if kq is not None else (vq.bits if vq is not None else 2, 128)
    vbits, vg = (vq.bits, vq.group) if vq is not None else (kbits, D)
    block_n = max(16, min(block_n, kg))  # a main-loop block lies inside one key group
    ref = kv.k_res if kv.k_res is not None else kq.packed  # type: ignore[union-attr]
    Hkv = ref.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads is not a multiple of {Hkv} KV heads")
    HG = Hq // Hkv
    dev = q.device
    if q.stride(-1) != 1:
        q = q.contiguous()
    (kp, *kp_st), (ks, kz, *ks_st) = _stream_args(kq, dev)
    (vp, *vp_st), (vs, vz, *vs_st) = _stream_args(vq, dev)
    kr = kv.k_res if kv.k_res is not None else _dummy(dev, q.dtype)
    vr = kv.v_res if kv.v_res is not None else _dummy(dev, q.dtype)
    kr_st = kr.stride()[:3] if kv.k_res is not None else (0, 0, 0)
    vr_st = vr.stride()[:3] if kv.v_res is not None else (0, 0, 0)
    for name, tns in (("k_res", kv.k_res), ("v_res", kv.v_res)):
        if tns is not None and tns.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    maskt, sm_b = mask_arg(mask, B, kv.tkq if lens is not None else kv.tokens, lens is not None, dev)
    if lens is not None:
        if num_splits is None or main_splits is None or not 0 < main_splits < num_splits:
            raise ValueError("graph mode needs fixed num_splits > main_splits > 0")
        T = tkq = tvq = 0
        fast_end = per_split = tail_chunk = 0
    else:
        T, tkq, tvq = kv.tokens, kv.tkq, kv.tvq
        fast_end, per_split, main_splits, tail_chunk, num_splits = plan_splits(
            B * Hkv, T, tkq, tvq, block_n, tail_n, fast, num_splits, waves, dev)
    m_ws, l_ws, acc_ws = workspace if workspace is not None else partials_workspace(B, Hq, num_splits, D, dev)
    sc = D ** -0.5 if scale is None else scale
    f32 = dot_in_f32(q.dtype)
    lens_t = lens if lens is not None else _dummy(dev, torch.int32)
    _decode_strided_kernel[(B * Hkv, num_splits)](
        q, q.stride(0), q.stride(1),
        kp, *kp_st, ks, kz, *ks_st, kr, *kr_st,
        vp, *vp_st, vs, vz, *vs_st, vr, *vr_st,
        maskt, sm_b, lens_t, m_ws, l_ws, acc_ws,
        Hkv, T, tkq, tvq, per_split, num_splits, sc * math.log2(math.e), fast_end, main_splits, tail_chunk,
        HG=HG, HG_PAD=max(16, next_pow2(HG)), D=D, BLOCK_N=block_n, TAIL_N=tail_n, KBITS=kbits, KG=kg,
        VBITS=vbits, VG=vg, HAS_MASK=mask is not None, F32=f32, FAST=fast, HAS_LENS=lens is not None, RING=ring,
        PV_ROWS=bool(pv_rows),
        num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg and dev.type == "cuda" and not f32 else {}))
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    if out.stride(-1) != 1 or tuple(out.shape) != (B, Hq, D):
        raise ValueError("out must be (B, Hq, D) with a contiguous last dim")
    _da._decode_reduce_kernel[(B * Hq,)](m_ws, l_ws, acc_ws, out, out.stride(0), out.stride(1), Hq, num_splits,
                                     D=D, S_PAD=next_pow2(num_splits), num_warps=4)
    return out


__all__ = ["decode_attention_strided", "strided_decode_supported", "LAUNCH"]
