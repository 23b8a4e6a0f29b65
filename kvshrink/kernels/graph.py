"""Cache layers whose decode step CUDA graphs can capture: fixed capacity, lengths on the device, no host syncs.

A decode step of :class:`~.layer.KernelUniformLayer` depends on host values that change every step (token
counts passed to launches, a split grid sized by the length, a residual that is a new tensor each step), so
it cannot be replayed from a CUDA graph. The layers here keep everything that changes on the device:

* :class:`StaticKiviLayer`: KIVI (per-channel keys over token groups, per-token values, asymmetric, full-
  precision residual of ``residual`` tokens, same flush rule and bytes as ``UniformLayer``) in the
  tensor cores' fragment order (``frag.py``, layout ``"frag"``, the default where it applies), KIVI's storage
  layout (``"kivi"``) or the channel-strided one (``strided.py``), buffers sized once for ``capacity`` tokens;
  residuals in ring buffers of ``ring`` rows (token ``t`` at row ``t % ring``, so flushing moves nothing); ``lens =
  [T, Tkq, Tvq]`` (int32, device). A decode step is two launches: ``_step_kernel`` quantizes what the previous
  step left due (a value token; a key block of ``residual`` tokens) from the rings into the packed buffers
  and writes the new token into the rings, then ``_lens_kernel`` advances ``lens``. Attention, in graph mode
  (fixed split count, programs without work exit early): the Gluon kernel of ``decode_frag.py`` (main splits,
  then a launch for the ring tail), :func:`~.decode_attention.decode_attention` or
  :func:`~.decode_strided.decode_attention_strided`.
* :class:`StaticDenseLayer`: the 16-bit baseline with the same discipline (preallocated K/V, device
  length, :func:`decode_attention_dense`, a split-K kernel over 16-bit K/V with the same structure), so the
  two can be compared under the same graph replay.

Prefill (one chunk into an empty layer) is served densely from the prompt, like the eager layers. A left-padded
prompt's mask is given once (``set_padding``, or ``GraphDecoder(..., attention_mask=...)``): the decode kernels
read it as a ``(B, capacity)`` buffer (the prompt's padding, then ones). Limits of graph mode: one chunk of
prefill, then single-token steps (all rows advance together).

The ``"kvshrink"`` attention function (``attention.py``) recognises the handles these layers return.
:func:`make_static_cache` builds a transformers ``Cache`` of them; :class:`GraphDecoder` captures one decode
step of a model and replays it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hf_compat import cache_kw
from ..layer import half_dtype
from ..storage import QuantizedTensor, packed_size
from ._triton import HAS_TRITON, dot_in_f32, next_pow2, tl, triton
from . import decode_attention as _da  # its merge kernel exists only with Triton: looked up at call time
from .decode_attention import _sm_count, decode_attention
from .quant_pack import kernel_supports, quantize_pack
from .decode_strided import decode_attention_strided
from .reference import PackedKV
from .strided import StridedQuantizedTensor, quantize_pack_strided, strided_supported

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # pragma: no cover - transformers is a dependency
    Cache, CacheLayerMixin = object, object  # type: ignore[assignment,misc]

if HAS_TRITON:
    from .decode_attention import _rescale_t

    @triton.jit
    def _step_kernel(K_NEW, V_NEW, snb, snh,  # new token (B, H, 1, D)
                     KR, VR, srb, srh, srt,  # rings (B, H, RING, D), same strides for K and V
                     KP, skp_b, skp_h, skp_t, KS, KZ, sks_b, sks_h, sks_g,
                     VP, svp_b, svp_h, svp_t, VS, VZ, svs_b, svs_h, svs_t,
                     LENS, H,
                     D: tl.constexpr, R: tl.constexpr, RING: tl.constexpr, KG: tl.constexpr, KBITS: tl.constexpr,
                     VG: tl.constexpr, VBITS: tl.constexpr, STRIDED: tl.constexpr, FRAG: tl.constexpr = False):
        """Per (b, h): flush what is due (base layer's rule, applied after the previous append), then write the
        new token into the rings. ``lens`` is read only (``_lens_kernel`` advances it afterwards).
        ``STRIDED``: the strided layout (``strided.py``); ``FRAG``: 2-bit codes in fragment order (``frag.py``;
        ``KP``/``VP`` int32 words, strides per (b, h) in ``skp_h``/``svp_h``); else KIVI's storage layout."""
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        T = tl.load(LENS)
        TKQ = tl.load(LENS + 1)
        TVQ = tl.load(LENS + 2)
        d = tl.arange(0, D)
        kr_base = KR + b * srb + h * srh
        vr_base = VR + b * srb + h * srh
        # values: one token leaves the residual once it holds more than R
        if T - TVQ > R:
            VHI: tl.constexpr = (1 << VBITS) - 1
            NG: tl.constexpr = D // VG
            VPPB: tl.constexpr = 8 // VBITS
            VDP: tl.constexpr = D // VPPB
            x = tl.load(vr_base + (TVQ % RING) * srt + d).to(tl.float32)
            xg = tl.reshape(x, [NG, VG])
            zero = tl.min(xg, axis=1).to(VS.dtype.element_ty)
            scale = tl.math.div_rn(tl.max(xg, axis=1) - zero.to(tl.float32), VHI * 1.0).to(VS.dtype.element_ty)
            s = scale.to(tl.float32)
            s = tl.where(s > 0, s, 1.0)
            y = tl.math.div_rn(xg - zero.to(tl.float32)[:, None], s[:, None])
            c = tl.minimum(tl.maximum((y + 12582912.0) - 12582912.0, 0.0), VHI * 1.0).to(tl.int32)
            if FRAG:  # channels c and c + 8 of this token share a word: (lane 4 * (c % 8) + q, word c // 16)
                VW: tl.constexpr = D // 16
                t0 = TVQ % 2
                tq = (TVQ // 2) % 4
                fld = (TVQ // 8) % 2 + 2 * ((TVQ // 16) % 2)
                c3 = tl.reshape(c, [VW, 2, 8])  # (word, c3, g)
                bits3 = 16 * t0 + 2 * (fld + 4 * tl.arange(0, 2))
                word = tl.sum(c3 << bits3[None, :, None], axis=1)  # (VW, 8): two codes each
                wi = tl.arange(0, VW)[:, None]
                gi = tl.arange(0, 8)[None, :]
                wp = VP + b * svp_b + h * svp_h + (TVQ // 32) * (32 * VW) + (4 * gi + tq) * VW + wi
                if (t0 == 0) & (fld == 0):  # the word's first token: it may hold an earlier sequence's codes
                    tl.store(wp, word)
                else:
                    tl.store(wp, tl.load(wp) | word)
            else:
                if STRIDED:  # channel j * VDP + byte -> slot j of that byte
                    c3 = tl.reshape(c, [VPPB, VDP])
                    packed = tl.sum(c3 << (tl.arange(0, VPPB) * VBITS)[:, None], axis=0).to(tl.uint8)
                else:  # KIVI: channel byte * VPPB + j -> slot j
                    c3 = tl.reshape(c, [VDP, VPPB])
                    packed = tl.sum(c3 << (tl.arange(0, VPPB) * VBITS)[None, :], axis=1).to(tl.uint8)
                tl.store(VP + b * svp_b + h * svp_h + TVQ * svp_t + tl.arange(0, VDP), packed)
            g = tl.arange(0, NG)
            tl.store(VS + b * svs_b + h * svs_h + TVQ * svs_t + g, scale)
            tl.store(VZ + b * svs_b + h * svs_h + TVQ * svs_t + g, zero)
        # keys: a block of R tokens (R // KG groups) leaves the residual once it holds R
        if T - TKQ >= R:
            KHI: tl.constexpr = (1 << KBITS) - 1
            KPPB: tl.constexpr = 8 // KBITS
            KDP: tl.constexpr = D // KPPB
            KGB: tl.constexpr = KG // KPPB
            tk = tl.arange(0, KG)
            for gi in tl.static_range(R // KG):
                t0 = TKQ + gi * KG
                x = tl.load(kr_base + ((t0 + tk) % RING)[:, None] * srt + d[None, :]).to(tl.float32)  # (KG, D)
                zero = tl.min(x, axis=0).to(KS.dtype.element_ty)
                scale = tl.math.div_rn(tl.max(x, axis=0) - zero.to(tl.float32), KHI * 1.0).to(KS.dtype.element_ty)
                s = scale.to(tl.float32)
                s = tl.where(s > 0, s, 1.0)
                y = tl.math.div_rn(x - zero.to(tl.float32)[None, :], s[None, :])
                c = tl.minimum(tl.maximum((y + 12582912.0) - 12582912.0, 0.0), KHI * 1.0).to(tl.int32)
                if FRAG:  # 16-token tiles; (t8, c4, c3, c0) of one (tile, g, word, q) share a word
                    KW: tl.constexpr = D // 32
                    sh = (16 * (d & 1) + 2 * (((d >> 3) & 1) + 2 * ((d >> 4) & 1)))[None, :] + 8 * ((tk >> 3) & 1)[:, None]
                    w8 = tl.reshape(c << sh, [KG // 16, 2, 8, KW, 2, 2, 4, 2])
                    w8 = tl.sum(tl.sum(tl.sum(tl.sum(w8, axis=7), axis=5), axis=4), axis=1)  # (tile, g, w, q)
                    i_t = tl.arange(0, KG // 16)[:, None, None, None]
                    i_g = tl.arange(0, 8)[None, :, None, None]
                    i_w = tl.arange(0, KW)[None, None, :, None]
                    i_q = tl.arange(0, 4)[None, None, None, :]
                    tl.store(KP + b * skp_b + h * skp_h + (t0 // 16 + i_t) * (32 * KW) + (4 * i_g + i_q) * KW + i_w, w8)
                elif STRIDED:  # per token, channels strided over the bit slots
                    c3 = tl.reshape(c, [KG, KPPB, KDP])
                    packed = tl.sum(c3 << (tl.arange(0, KPPB) * KBITS)[None, :, None], axis=1).to(tl.uint8)
                    kk = tl.arange(0, KDP)
                    tl.store(KP + b * skp_b + h * skp_h + (t0 + tk)[:, None] * skp_t + kk[None, :], packed)
                else:  # KIVI: per channel, KPPB consecutive tokens per byte; dim 2 of KP is the group
                    c3 = tl.reshape(c, [KGB, KPPB, D])
                    packed = tl.sum(c3 << (tl.arange(0, KPPB) * KBITS)[None, :, None], axis=1).to(tl.uint8)
                    kk = tl.arange(0, KGB)
                    tl.store(KP + b * skp_b + h * skp_h + (t0 // KG) * skp_t + d[None, :] * KGB + kk[:, None], packed)
                goff = b * sks_b + h * sks_h + (t0 // KG) * sks_g + d
                tl.store(KS + goff, scale)
                tl.store(KZ + goff, zero)
        # the new token (after the flush read its rows: the rings hold R + 1 < RING live rows)
        row = T % RING
        tl.store(kr_base + row * srt + d, tl.load(K_NEW + b * snb + h * snh + d).to(KR.dtype.element_ty))
        tl.store(vr_base + row * srt + d, tl.load(V_NEW + b * snb + h * snh + d).to(VR.dtype.element_ty))

    @triton.jit
    def _lens_kernel(LENS, R: tl.constexpr, NEW: tl.constexpr):
        T = tl.load(LENS)
        TKQ = tl.load(LENS + 1)
        TVQ = tl.load(LENS + 2)
        tl.store(LENS + 1, tl.where(T - TKQ >= R, TKQ + R, TKQ))
        tl.store(LENS + 2, tl.where(T - TVQ > R, TVQ + 1, TVQ))
        tl.store(LENS, T + NEW)

    @triton.jit
    def _dense_decode_kernel(Q, sqb, sqh, K, V, skb, skh, skt, LENS, MASK, smask_b, M_OUT, L_OUT, ACC_OUT, H,
                             num_splits, qk_scale, HG: tl.constexpr, HG_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK_N: tl.constexpr, F32: tl.constexpr, HAS_MASK: tl.constexpr = False):
        """Split-K decode over 16-bit K/V (B, H, cap, D) with the length on the device (baseline kernel)."""
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        T = tl.load(LENS)
        per = tl.cdiv(tl.cdiv(T, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per
        hi = tl.minimum(lo + per, T)
        hh = tl.arange(0, HG_PAD)
        hmask = hh < HG
        qrow = h * HG + hh
        d = tl.arange(0, D)
        qT = tl.load(Q + b * sqb + qrow[None, :] * sqh + d[:, None], mask=hmask[None, :], other=0.0).to(tl.float32)
        qT = (qT * qk_scale).to(K.dtype.element_ty)
        m_i = tl.full([HG_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HG_PAD], tl.float32)
        acc = tl.zeros([D, HG_PAD], tl.float32)
        n = tl.arange(0, BLOCK_N)
        base = b * skb + h * skh
        for start in range(lo, hi, BLOCK_N):
            t = start + n
            live = t < hi
            k = tl.load(K + base + t[:, None] * skt + d[None, :], mask=live[:, None], other=0.0)
            if F32:
                sT = tl.dot(k.to(tl.float32), qT.to(tl.float32), input_precision="ieee")
            else:
                sT = tl.dot(k, qT)
            ok = live
            if HAS_MASK:  # padding (B, >= capacity), 1 = attend
                ok = ok & (tl.load(MASK + b * smask_b + t, mask=live, other=0) != 0)
            sT = tl.where(ok[:, None], sT, float("-inf"))
            m_i, l_i, pT, alpha = _rescale_t(m_i, l_i, sT)
            v = tl.load(V + base + t[:, None] * skt + d[None, :], mask=live[:, None], other=0.0)
            if F32:
                acc = acc * alpha[None, :] + tl.dot(tl.trans(v.to(tl.float32)), pT, input_precision="ieee")
            else:
                acc = acc * alpha[None, :] + tl.dot(tl.trans(v), pT.to(v.dtype))
        o = (b * H * HG + qrow) * num_splits + split
        tl.store(M_OUT + o, m_i, mask=hmask)
        tl.store(L_OUT + o, l_i, mask=hmask)
        tl.store(ACC_OUT + o[None, :] * D + d[:, None], acc, mask=hmask[None, :])


def _frag_applies(bits: int, group: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                  heads_per_kv: int | None) -> bool:
    """Whether layout ``"auto"`` takes the fragment order: 2 bits, one value group per token, at most 8 query heads
    per KV head (known: the layer is told, e.g. by :func:`make_static_cache`), a 16-bit model (an fp32 model keeps
    the KIVI-layout kernel's fp32 dot products), an sm_80+ NVIDIA GPU and Triton's Gluon."""
    from .decode_frag import HAS_GLUON, HEAD_DIMS

    return (bits == 2 and group == head_dim and head_dim in HEAD_DIMS and dtype in (torch.float16, torch.bfloat16)
            and heads_per_kv is not None and heads_per_kv <= 8
            and device.type == "cuda" and HAS_GLUON
            and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0))


def _splits(batch_kv_heads: int, device: torch.device, waves: int = 4, tokens: int = 1 << 30, block: int = 128) -> int:
    """Fixed split count for graph mode: ~``waves`` programs per SM over ``batch_kv_heads`` heads, at least 2,
    at most one per ``block`` tokens of capacity (and 256)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    return max(2, min(-(-waves * sms // max(1, batch_kv_heads)), max(2, tokens // block), 256))


def decode_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, num_splits: int,
                           scale: float | None = None, block_n: int = 64, num_warps: int = 4,
                           workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                           out: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``q (B, Hq, D)`` over the first ``lens[0]`` tokens of 16-bit ``k``/``v (B, H, cap, D)`` (GQA); ``mask``
    ``(B, >= cap)``, nonzero where a token may be attended (padding)."""
    B, Hq, D = q.shape
    H = k.shape[1]
    maskt, sm_b = _da.mask_arg(mask, B, k.shape[2], True, q.device)
    HG = Hq // H
    m_ws, l_ws, acc_ws = workspace if workspace is not None else _da.partials_workspace(B, Hq, num_splits, D,
                                                                                         q.device)
    f32 = dot_in_f32(k.dtype)
    sc = (D ** -0.5 if scale is None else scale) * math.log2(math.e)
    _dense_decode_kernel[(B * H, num_splits)](q, q.stride(0), q.stride(1), k, v, k.stride(0), k.stride(1), k.stride(2),
                                              lens, maskt, sm_b, m_ws, l_ws, acc_ws, H, num_splits, sc, HG=HG,
                                              HG_PAD=max(16, next_pow2(HG)), D=D, BLOCK_N=block_n, F32=f32,
                                              HAS_MASK=mask is not None, num_warps=num_warps)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _da._decode_reduce_kernel[(B * Hq,)](m_ws, l_ws, acc_ws, out, out.stride(0), out.stride(1), Hq, num_splits,
                                     D=D, S_PAD=next_pow2(num_splits), num_warps=4)
    return out


def padding_buffer(attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` int8 for a graph-mode decode kernel: the prompt's ``attention_mask (B, T0)`` (1 = token,
    0 = padding), then ones: every decoded token is real, so the buffer is written once and read by every replay."""
    B, T0 = attention_mask.shape
    if T0 > width:
        raise ValueError(f"attention mask of {T0} tokens exceeds the cache's capacity {width}")
    buf = torch.ones(B, width, dtype=torch.int8, device=attention_mask.device)
    buf[:, :T0].copy_(attention_mask != 0)
    return buf


@dataclass
class GraphDecode:
    """What a static layer's decode ``update`` returns (as key and value) to the ``"kvshrink"`` attention."""

    layer: "StaticKiviLayer | StaticDenseLayer"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        lay = self.layer
        return (lay.batch, lay.num_heads, lay.capacity, lay.head_dim)

    def attend(self, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        return self.layer.attend(q, scale)


class _StaticBase(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.seen = 0  # host count (bookkeeping for transformers; replayed graph steps do not advance it)
        self.lens: torch.Tensor | None = None
        self.splits = 0
        self._ws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.pad_mask: torch.Tensor | None = None

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """The prompt's padding (``(B, T0)``, 0 = pad), masked out of every later decode step (None: no padding)."""
        self.pad_mask = None if attention_mask is None else padding_buffer(attention_mask, self.capacity)

    def _workspace(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, Hq, D = q.shape
        if self._ws is None or self._ws[0].shape != (B, Hq, self.splits):
            self._ws = _da.partials_workspace(B, Hq, self.splits, D, q.device)
        return self._ws

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A prompt (more than one token) into the empty cache: stored and returned dense for SDPA; a decode
        token: stored by :meth:`_step` with no host sync, and a :class:`GraphDecode` handle returned."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] > 1:
            self._check_prefill(key_states)
            self.prefill(key_states, value_states)
            return key_states, value_states
        self._step(key_states, value_states)
        self.seen += 1
        handle = GraphDecode(self)
        return handle, handle

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def _check_prefill(self, key_states: torch.Tensor) -> None:
        if self.seen:
            raise NotImplementedError("static (graph) layers take one prefill chunk into an empty cache, then "
                                      "single-token decode steps")
        if key_states.shape[-2] > self.capacity:
            raise ValueError(f"prompt of {key_states.shape[-2]} tokens exceeds capacity {self.capacity}")


class StaticDenseLayer(_StaticBase):
    """16-bit K/V preallocated for ``capacity`` tokens; the length lives on the device."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.num_heads, _, self.head_dim = key_states.shape
        shape = (self.batch, self.num_heads, self.capacity, self.head_dim)
        self.k = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._one = torch.ones(1, dtype=torch.int32, device=self.device)
        self.splits = _splits(self.batch * self.num_heads, self.device, tokens=self.capacity)
        self.is_initialized = True

    def prefill(self, k: torch.Tensor, v: torch.Tensor, batch_start: int = 0) -> None:
        """Store a prompt of ``n`` tokens for rows ``[batch_start, batch_start + k.shape[0])`` (every row must
        be given the same ``n``; rows may come in several calls, so large batches fill without a full copy)."""
        n = k.shape[-2]
        rows = slice(batch_start, batch_start + k.shape[0])
        self.k[rows, :, :n].copy_(k)
        self.v[rows, :, :n].copy_(v)
        self.lens.fill_(n)
        self.seen = n

    def _step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        idx = self.lens.long()  # device index: no host read of the length
        self.k.index_copy_(2, idx, key_states)
        self.v.index_copy_(2, idx, value_states)
        self.lens.add_(self._one)

    def attend(self, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        return decode_attention_dense(q, self.k, self.v, self.lens, self.splits, scale, workspace=self._workspace(q),
                                      mask=self.pad_mask)

    def nbytes(self) -> int:
        return 0 if self.lens is None else 2 * self.k.numel() * self.k.element_size()


class StaticKiviLayer(_StaticBase):
    """KIVI with fixed buffers, residual rings and device lengths (see module docstring). ``layout``: ``"frag"``,
    2-bit codes in the tensor cores' fragment order read by the Gluon kernel (``frag.py``, ``decode_frag.py``;
    2.2-2.8x faster than the KIVI-layout kernel on the H200), ``"kivi"`` (KIVI's storage layout, Triton kernel),
    ``"strided"``, or ``"auto"`` (default): ``"frag"`` where it applies (2 bits, one value group per token:
    ``group == head_dim``, 64 or 128; ``query_heads`` given and at most 8 per KV head; a 16-bit model on an sm_80+
    NVIDIA GPU with Gluon), else ``"kivi"``. Same
    codes, scales and bytes in every layout. ``waves``: main splits per KV head such that ~``waves`` programs per SM
    run over the quantized tokens (KIVI/strided kernels; the frag kernel sizes its own); ``tail_splits`` programs
    take the residual/partial-block tail."""

    def __init__(self, capacity: int, bits: int = 2, group: int = 128, residual: int = 128,
                 scale_dtype: torch.dtype = torch.float16, tail_splits: int = 4, layout: str = "auto",
                 waves: int = 16, query_heads: int | None = None) -> None:
        super().__init__(capacity)
        if tail_splits < 1:  # the residual ring is attended only by the tail programs
            raise ValueError(f"graph mode needs tail_splits >= 1 (the 16-bit residual's programs), got {tail_splits}")
        self.query_heads = query_heads
        self.waves = waves  # main splits: enough programs for ~waves x (one program per SM)
        if layout not in ("strided", "kivi", "frag", "auto"):
            raise ValueError(f"layout must be 'auto', 'frag', 'kivi' or 'strided', got {layout!r}")
        if layout == "frag" and (bits != 2 or group % 64):
            raise ValueError(f"layout 'frag' holds 2-bit codes with key groups of a multiple of 64 tokens, got "
                             f"bits={bits}, group={group}: use layout='kivi'")
        self.layout = layout
        if residual < group or residual % group:
            raise ValueError(f"graph mode needs residual ({residual}) a positive multiple of group ({group})")
        self.bits, self.group, self.residual, self.scale_dtype = bits, group, residual, scale_dtype
        # live residual rows: values hold R + 1 tokens before their flush and the new token is written after
        # it, keys at most R: R + 2 rows never overwrite a token still needed
        self.ring = residual + 2
        self.tail_splits = tail_splits
        self._frag_splits: tuple[tuple[int, bool], int, int] | None = None  # (batch, masked), main, tail splits

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        if self.layout == "auto":
            ratio = None if self.query_heads is None else self.query_heads // H
            self.layout = "frag" if _frag_applies(self.bits, self.group, D, key_states.device, key_states.dtype,
                                                  ratio) else "kivi"
        if self.layout == "strided" and not (strided_supported(self.bits, self.group, "token", D)
                                             and strided_supported(self.bits, self.group, "channel", D)):
            raise ValueError(f"graph mode: bits={self.bits}, group={self.group}, head_dim={D} not in the strided layout")
        if self.layout == "kivi" and not (self.bits in (2, 4, 8) and kernel_supports(self.bits, self.group, D)):
            raise ValueError(f"graph mode: bits={self.bits}, group={self.group}, head_dim={D} not served by the kernels")
        if self.layout == "frag":
            from .decode_frag import HEAD_DIMS

            if self.group != D or D not in HEAD_DIMS:
                raise ValueError(f"layout 'frag' quantizes each value token as one group: group ({self.group}) must "
                                 f"equal head_dim ({D}), one of {HEAD_DIMS}; use layout='kivi'")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.num_heads, self.head_dim = B, H, D
        cap = -(-self.capacity // self.group) * self.group
        self.capacity = cap
        dev, dp = self.device, packed_size(D, self.bits)
        strided = self.layout == "strided"
        if self.layout == "frag":  # int32 words, 16-token key tiles and 32-token value tiles (frag.py)
            self.kp = torch.zeros(B, H, cap // 16, 32, D // 32, dtype=torch.int32, device=dev)
        elif strided:
            self.kp = torch.zeros(B, H, cap, dp, dtype=torch.uint8, device=dev)
        else:
            self.kp = torch.zeros(B, H, cap // self.group, D, packed_size(self.group, self.bits), dtype=torch.uint8,
                                  device=dev)
        self.ks = torch.zeros(B, H, cap // self.group, D, dtype=self.scale_dtype, device=dev)
        self.kz = torch.zeros_like(self.ks)
        if self.layout == "frag":
            self.vp = torch.zeros(B, H, cap // 32, 32, D // 16, dtype=torch.int32, device=dev)
        else:
            self.vp = torch.zeros(B, H, cap, dp, dtype=torch.uint8, device=dev)
        self.vs = torch.zeros(B, H, cap, D // self.group, dtype=self.scale_dtype, device=dev)
        self.vz = torch.zeros_like(self.vs)
        rdt = half_dtype(key_states.dtype)
        self.kr = torch.zeros(B, H, self.ring, D, dtype=rdt, device=dev)
        self.vr = torch.zeros_like(self.kr)
        self.lens = torch.zeros(3, dtype=torch.int32, device=dev)
        self.splits = _splits(B * H, dev, waves=self.waves, tokens=cap) + self.tail_splits
        cls = StridedQuantizedTensor if strided else QuantizedTensor
        if self.layout != "frag":
            self.kv = PackedKV(cls(self.kp, self.ks, self.kz, self.bits, "token", self.group, cap, D, key_states.dtype),
                               self.kr,
                               cls(self.vp, self.vs, self.vz, self.bits, "channel", self.group, cap, D,
                                   key_states.dtype),
                               self.vr)
        self.is_initialized = True

    def _flush_rule(self, n: int) -> tuple[int, int]:
        """(Tkq, Tvq) after ``n`` tokens were appended at once: ``UniformLayer._flush_count``."""
        return (n // self.residual) * self.residual, max(0, n - self.residual)

    def prefill(self, k: torch.Tensor, v: torch.Tensor, batch_start: int = 0) -> None:
        """Store a prompt of ``n`` tokens (base layer's flush rule) for rows ``[batch_start, +k.shape[0])``;
        every row must be given the same ``n``, possibly over several calls."""
        n = k.shape[-2]
        tkq, tvq = self._flush_rule(n)
        half = self.kr.dtype
        r = slice(batch_start, batch_start + k.shape[0])
        if self.layout == "frag":
            self._prefill_frag(k, v, r, tkq, tvq)
        else:
            self._prefill_packed(k, v, r, tkq, tvq)
        lo = min(tkq, tvq)
        rows = torch.arange(lo, n, device=k.device) % self.ring
        self.kr[r, :, rows] = k[:, :, lo:].to(half)
        self.vr[r, :, rows] = v[:, :, lo:].to(half)
        self.lens.copy_(torch.tensor([n, tkq, tvq], dtype=torch.int32))
        self.seen = n

    def _prefill_frag(self, k: torch.Tensor, v: torch.Tensor, r: slice, tkq: int, tvq: int) -> None:
        """KIVI's quantizer (the same kernel, codes, scales as layout 'kivi'; scales and zeros straight into the
        buffers), then the codes reordered into fragment words (:mod:`.frag_pack`); the value tile left partial is
        zero-filled for the decode steps to OR into."""
        from .frag_pack import repack_keys, repack_values

        half, g, H, D = self.kr.dtype, self.group, self.num_heads, self.head_dim
        n_rows = k.shape[0]
        if tkq:
            tmp = torch.empty(n_rows, H, tkq // g, D, g // 4, dtype=torch.uint8, device=k.device)
            quantize_pack(k[:, :, :tkq].to(half), 2, "token", g, self.scale_dtype,
                          out=(tmp, self.ks[r, :, :tkq // g], self.kz[r, :, :tkq // g]))
            repack_keys(tmp, g, self.kp[r, :, :tkq // 16])
        if tvq:
            tmp = torch.empty(n_rows, H, tvq, D // 4, dtype=torch.uint8, device=k.device)
            quantize_pack(v[:, :, :tvq].to(half), 2, "channel", g, self.scale_dtype,
                          out=(tmp, self.vs[r, :, :tvq], self.vz[r, :, :tvq]))
            repack_values(tmp, tvq, self.vp[r, :, :-(-tvq // 32)])

    def _prefill_packed(self, k: torch.Tensor, v: torch.Tensor, r: slice, tkq: int, tvq: int) -> None:
        half = self.kr.dtype
        qpack = quantize_pack_strided if self.layout == "strided" else quantize_pack
        kp_rows = tkq if self.layout == "strided" else tkq // self.group
        if tkq:
            qpack(k[:, :, :tkq].to(half), self.bits, "token", self.group, self.scale_dtype,
                  out=(self.kp[r, :, :kp_rows], self.ks[r, :, :tkq // self.group], self.kz[r, :, :tkq // self.group]))
        if tvq:
            qpack(v[:, :, :tvq].to(half), self.bits, "channel", self.group, self.scale_dtype,
                  out=(self.vp[r, :, :tvq], self.vs[r, :, :tvq], self.vz[r, :, :tvq]))

    def _step(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, _, D = k.shape
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 and v.stride()[:2] == k.stride()[:2] else v.contiguous()
        if v.stride()[:2] != k.stride()[:2]:
            k = k.contiguous()
        _step_kernel[(B * H,)](k, v, k.stride(0), k.stride(1),
                               self.kr, self.vr, *self.kr.stride()[:3],
                               self.kp, *self.kp.stride()[:3], self.ks, self.kz, *self.ks.stride()[:3],
                               self.vp, *self.vp.stride()[:3], self.vs, self.vz, *self.vs.stride()[:3],
                               self.lens, H, D=D, R=self.residual, RING=self.ring, KG=self.group, KBITS=self.bits,
                               VG=self.group, VBITS=self.bits, STRIDED=self.layout == "strided",
                               FRAG=self.layout == "frag", num_warps=4)
        _lens_kernel[(1,)](self.lens, R=self.residual, NEW=1, num_warps=1)

    def attend(self, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        if self.layout == "frag":
            return self._attend_frag(q, scale)
        fn = decode_attention_strided if self.layout == "strided" else decode_attention
        return fn(q, self.kv, mask=self.pad_mask, scale=scale, lens=self.lens, ring=self.ring, num_splits=self.splits,
                  main_splits=self.splits - self.tail_splits, workspace=self._workspace(q))

    def _attend_frag(self, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        """The Gluon kernel over the fragment-ordered codes (decode_frag.py): main splits sized to one wave of
        resident programs over the capacity's heads, ``tail_splits`` programs for the residual tail."""
        from . import decode_frag as df

        if q.dtype == torch.float32:  # an fp32 model (CPU-style evaluation on a GPU): the query in the residual's
            return self._attend_frag(q.to(self.kr.dtype), scale).float()  # 16 bits, as the residual already is
        B, H, cap = self.batch, self.num_heads, self.capacity
        opts = df.launch_options()  # LAUNCH's settings
        df._check_launch(q, H, self.group, opts)  # before compiling anything
        key = (B, self.pad_mask is not None)  # a padding mask compiles another kernel (its own register count)
        if self._frag_splits is None or self._frag_splits[0] != key:
            kv = df.FragKV(self.kp, self.vp, self.ks, self.kz, self.vs.view(B, H, cap), self.vz.view(B, H, cap),
                           self.group)
            main = df.splits_for(q, kv, graph=True, has_mask=key[1], **opts)
            self._frag_splits = (key, max(1, min(main, cap // self.group)), self.tail_splits)
            self.splits = sum(self._frag_splits[1:])  # what _workspace sizes the partial results by
        _, main, tail = self._frag_splits
        return df._launch(q, self.kp, self.vp, self.ks, self.kz, self.vs.view(B, H, cap), self.vz.view(B, H, cap),
                          0, 0, main + tail, scale, self.group, opts, self._workspace(q), None,
                          graph=(self.lens, self.kr, self.vr, self.ring, main), mask=self.pad_mask)

    def state(self) -> PackedKV:
        """The held tokens as a host-mode :class:`PackedKV` (syncs: for tests and inspection only); layout 'frag'
        gives its codes back in KIVI's storage layout (same codes, same scales)."""
        T, tkq, tvq = (int(x) for x in self.lens.tolist())
        if self.layout == "frag":
            kq, vq = self._quantized_frag(tkq, tvq)
        else:
            cls = StridedQuantizedTensor if self.layout == "strided" else QuantizedTensor
            kp_rows = tkq if self.layout == "strided" else tkq // self.group
            kq = cls(self.kp[:, :, :kp_rows], self.ks[:, :, :tkq // self.group], self.kz[:, :, :tkq // self.group],
                     self.bits, "token", self.group, tkq, self.head_dim, self.dtype) if tkq else None
            vq = cls(self.vp[:, :, :tvq], self.vs[:, :, :tvq], self.vz[:, :, :tvq], self.bits, "channel", self.group,
                     tvq, self.head_dim, self.dtype) if tvq else None
        kr = self.kr[:, :, torch.arange(tkq, T, device=self.kr.device) % self.ring] if T > tkq else None
        vr = self.vr[:, :, torch.arange(tvq, T, device=self.vr.device) % self.ring] if T > tvq else None
        return PackedKV(kq, kr, vq, vr)

    def _quantized_frag(self, tkq: int, tvq: int) -> tuple[QuantizedTensor | None, QuantizedTensor | None]:
        """The first ``tkq`` keys and ``tvq`` values of layout 'frag' as KIVI-layout quantized tensors."""
        from ..storage import pack
        from . import frag

        B, H, D, g = self.batch, self.num_heads, self.head_dim, self.group
        kq = vq = None
        if tkq:
            kc = frag.unpack_keys(self.kp[:, :, :tkq // 16]).reshape(B, H, tkq // g, g, D).transpose(-1, -2)
            kq = QuantizedTensor(pack(kc.contiguous(), 2), self.ks[:, :, :tkq // g], self.kz[:, :, :tkq // g], 2,
                                 "token", g, tkq, D, self.dtype)
        if tvq:
            vc = frag.unpack_values(self.vp[:, :, :-(-tvq // 32)])[:, :, :tvq]
            vq = QuantizedTensor(pack(vc.contiguous(), 2), self.vs[:, :, :tvq], self.vz[:, :, :tvq], 2, "channel", g,
                                 tvq, D, self.dtype)
        return kq, vq

    def nbytes(self) -> int:
        if self.lens is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.kp, self.ks, self.kz, self.vp, self.vs, self.vz,
                                                           self.kr, self.vr))


def make_static_cache(model: torch.nn.Module, capacity: int, kind: str = "kivi", **kw) -> "Cache":
    """A transformers ``Cache`` of static layers (``kind`` "kivi", "dense" or "rotatekv") for graph-captured
    decoding, and ``model`` switched to the ``"kvshrink"`` attention (undo with ``kvshrink.kernels.disable``).
    ``kind="rotatekv"`` takes ``spec=`` (default ``"rotatekv:bits=2"``), ``sink_slots=``, ``waves=``
    (:func:`~.rotatekv_graph.make_static_rotatekv_cache`)."""
    from .attention import enable

    if kind == "rotatekv":
        from .rotatekv_graph import make_static_rotatekv_cache

        return make_static_rotatekv_cache(model, kw.pop("spec", "rotatekv:bits=2"), capacity, **kw)
    if kind not in ("kivi", "dense"):
        raise ValueError(f"kind must be 'kivi', 'dense' or 'rotatekv', got {kind!r}")

    n = model.config.num_hidden_layers
    if kind == "kivi":  # the query-head count decides whether layout "auto" can take the fragment order
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        kw.setdefault("query_heads", getattr(cfg, "num_attention_heads", None))
    layers = [StaticKiviLayer(capacity, **kw) if kind == "kivi" else StaticDenseLayer(capacity) for _ in range(n)]
    enable(model)
    return Cache(layers=layers)


class GraphDecoder:
    """One greedy decode step of ``model`` over a static cache, captured in a CUDA graph and replayed.

    ``step()`` replays: feeds the last token, writes the next into ``self.tokens`` (device). No host sync.
    The ``warmup`` eager steps before the capture are real decode steps: their tokens are kept in
    ``warmup_tokens`` (``(B, 1)`` each, in order). ``position``: the prompt's length (tokens in the cache).
    ``attention_mask (B, position)``: the prompt's padding (left padding: rows of different lengths); each row's
    position ids then continue from its own token count, and the padded slots stay masked in every step.
    """

    def __init__(self, model: torch.nn.Module, cache, first_tokens: torch.Tensor, position: int,
                 warmup: int = 2, attention_mask: torch.Tensor | None = None) -> None:
        self.model, self.cache = model, cache
        dev = first_tokens.device
        self.tokens = first_tokens.clone().view(-1, 1)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (self.tokens.shape[0], position):
                raise ValueError(f"attention_mask must be (batch, position) = {(self.tokens.shape[0], position)}, "
                                 f"got {tuple(attention_mask.shape)}")
            self.pos = (attention_mask != 0).sum(1, keepdim=True).to(device=dev, dtype=torch.long)
        else:
            self.pos = torch.full_like(self.tokens, position)
        for layer in getattr(cache, "layers", []):
            if hasattr(layer, "set_padding"):
                layer.set_padding(attention_mask)
            elif attention_mask is not None:
                raise ValueError(f"{type(layer).__name__} does not take a padding mask in graph mode")
        self.cache_position = torch.full((1,), position, dtype=torch.long, device=dev)
        self.warmup_tokens: list[torch.Tensor] = []
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # compiles the kernels; these steps are real decode steps
                self._forward()
                self.warmup_tokens.append(self.tokens.clone())
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._forward()

    def _forward(self) -> None:
        out = self.model(input_ids=self.tokens, position_ids=self.pos, cache_position=self.cache_position,
                         **cache_kw(self.model, self.cache), use_cache=True, logits_to_keep=1)
        self.tokens.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.cache_position.add_(1)

    def step(self) -> torch.Tensor:
        self.graph.replay()
        return self.tokens


__all__ = ["StaticKiviLayer", "StaticDenseLayer", "GraphDecode", "GraphDecoder", "make_static_cache",
           "decode_attention_dense"]
