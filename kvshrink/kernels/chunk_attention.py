"""Chunked prefill over KIVI's packed cache (Triton): a chunk of new tokens attends to the packed past without
dequantizing it into a 16-bit copy.

A chunk of ``C`` queries ``q (B, Hq, C, D)`` ends a cache of ``T`` tokens (:class:`~.reference.PackedKV`; the
chunk itself sits in the full-precision residual, as :class:`~.layer.KernelUniformLayer`'s handle holds it). Query
``c`` sees tokens ``[0, T - C + c]`` (causal), where the key-padding ``mask (B, T)`` allows.

Unlike decode, prefill does real matrix work per stored code (every code meets ``rows`` query rows), so the kernel
is flash attention with dequantizing loads: a program takes ``ROWS`` query rows of one KV head (its ``HG`` query
heads x ``C`` tokens, head-major, as ``q`` lies in memory), walks its slice of the tokens in blocks of
``BLOCK_N``, builds each block's keys ``(D, BLOCK_N)`` and values ``(BLOCK_N, D)`` in token/channel order --
each packed byte read once, its code lanes unpacked and interleaved back into order (``tl.join``; ``join=False``
reads one byte per element instead), ``code * scale + zero`` in 16 bits -- and runs the usual online softmax with
one score and one value product per block. Three loops: blocks packed in both streams, tokens packed in one
stream only (per-element residual selects), and 16-bit tokens (the residuals' rest and the chunk itself, where the
causal limit applies); a row tile stops at the last token any of its rows sees. Splits and the merge are the decode kernel's
(:func:`~.decode_attention.plan_splits`, ``_decode_reduce_kernel``).
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, dot_in_f32, next_pow2, tl, triton
from .decode_attention import (_decode_reduce_kernel, _dummy, _sm_count, mask_arg, packed_decode_supported,
                               partials_workspace, plan_splits)
from .reference import PackedKV

if HAS_TRITON:
    from triton.runtime.errors import OutOfResources

    from .decode_attention import _codes_to_float, _split_range

    @triton.jit
    def _unpack(bytes_, shift, MASK: tl.constexpr, DOT_F32: tl.constexpr):
        """Codes ``(bytes >> shift) & MASK`` as exact floats: fp16 by the exponent trick (``0x6400`` is 1024), or
        fp32 for fp32 models."""
        codes = (bytes_.to(tl.int32) >> shift) & MASK
        if DOT_F32:
            return _codes_to_float(codes)
        else:
            return (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0

    @triton.jit
    def _natural(b, BITS: tl.constexpr, DOT_F32: tl.constexpr, R: tl.constexpr, NB: tl.constexpr):
        """Bytes ``(R, NB)`` -> codes ``(R, NB * 8 // BITS)`` as floats, column ``PPB * i + j`` = code ``j`` of byte
        ``i``: each byte read once (vectorized), its code lanes interleaved back into order."""
        PPB: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        c0 = _unpack(b, 0, MASK, DOT_F32)
        if PPB == 1:
            return c0
        elif PPB == 2:
            return tl.reshape(tl.join(c0, _unpack(b, BITS, MASK, DOT_F32)), [R, NB * 2])
        else:
            return tl.reshape(tl.join(tl.join(c0, _unpack(b, 2 * BITS, MASK, DOT_F32)),
                                      tl.join(_unpack(b, BITS, MASK, DOT_F32), _unpack(b, 3 * BITS, MASK, DOT_F32))),
                              [R, NB * 4])

    @triton.jit
    def _block(q, m_i, l_i, acc, t, ok, MODE: tl.constexpr, d, kp_base, skp_g, KS, KZ, ks_off, sks_g, kr_base,
               skr_t, vp_base, svp_t, VS, VZ, vs_off, svs_t, vr_base, svr_t, TKQ, TVQ, D: tl.constexpr,
               KBITS: tl.constexpr, KG: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_F32: tl.constexpr, JOIN: tl.constexpr):
        """One block of tokens ``t`` (``ok (ROWS, BLOCK_N)``: which row sees which token). ``MODE`` 0: every token
        is quantized in both streams; 1: either (residual selects per element); 2: none (16-bit residual rows)."""
        PACKED: tl.constexpr = MODE == 0
        KPPB: tl.constexpr = 8 // KBITS
        KGB: tl.constexpr = KG // KPPB
        VPPB: tl.constexpr = 8 // VBITS
        fdt = tl.float32 if DOT_F32 else tl.float16
        # keys (D, BLOCK_N): channel d of token t is code (t % KG) of channel d in key group t // KG
        grp = t // KG
        kq = t < TKQ
        kaddr = kp_base + grp[None, :] * skp_g + d[:, None] * KGB + ((t % KG) // KPPB)[None, :]
        kshift = ((t % KPPB) * KBITS)[None, :]
        if PACKED and BLOCK_N <= KG:  # one key group per block (blocks start at multiples of BLOCK_N): one vector
            soff = ks_off + tl.min(grp, axis=0) * sks_g + d[:, None]
        else:
            soff = ks_off + grp[None, :] * sks_g + d[:, None]
        if MODE == 2:
            k = tl.load(kr_base + (t - TKQ)[None, :] * skr_t + d[:, None]).to(fdt)
        elif PACKED and JOIN:  # each key byte loaded once: bytes (D, BLOCK_N / KPPB), lanes interleaved
            i = tl.arange(0, BLOCK_N // KPPB)
            ti = tl.min(t, axis=0) + i * KPPB  # first token of byte column i
            kb = tl.load(kp_base + (ti // KG)[None, :] * skp_g + d[:, None] * KGB + ((ti % KG) // KPPB)[None, :])
            k = _natural(kb, KBITS, DOT_F32, D, BLOCK_N // KPPB) * tl.load(KS + soff).to(fdt) \
                + tl.load(KZ + soff).to(fdt)
        elif PACKED:
            k = _unpack(tl.load(kaddr), kshift, (1 << KBITS) - 1, DOT_F32) * tl.load(KS + soff).to(fdt) \
                + tl.load(KZ + soff).to(fdt)
        else:
            kres = tl.load(kr_base + (t - TKQ)[None, :] * skr_t + d[:, None], mask=(~kq)[None, :], other=0.0)
            kc = _unpack(tl.load(kaddr, mask=kq[None, :], other=0), kshift, (1 << KBITS) - 1, DOT_F32)
            k = tl.where(kq[None, :], kc * tl.load(KS + soff, mask=kq[None, :], other=0.0).to(fdt)
                         + tl.load(KZ + soff, mask=kq[None, :], other=0.0).to(fdt), kres.to(fdt))
        if DOT_F32:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # values (BLOCK_N, D): channel d of token t is code d % VPPB of byte d // VPPB of the token's row
        vq = t < TVQ
        vaddr = vp_base + t[:, None] * svp_t + (d // VPPB)[None, :]
        vshift = ((d % VPPB) * VBITS)[None, :]
        if VG == D:  # one scale per token
            voff = vs_off + t[:, None] * svs_t
        else:
            voff = vs_off + t[:, None] * svs_t + (d // VG)[None, :]
        if MODE == 2:
            v = tl.load(vr_base + (t - TVQ)[:, None] * svr_t + d[None, :]).to(fdt)
        elif PACKED and JOIN:  # each value byte loaded once: rows of D / VPPB bytes, lanes interleaved
            vb = tl.load(vp_base + t[:, None] * svp_t + tl.arange(0, D // VPPB)[None, :])
            v = _natural(vb, VBITS, DOT_F32, BLOCK_N, D // VPPB) * tl.load(VS + voff).to(fdt) \
                + tl.load(VZ + voff).to(fdt)
        elif PACKED:
            v = _unpack(tl.load(vaddr), vshift, (1 << VBITS) - 1, DOT_F32) * tl.load(VS + voff).to(fdt) \
                + tl.load(VZ + voff).to(fdt)
        else:
            vres = tl.load(vr_base + (t - TVQ)[:, None] * svr_t + d[None, :], mask=(~vq)[:, None], other=0.0)
            vc = _unpack(tl.load(vaddr, mask=vq[:, None], other=0), vshift, (1 << VBITS) - 1, DOT_F32)
            v = tl.where(vq[:, None], vc * tl.load(VS + voff, mask=vq[:, None], other=0.0).to(fdt)
                         + tl.load(VZ + voff, mask=vq[:, None], other=0.0).to(fdt), vres.to(fdt))
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["T", "TKQ", "TVQ", "C", "tokens_per_split", "num_splits", "smask_b", "FAST_END",
                                   "MAIN_SPLITS", "TAIL_CHUNK"])
    def _chunk_split_kernel(
            Q, sqb, sqr,  # (B, Hq * C, D): query rows, head-major
            KP, skp_b, skp_h, skp_g, KS, KZ, sks_b, sks_h, sks_g, KR, skr_b, skr_h, skr_t,
            VP, svp_b, svp_h, svp_t, VS, VZ, svs_b, svs_h, svs_t, VR, svr_b, svr_h, svr_t,
            MASK, smask_b, M_OUT, L_OUT, ACC_OUT,
            H, T, TKQ, TVQ, C, tokens_per_split, num_splits, qk_scale, FAST_END, MAIN_SPLITS, TAIL_CHUNK,
            HG: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, KBITS: tl.constexpr,
            KG: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr,
            JOIN: tl.constexpr):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        d = tl.arange(0, D)
        rows_h = HG * C  # query rows of this KV head: its HG heads x C tokens
        r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        rmask = r < rows_h
        qrow = h * rows_h + r
        q = tl.load(Q + b * sqb + qrow[:, None] * sqr + d[None, :], mask=rmask[:, None], other=0.0)
        q = q.to(tl.float32) * qk_scale  # 1/sqrt(D) and log2(e): the softmax runs in exp2
        if not DOT_F32:
            q = q.to(tl.float16)
        lim = T - C + r % C  # causal: the last token each row sees
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        lo, hi, T, TKQ, TVQ, FAST_END = _split_range(split, M_OUT, T, TKQ, TVQ, FAST_END, tokens_per_split,  # host lens
                                                     TAIL_CHUNK, num_splits, MAIN_SPLITS, BLOCK_N, BLOCK_N, False)
        hi = tl.minimum(hi, tl.max(tl.where(rmask, lim, 0), axis=0) + 1)  # nothing past this tile's last token
        kp_base = KP + b * skp_b + h * skp_h
        ks_off = b * sks_b + h * sks_h
        kr_base = KR + b * skr_b + h * skr_h
        vp_base = VP + b * svp_b + h * svp_h
        vs_off = b * svs_b + h * svs_h
        vr_base = VR + b * svr_b + h * svr_h
        n = tl.arange(0, BLOCK_N)
        # whole blocks quantized in both streams (main splits: [lo, hi) lies inside [0, FAST_END))
        packed_hi = tl.minimum(hi, FAST_END)
        for start in range(lo, packed_hi, BLOCK_N):
            t = start + n
            ok = rmask[:, None] & (t < packed_hi)[None, :]
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * smask_b + t) != 0)[None, :]
            m_i, l_i, acc = _block(q, m_i, l_i, acc, t, ok, 0, d, kp_base, skp_g, KS, KZ, ks_off, sks_g, kr_base,
                                   skr_t, vp_base, svp_t, VS, VZ, vs_off, svs_t, vr_base, svr_t, TKQ, TVQ, D,
                                   KBITS, KG, VBITS, VG, BLOCK_N, DOT_F32, JOIN)
        # tokens quantized in one stream only (KIVI's keys and values flush at different times), ragged ends
        dense_lo = tl.maximum(TKQ, TVQ)
        mixed_lo = tl.maximum(lo, packed_hi)
        mixed_hi = tl.maximum(mixed_lo, tl.minimum(hi, dense_lo))
        for start in range(mixed_lo, mixed_hi, BLOCK_N):
            t = start + n
            live = t < mixed_hi
            ok = rmask[:, None] & live[None, :]
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * smask_b + t, mask=live, other=0) != 0)[None, :]
            tt = tl.where(live, t, 0)  # out-of-range lanes read token 0 (masked out of the softmax)
            m_i, l_i, acc = _block(q, m_i, l_i, acc, tt, ok, 1, d, kp_base, skp_g, KS, KZ, ks_off, sks_g,
                                   kr_base, skr_t, vp_base, svp_t, VS, VZ, vs_off, svs_t, vr_base, svr_t, TKQ, TVQ,
                                   D, KBITS, KG, VBITS, VG, BLOCK_N, DOT_F32, JOIN)
        # 16-bit tokens only: the rest of the residuals and the chunk itself (causal)
        for start in range(mixed_hi, hi, BLOCK_N):
            t = start + n
            live = t < hi
            ok = rmask[:, None] & live[None, :] & (t[None, :] <= lim[:, None])
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * smask_b + t, mask=live, other=0) != 0)[None, :]
            tt = tl.where(live, t, mixed_hi)  # out-of-range lanes read a 16-bit row (masked out of the softmax)
            m_i, l_i, acc = _block(q, m_i, l_i, acc, tt, ok, 2, d, kp_base, skp_g, KS, KZ, ks_off, sks_g,
                                   kr_base, skr_t, vp_base, svp_t, VS, VZ, vs_off, svs_t, vr_base, svr_t, TKQ, TVQ,
                                   D, KBITS, KG, VBITS, VG, BLOCK_N, DOT_F32, JOIN)
        o = (b * H * rows_h + qrow) * num_splits + split
        tl.store(M_OUT + o, m_i, mask=rmask)
        tl.store(L_OUT + o, l_i, mask=rmask)
        tl.store(ACC_OUT + o[:, None] * D + d[None, :], acc, mask=rmask[:, None])


#: launch settings when a call does not name them (benchmarks/bench_kernels.py's chunk section compares others)
CHUNK_LAUNCH: dict = {"rows": 128, "block_n": 128, "num_warps": 8, "num_stages": 2, "join": True}


def chunk_supported(kv: PackedKV, head_dim: int) -> bool:
    """Whether :func:`chunk_attention` reads this cache: KIVI's storage layout at 2/4/8 bits."""
    return packed_decode_supported(kv, head_dim)


def chunk_attention(q: torch.Tensor, kv: PackedKV, mask: torch.Tensor | None = None, scale: float | None = None,
                    rows: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, num_splits: int | None = None, join: bool | None = None) -> torch.Tensor:
    """Causal attention of the chunk ``q (B, Hq, C, D)`` (the last ``C`` of ``kv``'s ``T`` tokens, held in its
    full-precision residual) over ``kv``; ``mask (B, T)`` nonzero where a token may be attended (key padding).
    Returns ``(B, Hq, C, D)`` in ``q.dtype``; a row that sees no token gives zeros."""
    if not HAS_TRITON:
        raise RuntimeError("chunk_attention needs Triton; use reference.chunk_attention_ref on this machine")
    B, Hq, C, D = q.shape
    T = kv.tokens
    if C < 1 or C > T or max(kv.tkq, kv.tvq) > T - C:
        raise ValueError(f"the chunk's {C} tokens must be the last of the {T} in kv and not quantized "
                         f"(keys quantized up to {kv.tkq}, values up to {kv.tvq}): pass the cache as it was before "
                         f"the chunk was stored, with the chunk appended to its residual")
    ref = kv.k_res if kv.k_res is not None else kv.kq.packed  # type: ignore[union-attr]
    Hkv = ref.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads is not a multiple of {Hkv} KV heads")
    if not chunk_supported(kv, D):
        raise ValueError("this cache layout is not handled by chunk_attention (KIVI's layout, 2/4/8 bits)")
    L = CHUNK_LAUNCH
    min_block = 16 * (8 // (kv.kq.bits if kv.kq is not None else 2))  # packed blocks hold >= 16 key bytes
    block_n = max(block_n or L["block_n"], min_block)
    rows = min(rows or L["rows"], max(16, next_pow2(Hq // Hkv * C)))
    launch = dict(num_warps=num_warps or L["num_warps"], num_stages=num_stages or L["num_stages"],
                  join=L["join"] if join is None else join)
    while True:  # a launch the GPU cannot hold (float32 models, head_dim > 128) retries with smaller tiles
        try:
            return _launch(q, kv, mask, scale, rows, block_n, num_splits, **launch)
        except OutOfResources:
            if block_n <= min_block and rows <= 16:
                raise
            if block_n > min_block:
                block_n //= 2
            else:
                rows //= 2


def _launch(q, kv, mask, scale, rows, block_n, num_splits, num_warps, num_stages, join) -> torch.Tensor:
    B, Hq, C, D = q.shape
    T = kv.tokens
    ref = kv.k_res if kv.k_res is not None else kv.kq.packed  # type: ignore[union-attr]
    Hkv = ref.shape[1]
    HG = Hq // Hkv
    tiles = -(-HG * C // rows)
    dev = q.device
    qr = q.reshape(B, Hq * C, D)  # head-major rows (a copy when q is a transposed view)
    if qr.stride(-1) != 1:
        qr = qr.contiguous()
    u8, f16 = _dummy(dev, torch.uint8), _dummy(dev, torch.float16)
    kq, vq = kv.kq, kv.vq
    kbits, kg = (kq.bits, kq.group) if kq is not None else (2, 32)
    vbits, vg = (vq.bits, vq.group) if vq is not None else (2, min(32, D))
    kp, ks, kz, kp_st, ks_st = ((kq.packed, kq.scale, kq.zero, kq.packed.stride()[:3], kq.scale.stride()[:3])
                                if kq is not None else (u8, f16, f16, (0, 0, 0), (0, 0, 0)))
    vp, vs, vz, vp_st, vs_st = ((vq.packed, vq.scale, vq.zero, vq.packed.stride()[:3], vq.scale.stride()[:3])
                                if vq is not None else (u8, f16, f16, (0, 0, 0), (0, 0, 0)))
    kr = kv.k_res if kv.k_res is not None else _dummy(dev, q.dtype)
    vr = kv.v_res if kv.v_res is not None else _dummy(dev, q.dtype)
    for name, tns in (("k_res", kv.k_res), ("v_res", kv.v_res)):
        if tns is not None and tns.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    kr_st = kr.stride()[:3] if kv.k_res is not None else (0, 0, 0)
    vr_st = vr.stride()[:3] if kv.v_res is not None else (0, 0, 0)
    maskt, sm_b = mask_arg(mask, B, T, False, dev)
    programs = B * Hkv * tiles
    if num_splits is None:  # enough programs for two waves; each split costs a (rows, D) float32 partial
        sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev.type == "cuda" else 4
        num_splits = max(1, -(-2 * sms // programs))
    fast_end, per_split, main_splits, tail_chunk, num_splits = plan_splits(
        programs, T, kv.tkq, kv.tvq, block_n, block_n, True, num_splits, 1, dev, max_tail_splits=2)
    m_ws, l_ws, acc_ws = partials_workspace(B, Hq * C, num_splits, D, dev)
    sc = D ** -0.5 if scale is None else scale
    _chunk_split_kernel[(B * Hkv, num_splits, tiles)](
        qr, qr.stride(0), qr.stride(1),
        kp, *kp_st, ks, kz, *ks_st, kr, *kr_st,
        vp, *vp_st, vs, vz, *vs_st, vr, *vr_st,
        maskt, sm_b, m_ws, l_ws, acc_ws,
        Hkv, T, kv.tkq, kv.tvq, C, per_split, num_splits, sc * math.log2(math.e), fast_end, main_splits, tail_chunk,
        HG=HG, ROWS=rows, D=D, BLOCK_N=block_n, KBITS=kbits, KG=kg, VBITS=vbits, VG=vg,
        HAS_MASK=mask is not None, DOT_F32=dot_in_f32(q.dtype), JOIN=join, num_warps=num_warps,
        num_stages=num_stages)
    out = torch.empty(B, Hq * C, D, dtype=q.dtype, device=dev)
    _decode_reduce_kernel[(B * Hq * C,)](m_ws, l_ws, acc_ws, out, out.stride(0), out.stride(1), Hq * C, num_splits,
                                         D=D, S_PAD=next_pow2(num_splits), num_warps=4)
    return out.view(B, Hq, C, D)


__all__ = ["chunk_attention", "chunk_supported", "CHUNK_LAUNCH"]
