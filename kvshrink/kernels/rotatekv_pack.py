"""Fused Triton kernel: RotateKV's key/value storage transform + clipped quantization + packing, one launch.

RotateKV (Su et al. 2025, arXiv 2501.16383, Sec. 3; ``kvshrink/methods/rotatekv.py``) stores, per layer,

* keys: ``kq = Q_clip^P( (H_G · R_t^{-1} k_t) - mu )`` rounded to 16 bits (the model dtype, or fp16 for
  an fp32 model: ``RotateKVLayer.stored_dtype``) before ``Q_clip``, where
  ``R_t^{-1}`` inverts RoPE with the chunk's (cos, sin) (``prerope``; :func:`kvshrink.rope.invert_rope`:
  ``k_pre = (k cos - rotate_half(k) sin) / (cos^2 + sin^2)``), ``H_G`` is the normalized Sylvester Hadamard
  matrix over each group of ``G`` KV heads (``G*D`` channels, head-major: channel ``h*D + d``), applied as
  :func:`kvshrink.rotation.fwht` does (butterfly stages with pair distance 1, 2, ..., G*D/2, then one multiply
  by ``1/sqrt(G*D)``), ``mu`` the per-channel centre ``k_mu (B, H, 1, D)``, and ``Q_clip^P`` quantizes with the
  groups formed over the layer's ``H*D`` channels in the calibrated order ``P`` (slot ``j`` = rotated channel
  ``perm[j]``) while every code stays at its own channel (:func:`kvshrink.methods.rotatekv.quantize_clipped`);
* values: ``vq = Q_clip(v · H_D)`` (per head);

with ``Q_clip`` the asymmetric per-token quantizer over groups of ``group`` channels and the range scaled by
``clip`` (:func:`kvshrink.methods.rotatekv.quantize_clipped`): ``zero = fp16(clip*min)``,
``scale = fp16((clip*max - zero) / (2**bits - 1))``, ``code = clamp(round_half_even((x - zero) / scale))``,
packed little-endian along channels (:func:`kvshrink.storage.pack`).

The torch path is ~15 launches per layer and step with float32 temporaries; here one program holds a block of
tokens with *all* ``H`` heads (the permutation crosses heads) and does every step in registers:

1. inverse RoPE at load time (the tile is loaded twice, the second time at the rotate-half partner column);
2. the Hadamard as the *same* butterfly stages as ``fwht`` (reshape/permute/split/join), so every float32
   addition happens in the same order as the reference: the rotated keys are bit-identical, not just close;
3. centre, round to the model dtype;
4. the permutation into slot order as one ``tl.gather`` along the channel axis up to 1024 channels
   (Llama-3-8B's 8 x 128); above that (Triton makes the gather warp-local and spills) through the program's own
   slice of a global float32 scratch buffer: store, ``bar.sync``, load at permuted offsets (stays in L1/L2);
5. clipped min/max, scale/zero and codes per slot group as ``quant_pack.py``; the codes permuted back to
   their channels (the inverse permutation, same route), packed.

Bit-exactness: every float32 operation of the reference is done once, in the same order, with IEEE rounding
(``div_rn`` for the divisions; the launch sets ``enable_fp_fusion=False`` so that ``a*b - c`` is not contracted
into an FMA, which torch's separate element-wise kernels never do). One device difference of torch itself is
followed: on CUDA ``(max - zero) / (2**bits - 1)`` (division by a Python scalar) is computed as a product with
``float32(1 / (2**bits - 1))`` (``div_true_kernel_cuda``), on CPU as a division; the kernel does the same as torch
on the tensor's device (the two can differ in the last bit: visible with fp32 scales, rarely after rounding
to fp16). So scales/zeros are bit-equal and codes equal; the tests still allow codes 1 apart at rounding ties
(as ``quant_pack``'s do) and count them.

Not covered (callers keep the torch path; :func:`rotatekv_pack_supported` says so): 3 or 16 bits,
``key_axis="token"``, head_dim other than 64/128, non-power-of-two Hadamard sizes (Paley), groups that do
not divide head_dim. Residual tokens (``residual > 0``) and sinks are the caller's business: these functions
quantize every token they are given.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import TYPE_CHECKING

import torch

from ..storage import QuantizedTensor, packed_size
from ._triton import HAS_TRITON, kernels_usable, next_pow2, tl, triton
from .quant_pack import _check_out

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.rotatekv import RotateKVLayer

PACK_BITS = (2, 4, 8)
HEAD_DIMS = (64, 128)
# fp32 elements of one program's tile (tokens x all heads' channels): 2 tokens of Llama-3-8B's 8 x 128, 4 warps
# (H100, 8K prefill, 32 layers K+V: 2 tokens 5.1 ms, 4 tokens / 8 warps 7.5 ms, 8 tokens 6.8 ms)
TILE_ELEMS = 2048
# the channel permutation: tl.gather up to this many channels (H*D), a global scratch round trip above (sm_90
# compile: tl.gather over 2048 channels spills, 255 registers + 4.7 KB stack; over 1024 it takes 126, no spills)
GATHER_MAX_CHANNELS = 1024


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    from .quant_pack import _round_half_even

    @triton.jit
    def _round_to(x, BF16: tl.constexpr, DT: tl.constexpr):
        """float32 ``x`` rounded to nearest-even in ``DT``, returned as float32 (``tensor.to(dtype)``).
        bfloat16 by integer arithmetic on the bits: the GPU's cvt.rn.bf16.f32 does the same, but Triton's
        interpreter truncates instead; fp16/fp32 by a plain conversion (RNE everywhere)."""
        if BF16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True)
        else:
            return x.to(DT).to(tl.float32)

    @triton.jit
    def _fwht_stage(x, ROWS: tl.constexpr, N: tl.constexpr, STEP: tl.constexpr):
        """One stage of ``rotation.fwht``: inside blocks of ``2*STEP`` channels, ``(a, b) -> (a + b, a - b)``
        for the pairs ``STEP`` apart: the same float32 additions, in the same order, as the reference."""
        y = tl.reshape(x, [ROWS, N // (2 * STEP), 2, STEP])
        y = tl.permute(y, [0, 1, 3, 2])  # the pair axis last, where split/join act
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
        return tl.reshape(y, [ROWS, N])

    @triton.jit
    def _permute(x, IDX, SCR, c, C: tl.constexpr, BLOCK_T: tl.constexpr, SCRATCH: tl.constexpr):
        """``x[:, IDX[c]]`` for a float32 ``(BLOCK_T, C)`` tile: by ``tl.gather`` in registers, or (``SCRATCH``)
        through this program's own slice of a global float32 buffer: store, ``bar.sync``, load at the permuted
        offsets (the round trip stays in L1/L2)."""
        idx = tl.load(IDX)
        if SCRATCH:
            base = SCR + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * (BLOCK_T * C)
            rr = tl.arange(0, BLOCK_T)[:, None] * C
            tl.store(base + rr + c[None, :], x)
            tl.debug_barrier()  # bar.sync: the CTA's global writes are visible to all its threads
            return tl.load(base + rr + idx[None, :])
        else:  # Triton makes the gather warp-local, which spills beyond ~1024 channels
            return tl.gather(x, tl.broadcast_to(idx[None, :], [BLOCK_T, C]), 1)

    @triton.jit
    def _invert_rope(x, row, d, m, COS, SIN, coff, R: tl.constexpr):
        """``(k cos - rotate_half(k) sin) / (cos^2 + sin^2)`` on the leading ``R`` channels of each head
        (``rope.invert_rope``; float32, IEEE division); channels ``>= R`` pass through."""
        HALF: tl.constexpr = R // 2
        rot = d < R
        partner = tl.where(d < HALF, d + HALF, tl.where(rot, d - HALF, d))
        x2 = tl.load(row + partner[None, :], mask=m, other=0.0).to(tl.float32)
        rh = tl.where((d < HALF)[None, :], -x2, x2)  # rotate_half(k) = (-k[R/2:], k[:R/2])
        mr = m & rot[None, :]
        c = tl.load(COS + coff, mask=mr, other=1.0).to(tl.float32)
        s = tl.load(SIN + coff, mask=mr, other=0.0).to(tl.float32)
        pre = tl.math.div_rn(x * c - rh * s, c * c + s * s)
        return tl.where(rot[None, :], pre, x)

    # outputs are views at a new token offset every call (capacity buffers): no alignment specialization
    @triton.jit(do_not_specialize=["P", "S", "Z", "T"])
    def _rotate_quant_kernel(X, sxb, sxh, sxt,  # input (B, H, T, D), last dim contiguous
                             COS, SIN, scb, sch, sct,  # RoPE (B, H, T, R) views (stride 0 where broadcast)
                             PERM, INV,  # int32 (HP*D,): slot j <- rotated channel PERM[j]; INV = PERM^-1
                             SCR,  # fp32 scratch, BLOCK_T*HP*D per program (SCRATCH only)
                             MU, smb, smh,  # centre (B, H, 1, D), last dim contiguous
                             P, spb, sph, spt,  # packed (B, H, T, D // PPB)
                             S, Z, ssb, ssh, sst,  # scale/zero (B, H, T, D // GROUP)
                             T, clip, inv_norm, inv_hi,
                             H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                             G: tl.constexpr, LOG_N: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                             BLOCK_T: tl.constexpr, ROPE: tl.constexpr, FWHT: tl.constexpr,
                             REORDER: tl.constexpr, SCRATCH: tl.constexpr, CENTER: tl.constexpr,
                             X_BF16: tl.constexpr, S_BF16: tl.constexpr, RECIP_HI: tl.constexpr,
                             R_F16: tl.constexpr):
        C: tl.constexpr = HP * D  # all heads' channels (HP: H padded to a power of two)
        b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.arange(0, C)
        h = c // D
        d = c % D
        tmask = t < T
        hmask = h < H
        m = tmask[:, None] & hmask[None, :]
        row = X + b * sxb + t[:, None] * sxt + (h * sxh)[None, :]
        x = tl.load(row + d[None, :], mask=m, other=0.0).to(tl.float32)  # k.float()
        if ROPE:
            coff = b * scb + t[:, None] * sct + (h * sch + d)[None, :]
            x = _invert_rope(x, row, d, m, COS, SIN, coff, R)
        if FWHT:  # x (B, T, H*D) -> (B*T*H/G, G*D): rows of one rotation group, head-major channels
            N: tl.constexpr = G * D
            ROWS: tl.constexpr = BLOCK_T * (HP // G)
            y = tl.reshape(x, [ROWS, N])
            for i in tl.static_range(LOG_N):
                y = _fwht_stage(y, ROWS, N, 1 << i)
            x = tl.reshape(y, [BLOCK_T, C]) * inv_norm  # fwht's final `* (1 / sqrt(n))`, fp32 constant
        if CENTER:  # k_mu is per rotated channel
            mu = tl.load(MU + b * smb + h * smh + d, mask=hmask, other=0.0).to(tl.float32)
            x = x - mu[None, :]
        # `kr.to(stored_dtype)` before quantizing: the reference quantizes the 16-bit tensor
        if R_F16:  # fp32 input: the layer stores (and quantizes from) fp16 (RotateKVLayer.stored_dtype)
            x = x.to(tl.float16).to(tl.float32)
        else:
            x = _round_to(x, X_BF16, X.dtype.element_ty)
        if REORDER:  # channels into quantization-slot order: slot j <- rotated channel PERM[j]
            x = _permute(x, PERM + c, SCR, c, C, BLOCK_T, SCRATCH)

        # clipped asymmetric quantization, per token over GROUP channels (quantize_clipped's order)
        NGT: tl.constexpr = C // GROUP
        NG: tl.constexpr = D // GROUP
        HI: tl.constexpr = (1 << BITS) - 1
        xg = tl.reshape(x, [BLOCK_T, NGT, GROUP])
        mn = tl.min(xg, axis=2) * clip
        mx = tl.max(xg, axis=2) * clip
        zero = _round_to(mn, S_BF16, S.dtype.element_ty)  # stored values, as float32
        if RECIP_HI:  # torch on CUDA divides by a Python scalar as `x * fp32(1/hi)` (div_true_kernel_cuda)
            scale = _round_to((mx - zero) * inv_hi, S_BF16, S.dtype.element_ty)
        else:  # torch on CPU divides
            scale = _round_to(tl.math.div_rn(mx - zero, HI * 1.0), S_BF16, S.dtype.element_ty)
        s = tl.where(scale > 0, scale, 1.0)
        q = tl.math.div_rn(xg - zero[:, :, None], s[:, :, None])
        codes = tl.minimum(tl.maximum(_round_half_even(q), 0.0), HI * 1.0).to(tl.int32)

        if REORDER:  # every code back to its own channel: channel c was quantized in slot INV[c]
            codes = tl.reshape(codes, [BLOCK_T, C])
            if SCRATCH:
                tl.debug_barrier()  # everybody has read the slot-order keys before the scratch is reused
            codes = _permute(codes.to(tl.float32), INV + c, SCR, c, C, BLOCK_T, SCRATCH).to(tl.int32)

        # channel c of a head sits in byte c // PPB at bit BITS * (c % PPB)
        PPB: tl.constexpr = 8 // BITS
        DP: tl.constexpr = D // PPB
        codes = tl.reshape(codes, [BLOCK_T, C // PPB, PPB])
        shifts = (tl.arange(0, PPB) * BITS)[None, None, :]
        packed = tl.sum(codes << shifts, axis=2).to(tl.uint8)
        kb = tl.arange(0, C // PPB)
        ph = kb // DP
        tl.store(P + b * spb + t[:, None] * spt + (ph * sph + kb % DP)[None, :], packed,
                 mask=tmask[:, None] & (ph < H)[None, :])
        gi = tl.arange(0, NGT)
        sh = gi // NG
        off = b * ssb + t[:, None] * sst + (sh * ssh + gi % NG)[None, :]
        smask = tmask[:, None] & (sh < H)[None, :]
        tl.store(S + off, scale.to(S.dtype.element_ty), mask=smask)  # exact: already rounded
        tl.store(Z + off, zero.to(S.dtype.element_ty), mask=smask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def rotatekv_pack_supported(layer: "RotateKVLayer", k: torch.Tensor | None = None) -> bool:
    """Whether the fused kernel reproduces ``layer``'s storage of ``k`` (else keep the torch path).

    Needs Triton (CUDA, or the interpreter), bits 2/4/8, head_dim 64/128, ``key_axis="channel"``, a
    power-of-two head group dividing the KV heads, power-of-two key/value groups dividing head_dim, and
    (with ``k``) a (B, H, T, D) fp16/bf16/fp32 tensor of this layer's shape on a usable device."""
    m = layer.m
    ok = (HAS_TRITON and layer.bits in PACK_BITS and layer.D in HEAD_DIMS and layer.key_axis == "channel"
          and _pow2(layer.G) and layer.H % layer.G == 0
          and all(_pow2(g) and 8 <= g <= layer.D and layer.D % g == 0 for g in (layer.key_group, layer.value_group))
          and not (layer.reordered and layer.perm is None)
          and layer.scale_dtype in (torch.float16, torch.bfloat16, torch.float32))
    if not ok:
        return False
    if m.fwht and (layer.G * layer.D) & (layer.G * layer.D - 1):
        return False
    if k is not None:
        if k.dim() != 4 or k.shape[1] != layer.H or k.shape[-1] != layer.D:
            return False
        if k.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not kernels_usable(k.device):
            return False
    return True


