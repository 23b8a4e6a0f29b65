"""Decode attention over 2-bit KIVI codes in fragment order (:mod:`.frag`), written in Gluon (Triton's layout-explicit
dialect) so that every code goes from its 16-byte load to the tensor cores without a layout conversion.

Why (docs/KERNELS.md, sessions 2 and 8): in plain Triton the code tiles of KIVI's order reach ``tl.dot`` through
shared-memory layout conversions and register moves, ~40 instructions per token and KV head; the unpack itself is
~1 instruction per code. Here the layouts are stated, so the compiler is told, not asked:

* ``S^T = K_codes (Q * s_k)^T + (Q . z_k)``: KIVI's per-channel key scale folds into the query (once per key
  group), the zero into one bias per head; keys are the A operand ``(tokens, D)``, the query the B operand
  ``(D, 8)`` (GQA's query heads of one KV head, padded to the MMA's 8 columns).
* ``O^T = V_codes^T (P * s_v)^T + sum_t p_t z_t``: the per-token value scale folds into the probabilities, the zero
  into one running sum per head; values are the A operand ``(D, tokens)``.
* The probabilities leave the first product in its accumulator layout; ``movmatrix`` transposes them into the
  second product's B operand in registers (8 instructions per 64 tokens).

One warp per program (every layout here is stated for one warp), online softmax in exp2 units, split-K over the
tokens; the partials are merged by the existing reduce kernel (:func:`.decode_attention._decode_reduce_kernel`),
in the same format. docs/KERNELS.md "Session 9" has the measurements.

Scope: 2-bit keys (groups of a multiple of ``BLOCK`` tokens) and values (one group per token), fp16/bf16
queries. Host mode (:func:`decode_attention_frag`): every token quantized (:class:`FragKV`). Graph mode
(``StaticKiviLayer(layout="frag")``): lengths on the device, the newest tokens in a 16-bit ring, padding masks.
References: :func:`decode_frag_ref` (unpack, then :func:`.reference.decode_attention_ref`); the graph layer's
state against KIVI's layout. The query times a key scale, and p times a value scale, are fp16 operands: the
tightest limit is ``p * value scale * 16`` with lazy rescaling (p <= 16), inf past a value scale of ~256 (a
token's 2-bit value range above ~768; ~12,000 without lazy rescaling); keys overflow only past
``|q * key scale| ~ 5e5``.
Needs Gluon (Triton >= 3.5) and an sm_80+ NVIDIA GPU; Triton's interpreter does not run Gluon.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..storage import QuantizedTensor
from . import frag
from .reference import PackedKV, decode_attention_ref

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
    HAS_GLUON = True
except Exception:  # pragma: no cover - Triton without Gluon
    HAS_GLUON = False


@dataclass
class FragKV:
    """One layer's fully quantized 2-bit cache in fragment order: codes from :mod:`.frag`, KIVI's scales.

    ``kf (B, H, T/16, 32, D/32)``, ``vf (B, H, T/32, 32, D/16)`` int32; ``k_scale``/``k_zero`` ``(B, H, T/kg, D)``
    and ``v_scale``/``v_zero`` ``(B, H, T)`` fp16 (one value group per token)."""

    kf: torch.Tensor
    vf: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    key_group: int

    @property
    def tokens(self) -> int:
        return self.kf.shape[2] * frag.KEY_TILE

    @classmethod
    def from_kivi(cls, k: QuantizedTensor, v: QuantizedTensor) -> "FragKV":
        """Reorder KIVI's 2-bit codes (keys per channel over token groups, values per token over all ``D`` channels);
        scales and zeros are reused as they are."""
        if k.bits != 2 or v.bits != 2 or k.axis != "token" or v.axis != "channel" or v.group != v.head_dim \
                or k.zero is None or v.zero is None or v.slots is not None:
            raise ValueError("FragKV holds 2-bit asymmetric KIVI caches: keys per channel, values one group per token")
        kc = k.codes()  # (B, H, T/g, D, g)
        B, H, NG, D, g = kc.shape
        kc = kc.permute(0, 1, 2, 4, 3).reshape(B, H, NG * g, D)
        return cls(frag.pack_keys(kc), frag.pack_values(v.codes()), k.scale, k.zero,
                   v.scale.reshape(B, H, -1), v.zero.reshape(B, H, -1), k.group)

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values ``(B, H, T, D)`` (float32 math, one cast)."""
        kc = frag.unpack_keys(self.kf).float()
        B, H, T, D = kc.shape
        ks = self.k_scale.float().repeat_interleave(self.key_group, dim=2)
        kz = self.k_zero.float().repeat_interleave(self.key_group, dim=2)
        vc = frag.unpack_values(self.vf).float()
        k = kc * ks + kz
        v = vc * self.v_scale.float()[..., None] + self.v_zero.float()[..., None]
        return k.to(dtype), v.to(dtype)


def decode_frag_ref(q: torch.Tensor, kv: FragKV, scale: float | None = None) -> torch.Tensor:
    """Float32 reference of :func:`decode_attention_frag`."""
    k, v = kv.dense(torch.float32)
    return decode_attention_ref(q, PackedKV(None, k, None, v), scale=scale)


#: launch defaults (see :func:`decode_attention_frag`; from the H200 sweeps of sessions 9-10): tokens per softmax
#: step, waves of resident programs (None: :func:`_wave_splits`), the folded unpack, register cap of the unmasked
#: main loop (0: the compiler's; 168 keeps 3 warps per scheduler, :func:`resident_warps_per_sm`), pipeline depth, lazy
#: rescaling of the running max, key scales through the cp.async pipeline (:func:`_main_loop`)
LAUNCH: dict = {"block": 64, "waves": None, "fold": True, "maxnreg": 168, "stages": 2, "lazy": True,
                "scale_pipe": True}


