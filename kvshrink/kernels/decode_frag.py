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

One warp per program, online softmax in exp2 units, split-K over the tokens; the partials are merged by the
existing reduce kernel (:func:`.decode_attention._decode_reduce_kernel`), in the same format.

Scope (an experiment, docs/KERNELS.md "Session 9"): 2-bit keys (group = a multiple of ``BLOCK``) and values (one
group per token), fp16 queries, whole tiles without residual tokens or masks. Reference:
:func:`decode_frag_ref` (unpack, then :func:`.reference.decode_attention_ref`). Needs Gluon (Triton >= 3.5) and an
sm_80+ GPU; Triton's interpreter does not run Gluon.
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


#: launch defaults (see :func:`decode_attention_frag`): tokens per softmax step, waves of resident programs, warps
#: per program, the folded unpack, register cap (0: the compiler's choice)
LAUNCH: dict = {"block": 128, "waves": 1, "num_warps": 1, "fold": True, "maxnreg": 0, "prefetch": False, "stages": 1}


if HAS_GLUON:
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
    def _load_words(base, N0: gl.constexpr, N3: gl.constexpr, L4: gl.constexpr):
        """``(N0, 8, 4, N3)`` int32 at ``base``, row-major: tile, lane = 4*g + q, word; each lane's words contiguous."""
        i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        i1 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        i2 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
        i3 = gl.arange(0, N3, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        off = (i0[:, None, None, None] * (32 * N3) + i1[None, :, None, None] * (4 * N3)
               + i2[None, None, :, None] * N3 + i3[None, None, None, :])
        return gl.load(base + off)

    @gluon.jit
    def _word_offsets(N0: gl.constexpr, N3: gl.constexpr, L4: gl.constexpr):
        i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        i1 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        i2 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
        i3 = gl.arange(0, N3, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        return (i0[:, None, None, None] * (32 * N3) + i1[None, :, None, None] * (4 * N3)
                + i2[None, None, :, None] * N3 + i3[None, None, None, :])

    @gluon.jit
    def _issue_step(ksm, vsm, ssm, zsm, kf_bh, vf_bh, VS, VZ, vs_off, t, koff, voff, soff,
                    KW: gl.constexpr, VW: gl.constexpr):
        """cp.async one step's key words, value words, value scales and zeros into one pipeline stage."""
        async_copy.async_copy_global_to_shared(ksm, kf_bh + (t // 16) * (32 * KW) + koff)
        async_copy.async_copy_global_to_shared(vsm, vf_bh + (t // 32) * (32 * VW) + voff)
        async_copy.async_copy_global_to_shared(ssm, VS + vs_off + t + soff)
        async_copy.async_copy_global_to_shared(zsm, VZ + vs_off + t + soff)
        async_copy.commit_group()

    @gluon.jit
    def _step(kw, vw, vs_raw, vz_raw, qk, bias, vfac, o, m_i, l_acc, z_acc, s0,
              D: gl.constexpr, BLOCK: gl.constexpr, FOLD: gl.constexpr, LK8: gl.constexpr, LV8: gl.constexpr):
        """One step of BLOCK tokens: scores, online softmax, value product (see the module docstring)."""
        NKT: gl.constexpr = BLOCK // 16
        NVT: gl.constexpr = BLOCK // 32
        KW: gl.constexpr = D // 32
        VW: gl.constexpr = D // 16
        kc = _words_to_codes(kw, [0, 1, 3, 2], [NKT, 1, 8, KW, 1, 1, 4, 1], [NKT, 2, 8, KW, 2, 2, 4, 2],
                             LK8, [BLOCK, D], _AOP, FOLD)
        s = mma_v2(kc, qk, s0) + bias[None, :]
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        vsc = vs_raw.to(gl.float32) * vfac
        vze = vz_raw.to(gl.float32)
        alpha_l = gl.convert_layout(alpha, gl.SliceLayout(0, l_acc.type.layout))
        l_acc = l_acc * alpha_l[None, :] + _lane_partials(p, BLOCK)
        z_acc = z_acc * alpha_l[None, :] + _lane_partials(p * vze[:, None], BLOCK)
        pv = (p * vsc[:, None]).to(gl.float16)
        # accumulator (tokens, heads) -> B operand (tokens, heads): an 8x8 transpose per register
        pt = gl.inline_asm_elementwise(_TRANSPOSE, "=r,r", [pv], dtype=gl.float16, is_pure=True, pack=2)
        pt = gl.convert_layout(gl.reshape(gl.permute(gl.reshape(pt, [BLOCK // 8, 8, 8]), [0, 2, 1]), [BLOCK, 8]), _BOP)
        vc = _words_to_codes(vw, [3, 1, 0, 2], [VW, 1, 8, NVT, 1, 1, 4, 1], [VW, 2, 8, NVT, 2, 2, 4, 2],
                             LV8, [D, BLOCK], _AOP, FOLD)
        o = mma_v2(vc, pt, o * alpha[None, :])
        return o, m_new, l_acc, z_acc

    @gluon.jit
    def _group_query(qv, KS, KZ, grp, c_b, kfac, qk_scale, D: gl.constexpr):
        """The query with key group ``grp``'s per-channel scale folded in (B operand), and its zero-point bias."""
        ks = gl.load(KS + grp * D + c_b).to(gl.float32) * (kfac * qk_scale)
        kz = gl.load(KZ + grp * D + c_b).to(gl.float32) * qk_scale
        qk = (qv.to(gl.float32) * ks[:, None]).to(gl.float16)
        bias = gl.convert_layout(gl.sum(qv.to(gl.float32) * kz[:, None], axis=0), gl.SliceLayout(0, _MMA))
        return qk, bias

    @gluon.jit
    def _pipelined_loop(qv, kfac, vfac, t_s, c_b, o, m_i, l_acc, z_acc, s0, KS, KZ, VS, VZ, kf_bh, vf_bh, pid, T,
                        start, end, qk_scale, D: gl.constexpr, BLOCK: gl.constexpr, KG: gl.constexpr,
                        FOLD: gl.constexpr, STAGES: gl.constexpr, LK4: gl.constexpr, LK8: gl.constexpr,
                        LV4: gl.constexpr, LV8: gl.constexpr):
        """The main loop with STAGES steps of codes and value scales in flight (cp.async into shared memory): each
        lane reads back exactly the words it copied, so only the scales, read by every lane, need a barrier."""
        NKT: gl.constexpr = BLOCK // 16
        NVT: gl.constexpr = BLOCK // 32
        KW: gl.constexpr = D // 32
        VW: gl.constexpr = D // 16
        SL: gl.constexpr = gl.BlockedLayout([BLOCK // 32], [32], [1], [0])
        plain5: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])  # per stage; stages outermost
        plain2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        ksm = gl.allocate_shared_memory(gl.int32, [STAGES, NKT, 8, 4, KW], plain5)
        vsm = gl.allocate_shared_memory(gl.int32, [STAGES, NVT, 8, 4, VW], plain5)
        ssm = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK], plain2)
        zsm = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK], plain2)
        koff = _word_offsets(NKT, KW, LK4)
        voff = _word_offsets(NVT, VW, LV4)
        soff = gl.arange(0, BLOCK, layout=SL)
        n = (end - start) // BLOCK
        for i in gl.static_range(STAGES - 1):
            t = start + gl.minimum(i, n - 1) * BLOCK
            _issue_step(ksm.index(i), vsm.index(i), ssm.index(i), zsm.index(i), kf_bh, vf_bh, VS, VZ, pid * T, t,
                        koff, voff, soff, KW, VW)
        qk, bias = _group_query(qv, KS, KZ, pid * (T // KG) + start // KG, c_b, kfac, qk_scale, D)
        for i in range(n):
            t0 = start + i * BLOCK
            if (t0 % KG == 0) & (i > 0):
                qk, bias = _group_query(qv, KS, KZ, pid * (T // KG) + t0 // KG, c_b, kfac, qk_scale, D)
            st = i % STAGES
            async_copy.wait_group(STAGES - 2)
            gl.thread_barrier()
            kw = ksm.index(st).load(LK4)
            vw = vsm.index(st).load(LV4)
            vs_raw = ssm.index(st).load(gl.SliceLayout(1, _MMA))
            vz_raw = zsm.index(st).load(gl.SliceLayout(1, _MMA))
            gl.thread_barrier()
            nx = (i + STAGES - 1) % STAGES  # the stage read one step ago
            t_nx = start + gl.minimum(i + STAGES - 1, n - 1) * BLOCK  # past the end: re-copy the last step
            _issue_step(ksm.index(nx), vsm.index(nx), ssm.index(nx), zsm.index(nx), kf_bh, vf_bh, VS, VZ, pid * T,
                        t_nx, koff, voff, soff, KW, VW)
            o, m_i, l_acc, z_acc = _step(kw, vw, vs_raw, vz_raw, qk, bias, vfac, o, m_i, l_acc, z_acc, s0,
                                         D, BLOCK, FOLD, LK8, LV8)
        async_copy.wait_group(0)
        return o, m_i, l_acc, z_acc

    @gluon.jit
    def _frag_decode_kernel(Q, KF, VF, KS, KZ, VS, VZ, M_OUT, L_OUT, ACC_OUT,
                            sq_b, sq_h, H, T, per_split, num_splits, qk_scale,
                            G: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, KG: gl.constexpr,
                            FOLD: gl.constexpr, PREFETCH: gl.constexpr, STAGES: gl.constexpr, LK4: gl.constexpr, LK8: gl.constexpr, LV4: gl.constexpr, LV8: gl.constexpr):
        pid = gl.program_id(0)  # b * H + h
        split = gl.program_id(1)
        b = pid // H
        h = pid % H
        NKT: gl.constexpr = BLOCK // 16  # key tiles per step
        NVT: gl.constexpr = BLOCK // 32  # value tiles per step
        KW: gl.constexpr = D // 32       # key words per lane and tile
        VW: gl.constexpr = D // 16       # value words per lane and tile

        # the query heads of this KV head, (D, 8) as the B operand
        c_b = gl.arange(0, D, layout=gl.SliceLayout(1, _BOP))
        h_b = gl.arange(0, 8, layout=gl.SliceLayout(0, _BOP))
        qmask = (h_b < G)[None, :] & (c_b < D)[:, None]
        qv = gl.load(Q + b * sq_b + (h * G + h_b[None, :]) * sq_h + c_b[:, None], mask=qmask, other=0.0)
        # held as fp16 (half the registers of fp32); the softmax scale joins the key scale per group
        t_s = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, _MMA))
        if FOLD:  # the unpack reads code * 4**m, m = bits 3-4 of the channel (keys) / token (values)
            kfac = gl.exp2(-2.0 * ((c_b >> 3) & 3).to(gl.float32))
            vfac = gl.exp2(4.0 - 2.0 * ((t_s >> 3) & 3).to(gl.float32))  # x16: no subnormal p * s / 64
        else:
            kfac = gl.full([D], 1.0, gl.float32, layout=gl.SliceLayout(1, _BOP))
            vfac = gl.full([BLOCK], 1.0, gl.float32, layout=gl.SliceLayout(1, _MMA))

        m_i = gl.full([8], float("-inf"), gl.float32, layout=gl.SliceLayout(0, _MMA))
        # running sums of p and p * zero per head, kept as per-lane partials (8 token lanes x 8 heads): the token
        # registers are summed each step, the lanes once at the end
        l_acc = _lane_partials(gl.zeros([BLOCK, 8], gl.float32, layout=_MMA), BLOCK)
        z_acc = l_acc
        o = gl.zeros([D, 8], gl.float32, layout=_MMA)
        s0 = gl.zeros([BLOCK, 8], gl.float32, layout=_MMA)

        start = split * per_split
        end = gl.minimum(start + per_split, T)
        kf_bh = KF + pid * (T // 16) * (32 * KW)
        vf_bh = VF + pid * (T // 32) * (32 * VW)
        if STAGES > 1:
            o, m_i, l_acc, z_acc = _pipelined_loop(
                qv, kfac, vfac, t_s, c_b, o, m_i, l_acc, z_acc, s0, KS, KZ, VS, VZ, kf_bh, vf_bh, pid, T, start, end,
                qk_scale, D, BLOCK, KG, FOLD, STAGES, LK4, LK8, LV4, LV8)
        else:
            if PREFETCH:  # the next step's words and value scales are in flight while this step computes
                kw_n = _load_words(kf_bh + (start // 16) * (32 * KW), NKT, KW, LK4)
                vw_n = _load_words(vf_bh + (start // 32) * (32 * VW), NVT, VW, LV4)
                vs_n = gl.load(VS + pid * T + start + t_s)
                vz_n = gl.load(VZ + pid * T + start + t_s)
            for g0 in range(start, end, KG):
                ks = gl.load(KS + (pid * (T // KG) + g0 // KG) * D + c_b).to(gl.float32) * (kfac * qk_scale)
                kz = gl.load(KZ + (pid * (T // KG) + g0 // KG) * D + c_b).to(gl.float32) * qk_scale
                qk = (qv.to(gl.float32) * ks[:, None]).to(gl.float16)
                bias = gl.convert_layout(gl.sum(qv.to(gl.float32) * kz[:, None], axis=0), gl.SliceLayout(0, _MMA))
                for t0 in range(g0, g0 + KG, BLOCK):
                    if PREFETCH:
                        kw, vw, vs_raw, vz_raw = kw_n, vw_n, vs_n, vz_n
                        t_nx = gl.minimum(t0 + BLOCK, end - BLOCK)  # the last step reloads its own block
                        kw_n = _load_words(kf_bh + (t_nx // 16) * (32 * KW), NKT, KW, LK4)
                        vw_n = _load_words(vf_bh + (t_nx // 32) * (32 * VW), NVT, VW, LV4)
                        vs_n = gl.load(VS + pid * T + t_nx + t_s)
                        vz_n = gl.load(VZ + pid * T + t_nx + t_s)
                    else:
                        kw = _load_words(kf_bh + (t0 // 16) * (32 * KW), NKT, KW, LK4)
                        vw = _load_words(vf_bh + (t0 // 32) * (32 * VW), NVT, VW, LV4)
                        vs_raw = gl.load(VS + pid * T + t0 + t_s)
                        vz_raw = gl.load(VZ + pid * T + t0 + t_s)
                    kc = _words_to_codes(kw, [0, 1, 3, 2], [NKT, 1, 8, KW, 1, 1, 4, 1], [NKT, 2, 8, KW, 2, 2, 4, 2],
                                         LK8, [BLOCK, D], _AOP, FOLD)
                    s = mma_v2(kc, qk, s0) + bias[None, :]
                    m_new = gl.maximum(m_i, gl.max(s, axis=0))
                    alpha = gl.exp2(m_i - m_new)
                    p = gl.exp2(s - m_new[None, :])
                    vsc = vs_raw.to(gl.float32) * vfac
                    vze = vz_raw.to(gl.float32)
                    alpha_l = gl.convert_layout(alpha, gl.SliceLayout(0, l_acc.type.layout))
                    l_acc = l_acc * alpha_l[None, :] + _lane_partials(p, BLOCK)
                    z_acc = z_acc * alpha_l[None, :] + _lane_partials(p * vze[:, None], BLOCK)
                    pv = (p * vsc[:, None]).to(gl.float16)
                    # accumulator (tokens, heads) -> B operand (tokens, heads): an 8x8 transpose per register
                    pt = gl.inline_asm_elementwise(_TRANSPOSE, "=r,r", [pv], dtype=gl.float16, is_pure=True, pack=2)
                    pt = gl.reshape(gl.permute(gl.reshape(pt, [BLOCK // 8, 8, 8]), [0, 2, 1]), [BLOCK, 8])
                    pt = gl.convert_layout(pt, _BOP)
                    vc = _words_to_codes(vw, [3, 1, 0, 2], [VW, 1, 8, NVT, 1, 1, 4, 1], [VW, 2, 8, NVT, 2, 2, 4, 2],
                                         LV8, [D, BLOCK], _AOP, FOLD)
                    o = mma_v2(vc, pt, o * alpha[None, :])
                    m_i = m_new

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


_RESIDENT: dict = {}


def _resident_per_sm(kernel) -> int:
    """Programs (one warp each) an SM holds at once for this compiled kernel, from its register count: the split
    count is sized to whole waves of these, as a program that starts in a second, near-empty wave doubles the time."""
    try:
        kernel._init_handles()
        regs = int(kernel.n_regs)
    except Exception:  # pragma: no cover - a Triton without these attributes: assume the worst case
        regs = 255
    per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocation unit: 256 registers per warp
    return max(1, min(32, 65536 // per_warp))


def decode_attention_frag(q: torch.Tensor, kv: FragKV, scale: float | None = None, num_splits: int | None = None,
                          block: int | None = None, waves: float | None = None, fold: bool | None = None,
                          maxnreg: int | None = None, prefetch: bool | None = None, stages: int | None = None,
                          workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q (B, Hq, D)`` fp16 over ``kv`` (all ``T`` tokens). Returns ``(B, Hq, D)`` fp16.

    ``waves``: how many full waves of resident programs the splits make (default :data:`LAUNCH`); ``maxnreg``:
    register cap per thread (more programs per SM, possibly spills); ``prefetch``: load the next step's codes
    while computing this one (more registers, latency hidden within a program); ``stages > 1``: instead, keep that
    many steps in flight through shared memory (cp.async), no extra registers."""
    from .decode_attention import _decode_reduce_kernel, _sm_count, partials_workspace
    from ._triton import next_pow2

    if not HAS_GLUON:
        raise RuntimeError("decode_attention_frag needs Triton's Gluon (Triton >= 3.5)")
    block = block or LAUNCH["block"]
    waves = waves or LAUNCH["waves"]
    maxnreg = LAUNCH["maxnreg"] if maxnreg is None else maxnreg
    fold = LAUNCH["fold"] if fold is None else bool(fold)
    prefetch = LAUNCH["prefetch"] if prefetch is None else bool(prefetch)
    stages = LAUNCH["stages"] if stages is None else int(stages)
    if stages > 1 and block < 64:
        raise ValueError("the cp.async pipeline (stages > 1) copies value scales 4 bytes per lane: block >= 64")
    B, Hq, D = q.shape
    H, T = kv.kf.shape[1], kv.tokens
    if q.dtype != torch.float16:
        raise ValueError(f"decode_attention_frag takes fp16 queries, got {q.dtype}")
    if Hq % H or Hq // H > 8:
        raise ValueError(f"{Hq} query heads over {H} KV heads: needs a multiple with at most 8 per KV head")
    if block not in (32, 64, 128) or kv.key_group % block or T % kv.key_group:
        raise ValueError(f"block {block} must be 32/64/128, dividing the key group {kv.key_group}, which divides T={T}")
    q = q.contiguous()
    consts = dict(G=Hq // H, D=D, BLOCK=block, KG=kv.key_group, FOLD=fold, PREFETCH=prefetch, STAGES=stages, **_layouts(D, block),
                  num_warps=LAUNCH["num_warps"], **({"maxnreg": maxnreg} if maxnreg else {}))
    if num_splits is None:
        key = (str(q.device), Hq // H, D, block, fold, prefetch, stages, maxnreg)
        if key not in _RESIDENT:  # compile once to read the register count
            ws = partials_workspace(B, Hq, 3, D, q.device)
            _RESIDENT[key] = _resident_per_sm(_frag_decode_kernel.warmup(
                q, kv.kf, kv.vf, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero, *ws,
                q.stride(0), q.stride(1), H, T, T, 3, 1.0, grid=(1,), **consts))
        num_splits = max(1, int(waves * _sm_count(q.device.index or 0) * _RESIDENT[key]) // (B * H))
    per_split = -(-T // max(1, min(num_splits, T // kv.key_group)))
    per_split = -(-per_split // kv.key_group) * kv.key_group
    num_splits = -(-T // per_split)
    m_ws, l_ws, acc_ws = workspace if workspace is not None else partials_workspace(B, Hq, num_splits, D, q.device)
    _frag_decode_kernel[(B * H, num_splits)](
        q, kv.kf, kv.vf, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero, m_ws, l_ws, acc_ws,
        q.stride(0), q.stride(1), H, T, per_split, num_splits,
        (D ** -0.5 if scale is None else scale) * math.log2(math.e), **consts)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _decode_reduce_kernel[(B * Hq,)](m_ws, l_ws, acc_ws, out, out.stride(0), out.stride(1), Hq, num_splits,
                                     D=D, S_PAD=next_pow2(num_splits), num_warps=4)
    return out