# int32 permutation and its inverse padded to HP*D, per layer and device (a decode step must not rebuild them)
_PERMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _perm_i32(layer: "RotateKVLayer", hp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (id(layer.perm), hp, str(device))
    hit = _PERMS.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    n = layer.H * layer.D
    pair = []
    for order in (layer.perm, layer.inv_perm):
        p = torch.arange(hp * layer.D, dtype=torch.int32)  # padded heads map to themselves (masked on store)
        p[:n] = order.to(torch.int32)
        pair.append(p.to(device))
    _PERMS[layer] = (key, tuple(pair))
    return tuple(pair)  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)  # called per launch: two tiny CPU tensors each time otherwise
def _recip32(n: int) -> float:
    """``float32(1) / float32(n)``, correctly rounded: the factor torch's CUDA division by a scalar uses."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(n), dtype=torch.float32))


def _rope_views(cos: torch.Tensor, sin: torch.Tensor, B: int, H: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as (B, H, T, R) views (``rope._bcast``: (B, T, R) is shared by all heads), last dim contiguous,
    same strides for both."""
    out = []
    for t in (cos, sin):
        if t.dim() == 3:
            t = t[:, None]
        if t.dim() != 4 or t.shape[-2] != T:
            raise ValueError(f"cos/sin must be (B, T, R) or (B, H, T, R) with T={T}, got {tuple(t.shape)}")
        out.append(t.expand(B, H, T, t.shape[-1]))
    c, s = out
    if c.stride() != s.stride() or c.stride(-1) != 1:
        c, s = c.contiguous(), s.contiguous()
    return c, s


