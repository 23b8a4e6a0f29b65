"""Decode attention that reads RotateKV's packed cache directly, RoPE applied inside the kernel (Triton).

RotateKV (Su et al. 2025, arXiv 2501.16383; layout in :mod:`kvshrink.methods.rotatekv`) stores, per layer
and token ``t``, keys as codes of ``H_n · k_pre(t) - mu`` with ``H_n`` the normalized Sylvester
Hadamard matrix over each group of ``G`` KV heads (``n = G*D`` channels, head-major) and ``mu`` a
per-channel centre, quantized in per-token groups formed in a calibrated order over all ``H*D`` channels
(rotated channel ``c`` took quantization slot ``slots[c]``, group ``slots[c] // group``); values as codes
of ``v · H_D`` per head. Keys are pre-RoPE, so no rotation can be
folded into the query alone (RoPE depends on each stored token's position). The kernel undoes everything
per block of tokens instead, exactly:

* **channel order**: codes sit at their own rotated channel, so one program reads the key bytes of its
  rotation group's ``G*D`` channels contiguously; only the scale/zero of each channel comes from its slot's
  group, anywhere among the token's ``H*D/group`` groups. With fp16 scales and at most ``MAX_DOT_GROUPS``
  groups the program loads the token's whole scale row once per block and picks each channel's entry by a
  product with a one-hot ``(groups, D)`` matrix on the matrix units (``scale_lookup="dot"``), else it loads
  them per element (``"gather"``).
* **grouped-head Hadamard**: Sylvester's ``H_{G*D} = H_G ⊗ H_D`` (:func:`kvshrink.rotation.hadamard_matrix`),
  so with ``y[a, :]`` the rotated channels ``a*D .. a*D+D-1`` of the group, the pre-RoPE key of head ``a'``
  is ``x[a'] = (1/sqrt(G D)) sum_a H_G[a, a'] (y[a] @ H_D)``. RoPE acts identically on every head of a
  token, so it commutes with the head mixing, and the score of query ``q_j`` (its KV head ``a_j``) is

      q_j · RoPE_t(x[a_j]) = sum_a H_G[a, a_j] · q_j · RoPE_t(y[a] @ H_D) / sqrt(G D)

  with ``H_G[a, a'] = (-1)^popcount(a & a')``: per head tile ``a`` one ``tl.dot`` of the dequantized
  ``(tokens, D)`` tile with the ±1 matrix ``H_D`` (exact in fp16), RoPE in registers, and a score
  product for *all* query rows of the group, signed per row. ``1/sqrt(G D)`` and RoPE's
  ``attention_scaling`` are folded into the (fp32) cos/sin.
* **RoPE** (rotate-half pairing, full rotary width): with ``z = y @ H_D`` split in halves,
  ``k_lo = z_lo cos - z_hi sin``, ``k_hi = z_hi cos + z_lo sin``, ``cos/sin = cos/sin(pos_t · inv_freq)``
  (fp32, as transformers' rotary modules compute them); so ``H_D`` is applied as its two column halves and
  ``rotate_half`` costs no product at all.
* **Kronecker split of H_D** (``kron``, the default where ``D/PPB >= 32``, PPB = codes per byte): Sylvester's
  ``H_D[PPB*i + j, PPB*m + e] = H_{D/PPB}[i, m] * H_PPB[j, e]`` (the bits of ``i``/``j`` and ``m``/``e`` do not
  overlap). Code lane ``j`` of a byte row holds channels ``PPB*i + j``, so ``u_j = y_j @ H_{D/PPB}`` per lane (one
  small ±1 constant, loaded once per program) and a butterfly over lanes, ``z_e = sum_j H_PPB[j, e] u_j``, give the
  output channels ``PPB*m + e``: 4x fewer multiply-adds than ``y @ H_D`` at 2 bits and no ``D x D`` operand
  re-staged per block. RoPE's rotate-half partner of channel ``PPB*m + e`` (``+ D/2``) is the same lane's column
  ``m + D/(2 PPB)``, so each output lane is rotated and scored with the matching query channels on its own.
* **values**: ``out_j = (sum_t p_jt v_rot(t)) H_D^T / sqrt(D)``: accumulated in the rotated domain per KV
  head (query rows of other heads masked out of ``p``: the matrix unit pads to 16 rows anyway), and
  rotated back once per output row in the merge kernel.

``prerope=false``: keys are stored post-RoPE, so ``H_D`` folds into the query once per program
(``q_j · x[a_j] = sum_a H_G[a, a_j] (q_j H_D) · y[a] / sqrt(G D)``) and the main loop has one product per head.

Flash-decoding split-K as :mod:`.decode_attention`: grid ``(B * H/G, splits)``, one program per rotation
group and slice of tokens, online softmax in exp2, partial ``(max, sum, acc)`` per split. Everything
that is not in the quantized stream -- exact sink tokens, the unquantized residual, the new token -- is a
small *dense segment* (float32, built by the layer) that the merge kernel attends itself before merging it with
the splits by log-sum-exp (session 7: it was ~12 torch ops per layer and step, and eager steps are host-bound). Sink tokens are removed from the quantized stream inside the kernel (their codes are replaced on
read by the exact copies, as :meth:`RotateKVLayer.dense` does).

Reference: :meth:`kvshrink.methods.rotatekv.RotateKVLayer.dense` + softmax attention (the tests), and
:func:`state_dense` (dense K/V of a :class:`RotateKVState`: the fallback when the kernel cannot serve a call).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..storage import QuantizedTensor
from ._triton import HAS_TRITON, INTERPRET, dot_in_f32, next_pow2, tl, triton
from .decode_attention import _dummy, _sm_count, choose_splits, mask_arg, partials_workspace

RKV_BITS = (2, 4, 8)
RKV_HEAD_DIMS = (64, 128)
MAX_QROWS = 64  # G * (query heads per KV head), padded: the score tile's rows
MAX_SPLITS = 255  # + the dense segment: the merge kernel holds <= 256 partials
LOG2E = math.log2(math.e)

#: launch settings when a call names none. Block 64 / 4 warps / 2 stages / no register cap / one-hot scales /
#: Kronecker split was the fastest at the shapes where the kernel, not the host, sets the time (H100, two runs:
#: benchmarks/results/kernels_h100_rotatekv_kron*.json): 8x32K 0.89 ms (full D x D products at the same launch 1.00,
#: the previous default 32 / 4 / cap 128 1.05-1.08), 16x32K 1.67-1.69 (2.0-2.6). At 1x32K and 8x8K the eager call's
#: host work dominates (0.5-0.9 ms whatever the launch). ``maxnreg``: optional register cap (CUDA, fp16 path);
#: ``kron``: pre-RoPE keys through Sylvester's Kronecker split of ``H_D`` (per-lane ``D/PPB``-wide products and a
#: butterfly, where ``D/PPB >= 32``) instead of ``D x D`` products per token (see the module docstring)
#: ``fast_trig``: RoPE's cos/sin in the kernel by range reduction + the hardware approximations (see ``_cos_sin``)
LAUNCH: dict = {"block_n": 64, "num_warps": 4, "num_stages": 2, "waves": 4, "scale_lookup": "dot", "maxnreg": None,
                "kron": True, "fast_trig": True}
#: key groups per token (all heads) up to which scales are picked by a one-hot product (its K dimension)
MAX_DOT_GROUPS = 64


# ---------------------------------------------------------------------------------------------- state
@dataclass
class RotateKVState:
    """One layer's RotateKV cache as the decode kernel reads it (``T = tq + dense tokens``).

    Quantized stream, tokens ``[0, tq)`` (``key_axis="channel"`` layout, may be views into capacity buffers):
    ``kq``/``vq`` codes + fp scale/zero, ``k_mu (B, H, 1, D)`` or None, ``key_slots (H*D,)`` int32: ``kq.slots``
    (the quantization slot of each rotated key channel) for the kernel, None when ``kq.slots`` is None,
    ``pos (B, >= tq)`` int32 positions (prerope),
    ``inv_freq (D/2,)`` float32 and ``rope_scale`` (RoPE's ``attention_scaling``), ``head_group`` = G,
    ``rotate_values`` (values stored as ``v @ H_D``), ``sink_idx (B, S)`` int32 sink tokens (-1 = none):
    excluded from the quantized stream.

    Dense segment (attended exactly, by the merge kernel): ``dense_k (B, H, Td, D)`` post-RoPE keys, ``dense_v`` values
    *in the stored value domain* (``v @ H_D`` when ``rotate_values``), ``dense_idx (B, Td)`` int64 token index
    of each entry in ``[0, T)`` (for the padding mask), -1 = no token.
    """

    kq: QuantizedTensor | None
    vq: QuantizedTensor | None
    k_mu: torch.Tensor | None
    key_slots: torch.Tensor | None
    pos: torch.Tensor | None
    inv_freq: torch.Tensor | None
    rope_scale: float
    head_group: int
    rotate_values: bool
    sink_idx: torch.Tensor | None
    dense_k: torch.Tensor
    dense_v: torch.Tensor
    dense_idx: torch.Tensor
    tokens: int

    @property
    def tq(self) -> int:
        return 0 if self.kq is None else self.kq.tokens

    @property
    def prerope(self) -> bool:
        return self.inv_freq is not None

    @property
    def num_kv_heads(self) -> int:
        return self.dense_k.shape[1]

    def nbytes(self) -> int:
        """Bytes the decode step reads: codes, scales, zeros, centre, positions, the dense segment."""
        n = 0
        for qt in (self.kq, self.vq):
            if qt is not None:
                n += sum(t.numel() * t.element_size() for t in qt.tensors())
        if self.pos is not None:
            n += self.pos.shape[0] * self.tq * 4
        for t in (self.dense_k, self.dense_v):
            n += t.numel() * t.element_size()
        return n


def unsupported_reason(state: RotateKVState, head_dim: int, num_q_heads: int) -> str | None:
    """Why :func:`decode_attention_rotatekv` cannot serve ``state`` (None: it can)."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if head_dim not in RKV_HEAD_DIMS:
        return f"head_dim {head_dim} (kernel: {RKV_HEAD_DIMS})"
    G, H = state.head_group, state.num_kv_heads
    if G < 1 or G & (G - 1) or H % G:
        return f"head_group {G} is not a power of two dividing {H} KV heads"
    if num_q_heads % H:
        return f"{num_q_heads} query heads is not a multiple of {H} KV heads"
    if next_pow2(max(16, G * (num_q_heads // H))) > MAX_QROWS:
        return f"{G * (num_q_heads // H)} query rows per rotation group (kernel: <= {MAX_QROWS})"
    if (state.kq is None) != (state.vq is None) or (state.kq is not None and state.kq.tokens != state.vq.tokens):
        return "key and value streams cover different tokens"
    for qt, name in ((state.kq, "keys"), (state.vq, "values")):
        if qt is None:
            continue
        if qt.axis != "channel" or qt.zero is None:
            return f"{name}: only asymmetric per-token groups (key_axis=channel) are read by the kernel"
        if qt.bits not in RKV_BITS:
            return f"{name}: {qt.bits} bits (kernel: {RKV_BITS})"
        g = qt.group
        if g & (g - 1) or head_dim % g or g < 8 // qt.bits:
            return f"{name}: group {g} (kernel: a power of two dividing head_dim, >= codes per byte)"
        if qt.packed.stride(-1) != 1 or qt.scale.stride(-1) != 1 or qt.zero.stride(-1) != 1:
            return f"{name}: storage with a non-contiguous last dim"
    kslots = None if state.kq is None else state.kq.slots
    if (kslots is None) != (state.key_slots is None) or (
            kslots is not None and tuple(kslots.shape) != tuple(state.key_slots.shape)):
        return "key_slots must be the keys' own slots (kq.slots), both given or both None"
    if state.pos is not None and state.pos.dim() != 2:
        return "per-head positions (an eviction policy in front)"
    if state.sink_idx is not None and state.sink_idx.dim() != 2:
        return "per-head sink slots (an eviction policy in front)"
    if state.prerope and state.inv_freq.numel() != head_dim // 2:
        return "partial rotary embedding"
    return None


# ---------------------------------------------------------------------------------------------- kernels
if HAS_TRITON:
    from .decode_attention import _codes_to_float, _rescale, _store_partials

    @triton.jit
    def _hg_sign(x):
        """(-1)^popcount(x) as float32, x < 256: the Sylvester Hadamard entry H[a, a'] for x = a & a'."""
        x = x ^ (x >> 4)
        x = x ^ (x >> 2)
        x = x ^ (x >> 1)
        return 1.0 - 2.0 * (x & 1).to(tl.float32)

    @triton.jit
    def _dot(a, b, DOT_F32: tl.constexpr):
        """fp16 operands, fp32 accumulation on the matrix units; IEEE fp32 when the model runs in fp32."""
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(tl.float16), b.to(tl.float16))

    @triton.jit
    def _key_lane(kb, LANE: tl.constexpr, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t, live, MU,
                  mu_off, smu_h, D: tl.constexpr, KBITS: tl.constexpr, KG: tl.constexpr, HAS_SLOTS: tl.constexpr,
                  HAS_MU: tl.constexpr, SCALE_DOT: tl.constexpr):
        """Dequantized rotated-domain keys of code lane ``LANE`` (a code's position inside its byte) of head
        ``h``'s packed bytes ``kb (N, D/KPPB)`` (int32): channels ``jb * KPPB + LANE``, float32 ``(N, D/KPPB)``.
        Each byte is loaded once, for all its codes. A channel's scale/zero is its quantization slot's: with
        ``SCALE_DOT`` picked from the token's whole scale row ``sct/zet (N, groups)`` by a one-hot product on the
        matrix units (exact: one nonzero term), else loaded per element."""
        KPPB: tl.constexpr = 8 // KBITS
        KMASK: tl.constexpr = (1 << KBITS) - 1
        ch = jb * KPPB + LANE
        code = (kb >> (LANE * KBITS)) & KMASK
        if HAS_SLOTS:
            sp = tl.load(KSLOT + h * D + ch)
        else:
            sp = h * D + ch
        if SCALE_DOT:
            onehot = ((sp // KG)[None, :] == g_ar[:, None]).to(tl.float16)  # (groups, D/KPPB)
            ksc = tl.dot(sct, onehot)
            kze = tl.dot(zet, onehot)
        else:
            soff = ks_off + (sp // D)[None, :] * sks_h + t[:, None] * sks_t + ((sp % D) // KG)[None, :]
            ksc = tl.load(KS + soff, mask=live[:, None], other=0.0).to(tl.float32)
            kze = tl.load(KZ + soff, mask=live[:, None], other=0.0).to(tl.float32)
        y = _codes_to_float(code) * ksc + kze
        if HAS_MU:
            y += tl.load(MU + mu_off + h * smu_h + ch).to(tl.float32)[None, :]
        return y

    @triton.jit
    def _lane_products(kb, LANE: tl.constexpr, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t, live,
                       MU, mu_off, smu_h, HD, dh, qh0, qh1, qh2, qh3, D: tl.constexpr, KBITS: tl.constexpr,
                       KG: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_MU: tl.constexpr, SCALE_DOT: tl.constexpr,
                       PREROPE: tl.constexpr, DOT_F32: tl.constexpr):
        """Code lane ``LANE``'s share of a head tile: pre-RoPE, its part of ``y @ H_D`` as the two column halves
        ``(N, D/2)`` (``y_j @ H_D[rows of lane j]``); post-RoPE, its part of the scores ``qh<LANE> @ y_j^T``
        (returned twice; ``qh<j>`` is the query's ``H_D`` column slice of lane j)."""
        KPPB: tl.constexpr = 8 // KBITS
        y = _key_lane(kb, LANE, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t, live, MU, mu_off, smu_h,
                      D, KBITS, KG, HAS_SLOTS, HAS_MU, SCALE_DOT)
        if PREROPE:
            rows = HD + (jb * KPPB + LANE)[:, None] * D
            return (_dot(y, tl.load(rows + dh[None, :]), DOT_F32),
                    _dot(y, tl.load(rows + D // 2 + dh[None, :]), DOT_F32))
        else:
            q_lane = qh0
            if LANE == 1:
                q_lane = qh1
            if LANE == 2:
                q_lane = qh2
            if LANE == 3:
                q_lane = qh3
            part = _dot(q_lane, tl.trans(y), DOT_F32)
            return part, part

    @triton.jit
    def _kron_lane(kb, LANE: tl.constexpr, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t, live, MU,
                   mu_off, smu_h, hs_lo, hs_hi, D: tl.constexpr, KBITS: tl.constexpr, KG: tl.constexpr,
                   HAS_SLOTS: tl.constexpr, HAS_MU: tl.constexpr, SCALE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
        """``u_j = y_j @ H_{D/KPPB}`` of code lane ``LANE``, as its two column halves ``(N, D/(2 KPPB))``."""
        y = _key_lane(kb, LANE, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t, live, MU, mu_off, smu_h,
                      D, KBITS, KG, HAS_SLOTS, HAS_MU, SCALE_DOT)
        return _dot(y, hs_lo, DOT_F32), _dot(y, hs_hi, DOT_F32)

    @triton.jit
    def _lane_query(qbase, FREQ, m2, rows_ok, qk_scale, E: tl.constexpr, KPPB: tl.constexpr, D2: tl.constexpr):
        """Output lane ``E``: the inverse frequencies of channels ``KPPB*m + E`` (lower half) and the query's
        channels there and at their RoPE partners ``+ D/2``, ``(QROWS, D/(2 KPPB))`` float32 each."""
        ch = m2 * KPPB + E
        ql = tl.load(qbase + ch[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32) * qk_scale
        qu = tl.load(qbase + D2 + ch[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32) * qk_scale
        return tl.load(FREQ + ch), ql, qu

    @triton.jit
    def _cos_sin(ang, FAST_TRIG: tl.constexpr):
        """cos and sin of float32 angles. ``FAST_TRIG`` (compiled GPUs): the angle reduced to about [-pi, pi] by a
        two-constant Cody-Waite step (2 pi = C1 + C2, C1 = 6.28125 exact in few bits), then the hardware's
        ``cos/sin.approx`` (one MUFU each): absolute error ~1e-6 up to 128K positions times frequency 1, far
        below the bf16 rounding of the model's own cos/sin tables, instead of libdevice's accurate versions
        (~30 instructions each, and a double-precision slow path past |x| ~ 1e5, i.e. every long context).
        Else ``tl.cos``/``tl.sin`` (Triton's interpreter runs no PTX)."""
        if FAST_TRIG:
            k = tl.floor(ang * 0.15915494309189535 + 0.5)
            r = tl.fma(-k, 6.28125, ang)
            r = tl.fma(-k, 0.0019353071795864769, r)
            c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True,
                                          pack=1)
            s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True,
                                          pack=1)
            return c, s
        else:
            return tl.cos(ang), tl.sin(ang)

    @triton.jit
    def _lane_rope(pt, fr, rope_mult, FAST_TRIG: tl.constexpr = False):
        """cos/sin of one output lane's channels at positions ``pt (N, 1)``, times ``rope_mult``."""
        c, s = _cos_sin(pt * fr[None, :], FAST_TRIG)
        return c * rope_mult, s * rope_mult

    @triton.jit
    def _rope_score(ql, qu, zl, zh, cs, sn, DOT_F32: tl.constexpr):
        """Scores of one output lane: RoPE (rotate-half pairs ``zl``/``zh``) then the query's matching channels."""
        return _dot(ql, tl.trans(zl * cs - zh * sn), DOT_F32) + _dot(qu, tl.trans(zh * cs + zl * sn), DOT_F32)

    @triton.jit
    def _value_lane(vb, shift: tl.constexpr, VMASK: tl.constexpr, vsc, vze):
        return _codes_to_float((vb >> shift) & VMASK) * vsc + vze

    # T and everything derived from it change every decode step: no specialization on them
    @triton.jit(do_not_specialize=["TQ", "tokens_per_split", "NSINK", "spos_b", "smask_b", "ssink_b"])
    def _rkv_split_kernel(
            Q, sqb, sqh,  # (B, Hq, D)
            KP, skp_b, skp_h, skp_t,  # key codes (B, H, T, D*KBITS/8), packed along (rotated) channels
            KS, KZ, sks_b, sks_h, sks_t,  # key scale/zero (B, H, T, D/KG)
            MU, smu_b, smu_h,  # key centre (B, H, 1, D)
            KSLOT,  # (H*D,) int32: quantization slot of each rotated channel (its scale: group slot // KG)
            HD,  # (D, D) Sylvester ±1 matrix (unnormalized)
            POS, spos_b,  # (B, T) int32 positions
            FREQ,  # (D/2,) float32 inverse frequencies
            VP, svp_b, svp_h, svp_t,  # value codes (B, H, T, D*VBITS/8)
            VS, VZ, svs_b, svs_h, svs_t,  # value scale/zero (B, H, T, D/VG)
            SINK, ssink_b, NSINK,  # (B, S) int32 sink token indices, -1 = none
            MASK, smask_b,  # (B, T) int8, 1 = attend
            M_OUT, L_OUT, ACC_OUT, SLOTS,  # (B, Hq, SLOTS), (B, Hq, SLOTS), (B, Hq, SLOTS, D) float32
            LENS,  # graph mode: [tq] int32 on the device (the host's TQ and tokens_per_split are ignored)
            R, TQ, tokens_per_split, qk_scale, rope_mult,
            G: tl.constexpr, HG: tl.constexpr, QROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
            KBITS: tl.constexpr, KG: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr,
            PREROPE: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_MU: tl.constexpr, HAS_SINKS: tl.constexpr,
            S_PAD: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, SCALE_DOT: tl.constexpr,
            NGK: tl.constexpr, NGK_PAD: tl.constexpr, HAS_LENS: tl.constexpr = False, KRON: tl.constexpr = False,
            FAST_TRIG: tl.constexpr = False):
        VPPB: tl.constexpr = 8 // VBITS
        VDP: tl.constexpr = D // VPPB
        VMASK: tl.constexpr = (1 << VBITS) - 1
        D2: tl.constexpr = D // 2

        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // R
        r = pid % R
        d = tl.arange(0, D)
        dh = tl.arange(0, D2)
        jj = tl.arange(0, QROWS)
        rows_ok = jj < G * HG
        qrow = r * (G * HG) + jj  # query heads of KV heads r*G .. r*G+G-1 are contiguous
        arow = jj // HG  # each row's KV head within the group
        KPPB: tl.constexpr = 8 // KBITS
        jb = tl.arange(0, D // KPPB)  # key bytes of a token and head
        qbase = Q + b * sqb + qrow[:, None] * sqh
        NL: tl.constexpr = D // KPPB  # channels per code lane
        N2: tl.constexpr = NL // 2
        m2 = tl.arange(0, N2)
        if KRON:
            # H_D[KPPB*i + j, KPPB*m + e] = H_NL[i, m] * H_KPPB[j, e] (Sylvester): y @ H_D is NL-wide products per
            # code lane plus a butterfly over lanes. Output lane e holds channels KPPB*m + e; its RoPE partners
            # (+ D/2) are the same lane's columns m + NL/2. H_NL is H_D's top-left block; loaded once.
            il = tl.arange(0, NL)
            hs_lo = tl.load(HD + il[:, None] * D + m2[None, :])
            hs_hi = tl.load(HD + il[:, None] * D + N2 + m2[None, :])
            fr0, ql0, qu0 = _lane_query(qbase, FREQ, m2, rows_ok, qk_scale, 0, KPPB, D2)
            fr1, ql1, qu1 = fr0, ql0, qu0  # lanes past KPPB: placeholders, never read
            fr2, ql2, qu2 = fr0, ql0, qu0
            fr3, ql3, qu3 = fr0, ql0, qu0
            if KPPB > 1:
                fr1, ql1, qu1 = _lane_query(qbase, FREQ, m2, rows_ok, qk_scale, 1, KPPB, D2)
            if KPPB > 2:
                fr2, ql2, qu2 = _lane_query(qbase, FREQ, m2, rows_ok, qk_scale, 2, KPPB, D2)
                fr3, ql3, qu3 = _lane_query(qbase, FREQ, m2, rows_ok, qk_scale, 3, KPPB, D2)
        elif PREROPE:
            q_lo = tl.load(qbase + dh[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32) * qk_scale
            q_hi = tl.load(qbase + D2 + dh[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32) * qk_scale
            freq = tl.load(FREQ + dh)
            qh0 = q_lo  # unused: the query meets the keys after RoPE
            qh1 = q_lo
            qh2 = q_lo
            qh3 = q_lo
        else:
            q = tl.load(qbase + d[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32) * qk_scale
            # keys stored post-RoPE: H_D (and 1/sqrt(G D)) move onto the query once, one column slice per code lane
            qh0 = _dot(q, tl.load(HD + d[:, None] * D + (jb * KPPB)[None, :]), DOT_F32) * rope_mult
            qh1 = qh0
            qh2 = qh0
            qh3 = qh0
            if KPPB > 1:
                qh1 = _dot(q, tl.load(HD + d[:, None] * D + (jb * KPPB + 1)[None, :]), DOT_F32) * rope_mult
            if KPPB > 2:
                qh2 = _dot(q, tl.load(HD + d[:, None] * D + (jb * KPPB + 2)[None, :]), DOT_F32) * rope_mult
                qh3 = _dot(q, tl.load(HD + d[:, None] * D + (jb * KPPB + 3)[None, :]), DOT_F32) * rope_mult
        if HAS_SINKS:
            si = tl.arange(0, S_PAD)
            sidx = tl.load(SINK + b * ssink_b + si, mask=si < NSINK, other=-1)

        m_i = tl.full([QROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([QROWS], tl.float32)
        # value accumulators per code lane: acc<j>[:, cb] is channel cb * VPPB + j (as decode_attention.py)
        acc0 = tl.zeros([QROWS, VDP], tl.float32)
        acc1 = tl.zeros([QROWS, VDP], tl.float32)
        acc2 = tl.zeros([QROWS, VDP], tl.float32)
        acc3 = tl.zeros([QROWS, VDP], tl.float32)
        cb = tl.arange(0, VDP)

        if HAS_LENS:  # the split grid is fixed; each program derives its slice from the device length
            TQ = tl.load(LENS)
            tokens_per_split = tl.cdiv(tl.cdiv(TQ, tl.num_programs(1)), BLOCK_N) * BLOCK_N
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, TQ)
        kp_off = b * skp_b
        ks_off = b * sks_b
        mu_off = b * smu_b
        n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            t = start + n
            live = t < hi
            ok = live
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * smask_b + t, mask=live, other=0) != 0)
            if HAS_SINKS:  # sinks are attended exactly in the dense segment, not from their codes
                hit = tl.sum((t[:, None] == sidx[None, :]).to(tl.int32), axis=1)
                ok = ok & (hit == 0)
            if KRON:  # cos/sin per output lane (channels KPPB*m + e), rope_mult = attention_scaling / sqrt(G D)
                pt = tl.load(POS + b * spos_b + t, mask=live, other=0).to(tl.float32)[:, None]
                cs0, sn0 = _lane_rope(pt, fr0, rope_mult, FAST_TRIG)
                cs1, sn1 = cs0, sn0
                cs2, sn2 = cs0, sn0
                cs3, sn3 = cs0, sn0
                if KPPB > 1:
                    cs1, sn1 = _lane_rope(pt, fr1, rope_mult, FAST_TRIG)
                if KPPB > 2:
                    cs2, sn2 = _lane_rope(pt, fr2, rope_mult, FAST_TRIG)
                    cs3, sn3 = _lane_rope(pt, fr3, rope_mult, FAST_TRIG)
            elif PREROPE:
                ang = tl.load(POS + b * spos_b + t, mask=live, other=0).to(tl.float32)[:, None] * freq[None, :]
                cs, sn = _cos_sin(ang, FAST_TRIG)
                cs = cs * rope_mult  # rope_mult = attention_scaling / sqrt(G D)
                sn = sn * rope_mult
            g_ar = tl.arange(0, NGK_PAD)
            sct = g_ar
            zet = g_ar
            if SCALE_DOT:  # every key group's scale/zero of these tokens (all heads), once for the G head tiles
                goff = ks_off + (g_ar // (D // KG))[None, :] * sks_h + t[:, None] * sks_t + (g_ar % (D // KG))[None, :]
                gm = live[:, None] & (g_ar < NGK)[None, :]
                sct = tl.load(KS + goff, mask=gm, other=0.0)
                zet = tl.load(KZ + goff, mask=gm, other=0.0)
            s = tl.zeros([QROWS, BLOCK_N], tl.float32)
            for a in range(G):  # not unrolled: one head tile live at a time (registers)
                h = r * G + a
                kb = tl.load(KP + kp_off + h * skp_h + t[:, None] * skp_t + jb[None, :], mask=live[:, None],
                             other=0).to(tl.int32)
                if KRON:
                    # u_j = y_j @ H_NL per code lane; output lane e = sum_j H_KPPB[j, e] u_j (a butterfly)
                    u0l, u0h = _kron_lane(kb, 0, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t, live,
                                          MU, mu_off, smu_h, hs_lo, hs_hi, D, KBITS, KG, HAS_SLOTS, HAS_MU, SCALE_DOT,
                                          DOT_F32)
                    if KPPB == 1:
                        part = _rope_score(ql0, qu0, u0l, u0h, cs0, sn0, DOT_F32)
                    else:
                        u1l, u1h = _kron_lane(kb, 1, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t,
                                              live, MU, mu_off, smu_h, hs_lo, hs_hi, D, KBITS, KG, HAS_SLOTS, HAS_MU,
                                              SCALE_DOT, DOT_F32)
                        if KPPB == 2:
                            part = (_rope_score(ql0, qu0, u0l + u1l, u0h + u1h, cs0, sn0, DOT_F32)
                                    + _rope_score(ql1, qu1, u0l - u1l, u0h - u1h, cs1, sn1, DOT_F32))
                        else:
                            u2l, u2h = _kron_lane(kb, 2, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t,
                                                  t, live, MU, mu_off, smu_h, hs_lo, hs_hi, D, KBITS, KG, HAS_SLOTS,
                                                  HAS_MU, SCALE_DOT, DOT_F32)
                            u3l, u3h = _kron_lane(kb, 3, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t,
                                                  t, live, MU, mu_off, smu_h, hs_lo, hs_hi, D, KBITS, KG, HAS_SLOTS,
                                                  HAS_MU, SCALE_DOT, DOT_F32)
                            al, ah = u0l + u1l, u0h + u1h  # H_4's butterfly: lanes (0+1), (0-1), (2+3), (2-3)
                            bl, bh = u0l - u1l, u0h - u1h
                            cl, ch_ = u2l + u3l, u2h + u3h
                            dl, dh_ = u2l - u3l, u2h - u3h
                            part = (_rope_score(ql0, qu0, al + cl, ah + ch_, cs0, sn0, DOT_F32)
                                    + _rope_score(ql1, qu1, bl + dl, bh + dh_, cs1, sn1, DOT_F32)
                                    + _rope_score(ql2, qu2, al - cl, ah - ch_, cs2, sn2, DOT_F32)
                                    + _rope_score(ql3, qu3, bl - dl, bh - dh_, cs3, sn3, DOT_F32))
                else:
                    # code lane by code lane: y_j (N, D/KPPB) holds channels jb*KPPB + j; y @ H_D = sum_j y_j @ H_D[rows j]
                    z_lo, z_hi = _lane_products(kb, 0, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t, live,
                                                MU, mu_off, smu_h, HD, dh, qh0, qh1, qh2, qh3, D, KBITS, KG, HAS_SLOTS,
                                                HAS_MU, SCALE_DOT, PREROPE, DOT_F32)
                    for lane in tl.static_range(1, KPPB):
                        lo_, hi_ = _lane_products(kb, lane, jb, h, KSLOT, sct, zet, g_ar, KS, KZ, ks_off, sks_h, sks_t, t,
                                                  live, MU, mu_off, smu_h, HD, dh, qh0, qh1, qh2, qh3, D, KBITS, KG,
                                                  HAS_SLOTS, HAS_MU, SCALE_DOT, PREROPE, DOT_F32)
                        z_lo += lo_
                        z_hi += hi_
                    if PREROPE:
                        w_lo = z_lo * cs - z_hi * sn  # RoPE, rotate-half pairing
                        w_hi = z_hi * cs + z_lo * sn
                        part = _dot(q_lo, tl.trans(w_lo), DOT_F32) + _dot(q_hi, tl.trans(w_hi), DOT_F32)
                    else:
                        part = z_lo  # (query rows, N) scores already
                s += _hg_sign(arow & a)[:, None] * part  # H_G[a, a_j]
            m_i, l_i, p, alpha = _rescale(m_i, l_i, s, ok)
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            acc2 = acc2 * alpha[:, None]
            acc3 = acc3 * alpha[:, None]
            for a in range(G):  # not unrolled: one head tile live at a time (registers)
                pa = tl.where((arow == a)[:, None], p, 0.0)  # only the query rows of KV head r*G + a
                h = r * G + a
                # tokens not attended (padding, sinks, past the split) read as 0: p is 0 there, and 0 * (a
                # non-finite scale of a token nobody attends) must not turn the accumulator into NaN
                vb = tl.load(VP + b * svp_b + h * svp_h + t[:, None] * svp_t + cb[None, :], mask=ok[:, None],
                             other=0).to(tl.int32)
                if VG == D:
                    voff = b * svs_b + h * svs_h + t * svs_t
                    vsc = tl.load(VS + voff, mask=ok, other=0.0).to(tl.float32)[:, None]
                    vze = tl.load(VZ + voff, mask=ok, other=0.0).to(tl.float32)[:, None]
                else:
                    voff = b * svs_b + h * svs_h + t[:, None] * svs_t + ((cb * VPPB) // VG)[None, :]
                    vsc = tl.load(VS + voff, mask=ok[:, None], other=0.0).to(tl.float32)
                    vze = tl.load(VZ + voff, mask=ok[:, None], other=0.0).to(tl.float32)
                acc0 += _dot(pa, _value_lane(vb, 0, VMASK, vsc, vze), DOT_F32)
                if VPPB > 1:
                    acc1 += _dot(pa, _value_lane(vb, VBITS, VMASK, vsc, vze), DOT_F32)
                if VPPB > 2:
                    acc2 += _dot(pa, _value_lane(vb, 2 * VBITS, VMASK, vsc, vze), DOT_F32)
                    acc3 += _dot(pa, _value_lane(vb, 3 * VBITS, VMASK, vsc, vze), DOT_F32)

        _store_partials(M_OUT, L_OUT, ACC_OUT, (b * R * G * HG + qrow) * SLOTS + split, rows_ok, m_i, l_i,
                        acc0, acc1, acc2, acc3, cb, D, VPPB)

    @triton.jit
    def _rkv_merge_kernel(M_IN, L_IN, ACC_IN, HD, OUT, so_b, so_h, HQ, SLOTS, inv_sqrt_d,
                          Q, sq_b, sq_h, DK, DV, sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t, DIDX, sdi_b, MASK, sm_b,
                          TD, HG, qk_scale,
                          D: tl.constexpr, S_PAD: tl.constexpr, ROT_V: tl.constexpr, HAS_MASK: tl.constexpr,
                          TD_BLOCK: tl.constexpr):
        """The dense segment's attention (sinks, residual, the new token: ``TD`` float32 entries, index -1 = none),
        merged by log-sum-exp with the ``SLOTS - 1`` splits' partials, then ``o @ H_D^T / sqrt(D)``."""
        pid = tl.program_id(0)  # b * HQ + head
        b = pid // HQ
        hq = pid % HQ
        h = hq // HG
        d = tl.arange(0, D)
        qv = tl.load(Q + b * sq_b + hq * sq_h + d).to(tl.float32) * qk_scale
        m_d = tl.max(tl.full([TD_BLOCK], float("-inf"), tl.float32), axis=0)
        l_d = tl.sum(tl.zeros([TD_BLOCK], tl.float32), axis=0)
        acc_d = tl.zeros([D], tl.float32)
        for t0 in range(0, TD, TD_BLOCK):  # online softmax over the dense entries, as a split does
            t = t0 + tl.arange(0, TD_BLOCK)
            idx = tl.load(DIDX + b * sdi_b + t, mask=t < TD, other=-1)
            ok = idx >= 0
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * sm_b + tl.where(ok, idx, 0), mask=ok, other=0) != 0)
            kt = tl.load(DK + b * sdk_b + h * sdk_h + t[:, None] * sdk_t + d[None, :], mask=ok[:, None], other=0.0)
            sc = tl.where(ok, tl.sum(kt * qv[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_d, tl.max(sc, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_d - m_safe)
            p = tl.exp2(sc - m_safe)  # 0 where not ok
            vt = tl.load(DV + b * sdv_b + h * sdv_h + t[:, None] * sdv_t + d[None, :], mask=ok[:, None], other=0.0)
            l_d = l_d * alpha + tl.sum(p, axis=0)
            acc_d = acc_d * alpha + tl.sum(p[:, None] * vt, axis=0)
            m_d = m_new
        # the splits (slots 0 .. SLOTS - 2; the last slot is the dense segment's, computed above instead)
        s = tl.arange(0, S_PAD)
        smask = s < SLOTS - 1
        m = tl.load(M_IN + pid * SLOTS + s, mask=smask, other=float("-inf"))
        l = tl.load(L_IN + pid * SLOTS + s, mask=smask, other=0.0)
        m_max = tl.maximum(tl.max(m, axis=0), m_d)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe)  # splits that saw no token have m = -inf -> weight 0
        w_d = tl.exp2(m_d - m_safe)
        total = tl.sum(w * l, axis=0) + w_d * l_d
        acc = tl.load(ACC_IN + (pid * SLOTS + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        o = (tl.sum(acc * w[:, None], axis=0) + w_d * acc_d) / tl.where(total > 0, total, 1.0)
        if ROT_V:  # Sylvester's H_D is symmetric: H_D^T = H_D
            hd = tl.load(HD + d[:, None] * D + d[None, :]).to(tl.float32)
            o = tl.sum(o[:, None] * hd, axis=0) * inv_sqrt_d
        tl.store(OUT + b * so_b + hq * so_h + d, o.to(OUT.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=None)
def _hadamard_pm1(D: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Sylvester's ``D x D`` ±1 matrix (entries ``(-1)^popcount(i & j)``), unnormalized: exact in fp16."""
    from ..rotation import hadamard_matrix

    return (hadamard_matrix(D) * D ** 0.5).round().to(dtype=dtype, device=device).contiguous()


def hadamard_normalized(D: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H_D / sqrt(D)``: what :func:`kvshrink.rotation.hadamard_transform` multiplies by (power-of-two D)."""
    return _hadamard_pm1(D, torch.float32, str(torch.device(device))).to(dtype) * (D ** -0.5)


def decode_attention_rotatekv(q: torch.Tensor, state: RotateKVState, mask: torch.Tensor | None = None,
                              scale: float | None = None, out: torch.Tensor | None = None,
                              num_splits: int | None = None, block_n: int | None = None,
                              num_warps: int | None = None, num_stages: int | None = None,
                              waves: int | None = None, scale_lookup: str | None = None,
                              maxnreg: int | None = None, kron: bool | None = None,
                              lens: torch.Tensor | None = None,
                              workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                              fast_trig: bool | None = None) -> torch.Tensor:
    """Attention of ``q (B, Hq, D)`` (one token per sequence, post-RoPE) over a RotateKV cache ``state``.

    ``mask (B, T)`` bool/int, nonzero where a token may be attended (``T = state.tokens``). Returns
    ``(B, Hq, D)`` in ``q.dtype`` (or writes ``out``). Launch settings default to :data:`LAUNCH`
    (``scale_lookup``: how key scales are found, see the module docstring). Raises ValueError for what
    :func:`unsupported_reason` names; callers fall back to :func:`state_dense` + dense attention.

    Graph mode (``lens``, :mod:`.rotatekv_graph`): the quantized stream holds ``lens[0]`` tokens (int32 on
    the device; ``state.kq``/``vq`` may span a larger capacity), ``num_splits`` is fixed and each program
    derives its slice on the device, ``workspace`` (``partials_workspace(B, Hq, num_splits + 1, D)``) is reused:
    nothing depends on a host value that changes per step, so CUDA graphs can capture the call. A ``mask`` then
    covers the capacity, ``(B, >= state.tokens)``: the prompt's padding, then ones.
    """
    B, Hq, D = q.shape
    why = unsupported_reason(state, D, Hq)
    if why is not None:
        raise ValueError(f"decode_attention_rotatekv: {why}")
    block_n = max(16, block_n or LAUNCH["block_n"])
    num_warps = num_warps or LAUNCH["num_warps"]
    num_stages = num_stages or LAUNCH["num_stages"]
    waves = waves or LAUNCH["waves"]
    H, G = state.num_kv_heads, state.head_group
    HG, R = Hq // H, H // G
    T, tq, dev = state.tokens, state.tq, q.device
    if q.stride(-1) != 1:
        q = q.contiguous()
    maskt = None if mask is None else mask_arg(mask, B, T, lens is not None, dev)[0]
    sc = D ** -0.5 if scale is None else scale
    qk_scale = sc * LOG2E  # the softmax runs in exp2
    if lens is not None:
        if not num_splits or not 0 < num_splits <= MAX_SPLITS or state.kq is None:
            raise ValueError(f"graph mode needs a quantized stream and a fixed 0 < num_splits <= {MAX_SPLITS}")
        splits, per_split = num_splits, 0
    elif tq > 0:
        sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev.type == "cuda" else 4
        splits = max(1, min(num_splits or choose_splits(B * R, tq, block_n, sms, waves), MAX_SPLITS))
        per_split = -(-tq // splits)
        per_split = -(-per_split // block_n) * block_n  # whole blocks per split
        splits = -(-tq // per_split)
    else:
        splits, per_split = 0, block_n
    slots = splits + 1  # partial-result slots, one per split; the last one (the dense segment's) stays unused
    m_ws, l_ws, acc_ws = workspace if workspace is not None else partials_workspace(B, Hq, slots, D, dev)
    if tuple(acc_ws.shape) != (B, Hq, slots, D):
        raise ValueError(f"workspace must hold (B, Hq, splits + 1, D) = {(B, Hq, slots, D)} partials")
    dot_f32 = dot_in_f32(q.dtype)
    hd = _hadamard_pm1(D, torch.float32 if dot_f32 else torch.float16, str(dev))
    if splits:
        _launch_split(q, state, maskt, m_ws, l_ws, acc_ws, slots, splits, per_split, qk_scale, hd, block_n,
                      num_warps, num_stages, dot_f32, R, HG, scale_lookup, lens,
                      maxnreg if maxnreg is not None else LAUNCH.get("maxnreg"),
                      LAUNCH.get("kron", True) if kron is None else kron,
                      LAUNCH.get("fast_trig", True) if fast_trig is None else fast_trig)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    if out.stride(-1) != 1 or tuple(out.shape) != (B, Hq, D):
        raise ValueError("out must be (B, Hq, D) with a contiguous last dim")
    dk, dv, didx = state.dense_k, state.dense_v, state.dense_idx
    if dk.stride(-1) != 1 or dv.stride(-1) != 1 or didx.stride(-1) != 1:
        raise ValueError("dense_k, dense_v and dense_idx must have a contiguous last dim")
    # the merge attends the dense segment itself (one launch, no torch ops: eager steps are host-bound)
    _rkv_merge_kernel[(B * Hq,)](m_ws, l_ws, acc_ws, hd, out, out.stride(0), out.stride(1), Hq, slots, D ** -0.5,
                                 q, q.stride(0), q.stride(1), dk, dv, *dk.stride()[:3], *dv.stride()[:3],
                                 didx, didx.stride(0), maskt if maskt is not None else _dummy(dev, torch.int8),
                                 maskt.stride(0) if maskt is not None else 0, dk.shape[2], HG, qk_scale,
                                 D=D, S_PAD=next_pow2(slots), ROT_V=state.rotate_values, HAS_MASK=maskt is not None,
                                 TD_BLOCK=16, num_warps=4)
    return out


def _launch_split(q, state: RotateKVState, maskt, m_ws, l_ws, acc_ws, slots, splits, per_split, qk_scale, hd,
                  block_n, num_warps, num_stages, dot_f32, R, HG, scale_lookup, lens=None, maxnreg=None,
                  kron=True, fast_trig=True) -> None:
    B, Hq, D = q.shape
    dev = q.device
    G = state.head_group
    kq, vq = state.kq, state.vq
    i32, f16 = _dummy(dev, torch.int32), _dummy(dev, torch.float16)
    mu = state.k_mu
    mu_st = (mu.stride(0), mu.stride(1)) if mu is not None else (0, 0)
    if mu is not None and mu.stride(-1) != 1:
        raise ValueError("k_mu must have a contiguous last dim")
    pos, freq = state.pos, state.inv_freq
    if state.prerope and pos.stride(-1) != 1:
        pos = pos.contiguous()
    sink = state.sink_idx
    nsink = 0 if sink is None else sink.shape[-1]
    if sink is not None and sink.stride(-1) != 1:
        sink = sink.contiguous()
    rope_mult = (state.rope_scale if state.prerope else 1.0) / math.sqrt(G * D)
    ngk = state.num_kv_heads * (D // kq.group)  # key groups per token, all heads
    if scale_lookup is None:
        scale_lookup = LAUNCH["scale_lookup"]
    if scale_lookup not in ("dot", "gather"):
        raise ValueError(f"scale_lookup must be 'dot' or 'gather', got {scale_lookup!r}")
    # the one-hot pick needs scales exact in fp16 (and few groups: its product runs over all of them)
    scale_dot = scale_lookup == "dot" and kq.scale.dtype == torch.float16 and ngk <= MAX_DOT_GROUPS
    _rkv_split_kernel[(B * R, splits)](
        q, q.stride(0), q.stride(1),
        kq.packed, *kq.packed.stride()[:3], kq.scale, kq.zero, *kq.scale.stride()[:3],
        mu if mu is not None else f16, *mu_st,
        state.key_slots if state.key_slots is not None else i32,
        hd,
        pos if state.prerope else i32, pos.stride(0) if state.prerope else 0,
        freq if state.prerope else _dummy(dev, torch.float32),
        vq.packed, *vq.packed.stride()[:3], vq.scale, vq.zero, *vq.scale.stride()[:3],
        sink if nsink else i32, sink.stride(0) if nsink else 0, nsink,
        maskt if maskt is not None else _dummy(dev, torch.int8), maskt.stride(0) if maskt is not None else 0,
        m_ws, l_ws, acc_ws, slots, lens if lens is not None else i32,
        R, state.tq, per_split, qk_scale, rope_mult,
        G=G, HG=HG, QROWS=next_pow2(max(16, G * HG)), D=D, BLOCK_N=block_n, KBITS=kq.bits, KG=kq.group,
        VBITS=vq.bits, VG=vq.group, PREROPE=state.prerope, HAS_SLOTS=state.key_slots is not None,
        HAS_MU=mu is not None, HAS_SINKS=nsink > 0, S_PAD=next_pow2(max(nsink, 1)),
        HAS_MASK=maskt is not None, DOT_F32=dot_f32, SCALE_DOT=scale_dot, NGK=ngk, NGK_PAD=next_pow2(max(16, ngk)),
        HAS_LENS=lens is not None, KRON=bool(kron and state.prerope and D // (8 // kq.bits) >= 32),
        FAST_TRIG=bool(fast_trig) and dev.type == "cuda" and torch.version.hip is None and not INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
        # register cap on the fp16 path only, where it was measured
        **({"maxnreg": maxnreg} if maxnreg and dev.type == "cuda" and not dot_f32 else {}))


# ---------------------------------------------------------------------------------------------- torch reference
def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``(B, T, D)`` as transformers' standard rotary module computes them (fp32)."""
    freqs = pos.float()[..., None] * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def state_dense(state: RotateKVState, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``T`` tokens' post-RoPE keys and values of ``state`` as ``dtype`` (float32 math, one cast), as
    :meth:`RotateKVLayer.dense` reads them plus the dense segment placed at its token indices."""
    from ..rope import apply_rope
    from ..rotation import hadamard_transform

    B, H, _, D = state.dense_k.shape
    T, tq, G = state.tokens, state.tq, state.head_group
    K = torch.zeros(B, H, T + 1, D, dtype=torch.float32, device=state.dense_k.device)  # + a dump slot for -1
    V = torch.zeros_like(K)
    if tq:
        y = state.kq.dequantize(torch.float32)  # channel c with its slot's scale (kq.slots)
        if state.k_mu is not None:
            y = y + state.k_mu.float()
        y = y.transpose(1, 2).reshape(B, tq, H * D)
        x = hadamard_transform(y.reshape(B, tq, H // G, G * D), inverse=True).reshape(B, tq, H, D).transpose(1, 2)
        if state.prerope:
            cos, sin = rope_tables(state.pos[:, :tq], state.inv_freq, state.rope_scale)
            x = apply_rope(x, cos, sin)
        K[:, :, :tq] = x
        v = state.vq.dequantize(torch.float32)
        V[:, :, :tq] = hadamard_transform(v, inverse=True) if state.rotate_values else v
    dv = state.dense_v.float()
    if state.rotate_values:
        dv = hadamard_transform(dv, inverse=True)
    idx = torch.where(state.dense_idx >= 0, state.dense_idx, T)[:, None, :, None].expand(B, H, -1, D)
    K.scatter_(2, idx, state.dense_k.float())
    V.scatter_(2, idx, dv)
    return K[:, :, :T].to(dtype), V[:, :, :T].to(dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """Plain float32 softmax attention of ``q (B, Hq, D)`` over dense ``k, v (B, H, T, D)`` (GQA)."""
    B, Hq, D = q.shape
    rep = Hq // k.shape[1]
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k) * (D ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", torch.softmax(s, dim=-1).nan_to_num(0.0), v)


__all__ = ["RotateKVState", "decode_attention_rotatekv", "unsupported_reason", "state_dense", "attention_ref",
           "rope_tables", "hadamard_normalized", "LAUNCH"]