def launch_options(**given) -> dict:
    """:data:`LAUNCH` with the options given (None = the default), checked for unknown names."""
    unknown = set(given) - set(LAUNCH)
    if unknown:
        raise TypeError(f"unknown launch option(s) {sorted(unknown)}; known: {sorted(LAUNCH)}")
    opts = {k: (LAUNCH[k] if given.get(k) is None else given[k]) for k in LAUNCH}
    for k in ("fold", "lazy", "scale_pipe"):
        opts[k] = bool(opts[k])
    return opts


if HAS_GLUON:
    # Gluon renamed these in Triton 3.9 (the GPU machine runs 3.6): one name for either
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
    _AOP = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA.value, k_width=2))
    _BOP = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=_MMA.value, k_width=2))

    def _unpack_ptx(fold: bool) -> str:
        """16 register copies of one word (``$8``..) -> its 16 codes as eight half2 (``$0``..``$7``, register ``j`` =
        field ``f = j // 2 + 4 * (j % 2)`` of :mod:`.frag`), each ``(1024 + x) - 1024`` from a ``lop3``. ``fold``:
        one shift per word and ``x = code * 4**(f % 4)`` (the caller divides that out); else ``x = code``, one
        shift per field."""
        body = "{ .reg .b32 t, u, k; mov.b32 k, 0x64006400; " + ("shr.b32 u, $8, 8; " if fold else "")
        for j in range(8):
            f = j // 2 + 4 * (j % 2)
            if fold:
                src, mask = ("u" if j % 2 else "$8"), (3 << 2 * (f % 4)) * 0x10001
            else:
                body += f"shr.b32 t, $8, {2 * f}; " if f else "mov.b32 t, $8; "
                src, mask = "t", 0x00030003
            body += f"lop3.b32 t, {src}, {mask:#x}, k, 0xea; sub.rn.f16x2 ${j}, t, k; "
        return body + "}"

    _UNPACK_FOLD = gl.constexpr(_unpack_ptx(True))
    _UNPACK_EXACT = gl.constexpr(_unpack_ptx(False))
    _TRANSPOSE = gl.constexpr("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;")
    _UNPACK_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 16))

    @gluon.jit
    def _words_to_codes(w4, W_AXES: gl.constexpr, SMALL: gl.constexpr, FULL: gl.constexpr, L8: gl.constexpr,
                        OUT: gl.constexpr, OUT_LAYOUT: gl.constexpr, FOLD: gl.constexpr):
        """Words (one per lane and register) -> fp16 codes in the MMA operand layout, without moving data:
        permute/reshape to the 8-D view whose size-1 axes are the word's 16 codes, broadcast them in registers,
        unpack 16 at a time (inline PTX), and fold the 8-D view back to the operand's 2-D shape."""
        w = gl.reshape(gl.permute(w4, W_AXES), SMALL)
        w = gl.convert_layout(w, L8)
        w = gl.broadcast(w, gl.full(FULL, 0, gl.int32, layout=L8))[0]
        if FOLD:
            c = gl.inline_asm_elementwise(_UNPACK_FOLD, _UNPACK_CONSTRAINTS, [w], dtype=gl.float16, is_pure=True,
                                          pack=16)
        else:
            c = gl.inline_asm_elementwise(_UNPACK_EXACT, _UNPACK_CONSTRAINTS, [w], dtype=gl.float16, is_pure=True,
                                          pack=16)
        return gl.convert_layout(gl.reshape(c, OUT), OUT_LAYOUT)

    @gluon.jit
    def _lane_partials(x, BLOCK: gl.constexpr):
        """``(BLOCK, 8)`` accumulator tile -> ``(8, 8)``: summed over the tokens one lane holds (registers only)."""
        return gl.sum(gl.reshape(x, [BLOCK // 8, 8, 8]), axis=0)

    @gluon.jit
    def _word_offsets(N0: gl.constexpr, N3: gl.constexpr, L4: gl.constexpr):
        """Offsets of ``(N0, 8, 4, N3)`` int32 words, row-major: tile, lane = 4*g + q, word (a lane's words contiguous)."""
        i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        i1 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        i2 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
        i3 = gl.arange(0, N3, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        return (i0[:, None, None, None] * (32 * N3) + i1[None, :, None, None] * (4 * N3)
                + i2[None, None, :, None] * N3 + i3[None, None, None, :])

    @gluon.jit
    def _transpose_p(p, BLOCK: gl.constexpr):
        """16-bit ``(BLOCK, 8)`` in the accumulator layout -> the same values as the B operand: one ``movmatrix``
        (8x8 transpose across the warp) per register, then a relabeling that moves nothing."""
        pt = gl.inline_asm_elementwise(_TRANSPOSE, "=r,r", [p], dtype=p.dtype, is_pure=True, pack=2)
        return gl.convert_layout(gl.reshape(gl.permute(gl.reshape(pt, [BLOCK // 8, 8, 8]), [0, 2, 1]), [BLOCK, 8]),
                                 _BOP)

    @gluon.jit
    def _key_codes(kw, D: gl.constexpr, BLOCK: gl.constexpr, FOLD: gl.constexpr, LK8: gl.constexpr):
        NKT: gl.constexpr = BLOCK // 16
        KW: gl.constexpr = D // 32
        return _words_to_codes(kw, [0, 1, 3, 2], [NKT, 1, 8, KW, 1, 1, 4, 1], [NKT, 2, 8, KW, 2, 2, 4, 2],
                               LK8, [BLOCK, D], _AOP, FOLD)

    @gluon.jit
    def _value_codes(vw, D: gl.constexpr, BLOCK: gl.constexpr, FOLD: gl.constexpr, LV8: gl.constexpr):
        NVT: gl.constexpr = BLOCK // 32
        VW: gl.constexpr = D // 16
        return _words_to_codes(vw, [3, 1, 0, 2], [VW, 1, 8, NVT, 1, 1, 4, 1], [VW, 2, 8, NVT, 2, 2, 4, 2],
                               LV8, [D, BLOCK], _AOP, FOLD)

    @gluon.jit
    def _issue_step(ksm, vsm, ssm, zsm, kssm, kzsm, kf_bh, vf_bh, vs_bh, vz_bh, ks_bh, kz_bh, t, koff, voff, soff,
                    doff, KW: gl.constexpr, VW: gl.constexpr, KG: gl.constexpr, D: gl.constexpr,
                    SCALE_PIPE: gl.constexpr):
        """cp.async one step's key words, value words, value scales and zeros into one pipeline stage;
        ``SCALE_PIPE``: its key group's scales and zeros too (read on the group's first step)."""
        _cp_async(ksm, kf_bh + (t // 16) * (32 * KW) + koff)
        _cp_async(vsm, vf_bh + (t // 32) * (32 * VW) + voff)
        _cp_async(ssm, vs_bh + t + soff)
        _cp_async(zsm, vz_bh + t + soff)
        if SCALE_PIPE:
            _cp_async(kssm, ks_bh + (t // KG) * D + doff)
            _cp_async(kzsm, kz_bh + (t // KG) * D + doff)
        async_copy.commit_group()

    @gluon.jit
    def _softmax_step(s, m_i, l_acc, z_acc, vze, BLOCK: gl.constexpr):
        """Online softmax over one step's scores ``(BLOCK, 8)`` (exp2 units): the new max, the rescale factor, the
        probabilities, and the running sums of ``p`` and ``p * zero`` (per-lane partials)."""
        m_new = gl.maximum(m_i, gl.max(s, axis=0))  # m_i starts finite: masked steps give p = 0, alpha = 1
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        alpha_l = gl.convert_layout(alpha, gl.SliceLayout(0, l_acc.type.layout))
        l_acc = l_acc * alpha_l[None, :] + _lane_partials(p, BLOCK)
        z_acc = z_acc * alpha_l[None, :] + _lane_partials(p * vze[:, None], BLOCK)
        return m_new, alpha, p, l_acc, z_acc

    @gluon.jit
    def _group_query(qs, ks, kz, kfac):
        """The query (``qs``: float32, softmax scale in) with one key group's per-channel scale ``ks`` folded in
        (fp16 B operand), and its zero-point bias (from ``kz``)."""
        qk = (qs * (ks.to(gl.float32) * kfac)[:, None]).to(gl.float16)
        bias = gl.convert_layout(gl.sum(qs * kz.to(gl.float32)[:, None], axis=0), gl.SliceLayout(0, _MMA))
        return qk, bias

    @gluon.jit
    def _main_loop(qv, kfac, vfac, t_s, c_b, o, m_i, l_acc, z_acc, ks_bh, kz_bh, vs_bh, vz_bh, kf_bh, vf_bh,
                   mask_b, start, end, qk_scale, D: gl.constexpr, BLOCK: gl.constexpr, KG: gl.constexpr,
                   FOLD: gl.constexpr, STAGES: gl.constexpr, HAS_MASK: gl.constexpr, LK4: gl.constexpr,
                   LK8: gl.constexpr, LV4: gl.constexpr, LV8: gl.constexpr, LAZY: gl.constexpr,
                   SCALE_PIPE: gl.constexpr):
        """Tokens ``[start, end)`` (whole key groups, all quantized) with ``STAGES - 1`` steps of codes and value
        scales in flight (cp.async into shared memory). Each lane reads back exactly the words it copied; the
        scales, read by every lane, are fenced by a barrier (one warp: cheap). ``LAZY``: the running max moves
        (and the accumulators are rescaled) only when a head's max grows by more than 2**4, so p <= 16.
        ``SCALE_PIPE``: a key group's scales and zeros come through the pipeline too, instead of loads that the
        group's first step waits for (ncu: ~12% of the warps' stall samples at 8 x 32K, session 10)."""
        NKT: gl.constexpr = BLOCK // 16
        NVT: gl.constexpr = BLOCK // 32
        KW: gl.constexpr = D // 32
        VW: gl.constexpr = D // 16
        # value scales/zeros: >= 2 per lane (cp.async moves >= 4 bytes; at BLOCK 32 half the lanes copy twice)
        SL: gl.constexpr = gl.BlockedLayout([max(BLOCK // 32, 2)], [32], [1], [0])
        plain4: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])  # per stage; stages outermost
        plain1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        ksm = gl.allocate_shared_memory(gl.int32, [STAGES, NKT, 8, 4, KW], plain4)
        vsm = gl.allocate_shared_memory(gl.int32, [STAGES, NVT, 8, 4, VW], plain4)
        ssm = gl.allocate_shared_memory(vs_bh.dtype.element_ty, [STAGES, BLOCK], plain1)
        zsm = gl.allocate_shared_memory(vz_bh.dtype.element_ty, [STAGES, BLOCK], plain1)
        kssm = gl.allocate_shared_memory(ks_bh.dtype.element_ty, [STAGES, D if SCALE_PIPE else 2], plain1)
        kzsm = gl.allocate_shared_memory(kz_bh.dtype.element_ty, [STAGES, D if SCALE_PIPE else 2], plain1)
        doff = gl.arange(0, D, layout=gl.BlockedLayout([D // 32], [32], [1], [0]))
        koff = _word_offsets(NKT, KW, LK4)
        voff = _word_offsets(NVT, VW, LV4)
        soff = gl.arange(0, BLOCK, layout=SL)
        s0 = gl.zeros([BLOCK, 8], gl.float32, layout=_MMA)
        n = (end - start) // BLOCK
        if n > 0:
            for i in gl.static_range(STAGES - 1):
                _issue_step(ksm.index(i), vsm.index(i), ssm.index(i), zsm.index(i), kssm.index(i), kzsm.index(i),
                            kf_bh, vf_bh, vs_bh, vz_bh, ks_bh, kz_bh, start + gl.minimum(i, n - 1) * BLOCK, koff,
                            voff, soff, doff, KW, VW, KG, D, SCALE_PIPE)
        g0 = gl.maximum(gl.minimum(start, end - 1), 0) // KG  # an empty split reads a group inside the buffer
        qk, bias = _group_query(qv, gl.load(ks_bh + g0 * D + c_b), gl.load(kz_bh + g0 * D + c_b), kfac)
        for i in range(n):
            t0 = start + i * BLOCK
            if not SCALE_PIPE:
                if (t0 % KG == 0) & (i > 0):
                    qk, bias = _group_query(qv, gl.load(ks_bh + (t0 // KG) * D + c_b),
                                            gl.load(kz_bh + (t0 // KG) * D + c_b), kfac)
            if HAS_MASK:
                keep = gl.load(mask_b + t0 + t_s) != 0
            st = i % STAGES
            async_copy.wait_group(STAGES - 2)
            _barrier()
            if SCALE_PIPE:  # before the codes are read: the group's registers are not live beside theirs
                if (t0 % KG == 0) & (i > 0):
                    qk, bias = _group_query(qv, kssm.index(st).load(c_b.type.layout),
                                            kzsm.index(st).load(c_b.type.layout), kfac)
            kw = ksm.index(st).load(LK4)
            vw = vsm.index(st).load(LV4)
            vsc = ssm.index(st).load(gl.SliceLayout(1, _MMA)).to(gl.float32) * vfac
            vze = zsm.index(st).load(gl.SliceLayout(1, _MMA)).to(gl.float32)
            _barrier()
            nx = (i + STAGES - 1) % STAGES  # the stage read one step ago
            _issue_step(ksm.index(nx), vsm.index(nx), ssm.index(nx), zsm.index(nx), kssm.index(nx), kzsm.index(nx),
                        kf_bh, vf_bh, vs_bh, vz_bh, ks_bh, kz_bh, start + gl.minimum(i + STAGES - 1, n - 1) * BLOCK,
                        koff, voff, soff, doff, KW, VW, KG, D, SCALE_PIPE)
            s = mma_v2(_key_codes(kw, D, BLOCK, FOLD, LK8), qk, s0) + bias[None, :]
            if HAS_MASK:
                s = gl.where(keep[:, None], s, float("-inf"))
            if LAZY:
                m_blk = gl.max(s, axis=0)
                if gl.max(m_blk - m_i, axis=0) > 4.0:
                    m_new = gl.maximum(m_i, m_blk)
                    alpha = gl.exp2(m_i - m_new)
                    alpha_l = gl.convert_layout(alpha, gl.SliceLayout(0, l_acc.type.layout))
                    o = o * alpha[None, :]
                    l_acc = l_acc * alpha_l[None, :]
                    z_acc = z_acc * alpha_l[None, :]
                    m_i = m_new
                p = gl.exp2(s - m_i[None, :])
                l_acc = l_acc + _lane_partials(p, BLOCK)
                z_acc = z_acc + _lane_partials(p * vze[:, None], BLOCK)
            else:
                m_i, alpha, p, l_acc, z_acc = _softmax_step(s, m_i, l_acc, z_acc, vze, BLOCK)
                o = o * alpha[None, :]
            pt = _transpose_p((p * vsc[:, None]).to(gl.float16), BLOCK)
            o = mma_v2(_value_codes(vw, D, BLOCK, FOLD, LV8), pt, o)
        async_copy.wait_group(0)
        return o, m_i, l_acc, z_acc

    @gluon.jit
    def _tail_loop(qv, kfac, vfac, t_s, c_b, o, m_i, l_acc, z_acc, ks_bh, kz_bh, vs_bh, vz_bh, kf_bh, vf_bh,
                   mask_b, kr_bh, vr_bh, srt, lo, hi, TKQ, TVQ, RING, qk_scale, D: gl.constexpr,
                   BLOCK: gl.constexpr, KG: gl.constexpr, FOLD: gl.constexpr, HAS_MASK: gl.constexpr,
                   LK4: gl.constexpr, LK8: gl.constexpr, LV4: gl.constexpr, LV8: gl.constexpr):
        """Tokens ``[lo, hi)`` past the main region (graph mode): keys quantized below ``TKQ``, in the 16-bit ring
        above; values quantized below ``TVQ`` (the last value tile partly written), in the ring above. Both sources
        go through the tensor cores, each masked to its own tokens."""
        NKT: gl.constexpr = BLOCK // 16
        NVT: gl.constexpr = BLOCK // 32
        KW: gl.constexpr = D // 32
        VW: gl.constexpr = D // 16
        RDT: gl.constexpr = kr_bh.dtype.element_ty
        s0 = gl.zeros([BLOCK, 8], gl.float32, layout=_MMA)
        o0 = gl.zeros([D, 8], gl.float32, layout=_MMA)
        q16 = qv.to(RDT)
        koff = _word_offsets(NKT, KW, LK4)
        voff = _word_offsets(NVT, VW, LV4)
        # ring rows (tokens, D) read coalesced, 16 bytes per lane, then laid out for the tensor cores
        RL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [1, 1], [1, 0])
        tr = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, RL))
        cr = gl.arange(0, D, layout=gl.SliceLayout(0, RL))
        for t0 in range(lo, hi, BLOCK):
            tok = t0 + t_s
            live = tok < hi
            if HAS_MASK:
                live = live & (gl.load(mask_b + tok, mask=live, other=0) != 0)
            grp = gl.maximum(gl.minimum(t0, TKQ - 1), 0) // KG  # a step lies in one key group; past TKQ: masked
            qk, bias = _group_query(qv, gl.load(ks_bh + grp * D + c_b), gl.load(kz_bh + grp * D + c_b), kfac)
            kc = _key_codes(gl.load(kf_bh + (t0 // 16) * (32 * KW) + koff), D, BLOCK, FOLD, LK8)
            s_q = mma_v2(kc, qk, s0) + bias[None, :]
            rows = ((t0 + tr) % RING)[:, None] * srt + cr[None, :]
            s_r = mma_v2(gl.convert_layout(gl.load(kr_bh + rows), _AOP), q16, s0)
            s = gl.where((tok < TKQ)[:, None], s_q, s_r)
            s = gl.where(live[:, None], s, float("-inf"))
            quant_v = tok < TVQ
            vsc = gl.where(quant_v, gl.load(vs_bh + tok).to(gl.float32) * vfac, 0.0)
            vze = gl.where(quant_v, gl.load(vz_bh + tok).to(gl.float32), 0.0)
            m_i, alpha, p, l_acc, z_acc = _softmax_step(s, m_i, l_acc, z_acc, vze, BLOCK)
            pq = _transpose_p((p * vsc[:, None]).to(gl.float16), BLOCK)
            pr = _transpose_p(gl.where(quant_v[:, None], 0.0, p).to(RDT), BLOCK)
            vc = _value_codes(gl.load(vf_bh + (t0 // 32) * (32 * VW) + voff), D, BLOCK, FOLD, LV8)
            o_r = mma_v2(gl.convert_layout(gl.permute(gl.load(vr_bh + rows), [1, 0]), _AOP), pr, o0)
            if FOLD:
                o_r = o_r * 16.0  # the main accumulator is scaled by 16 (vfac); divided out at the end
            o = mma_v2(vc, pq, o * alpha[None, :]) + o_r
        return o, m_i, l_acc, z_acc

    @gluon.jit
    def _frag_decode_kernel(Q, KF, VF, KS, KZ, VS, VZ, M_OUT, L_OUT, ACC_OUT, KR, VR, MASK, LENS,
                            sq_b, sq_h, skf, svf, sks, svs, srb, srh, srt, smask_b, H, T, per_split, num_splits,
                            main_splits, RING, qk_scale,
                            G: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, KG: gl.constexpr,
                            FOLD: gl.constexpr, STAGES: gl.constexpr, PART: gl.constexpr, HAS_MASK: gl.constexpr,
                            LAZY: gl.constexpr, SCALE_PIPE: gl.constexpr, LK4: gl.constexpr, LK8: gl.constexpr,
                            LV4: gl.constexpr, LV8: gl.constexpr):
        """Grid ``(B * H, splits)``; partials go to slot ``split`` of ``num_splits``. ``PART`` 0 (host mode): split
        ``s`` takes tokens ``[s * per_split, ...)`` of ``T``, all quantized. Graph mode, lengths ``[T, TKQ, TVQ]``
        read from ``LENS``: ``PART`` 1, splits ``[0, main_splits)`` share the whole key groups below both quantized
        lengths; ``PART`` 2 (its own launch, so the main loop keeps its registers), splits
        ``[main_splits, num_splits)`` take the rest (:func:`_tail_loop`)."""
        pid = gl.program_id(0)  # b * H + h
        split = gl.program_id(1) + (main_splits if PART == 2 else 0)
        b = pid // H
        h = pid % H
        # the query heads of this KV head, (D, 8) as the B operand, fp16 (the softmax scale joins per group)
        c_b = gl.arange(0, D, layout=gl.SliceLayout(1, _BOP))
        h_b = gl.arange(0, 8, layout=gl.SliceLayout(0, _BOP))
        qmask = (h_b < G)[None, :] & (c_b < D)[:, None]
        qv = gl.load(Q + b * sq_b + (h * G + h_b[None, :]) * sq_h + c_b[:, None], mask=qmask,
                     other=0.0).to(gl.float32) * qk_scale  # float32, softmax scale (log2 units) in
        t_s = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, _MMA))
        if FOLD:  # the unpack reads code * 4**m, m = bits 3-4 of the channel (keys) / token (values)
            kfac = gl.exp2(-2.0 * ((c_b >> 3) & 3).to(gl.float32))
            vfac = gl.exp2(4.0 - 2.0 * ((t_s >> 3) & 3).to(gl.float32))  # x16: no subnormal p * s / 64
        else:
            kfac = gl.full([D], 1.0, gl.float32, layout=gl.SliceLayout(1, _BOP))
            vfac = gl.full([BLOCK], 1.0, gl.float32, layout=gl.SliceLayout(1, _MMA))

        m_i = gl.full([8], -1.0e30, gl.float32, layout=gl.SliceLayout(0, _MMA))
        # running sums of p and p * zero per head, kept as per-lane partials (8 token lanes x 8 heads): the token
        # registers are summed each step, the lanes once at the end
        l_acc = _lane_partials(gl.zeros([BLOCK, 8], gl.float32, layout=_MMA), BLOCK)
        z_acc = l_acc
        o = gl.zeros([D, 8], gl.float32, layout=_MMA)

        kf_bh = KF + pid * skf
        vf_bh = VF + pid * svf
        ks_bh = KS + pid * sks
        kz_bh = KZ + pid * sks
        vs_bh = VS + pid * svs
        vz_bh = VZ + pid * svs
        mask_b = MASK + b * smask_b
        if PART == 0:
            start = gl.multiple_of(split * per_split, KG)
            end = gl.minimum(start + per_split, T)
            o, m_i, l_acc, z_acc = _main_loop(
                qv, kfac, vfac, t_s, c_b, o, m_i, l_acc, z_acc, ks_bh, kz_bh, vs_bh, vz_bh, kf_bh, vf_bh,
                mask_b, start, end, qk_scale, D, BLOCK, KG, FOLD, STAGES, HAS_MASK, LK4, LK8, LV4, LV8, LAZY,
                SCALE_PIPE)
        else:
            T = gl.load(LENS)
            TKQ = gl.load(LENS + 1)
            TVQ = gl.load(LENS + 2)
            main_end = (gl.minimum(TKQ, TVQ) // KG) * KG
            if PART == 1:
                per = gl.cdiv(gl.cdiv(main_end, main_splits), KG) * KG
                start = split * per
                end = gl.minimum(start + per, main_end)
                o, m_i, l_acc, z_acc = _main_loop(
                    qv, kfac, vfac, t_s, c_b, o, m_i, l_acc, z_acc, ks_bh, kz_bh, vs_bh, vz_bh, kf_bh, vf_bh,
                    mask_b, start, end, qk_scale, D, BLOCK, KG, FOLD, STAGES, HAS_MASK, LK4, LK8, LV4, LV8, LAZY,
                    SCALE_PIPE)
            else:
                n_tail = num_splits - main_splits
                per = gl.cdiv(gl.cdiv(T - main_end, n_tail), BLOCK) * BLOCK
                lo = main_end + (split - main_splits) * per
                hi = gl.minimum(lo + per, T)
                o, m_i, l_acc, z_acc = _tail_loop(
                    qv, kfac, vfac, t_s, c_b, o, m_i, l_acc, z_acc, ks_bh, kz_bh, vs_bh, vz_bh, kf_bh, vf_bh,
                    mask_b, KR + b * srb + h * srh, VR + b * srb + h * srh, srt, lo, hi, TKQ, TVQ, RING, qk_scale,
                    D, BLOCK, KG, FOLD, HAS_MASK, LK4, LK8, LV4, LV8)

        l_i = gl.convert_layout(gl.sum(l_acc, axis=0), gl.SliceLayout(0, _MMA))
        if FOLD:
            o = o * 0.0625
        o = o + gl.convert_layout(gl.sum(z_acc, axis=0), gl.SliceLayout(0, _MMA))[None, :]
        h_o = gl.arange(0, 8, layout=gl.SliceLayout(0, _MMA))
        c_o = gl.arange(0, D, layout=gl.SliceLayout(1, _MMA))
        row = (b * H * G + h * G + h_o) * num_splits + split
        gl.store(M_OUT + row, m_i, mask=h_o < G)
        gl.store(L_OUT + row, l_i, mask=h_o < G)
        gl.store(ACC_OUT + row[None, :] * D + c_o[:, None], o, mask=(h_o < G)[None, :] & (c_o < D)[:, None])


def _layouts(D: int, block: int) -> dict:
    """The load layouts (4-D: tile, g, q, word) and the 8-D code views of keys and values (see :mod:`.frag`)."""
    nkt, nvt, kw, vw = block // 16, block // 32, D // 32, D // 16
    ones = [1] * 8
    return dict(
        LK4=gl.BlockedLayout([1, 1, 1, kw], [1, 8, 4, 1], [1, 1, 1, 1], [3, 2, 1, 0]),
        # dims (tile, t8, g, w, c4, c3, q, c0); registers c0, t8, c3, c4, w, tile; lanes q, g
        LK8=gl.BlockedLayout([nkt, 2, 1, kw, 2, 2, 1, 2], [1, 1, 8, 1, 1, 1, 4, 1], ones, [7, 1, 5, 4, 3, 0, 6, 2]),
        LV4=gl.BlockedLayout([1, 1, 1, vw], [1, 8, 4, 1], [1, 1, 1, 1], [3, 2, 1, 0]),
        # dims (w, c3, g, tile, t4, t3, q, t0); registers t0, c3, t3, t4, tile, w; lanes q, g
        LV8=gl.BlockedLayout([vw, 2, 1, nvt, 2, 2, 1, 2], [1, 1, 8, 1, 1, 1, 4, 1], ones, [7, 1, 5, 4, 3, 0, 6, 2]),
    )


#: per compiled main-loop kernel (device, shapes, options): :func:`_compiled_info`
_RESIDENT: dict = {}


def resident_warps_per_sm(regs: int, smem: int) -> int:
    """One-warp programs an SM (Hopper/Ampere) holds at once with ``regs`` registers per thread and ``smem`` bytes of
    shared memory per program. Registers are the binding limit, and they bind per scheduler: each of the 4 holds
    its own warps in its quarter of the register file (16K), allocated in units of 256 per warp, so 161-168
    registers fit 3 warps a scheduler (12 per SM) but 169-255 only 2 (8), which is what ncu reports as the block
    limit (a whole-SM count, 65536 / registers per warp, says 11). Shared memory: 227 KiB per SM, 1 KiB of it
    reserved by the driver per block; at most 32 blocks."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    per_scheduler = min(16, 16384 // per_warp)
    return max(1, min(32, 4 * per_scheduler, 232448 // (max(smem, 0) + 1024)))


def _compiled_info(kernel) -> dict:
    """Registers, spills and shared memory of a compiled kernel, and :func:`resident_warps_per_sm` of them."""
    try:
        kernel._init_handles()
        info = {"regs": int(kernel.n_regs), "spills": int(kernel.n_spills), "smem": int(kernel.metadata.shared)}
    except Exception:  # pragma: no cover - a Triton without these attributes: assume the worst case
        info = {"regs": 255, "spills": -1, "smem": 0}
    return {**info, "resident": resident_warps_per_sm(info["regs"], info["smem"])}


def _wave_splits(heads: int, slots: int, groups: int) -> int:
    """Splits per (sequence, KV head) for ``groups`` key groups, minimising (waves of ``slots`` resident programs)
    x (groups per split), the critical path when every wave runs full programs, plus the merge's work (a split's
    partial result is written and read back: ~half a key group's bytes). A split count that leaves a second,
    near-empty wave would double the time."""
    def cost(s: int) -> tuple[float, int]:
        per = -(-groups // s)
        s = -(-groups // per)
        return -(-heads * s // slots) * per + 0.5 * s * heads / slots, s
    return min(range(1, max(1, min(groups, 512)) + 1), key=cost)


def _decode_attention_module():
    """The module of the KIVI-layout kernel (its merge kernel, workspaces, masks): the package's attribute of that
    name is the function, so import the module by its path."""
    import importlib

    return importlib.import_module(".decode_attention", __package__)


def _launch(q, kf, vf, ks, kz, vs, vz, T: int, per_split: int, num_splits: int, scale, key_group: int, opts: dict,
            workspace, out, graph: tuple | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    from ._triton import next_pow2

    _da = _decode_attention_module()
    B, Hq, D = q.shape
    H = kf.shape[1]
    dev = q.device
    maskt, sm_b = _da.mask_arg(mask, B, kf.shape[2] * frag.KEY_TILE, graph is not None, dev)
    if graph is None:
        lens, kr, ring, main_splits, rst = _da._dummy(dev, torch.int32), _da._dummy(dev, q.dtype), 1, num_splits, (0, 0, 0)
        vr = kr
    else:
        lens, kr, vr, ring, main_splits = graph
        rst = kr.stride()[:3]
    m_ws, l_ws, acc_ws = workspace if workspace is not None else _da.partials_workspace(B, Hq, num_splits, D, dev)
    args = (q, kf, vf, ks, kz, vs, vz, m_ws, l_ws, acc_ws, kr, vr, maskt, lens,
            q.stride(0), q.stride(1), kf.stride(1), vf.stride(1), ks.stride(1), vs.stride(1), *rst, sm_b,
            H, T, per_split, num_splits, main_splits, ring, (D ** -0.5 if scale is None else scale) * math.log2(math.e))
    for part, splits in (((0, num_splits),) if graph is None else ((1, main_splits), (2, num_splits - main_splits))):
        _frag_decode_kernel[(B * H, splits)](*args, **_consts(Hq // H, D, key_group, part, mask is not None, opts))
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    _da._decode_reduce_kernel[(B * Hq,)](m_ws, l_ws, acc_ws, out, out.stride(0), out.stride(1), Hq, num_splits,
                                         D=D, S_PAD=next_pow2(num_splits), num_warps=4)
    return out


def _consts(G: int, D: int, key_group: int, part: int, has_mask: bool, opts: dict) -> dict:
    # the cap binds the unmasked main loop only: the tail (ring + codes, short) and masked launches (~190 registers:
    # capped at 168 they spill and measured no faster, 0.0710 vs 0.0708 ms at 8 x 32K, 0.0450 vs 0.0429 at 1 x 128K)
    # keep the compiler's count
    maxnreg = opts["maxnreg"] if part != 2 and not has_mask else 0
    return dict(G=G, D=D, BLOCK=opts["block"], KG=key_group, FOLD=opts["fold"], STAGES=opts["stages"], PART=part,
                HAS_MASK=has_mask, LAZY=opts["lazy"], SCALE_PIPE=opts["scale_pipe"], **_layouts(D, opts["block"]),
                num_warps=1, **({"maxnreg": maxnreg} if maxnreg else {}))


#: head dims the kernel was built and tested for (its register tiles grow with D; the ring tail's load layout
#: covers up to 256)
HEAD_DIMS = (64, 128)


def _check_launch(q: torch.Tensor, H: int, key_group: int, opts: dict) -> None:
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the fragment-order kernel serves head_dim {HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the fragment-order kernel takes fp16/bf16 queries, got {q.dtype}")
    Hq = q.shape[1]
    if Hq % H or Hq // H > 8:
        raise ValueError(f"{Hq} query heads over {H} KV heads: needs a multiple with at most 8 per KV head")
    if opts["block"] not in (32, 64, 128) or key_group % opts["block"]:
        raise ValueError(f"block {opts['block']} must be 32, 64 or 128 and divide the key group {key_group}")
    if opts["stages"] < 2:
        raise ValueError(f"stages must be >= 2 (the cp.async pipeline), got {opts['stages']}")


def compiled_info(q: torch.Tensor, kv: FragKV, graph: bool = False, has_mask: bool = False, **options) -> dict:
    """Registers, spills, shared memory and resident programs per SM (:func:`_compiled_info`) of the main-loop
    kernel these inputs and options launch; compiled once per key and cached (``options``: as
    :func:`decode_attention_frag`'s, None: :data:`LAUNCH`)."""
    from .decode_attention import partials_workspace

    opts = launch_options(**options)
    B, Hq, D = q.shape
    H = kv.kf.shape[1]
    part = int(graph)
    key = (str(q.device), Hq // H, D, kv.key_group, q.dtype, kv.v_scale.dtype, part, has_mask,
           tuple(sorted((k, v) for k, v in opts.items() if k != "waves")))
    if key not in _RESIDENT:  # compile once to read the register count
        _da = _decode_attention_module()
        dev = q.device
        ws = partials_workspace(B, Hq, 3, D, dev)
        i32, f16, i8 = _da._dummy(dev, torch.int32), _da._dummy(dev, torch.float16), _da._dummy(dev, torch.int8)
        _RESIDENT[key] = _compiled_info(_frag_decode_kernel.warmup(
            q, kv.kf, kv.vf, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero, *ws, f16, f16, i8, i32,
            q.stride(0), q.stride(1), kv.kf.stride(1), kv.vf.stride(1), kv.k_scale.stride(1), kv.v_scale.stride(1),
            0, 0, 0, 0, H, kv.tokens, kv.tokens, 3, 2, 1, 1.0, grid=(1,),
            **_consts(Hq // H, D, kv.key_group, part, has_mask, opts)))
    return _RESIDENT[key]


def splits_for(q: torch.Tensor, kv: FragKV, graph: bool = False, has_mask: bool = False, **options) -> int:
    """Splits per KV head: :func:`_wave_splits` over the resident programs (one warp each; how many an SM holds
    comes from the compiled kernel's registers and shared memory, :func:`compiled_info`), or, with ``waves``, that
    many waves' worth. ``options``: as :func:`decode_attention_frag`'s (None: :data:`LAUNCH`)."""
    from .decode_attention import _sm_count

    opts = launch_options(**options)
    B, H = q.shape[0], kv.kf.shape[1]
    slots = _sm_count(q.device.index or 0) * compiled_info(q, kv, graph, has_mask, **opts)["resident"]
    if opts["waves"]:
        return max(1, int(opts["waves"] * slots) // (B * H))
    return _wave_splits(B * H, slots, kv.tokens // kv.key_group)


def decode_attention_frag(q: torch.Tensor, kv: FragKV, scale: float | None = None, num_splits: int | None = None,
                          block: int | None = None, waves: float | None = None, fold: bool | None = None,
                          stages: int | None = None, maxnreg: int | None = None, lazy: bool | None = None,
                          scale_pipe: bool | None = None,
                          workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q (B, Hq, D)`` fp16/bf16 over ``kv`` (all ``T`` tokens quantized). Returns ``(B, Hq, D)`` in
    ``q``'s dtype.

    Launch options (None: :data:`LAUNCH`): ``block`` tokens per step; ``waves`` of resident programs the
    splits make (:func:`splits_for`); ``fold``: the one-shift unpack (``4**m`` folded into query and
    probabilities); ``stages`` steps in flight through shared memory; ``maxnreg`` register cap per thread (main
    loop without a padding mask, :func:`_consts`);
    ``lazy``: rescale only when the running max grows by more than 2**4; ``scale_pipe``: each key group's scales
    and zeros arrive through the pipeline with the codes."""
    if not HAS_GLUON:
        raise RuntimeError("decode_attention_frag needs Triton's Gluon (Triton >= 3.5)")
    opts = launch_options(block=block, waves=waves, fold=fold, stages=stages, maxnreg=maxnreg, lazy=lazy,
                          scale_pipe=scale_pipe)
    B, Hq, D = q.shape
    H, T = kv.kf.shape[1], kv.tokens
    _check_launch(q, H, kv.key_group, opts)
    if kv.kf.shape[:2] != (B, H) or kv.kf.shape[-1] * 32 != D:
        raise ValueError(f"query (B={B}, head_dim={D}) does not match the cache's codes {tuple(kv.kf.shape)}")
    if T % kv.key_group:
        raise ValueError(f"T={T} must be a multiple of the key group {kv.key_group}")
    q = q.contiguous()
    kv_parts = (kv.kf, kv.vf, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero)
    if not all(x.is_contiguous() for x in kv_parts):
        raise ValueError("decode_attention_frag reads contiguous code, scale and zero tensors (FragKV.from_kivi "
                         "makes them); call .contiguous() on the ones sliced or transposed")
    if num_splits is None:
        num_splits = splits_for(q, kv, **opts)
    per_split = -(-T // max(1, min(num_splits, T // kv.key_group)))
    per_split = -(-per_split // kv.key_group) * kv.key_group
    num_splits = -(-T // per_split)
    return _launch(q, *kv_parts, T, per_split, num_splits, scale, kv.key_group, opts, workspace, out)