def _outputs(B: int, H: int, T: int, D: int, bits: int, group: int, scale_dtype: torch.dtype, device,
             out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None):
    shapes = ((B, H, T, packed_size(D, bits)), (B, H, T, D // group))
    if out is None:
        return (torch.empty(shapes[0], dtype=torch.uint8, device=device),
                torch.empty(shapes[1], dtype=scale_dtype, device=device),
                torch.empty(shapes[1], dtype=scale_dtype, device=device))
    packed, scale, zero = out
    _check_out(packed, shapes[0], torch.uint8, "packed", 1)
    _check_out(scale, shapes[1], scale_dtype, "scale", 1)
    _check_out(zero, shapes[1], scale_dtype, "zero", 1)
    if scale.stride() != zero.stride():
        raise ValueError("scale and zero must have the same strides")
    return packed, scale, zero


def _launch(layer: "RotateKVLayer", x: torch.Tensor, group: int, *, rope: tuple | None, rot_heads: int,
            fwht: bool, reorder: bool, mu: torch.Tensor | None, out: tuple | None, block_t: int | None,
            num_warps: int | None, scratch: bool | None) -> QuantizedTensor:
    B, H, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    packed, scale, zero = _outputs(B, H, T, D, layer.bits, group, layer.scale_dtype, x.device, out)
    hp = next_pow2(H)
    C = hp * D
    if rope is not None:
        cos, sin = _rope_views(rope[0], rope[1], B, H, T)
        R = cos.shape[-1]
        if R % 2 or R > D:
            raise ValueError(f"rotary dim {R} must be even and <= head_dim {D}")
        rs = (cos.stride(0), cos.stride(1), cos.stride(2))
    else:
        cos = sin = x
        R, rs = D, (0, 0, 0)
    perm, inv = _perm_i32(layer, hp, x.device) if reorder else (x, x)
    if mu is not None:
        mu = mu.to(device=x.device).expand(B, H, 1, D)
        if mu.stride(-1) != 1:
            mu = mu.contiguous()
        ms = (mu.stride(0), mu.stride(1))
    center = mu is not None
    if not center:
        mu, ms = x, (0, 0)
    n = rot_heads * D
    if block_t is None:
        block_t = max(1, min(next_pow2(T), TILE_ELEMS // C))
    if num_warps is None:
        num_warps = 4 if block_t * C <= 2048 else 8
    grid = (B, triton.cdiv(T, block_t))
    if scratch is None:  # tl.gather exists from Triton 3.2 on: older ones take the scratch route
        scratch = C > GATHER_MAX_CHANNELS or not hasattr(tl, "gather")
    scr = x
    if reorder and scratch:
        scr = torch.empty(grid[0] * grid[1] * block_t * C, dtype=torch.float32, device=x.device)
    if T and B:
        _rotate_quant_kernel[grid](
            x, x.stride(0), x.stride(1), x.stride(2),
            cos, sin, *rs, perm, inv, scr, mu, *ms,
            packed, packed.stride(0), packed.stride(1), packed.stride(2),
            scale, zero, scale.stride(0), scale.stride(1), scale.stride(2),
            T, float(layer.clip), 1.0 / math.sqrt(n), _recip32(2**layer.bits - 1),
            H=H, HP=hp, D=D, R=R, G=rot_heads, LOG_N=int(math.log2(n)), GROUP=group, BITS=layer.bits,
            BLOCK_T=block_t, ROPE=rope is not None, FWHT=fwht, REORDER=reorder, SCRATCH=bool(scratch), CENTER=center,
            X_BF16=x.dtype == torch.bfloat16, S_BF16=layer.scale_dtype == torch.bfloat16, RECIP_HI=x.is_cuda,
            R_F16=layer.stored_dtype(x.dtype) != x.dtype,
            num_warps=num_warps, enable_fp_fusion=False)
    order = layer.channel_order(x.device) if reorder else None
    return QuantizedTensor(packed, scale, zero, layer.bits, "channel", group, T, D,  # type: ignore[arg-type]
                           layer.stored_dtype(x.dtype), None if order is None else order[1])


def key_center(layer: "RotateKVLayer", k: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> torch.Tensor | None:
    """The layer's key centre ``k_mu (B, H, 1, D)``, computed in torch from this chunk if not set yet (the
    median over the first chunk's rotated keys, ``RotateKVLayer._key_center``: it runs once per layer, so
    it stays in torch); None with ``center=false``."""
    if not layer.m.center:
        return None
    if layer.k_mu is None:
        # The median runs per (row, head, channel), so batch rows can go a few at a time: the torch path holds
        # ~4 float32 copies of what it is given, which for a large batch's first chunk is what runs out of memory.
        B = k.shape[0]
        per_row = 4 * k[:1].numel() * 4
        step = max(1, min(B, CENTER_CHUNK_BYTES // max(per_row, 1)))
        parts = []
        for b0 in range(0, B, step):
            rows = slice(b0, min(B, b0 + step))
            c, s_ = (None, None) if cos is None else (_rows(cos, rows, B), _rows(sin, rows, B))
            parts.append(layer._center_of(_rotated_keys_ref(layer, k[rows], c, s_)))
        layer.k_mu = torch.cat(parts, dim=0)
    return layer.k_mu


#: float32 bytes the first-chunk centre computation may hold at once (batch rows are taken a few at a time)
CENTER_CHUNK_BYTES = 512 * 2**20


def _rows(t: torch.Tensor, rows: slice, B: int) -> torch.Tensor:
    """Batch rows ``rows`` of a RoPE table ``(B | 1, ...)`` (a table shared by the batch stays whole)."""
    return t[rows] if t.shape[0] == B and B > 1 else t


def rotatekv_quantize_keys(layer: "RotateKVLayer", k: torch.Tensor, cos: torch.Tensor | None = None,
                           sin: torch.Tensor | None = None,
                           out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, *,
                           block_t: int | None = None, num_warps: int | None = None,
                           scratch: bool | None = None) -> QuantizedTensor:
    """RotateKV's quantized keys of ``k`` (B, H, T, D, post-RoPE as the model gives them), one launch.

    Same QuantizedTensor as the layer's torch path for these tokens (``_store`` -> ``_push_keys`` with
    ``residual=0``): ``layer.quantize_keys((H_G R^{-1} k - k_mu).to(k.dtype))`` (groups in the calibrated order).
    ``cos, sin`` ((B, T, R) or per head (B, H, T, R)) are the chunk's RoPE tables, needed with ``prerope``.
    With ``center`` and no ``layer.k_mu`` yet, the centre is taken from this chunk first (:func:`key_center`,
    torch, sets ``layer.k_mu``). ``out = (packed, scale, zero)`` views are written in place."""
    if not rotatekv_pack_supported(layer, k):
        raise ValueError("rotatekv_quantize_keys: this layer/input is not covered by the kernel "
                         "(see rotatekv_pack_supported); use the layer's torch path")
    rope = None
    if layer.m.prerope:
        if cos is None or sin is None:
            raise ValueError("rotatekv_quantize_keys: prerope=true needs the chunk's (cos, sin)")
        rope = (cos, sin)
    mu = key_center(layer, k, cos, sin)
    return _launch(layer, k, layer.key_group, rope=rope, rot_heads=layer.G, fwht=layer.m.fwht,
                   reorder=layer.reordered, mu=mu, out=out, block_t=block_t, num_warps=num_warps,
                   scratch=scratch)


def rotatekv_quantize_values(layer: "RotateKVLayer", v: torch.Tensor,
                             out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, *,
                             block_t: int | None = None, num_warps: int | None = None) -> QuantizedTensor:
    """RotateKV's quantized values: ``quantize_clipped((v H_D).to(v.dtype), bits, "channel", value_group,
    clip)`` (``H_D`` per head, when ``fwht`` and ``rotate_values``), one launch."""
    if not rotatekv_pack_supported(layer, v):
        raise ValueError("rotatekv_quantize_values: this layer/input is not covered by the kernel "
                         "(see rotatekv_pack_supported); use the layer's torch path")
    return _launch(layer, v, layer.value_group, rope=None, rot_heads=1,
                   fwht=bool(layer.m.fwht and layer.m.rotate_values), reorder=False, mu=None, out=out,
                   block_t=block_t, num_warps=num_warps, scratch=False)


# ----------------------------------------------------------------------------------------------
# torch reference: the layer's own functions, in _store's order
# ----------------------------------------------------------------------------------------------
def _rotated_keys_ref(layer: "RotateKVLayer", k: torch.Tensor, cos: torch.Tensor | None,
                      sin: torch.Tensor | None) -> torch.Tensor:
    from ..rope import invert_rope

    kk = k
    if layer.m.prerope:
        kk = invert_rope(k.float(), cos.float(), sin.float())
    return layer.rotate_keys(kk)


def rotatekv_quantize_keys_ref(layer: "RotateKVLayer", k: torch.Tensor, cos: torch.Tensor | None = None,
                               sin: torch.Tensor | None = None) -> QuantizedTensor:
    """What ``RotateKVLayer._store`` + ``_push_keys`` (residual 0) store for ``k``: the torch path."""
    kr = _rotated_keys_ref(layer, k, cos, sin)
    if layer.m.center:
        kr = kr - layer._key_center(kr)
    return layer.quantize_keys(kr.to(layer.stored_dtype(k.dtype)))


def rotatekv_quantize_values_ref(layer: "RotateKVLayer", v: torch.Tensor) -> QuantizedTensor:
    """What ``RotateKVLayer._store`` + ``_push_values`` (residual 0) store for ``v``."""
    from ..methods.rotatekv import quantize_clipped

    return quantize_clipped(layer.rotate_values(v).to(layer.stored_dtype(v.dtype)), layer.bits, "channel",
                            layer.value_group, layer.clip, layer.scale_dtype)


# ----------------------------------------------------------------------------------------------
# microbenchmark (GPU)
# ----------------------------------------------------------------------------------------------
def make_bench_layer(H: int = 8, D: int = 128, G: int = 4, bits: int = 2, seed: int = 0, **flags):
    """A RotateKVLayer (random channel order, no sinks, residual 0) for tests and the benchmark."""
    from ..methods.rotatekv import RotateKV, RotateKVLayer

    flags.setdefault("sinks", False)
    method = RotateKV(bits=bits, head_group=G, **flags)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(H * D, generator=gen) if method.uses_reorder() else None
    return RotateKVLayer(method, 0, H, D, G, perm)


def bench_rotatekv_pack(T: int = 8192, layers: int = 32, H: int = 8, D: int = 128, G: int = 4, bits: int = 2,
                        B: int = 1, dtype: torch.dtype = torch.bfloat16, check: bool = True, ref: bool = True,
                        **launch) -> dict:
    """Fused kernel vs the torch path: K and V of ``layers`` layers for a ``T``-token prefill (defaults:
    Llama-3-8B, 32 layers x 8 KV heads x d=128, G=4, 2 bits, prerope, reorder, center). Medians of
    ``triton.testing.do_bench`` in ms, plus the bytes moved and the share of mismatching codes. ``launch``
    (``block_t``, ``num_warps``, ``scratch``) goes to the key kernel."""
    from triton.testing import do_bench

    dev = "cuda"
    layer = make_bench_layer(H, D, G, bits)
    gen = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=gen)
    pos = torch.arange(T, device=dev, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, -1)[None].expand(B, T, D)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    key_center(layer, k, cos, sin)

    def fused():
        for _ in range(layers):
            rotatekv_quantize_keys(layer, k, cos, sin, **launch)
            rotatekv_quantize_values(layer, v)

    def torch_path():
        for _ in range(layers):
            rotatekv_quantize_keys_ref(layer, k, cos, sin)
            rotatekv_quantize_values_ref(layer, v)

    res = {"T": T, "B": B, "layers": layers, "H": H, "D": D, "G": G, "bits": bits, "dtype": str(dtype), **launch}
    if check:
        for got, want in ((rotatekv_quantize_keys(layer, k, cos, sin, **launch),
                           rotatekv_quantize_keys_ref(layer, k, cos, sin)),
                          (rotatekv_quantize_values(layer, v), rotatekv_quantize_values_ref(layer, v))):
            res.setdefault("scales_equal", []).append(bool(torch.equal(got.scale, want.scale)
                                                           and torch.equal(got.zero, want.zero)))
            res.setdefault("code_mismatch", []).append(float((got.codes() != want.codes()).float().mean()))
    res["fused_ms"] = do_bench(fused, warmup=25, rep=200)
    q = rotatekv_quantize_keys(layer, k, cos, sin)
    moved = layers * 2 * (k.numel() * k.element_size() + q.nbytes())  # read K/V, write packed + scales
    res["GB_per_s"] = moved / res["fused_ms"] / 1e6
    if ref:
        res["torch_ms"] = do_bench(torch_path, warmup=5, rep=100)
        res["speedup"] = res["torch_ms"] / res["fused_ms"]
    return res


__all__ = ["rotatekv_pack_supported", "rotatekv_quantize_keys", "rotatekv_quantize_values", "key_center",
           "rotatekv_quantize_keys_ref", "rotatekv_quantize_values_ref", "make_bench_layer", "bench_rotatekv_pack"]
