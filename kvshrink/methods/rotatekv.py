"""RotateKV: 2-bit KV cache quantization with outlier-aware, pre-RoPE, grouped-head Hadamard rotations.

Su, Chen, Shen, Wei, Li, Yu, Yuan. "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via
Outlier-Aware Adaptive Rotations", IJCAI 2025 (arXiv 2501.16383), Sec. 3 (method). Its three components,
each a switch here:

* **Pre-RoPE Grouped-Head Rotation** (``prerope``, ``head_group``): keys are stored *before*
  RoPE (RoPE mixes channel pairs differently at every position and so moves outliers around), and the
  Hadamard rotation spans the ``head_group`` heads of a group (``head_group * head_dim`` channels,
  the paper's 4 heads), which smooths outliers across heads too. The cache is handed post-RoPE keys,
  so RoPE is inverted exactly with the (cos, sin) captured by a forward pre-hook on each decoder layer
  (:mod:`kvshrink.rope`) and re-applied for each stored token's own position id when keys are used.
* **Outlier-Aware Rotation** (``fwht``, ``reorder``): the rotation is a normalized Hadamard
  matrix applied with the fast Walsh–Hadamard transform (:mod:`kvshrink.rotation`; sizes 2^k and
  12/20/28 x 2^k). The paper's calibrated channel reordering then permutes the rotated channels of a
  layer (all its KV heads) in order of their calibrated mean, so that each per-token quantization group
  holds channels of like distribution (so it acts with ``key_axis=channel`` only: in KIVI's layout each
  channel is quantized on its own and an order changes nothing; no calibration runs then) (the permutation is calibrated on rotated pre-RoPE keys, as in the
  authors' code, which sorts channels by their summed value over calibration text). Values are rotated
  per head by the Hadamard matrix (the authors fold it into ``v_proj``/``o_proj``).
* **Attention-Sink-Aware Quantization** (``sinks``): attention sinks are found from massive
  activations: the tokens owning the ``sink_topk`` (paper: 20) largest |entries| of the decoder layer's
  input hidden states, kept only if an entry is at least ``sink_ratio`` times the chunk's median |entry|
  (massive activations are 10^2-10^4 times the median, Sun et al. 2024; the ratio keeps ordinary
  tokens of a decode step from being taken for sinks). Their keys and values are kept at full precision
  (``sink_dtype``: FP16 as in the paper, or ``model`` = bit-exact), every other token is quantized.

Quantization is uniform asymmetric with a clipped range (the authors' ``clip_ratio``: 0.8 at 2 bits, 1.0 at
3/4 bits): ``zero = clip*min``, ``scale = clip*(max-min)/(2**bits-1)`` per group (note ``2**bits - 1``
levels; the authors' script computes ``bits**2 - 1``, which is right only at 2 and 4 bits).

Layout (what a decode kernel reads), per layer, batch at dim 0, tokens at dim 2:

* ``kq``: keys, rotated domain = ``H_G · k_pre`` viewed as ``(B, H, T, D)`` with H_G the
  normalized Hadamard matrix over each group of ``G`` heads' channels (``(B, T, H*D)`` → ``(B, T, H/G, G*D)``).
  The calibrated order ``perm`` over the ``H*D`` channels (``key_axis=channel`` only) decides which channels
  share a quantization group: group ``j`` of a token holds channels ``perm[j*group : (j+1)*group]``, exactly as
  if the channels were gathered by ``perm`` and then grouped; but each code stays at its own rotated channel
  and the tensor records ``slots = perm.argsort()`` (:class:`kvshrink.storage.QuantizedTensor`), so that a
  decode kernel reads the codes of one rotation group contiguously and only looks up its scales (same bytes,
  same values as storing the codes in ``perm`` order).
  ``key_axis="token"`` (kvshrink's variant): per-channel groups of ``group`` (32) tokens as in KIVI (packed
  ``(B,H,T/g,D,packed(g))``, scale/zero ``(B,H,T/g,D)``); sink tokens are replaced by their group's mean
  before quantizing so that a sink does not widen its group's range. ``key_axis="channel"`` (the
  default, as in the paper and the authors' code: per-token groups of ``group`` = head_dim channels; packed ``(B,H,T,packed(D))``,
  scale/zero ``(B,H,T,D/group)``). Layouts are :mod:`kvshrink.storage.quantize`'s; scales/zeros fp16.
  The default follows the paper; the token-axis variant is offered because kvshrink's decode kernels read
  KIVI's key layout, and it measured better at 2 bits on both models tried (decode mode: SmolLM2-135M /
  lcet10 ΔPPL +2.46 vs +12.0 without centering; Qwen2.5-Coder-0.5B / Python stdlib +0.42 vs +33.9) for
  ~10% more bytes.
* ``k_mu`` (``center``, kvshrink's addition, on by default; ``center=false`` is the paper exactly): a
  per-channel key offset ``(B, H, 1, D)`` in the rotated domain (median of the first chunk, in
  ``scale_dtype``), subtracted before quantizing and added back on read, so it costs no precision. Keys of
  models whose ``k_proj`` has a bias (Qwen2) carry a large constant offset that per-token groups after the
  rotation would spend their range on: paper layout, decode mode, 2 bits: Qwen2.5-Coder-0.5B ΔPPL +33.9
  without, +0.62 with; SmolLM2-135M +12.0 without, +6.0 with (both measured here).
* ``vq``: values rotated per head (``v · H_D``), per-token groups of ``group`` channels.
* ``k_res``/``v_res``: the newest ``residual`` tokens (keys with ``key_axis=token``: up to ``residual``
  or, with ``residual=0``, ``group`` - 1 tokens, flushed a whole group at a time as in KIVI's Alg. 1), same
  rotated domain, in 16 bits (:func:`kvshrink.layer.half_dtype`: the model's dtype if 16-bit, else fp16, as
  every kvshrink method keeps its full-precision parts; quantized from those 16-bit values), except with
  ``bits=16``, which keeps the model's dtype (an exact round trip).
* ``pos``: ``(B, T)`` int32 position id of every held token (pre-RoPE only); RoPE is re-applied with
  ``cos/sin = rotary(pos)``. Behind an eviction policy that keeps different tokens per head (it passes the
  kept chunk positions, ``append(k, v, index)``), ``(B, H, T)``: held slot ``t`` of head ``h`` is that
  head's token; the Hadamard rotation across heads still inverts exactly, and RoPE is re-applied per head.
* ``sink_k``/``sink_v``: ``(B, H, S, D)`` sink tokens as given (post-RoPE keys) in ``sink_dtype``, ``sink_idx``
  ``(B, S)`` int32 their index in the held sequence (-1 = padding for rows with fewer sinks; ``(B, H, S)``
  behind a per-head eviction policy, -1 where a head did not keep the sink). Dense keys and values are
  overwritten at those indices.

Reading (``dense``): dequantize (each code with its slot's scale), inverse-rotate (``H_G^T``), re-apply RoPE
with ``rotary(pos)``, then write the exact sinks back. A decode kernel can instead fold everything linear into
the query, per rotation group: with ``q_t`` the post-RoPE query and ``R_p`` RoPE at position ``p``,
``q_t · R_p H_G^T k_rot = (H_G R_p^T q_t) · k_rot``, which depends on ``p`` (that is the cost of pre-RoPE
storage: RoPE must be applied per stored token, or the query rotated per position). With
``prerope=false`` the query is rotated once, ``(H_G q_t) · k_rot``. Values: the output is
``(softmax · V_rot) H_D^T``, one rotation per output row.

``bits=16`` stores the rotated keys/values unquantized (an exact round trip: tests the rotation and RoPE
inversion); ``bits=8`` is near-lossless.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from ..errors import KVShrinkError, SpecError, UnsupportedModelError
from ..hf_compat import cache_in, cache_kw
from ..layer import CompressedLayer, half_dtype
from ..registry import register
from ..quant_utils import gather_tokens
from ..rope import append_positions, RopeSource, apply_rope, check_rope_style, decoder_layers, invert_rope, rotary_modules
from ..rotation import hadamard_transform, is_supported
from ..storage import SCALE_DTYPES, QuantizedTensor, pack, quantize, regroup_channels
from .base import Quantizer, check_choice, require

log = logging.getLogger("kvshrink")

BITS = (2, 3, 4, 8, 16)


# ----------------------------------------------------------------------------------------------
# quantization with a clipped range (the authors' clip_ratio)
# ----------------------------------------------------------------------------------------------
def quantize_clipped(x: torch.Tensor, bits: int, axis: str, group: int, clip: float,
                     scale_dtype: torch.dtype = torch.float16, order: torch.Tensor | None = None,
                     slots: torch.Tensor | None = None) -> QuantizedTensor:
    """Asymmetric uniform quantization with the group range scaled by ``clip`` (<= 1); values outside
    the clipped range saturate. ``clip == 1`` is exactly :func:`kvshrink.storage.quantize`.

    ``order`` (``axis="channel"``; ``slots`` its inverse permutation, computed if not given): channel groups are
    formed over the token's channels (flat over heads) gathered by ``order``, as if stored in that order, while
    every code stays at its own channel; the result records ``slots`` (:class:`~kvshrink.storage.QuantizedTensor`)."""
    if order is not None:
        if axis != "channel":
            raise ValueError("quantize_clipped: a channel order forms channel groups; it needs axis='channel'")
        if slots is None:
            slots = order.argsort()
        q = quantize_clipped(regroup_channels(x, order), bits, axis, group, clip, scale_dtype)
        return replace(q, packed=pack(regroup_channels(q.codes(), slots), bits), slots=slots)
    if clip >= 1.0:
        return quantize(x, bits, axis, group, False, scale_dtype)  # type: ignore[arg-type]
    B, H, T, D = x.shape
    if axis == "channel":
        g = x.float().reshape(B, H, T, D // group, group)
    else:
        g = x.float().reshape(B, H, T // group, group, D).transpose(-1, -2)
    hi = 2**bits - 1
    mn, mx = g.amin(-1) * clip, g.amax(-1) * clip
    zero = mn.to(scale_dtype)
    scale = ((mx - zero.float()) / hi).to(scale_dtype)
    s = scale.float().unsqueeze(-1)
    codes = torch.round((g - zero.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0)).clamp_(0, hi).to(torch.uint8)
    if axis == "channel":
        codes = codes.reshape(B, H, T, D)
    return QuantizedTensor(pack(codes, bits), scale, zero, bits, axis, group, T, D, x.dtype)  # type: ignore[arg-type]


def _cat(a: torch.Tensor | None, b: torch.Tensor | None, dim: int = -2) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=dim)


def _slots_of(index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
    """Where tokens ``tokens (B, H, S)`` (-1 = none) sit in ``index (B, H, T')``: ``(B, H, S)`` slots, -1 where
    a head did not keep the token; columns no head kept are dropped (None if none is left)."""
    match = (index[:, :, None, :] == tokens[..., None]) & (tokens >= 0)[..., None]  # (B, H, S, T')
    found = match.any(-1)
    slots = torch.where(found, match.to(torch.uint8).argmax(-1), -1)
    cols = found.flatten(0, 1).any(0)
    return slots[..., cols] if bool(cols.any()) else None


#: a decode step's sink is decided on the device (no host sync): every step writes a column of a block of this many
#: pending sink columns (-1 in rows where the token is no sink), and only a full block is compacted, with one sync
SINK_BLOCK = 16

#: rows at least this long take the bisection on CUDA (a decode step's row, 1 x hidden, stays on torch.median)
BISECT_MIN = 1 << 20


def lower_median(a: torch.Tensor, bisect: bool | None = None) -> torch.Tensor:
    """``a.median(dim=1).values`` (the lower median: sorted element ``(n - 1) // 2``; NaN if the row has one)
    of each row of a non-negative float32 ``(B, n)`` tensor, bit-identical. On CUDA, torch's median gives each
    row to a single thread block, so one row of a long chunk's hidden states (32K tokens x 4096 = 134M entries)
    is slow; for rows of at least ``BISECT_MIN`` entries on CUDA the median is found instead by bisection on the
    float bit patterns (monotonic for non-negative floats: 31 rounds of a compare-and-count over the row, all
    rows at once). Short rows (a decode step's) keep torch's median: one launch instead of ~300.
    ``bisect`` forces one method."""
    if bisect is None:
        bisect = a.device.type == "cuda" and a.shape[1] >= BISECT_MIN
    if not bisect:
        return a.median(dim=1).values
    bits = a.contiguous().view(torch.int32)
    k = (a.shape[1] - 1) // 2 + 1  # the answer: the smallest x with count(bits <= x) >= k
    lo = torch.zeros(a.shape[0], dtype=torch.int32, device=a.device)
    hi = torch.full_like(lo, 0x7F800000)  # +inf
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        enough = (bits <= mid[:, None]).sum(dim=1) >= k
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return torch.where(a.isnan().any(dim=1), float("nan"), hi.view(torch.float32))


class _Capture:
    __slots__ = ("hidden", "cos", "sin", "position_ids")

    def __init__(self, hidden, cos, sin, position_ids):
        self.hidden, self.cos, self.sin, self.position_ids = hidden, cos, sin, position_ids


# ----------------------------------------------------------------------------------------------
# the cache layer
# ----------------------------------------------------------------------------------------------
class RotateKVLayer(CompressedLayer):
    """One layer of a RotateKV cache (layout in the module docstring)."""

    state_fields = ("kq", "vq", "k_res", "v_res", "pos", "sink_k", "sink_v", "sink_idx", "k_mu")

    def __init__(self, method: "RotateKV", layer_idx: int, num_kv_heads: int, head_dim: int, head_group: int,
                 perm: torch.Tensor | None) -> None:
        super().__init__()
        self.m = method
        self.layer_idx = layer_idx
        self.H, self.D, self.G = num_kv_heads, head_dim, head_group
        self.bits = method.bits
        self.clip = method.effective_clip()
        self.key_axis = method.key_axis
        self.key_group = method.key_group(head_dim)
        self.value_group = method.value_group(head_dim)
        self.scale_dtype = SCALE_DTYPES[method.scale_dtype]
        self.reordered = method.uses_reorder()
        self.set_perm(perm)
        self.pending: _Capture | None = None
        self.rope_fn = None
        self.deferred_sinks: bool | None = None  # None: decode-step sinks found without a host sync off the CPU
        self._sink_free, self._sink_block_of = 0, None

    # -- calibration ------------------------------------------------------------------------
    def set_perm(self, perm: torch.Tensor | None) -> None:
        if perm is not None:
            perm = perm.to(torch.long).reshape(-1)
            if perm.numel() != self.H * self.D or not torch.equal(perm.sort().values, torch.arange(perm.numel())):
                raise KVShrinkError(f"rotatekv: layer {self.layer_idx}: channel order must be a permutation of "
                                    f"{self.H * self.D} channels")
            self.perm, self.inv_perm = perm, perm.argsort()
        else:
            self.perm = self.inv_perm = None
        self._orders: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def channel_order(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(perm, slots)`` on ``device`` (cached: a decode step must not copy them again): key channel
        groups are formed over the rotated channels gathered by ``perm``; ``slots = perm.argsort()`` is each
        channel's quantization slot. None without reordering."""
        if not self.reordered or self.key_axis != "channel":
            return None
        key = str(torch.device(device))
        if key not in self._orders:
            self._orders[key] = (self.perm.to(device), self.inv_perm.to(device))
        return self._orders[key]

    # -- rotations ------------------------------------------------------------------------------
    def rotate_keys(self, k: torch.Tensor) -> torch.Tensor:
        """(B,H,T,D) pre-RoPE (or post-RoPE) keys -> rotated domain (``H_G k``), float32. The calibrated
        order acts only when quantizing (:meth:`quantize_keys`): it decides which channels share a group."""
        B, H, T, D = k.shape
        x = k.float().transpose(1, 2).reshape(B, T, H * D)
        if self.m.fwht:
            x = hadamard_transform(x.reshape(B, T, H // self.G, self.G * D)).reshape(B, T, H * D)
        return x.reshape(B, T, H, D).transpose(1, 2)

    def unrotate_keys(self, x: torch.Tensor) -> torch.Tensor:
        B, H, T, D = x.shape
        y = x.float().transpose(1, 2).reshape(B, T, H * D)
        if self.m.fwht:
            y = hadamard_transform(y.reshape(B, T, H // self.G, self.G * D), inverse=True).reshape(B, T, H * D)
        return y.reshape(B, T, H, D).transpose(1, 2)

    def rotate_values(self, v: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if not (self.m.fwht and self.m.rotate_values):
            return v.float()
        return hadamard_transform(v.float(), inverse=inverse)

    # -- capture (from the decoder-layer pre-hook) ------------------------------------------------
    def capture(self, hidden: torch.Tensor | None, position_embeddings: Any, position_ids: torch.Tensor | None,
                rope_source: RopeSource | None) -> None:
        cos = sin = None
        if isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2:
            cos, sin = position_embeddings
        if self.m.prerope:
            if cos is None:
                raise UnsupportedModelError(
                    f"rotatekv: layer {self.layer_idx} got no RoPE position embeddings (cos, sin); this model does "
                    "not use rotary embeddings the way kvshrink expects; use prerope=false")
            if self.rope_fn is None:
                self.rope_fn = rope_source.recompute_fn(cos) if rope_source is not None else None
                if self.rope_fn is None:
                    raise UnsupportedModelError(
                        f"rotatekv: could not find the rotary-embedding module that produced layer {self.layer_idx}'s "
                        "cos/sin, so RoPE cannot be re-applied to stored keys; use prerope=false")
        self.pending = _Capture(hidden.detach() if (hidden is not None and self.m.sinks) else None, cos, sin,
                                position_ids)

    def nbytes(self) -> int:
        """Stored tensors (see ``state_fields``) plus, once the layer holds tokens, its channel order and
        inverse (int64, ``H*D`` each): calibration data, but memory this layer holds all the same. A block of
        pending decode-step sink columns (GPU) is held memory too, free columns included: :meth:`compact`
        first for the bytes of the sinks alone."""
        n = super().nbytes()
        if self.perm is not None and self.is_initialized:
            n += 2 * self.perm.numel() * self.perm.element_size()
        return n

    # -- storing --------------------------------------------------------------------------------
    def _held(self) -> int:
        return (self.kq.tokens if self.kq is not None else 0) + (self.k_res.shape[-2] if self.k_res is not None else 0)

    takes_index = True  # pre-RoPE positions and sinks are captured for the whole chunk (see append)

    def append(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Store ``k, v (B, H, T', D)``: the model's whole chunk (``index`` None) or, behind an eviction
        policy, the tokens at chunk positions ``index (B, H, T')`` (per head). The chunk's captured (cos, sin),
        position ids and sink tokens are gathered at those positions, so kept keys are un-RoPE'd and later
        re-RoPE'd at their true positions."""
        B, H, q, D = k.shape
        cap, self.pending = self.pending, None
        if self.reordered and self.perm is None:
            raise KVShrinkError(
                "rotatekv: reorder=true needs a calibrated channel order: build the cache from the model, "
                "make_cache(model, 'rotatekv'), which calibrates on the fly, or pass calib=FILE made by "
                "`kvshrink calibrate`; or set reorder=false")
        n = cap.cos.shape[-2] if (cap is not None and cap.cos is not None) else q
        if index is None and n != q:
            raise KVShrinkError(
                f"rotatekv: layer {self.layer_idx} received {q} tokens but the model computed positions for {n}, "
                "and no index saying which tokens of the chunk these are: a policy in front of rotatekv must pass "
                "append(k, v, index=...) (kvshrink's eviction policies do; merging policies such as kvmerger, "
                "cake or lminfinite do not); use prerope=false,sinks=false with it")
        if index is not None:
            index = index.to(device=k.device, dtype=torch.long)
            if tuple(index.shape) != (B, H, q):
                raise KVShrinkError(f"rotatekv: index has shape {tuple(index.shape)}, expected {(B, H, q)}")
        slots = None
        if self.m.sinks and cap is not None and cap.hidden is not None:
            if q == 1 and index is None and self._sinks_deferred(k):  # a decode step: decided on the device
                slots = torch.where(self.token_is_sink(cap.hidden), 0, -1).to(k.device)[:, None]
            else:
                slots = self._chunk_sinks(cap.hidden, index, k.device)
        pos = cos = sin = None
        if self.m.prerope:
            if cap is None or cap.cos is None:
                raise KVShrinkError(
                    "rotatekv: prerope=true needs the (cos, sin) the model computed for these tokens, captured by a "
                    "hook on the model: build the cache with make_cache(model, ...) (not from a config) and run it "
                    "through that model; or use prerope=false")
            pid = cap.position_ids
            if pid is None:  # model did not pass position ids: they follow the cache length
                start = self._held()
                pid = torch.arange(start, start + n, device=k.device)[None]
            pid = pid.to(device=k.device, dtype=torch.int32).expand(B, n)
            cos, sin = cap.cos, cap.sin
            if index is None:
                pos = pid.contiguous()
            else:  # per-head positions and RoPE angles of the kept tokens
                pos = pid[:, None].expand(B, H, n).gather(2, index)
                R = cos.shape[-1]
                g = index[..., None].expand(B, H, q, R)
                cos = cos.expand(B, n, R)[:, None].expand(B, H, n, R).gather(2, g)
                sin = sin.expand(B, n, R)[:, None].expand(B, H, n, R).gather(2, g)
        self._store(k, v, pos, cos, sin, slots)

    def _store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None, cos: torch.Tensor | None,
               sin: torch.Tensor | None, slots: torch.Tensor | None) -> None:
        """Store post-RoPE ``k`` and ``v`` with positions ``pos`` ((B, T) or per head (B, H, T); pre-RoPE
        only), their RoPE ``cos/sin`` (None: recomputed from ``pos``) and sink slots ``slots`` ((B, S) or
        (B, H, S) indices into these tokens, -1 = none)."""
        start = self._held()
        if slots is not None:
            self._add_sink_slots(k, v, slots, start)
        if self.m.prerope:
            if cos is None:
                cos, sin = self._rope_at(pos)
            self._add_pos(pos)
        kr, vr = self.stored_domain(k, v, cos, sin)
        self._push_keys(kr)
        self._push_values(vr)

    def stored_domain(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                      sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE ``k``, ``v`` as the layer quantizes (or holds in its residual) them: keys pre-RoPE (with their
        ``cos, sin``), rotated and centred, values rotated, both rounded to :meth:`stored_dtype`."""
        kk = invert_rope(k.float(), cos.float(), sin.float()) if self.m.prerope else k
        kr = self.rotate_keys(kk)
        if self.m.center:
            kr = kr - self._key_center(kr)
        store = self.stored_dtype(k.dtype)
        return kr.to(store), self.rotate_values(v).to(store)

    def stored_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What rotated keys/values are rounded to before quantizing, and what the residual holds: 16 bits,
        as KIVI and every kvshrink method keep full-precision parts (an fp32 CPU evaluation would otherwise
        count the residual at twice the bytes); the model's dtype with ``bits=16`` (an exact round trip)."""
        return dtype if self.bits == 16 else half_dtype(dtype)

    def _key_center(self, kr: torch.Tensor) -> torch.Tensor:
        """Per-channel key offset ``(B, H, 1, D)`` in the rotated domain, taken once from the first chunk (the
        median over its tokens: sinks do not move it) and kept in ``scale_dtype``; keys are stored minus it
        and read plus it, so the offset costs no precision. Why: keys of models with a ``k_proj`` bias (Qwen2)
        carry a large constant per-channel offset; per-token groups after rotation (``key_axis=channel``)
        would spend their 2-bit range on it (per-channel groups absorb it in their zero points anyway)."""
        if self.k_mu is None:
            self.k_mu = self._center_of(kr)
        return self.k_mu.float()

    def _center_of(self, kr: torch.Tensor) -> torch.Tensor:
        """The per-channel centre of rotated keys ``kr (B, H, T, D)``: their median over tokens, ``(B, H, 1, D)``
        in ``scale_dtype`` (rows are independent: a caller may compute it a few batch rows at a time)."""
        return kr.float().median(dim=2, keepdim=True).values.to(self.scale_dtype)

    # -- positions (pre-RoPE) -------------------------------------------------------------------
    def _add_pos(self, pos: torch.Tensor) -> None:
        self.pos = append_positions(self.pos, pos, self.H)

    def _pos_per_head(self) -> torch.Tensor:
        p = self.pos
        return p if p.dim() == 3 else p[:, None].expand(p.shape[0], self.H, p.shape[-1])

    def _rope_at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) at ``pos`` (B, T) -> (B, T, R), or per head (B, H, T) -> (B, H, T, R)."""
        if pos.dim() == 2:
            return self.rope_fn(pos, torch.float32)
        B, H, T = pos.shape
        cos, sin = self.rope_fn(pos.reshape(B, H * T), torch.float32)
        return cos.reshape(B, H, T, -1), sin.reshape(B, H, T, -1)

    # -- dropping held tokens (decode-time eviction) ------------------------------------------------
    def select(self, idx: torch.Tensor) -> None:
        """Keep held tokens ``idx (B, H, T')`` (an eviction policy dropping stored tokens). Quantized storage
        cannot drop single tokens, so the kept tokens are dequantized and stored again (quantized a second
        time), at their own positions (kept per head) and with sinks still exact."""
        K, V = self.dense()
        if K is None:
            return
        idx = idx.to(device=K.device, dtype=torch.long)
        B, H, T2 = idx.shape
        kk, vv = gather_tokens(K, idx), gather_tokens(V, idx)
        pos = self._pos_per_head().gather(2, idx) if self.m.prerope else None
        slots = None
        if self.sink_idx is not None:
            old = self.sink_idx.long()
            slots = _slots_of(idx, old if old.dim() == 3 else old[:, None].expand(B, H, old.shape[-1]))
        for name in self.state_fields:
            setattr(self, name, None)
        self._store(kk, vv, pos, None, None, slots)

    def _flush_count(self, length: int, axis: str, group: int) -> int:
        if self.bits == 16:
            return 0
        if axis == "token":
            block = self.m.residual or group
            return (length // block) * block
        return max(0, length - self.m.residual)

    def quantize_keys(self, block: torch.Tensor) -> QuantizedTensor:
        """Rotated (centred, 16-bit) keys ``block (B, H, n, D)`` -> their quantized storage: the paper's
        outlier-aware order decides which channels share a per-token group (``key_axis="channel"``); codes
        stay at their rotated channel, so a decode kernel reads each rotation group's codes contiguously."""
        order = self.channel_order(block.device)
        return quantize_clipped(block, self.bits, self.key_axis, self.key_group, self.clip, self.scale_dtype,
                                *(order or (None, None)))

    def _push_keys(self, kr: torch.Tensor) -> None:
        res = _cat(self.k_res, kr)
        n = self._flush_count(res.shape[-2], self.key_axis, self.key_group)
        if n:
            block = res[:, :, :n]
            if self.key_axis == "token" and self.sink_idx is not None:
                block = self._neutralize_sinks(block, self.kq.tokens if self.kq is not None else 0)
            new = self.quantize_keys(block)
            self.kq = new if self.kq is None else self.kq.cat(new)
            rest = res[:, :, n:]
            res = rest.clone() if rest.shape[-2] else None  # clone: free the flushed part's storage
        self.k_res = res

    def _push_values(self, vr: torch.Tensor) -> None:
        res = _cat(self.v_res, vr)
        n = self._flush_count(res.shape[-2], "channel", self.value_group)
        if n:
            new = quantize_clipped(res[:, :, :n], self.bits, "channel", self.value_group, self.clip, self.scale_dtype)
            self.vq = new if self.vq is None else self.vq.cat(new)
            rest = res[:, :, n:]
            res = rest.clone() if rest.shape[-2] else None
        self.v_res = res

    # -- sinks ----------------------------------------------------------------------------------
    def _chunk_sinks(self, hidden: torch.Tensor, index: torch.Tensor | None, device) -> torch.Tensor | None:
        """Sink tokens of a chunk from its hidden states: (B, S) chunk positions (-1 pads rows with fewer),
        or with ``index`` (B, H, S) slots among the kept tokens of each head (-1 = not kept there)."""
        B = hidden.shape[0]
        a = hidden.detach().abs().float().reshape(B, -1)
        C = hidden.shape[-1]
        top = min(self.m.sink_topk, a.shape[1])
        n = a.shape[1] // C
        vals, flat = a.topk(top, dim=1)
        med = lower_median(a)
        keep = vals >= self.m.sink_ratio * med[:, None]
        # each row's distinct sink tokens, ascending, padded with -1: computed on the device, one host sync (S)
        hit = torch.zeros(B, n + 1, dtype=torch.bool, device=a.device)
        hit.scatter_(1, torch.where(keep, flat // C, n), True)  # n: a dump column for entries not kept
        hit = hit[:, :n]
        S = int(hit.sum(1).max()) if B else 0
        if S == 0:
            return None
        tokens = torch.arange(n, device=a.device).expand(B, n)
        idx = torch.where(hit, tokens, n).sort(dim=1).values[:, :S]
        idx = torch.where(idx < n, idx, -1).to(device)
        if index is None:
            return idx
        return _slots_of(index, idx[:, None].expand(B, index.shape[1], S))

    def token_is_sink(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: whether a one-token chunk ``hidden (B, 1, C)`` is a sink, exactly as :meth:`_chunk_sinks`
        decides it (some of the token's top-k |entries| reach ``sink_ratio`` x the median |entry|: true iff its
        largest does), computed on the device with no host sync (graph-captured decode steps)."""
        a = hidden.detach().abs().float().reshape(hidden.shape[0], -1)
        return a.amax(dim=1) >= self.m.sink_ratio * lower_median(a)

    def _add_sinks(self, hidden: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                   index: torch.Tensor | None = None) -> None:
        """Detect the sinks of a chunk from its hidden states and keep them exact (held indices from ``start``)."""
        slots = self._chunk_sinks(hidden, index, k.device)
        if slots is not None:
            self._add_sink_slots(k, v, slots, start)

    def _sinks_deferred(self, k: torch.Tensor) -> bool:
        """Whether the one-token chunk ``k`` (a decode step) finds its sink on the device, with no host sync, into
        a block of pending sink columns (:data:`SINK_BLOCK`): off the CPU by default (``deferred_sinks``), and
        while sinks are shared by all heads (an eviction policy's per-head sinks take the general path)."""
        if k.shape[-2] != 1 or (self.sink_idx is not None and self.sink_idx.dim() != 2):
            return False
        return self.deferred_sinks if self.deferred_sinks is not None else k.device.type != "cpu"

    def _add_sink_slots(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, start: int) -> None:
        B, H, _, D = k.shape
        if slots.dim() == 2 and self._sinks_deferred(k):
            return self._add_pending_sink(k, v, slots, start)
        S = slots.shape[-1]
        s3 = slots if slots.dim() == 3 else slots[:, None].expand(B, H, S)
        gather = s3.clamp(min=0)[..., None].expand(B, H, S, D)
        valid = (s3 >= 0)[..., None]
        sk = torch.where(valid, k.gather(2, gather), torch.zeros((), dtype=k.dtype, device=k.device))
        sv = torch.where(valid, v.gather(2, gather), torch.zeros((), dtype=v.dtype, device=v.device))
        if self.m.sink_dtype != "model":
            sk, sv = sk.to(SCALE_DTYPES[self.m.sink_dtype]), sv.to(SCALE_DTYPES[self.m.sink_dtype])
        gidx = torch.where(slots >= 0, slots + start, slots).to(torch.int32)
        if self.sink_idx is not None and self.sink_idx.shape[0] != B:
            raise KVShrinkError("rotatekv: batch size changed between chunks")
        if self.sink_idx is not None and self.sink_idx.dim() != gidx.dim():  # per-head slots from now on
            if gidx.dim() == 2:
                gidx = gidx[:, None].expand(B, H, S)
            else:
                self.sink_idx = self.sink_idx[:, None].expand(B, H, self.sink_idx.shape[-1])
        self.sink_k, self.sink_v = _cat(self.sink_k, sk), _cat(self.sink_v, sv)
        self.sink_idx = _cat(self.sink_idx, gidx.contiguous(), dim=-1).contiguous()

    def _add_pending_sink(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, start: int) -> None:
        """A decode step's sink slot ``slots (B, 1)`` (0: the token is a sink in that row, -1: not), written into
        the next free column of the pending block, whatever it holds: a row that is no sink gets -1 there
        (padding every reader skips). Only a full block costs a host sync: :meth:`compact_sinks`, then
        :data:`SINK_BLOCK` new columns."""
        B, H, _, D = k.shape
        S = 0 if self.sink_idx is None else self.sink_idx.shape[-1]
        free = self._sink_free if (self.sink_idx is not None and self._sink_block_of is self.sink_idx) else 0
        if free == 0:
            self.compact_sinks()
            S = 0 if self.sink_idx is None else self.sink_idx.shape[-1]
            dt = k.dtype if self.m.sink_dtype == "model" else SCALE_DTYPES[self.m.sink_dtype]
            pad = torch.zeros(B, H, SINK_BLOCK, D, dtype=dt, device=k.device)
            self.sink_k, self.sink_v = _cat(self.sink_k, pad), _cat(self.sink_v, pad.clone())
            self.sink_idx = _cat(self.sink_idx, torch.full((B, SINK_BLOCK), -1, dtype=torch.int32, device=k.device),
                                 dim=-1).contiguous()
            S, free = S + SINK_BLOCK, SINK_BLOCK
        col = S - free
        # the token goes in whole: rows where it is no sink carry index -1, which every reader skips (and
        # compaction zeroes), so no select is needed (three small launches per layer and step, host-bound)
        self.sink_k[:, :, col].copy_(k[:, :, 0])
        self.sink_v[:, :, col].copy_(v[:, :, 0])
        self.sink_idx[:, col] = torch.where(slots[:, 0] >= 0, start, -1).to(torch.int32)
        # the block belongs to this very tensor (written in place): state replaced wholesale means no free column
        self._sink_free, self._sink_block_of = free - 1, self.sink_idx

    def compact(self) -> None:
        self.compact_sinks()

    def map_state(self, fn) -> None:
        super().map_state(fn)
        self._sink_free, self._sink_block_of = 0, None  # new tensors: no pending block (nor a reference to the old)

    def reset(self) -> None:
        super().reset()
        self._sink_free, self._sink_block_of = 0, None

    def compact_sinks(self) -> None:
        """Drop the padding (-1) columns of the sink tensors: each row's sinks first, in held order, trimmed to
        the longest row. One host sync (how many columns are left)."""
        self._sink_free, self._sink_block_of = 0, None
        idx = self.sink_idx
        if idx is None:
            return
        valid = idx >= 0
        counts = valid.sum(-1).flatten()
        n, fewest = torch.stack([counts.max(), counts.min()]).tolist() if counts.numel() else (0, 0)
        if fewest == idx.shape[-1]:  # no padding anywhere
            return
        if n == 0:
            self.sink_k = self.sink_v = self.sink_idx = None
            return
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[..., :n]
        self.sink_idx = idx.gather(-1, order).contiguous()
        B, H, _, D = self.sink_k.shape
        o = (order if order.dim() == 3 else order[:, None].expand(B, H, n))[..., None].expand(B, H, n, D)
        kept = (self.sink_idx >= 0)
        kept = (kept if kept.dim() == 3 else kept[:, None].expand(B, H, n))[..., None]
        # padding (-1) entries read as zeros, as sinks found chunk by chunk pad them
        self.sink_k = torch.where(kept, self.sink_k.gather(2, o), 0).to(self.sink_k.dtype)
        self.sink_v = torch.where(kept, self.sink_v.gather(2, o), 0).to(self.sink_v.dtype)

    def _sinks_per_head(self) -> torch.Tensor:
        idx = self.sink_idx.long()
        return idx if idx.dim() == 3 else idx[:, None].expand(idx.shape[0], self.H, idx.shape[-1])

    def _neutralize_sinks(self, block: torch.Tensor, offset: int) -> torch.Tensor:
        """Token-group key quantization: replace sink tokens in ``block`` (held indices ``offset..``) by the
        mean of the block's other tokens, so a sink's huge key does not widen its group's range (sinks
        are restored exactly from ``sink_k`` at read time)."""
        B, H, n, D = block.shape
        held = self._sinks_per_head()
        idx = held - offset
        inside = (held >= 0) & (idx >= 0) & (idx < n)
        if not bool(inside.any()):
            return block
        mask = torch.zeros(B, H, n + 1, dtype=torch.bool, device=block.device)
        mask.scatter_(2, torch.where(inside, idx, n), True)
        mask = mask[:, :, :n, None]
        keep = (~mask).to(block.dtype)
        mean = (block * keep).sum(2, keepdim=True) / keep.sum(2, keepdim=True).clamp(min=1)
        return torch.where(mask, mean.to(block.dtype), block)

    def _put_sinks(self, x: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
        B, H, T, D = x.shape
        idx = self._sinks_per_head()
        S = idx.shape[-1]
        tgt = torch.where(idx >= 0, idx, T)[..., None].expand(B, H, S, D)
        out = torch.cat([x, x.new_zeros(B, H, 1, D)], dim=2)
        out.scatter_(2, tgt, sinks.to(x.dtype))
        return out[:, :, :T]

    # -- reading --------------------------------------------------------------------------------
    def dense(self):
        if self.kq is None and self.k_res is None:
            return None, None
        dtype, f32 = self.dtype, torch.float32
        # float32 math throughout (the stored 16-bit values are not rounded again), one cast at the end
        K = _cat(self.kq.dequantize(f32) if self.kq is not None else None,
                 self.k_res.float() if self.k_res is not None else None)
        if self.k_mu is not None:
            K = K.float() + self.k_mu.float()
        K = self.unrotate_keys(K)
        if self.m.prerope:
            cos, sin = self._rope_at(self.pos)
            K = apply_rope(K, cos.float(), sin.float())
        V = _cat(self.vq.dequantize(f32) if self.vq is not None else None,
                 self.v_res.float() if self.v_res is not None else None)
        V = self.rotate_values(V, inverse=True)
        K, V = K.to(dtype), V.to(dtype)
        if self.sink_idx is not None:
            K, V = self._put_sinks(K, self.sink_k), self._put_sinks(V, self.sink_v)
        return K, V


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------
_BUILTIN: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_FILES: dict[tuple, tuple[dict, dict]] = {}


@register
@dataclass
class RotateKV(Quantizer):
    """Hadamard-rotated (outlier-aware, pre-RoPE, grouped-head) 2-bit keys/values with exact attention sinks."""

    name = "rotatekv"
    paper = ("Su et al. 2025, RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware "
             "Adaptive Rotations (arXiv 2501.16383)")

    bits: int = field(default=2, metadata={"help": "bits per key/value code: 2, 3, 4 (paper), 8, or 16 (no "
                                                  "quantization: rotation round trip only)"})
    group: int | None = field(default=None, metadata={
        "help": "quantization group: channels per per-token group (values; keys with key_axis=channel), tokens "
                "per group for keys with key_axis=token; none = head_dim for channel groups (paper: 128 = "
                "Llama's head_dim), 32 tokens for token groups"})
    key_axis: Literal["channel", "token"] = field(default="channel", metadata={
        "help": "key groups run along channels (per-token scales after rotation: the paper and the authors' "
                "code, the default) or along tokens (per-channel scales over groups of tokens, as KIVI: "
                "kvshrink's kernel layout)"})
    residual: int = field(default=0, metadata={"help": "newest tokens kept unquantized (paper: 0)"})
    clip: float | None = field(default=None, metadata={
        "help": "fraction of each group's [min, max] range kept (none: the paper's 0.8 at 2 bits, 1.0 above)"})
    head_group: int = field(default=4, metadata={
        "help": "KV heads per Hadamard rotation (paper: 4); the largest divisor of the model's KV heads not above "
                "it whose rotation size is supported is used"})
    fwht: bool = field(default=True, metadata={"help": "Hadamard-rotate keys (and values) before quantizing"})
    rotate_values: bool = field(default=True, metadata={"help": "also rotate values (per head)"})
    reorder: bool = field(default=True, metadata={
        "help": "calibrated outlier-aware channel reordering (acts with key_axis=channel only: with per-channel "
                "token groups every channel is quantized alone, so an order changes nothing)"})
    prerope: bool = field(default=True, metadata={"help": "rotate/quantize keys before RoPE (re-applied on read)"})
    center: bool = field(default=True, metadata={
        "help": "subtract a per-channel key offset (median of the first chunk, stored in scale_dtype) before "
                "quantizing, add it back on read (kvshrink's addition, not in the paper; false = the paper exactly). "
                "Keys with a bias (Qwen2's k_proj) otherwise spend the per-token 2-bit range on it"})
    sinks: bool = field(default=True, metadata={"help": "keep attention-sink tokens (massive activations) exact"})
    sink_topk: int = field(default=20, metadata={"help": "largest |hidden| entries whose tokens may be sinks (paper: 20)"})
    sink_ratio: float = field(default=100.0, metadata={
        "help": "an entry must be this many times the chunk's median |hidden| to mark a sink (0: paper's plain top-k)"})
    sink_dtype: str = field(default="float16", metadata={
        "help": "dtype sink tokens are kept in: float16 (the paper's FP16), bfloat16, float32, or model (as given)"})
    calib: str | None = field(default=None, metadata={
        "help": "calibration file from `kvshrink calibrate` (none: quick built-in calibration on the model)"})
    calib_tokens: int = field(default=512, metadata={"help": "tokens for the built-in calibration"})
    scale_dtype: str = field(default="float16", metadata={"help": "dtype of scales and zero points"})

    def __post_init__(self) -> None:
        check_choice("rotatekv", "bits", self.bits, BITS)
        check_choice("rotatekv", "key_axis", self.key_axis, ("channel", "token"))
        check_choice("rotatekv", "scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        check_choice("rotatekv", "sink_dtype", self.sink_dtype, (*SCALE_DTYPES, "model"))
        require(self.group is None or self.group > 0, f"rotatekv: group must be positive or none, got {self.group}")
        require(self.residual >= 0, f"rotatekv: residual must be >= 0, got {self.residual}")
        if self.key_axis == "token":
            g = self.group or 32
            require(self.residual % g == 0, f"rotatekv: residual={self.residual} must be a multiple of the key token "
                                            f"group ({g}) with key_axis=token (keys are flushed in whole groups)")
        require(self.clip is None or 0.0 < self.clip <= 1.0, f"rotatekv: clip must be in (0, 1], got {self.clip}")
        require(self.head_group >= 1, f"rotatekv: head_group must be >= 1, got {self.head_group}")
        require(self.sink_topk >= 1, f"rotatekv: sink_topk must be >= 1, got {self.sink_topk}")
        require(self.sink_ratio >= 0, f"rotatekv: sink_ratio must be >= 0, got {self.sink_ratio}")
        require(self.calib_tokens >= 16, f"rotatekv: calib_tokens must be >= 16, got {self.calib_tokens}")
        require(not (self.calib and not self.reorder),
                "rotatekv: calib= gives a channel order, which reorder=false does not use; drop one of them")

    # -- derived settings -------------------------------------------------------------------------
    def effective_clip(self) -> float:
        if self.clip is not None:
            return self.clip
        return 0.8 if self.bits == 2 else 1.0

    def uses_reorder(self) -> bool:
        """Whether the channel order is applied: only per-token key groups (``key_axis=channel``) see it."""
        return self.reorder and self.key_axis == "channel"

    def key_group(self, head_dim: int) -> int:
        if self.key_axis == "token":
            return self.group or 32
        return self.group or head_dim

    def value_group(self, head_dim: int) -> int:
        return self.group or head_dim

    def effective_head_group(self, info) -> int:
        """Largest divisor of the KV heads <= head_group whose rotation size is supported."""
        H, D = info.num_kv_heads, info.head_dim
        for g in range(min(self.head_group, H), 0, -1):
            if H % g == 0 and (not self.fwht or is_supported(g * D)):
                return g
        raise SpecError(
            f"rotatekv: no Hadamard rotation fits head_dim={D} (sizes that work: powers of two and 12, 20 or 28 "
            "times a power of two, e.g. 64, 96, 128, 160, 192, 256); use fwht=false for this model")

    def calib_params(self, info) -> dict[str, Any]:
        """The parameters a calibration depends on (a file must match them)."""
        return {"head_group": self.effective_head_group(info), "fwht": self.fwht, "prerope": self.prerope,
                "statistic": "mean"}

    # -- Quantizer API --------------------------------------------------------------------------
    def validate(self, info) -> None:
        D = info.head_dim
        require(D % self.value_group(D) == 0,
                f"rotatekv: group={self.group} does not divide head_dim={D}; use a divisor of {D} or none")
        if self.key_axis == "channel":
            require(D % self.key_group(D) == 0, f"rotatekv: group={self.group} does not divide head_dim={D}")
        if self.fwht and self.rotate_values:
            require(is_supported(D), f"rotatekv: no Hadamard rotation of head_dim={D} for the values (sizes that "
                                     "work: powers of two and 12, 20 or 28 times a power of two, e.g. 64, 80, 96, "
                                     "128); use rotate_values=false (or fwht=false)")
        G = self.effective_head_group(info)
        if G != self.head_group:
            log.info("rotatekv: head_group=%d does not fit %d KV heads of %d channels; using %d", self.head_group,
                     info.num_kv_heads, D, G)
        if self.prerope and info.config is not None:
            check_rope_style(info.config)
        if self.calib:
            self._load_file(info)

    def _load_file(self, info) -> dict[int, torch.Tensor]:
        from ..calibration import check_calibration, load_calibration
        import os

        key = (os.path.abspath(self.calib), os.path.getmtime(self.calib) if os.path.exists(self.calib) else 0)
        if key not in _FILES:
            _FILES[key] = load_calibration(self.calib)
        tensors, meta = _FILES[key]
        check_calibration(meta, self.calib, self.name, self.calib_params(info), info.identity())
        return {i: tensors[f"layer.{i}.perm"] for i, kind in enumerate(info.layer_kinds) if f"layer.{i}.perm" in tensors}

    def make_layer(self, layer_idx, info):
        perm = None
        if self.uses_reorder() and self.calib:
            perms = self._load_file(info)
            if layer_idx not in perms:
                from ..errors import CalibrationMismatchError
                raise CalibrationMismatchError(f"calibration file {self.calib} has no channel order for layer {layer_idx}")
            perm = perms[layer_idx]
        return RotateKVLayer(self, layer_idx, info.num_kv_heads, info.head_dim, self.effective_head_group(info), perm)

    def attach(self, model, cache) -> list:
        layers = {i: l for i, l in enumerate(cache.layers) if isinstance(_find(l), RotateKVLayer)}
        if not layers:
            return []
        if self.uses_reorder() and not self.calib and any(_find(l).perm is None for l in layers.values()):
            perms = builtin_calibration(model, self, cache.info)
            for i, l in layers.items():
                _find(l).set_perm(perms[i])
        handles = []
        source = RopeSource()
        if self.prerope:
            for m in rotary_modules(model):
                handles.append(m.register_forward_hook(source.hook, with_kwargs=True))
        cache_ref = weakref.ref(cache)
        found = decoder_layers(model)
        missing = [i for i in layers if i not in found]
        if missing and (self.prerope or self.sinks):
            for h in handles:
                h.remove()
            raise UnsupportedModelError(
                f"rotatekv: could not find decoder layers {missing[:5]} (modules with a `self_attn` that has "
                "`layer_idx`) to capture RoPE and hidden states; use prerope=false,sinks=false")
        if self.prerope or self.sinks:
            for i in layers:
                handles.append(found[i].register_forward_pre_hook(_make_hook(cache_ref, i, source), with_kwargs=True))
        return handles


def _find(layer) -> Any:
    """The RotateKV layer inside a (possibly policy-wrapped) cache layer."""
    seen = 0
    while layer is not None and not isinstance(layer, RotateKVLayer) and seen < 8:
        layer = getattr(layer, "inner", None)
        seen += 1
    return layer


def _make_hook(cache_ref: "weakref.ref", idx: int, source: RopeSource):
    def hook(module, args, kwargs):
        cache = cache_ref()
        if cache is None or cache_in(kwargs) is not cache:
            return None  # another cache (or none) is running through this model: not ours
        layer = _find(cache.layers[idx])
        if layer is None:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        layer.capture(hidden, kwargs.get("position_embeddings"), kwargs.get("position_ids"), source)
        return None
    return hook


# ----------------------------------------------------------------------------------------------
# calibration of the outlier-aware channel order
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def channel_statistics(model, method: RotateKV, input_ids: torch.Tensor, window: int = 512) -> dict[int, torch.Tensor]:
    """Per layer, the mean of each rotated (pre-RoPE if ``prerope``) key channel, ``(H*D,)`` float64,
    over the tokens of ``input_ids`` (B, T) run through ``model`` in windows of ``window`` tokens."""
    from ..cache import make_cache

    # center=False: the statistic is the channels' own mean; a centred probe would hand back means of ~0
    probe = RotateKV(bits=16, head_group=method.head_group, fwht=method.fwht, reorder=False, prerope=method.prerope,
                     sinks=False, rotate_values=False, center=False)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    for start in range(0, ids.shape[1], window):
        chunk = ids[:, start:start + window]
        if chunk.shape[1] < 2:
            break
        cache = make_cache(model, probe)
        try:
            model(input_ids=chunk, **cache_kw(model, cache), use_cache=True)
            for i, layer in enumerate(cache.layers):
                layer = _find(layer)
                if not isinstance(layer, RotateKVLayer) or layer.k_res is None:
                    continue
                k = layer.k_res.double()  # (B, H, T, D) rotated, not reordered
                B, H, T, D = k.shape
                s = k.transpose(1, 2).reshape(B * T, H * D).sum(0)
                sums[i] = sums[i] + s if i in sums else s
            count += chunk.shape[0] * chunk.shape[1]
        finally:
            cache.close()
    if not sums:
        raise KVShrinkError("rotatekv: calibration saw no tokens; give at least 2 tokens of text")
    return {i: s / count for i, s in sums.items()}


def calibrate(model, method: RotateKV, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Calibration tensors for ``method`` on ``model``: ``layer.{i}.perm`` (int64, ``H*D``): quantization
    slot ``j`` holds rotated channel ``perm[j]``, channels in ascending order of their mean (the
    authors' ordering), and ``layer.{i}.mean`` (float32) the means themselves."""
    stats = channel_statistics(model, method, input_ids)
    out = {}
    for i, mean in stats.items():
        out[f"layer.{i}.perm"] = torch.argsort(mean).to(torch.int64).cpu()
        out[f"layer.{i}.mean"] = mean.float().cpu()
    return out


def _builtin_tokens(model, n: int) -> tuple[torch.Tensor, str]:
    """Tokens for the quick built-in calibration: the default text through the model's tokenizer if
    both are at hand (its last ``n`` tokens, away from the opening that evaluations usually score),
    else ``n`` seeded random token ids."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    try:
        if not name:
            raise OSError("no model path")
        from transformers import AutoTokenizer

        from .. import assets

        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        text = assets.read_texts(list(assets.DEFAULT_TEXTS))
        ids = tok(text[-max(8 * n, 4096):], return_tensors="pt")["input_ids"][:, -n:]
        if ids.shape[1] >= 16:
            return ids, f"the last {ids.shape[1]} tokens of the default text ({', '.join(assets.DEFAULT_TEXTS)})"
    except Exception:  # no tokenizer / text here: fall back to tokens drawn from the vocabulary
        pass
    vocab = int(getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, n), generator=g), f"{n} seeded random token ids"


def builtin_calibration(model, method: RotateKV, info) -> dict[int, torch.Tensor]:
    key = (method.effective_head_group(info), method.fwht, method.prerope, method.calib_tokens)
    per_model = _BUILTIN.setdefault(model, {})
    if key not in per_model:
        ids, what = _builtin_tokens(model, method.calib_tokens)
        msg = (f"rotatekv: no calib file given; calibrating the channel order on {what} "
               "(for the paper's calibration on your own text run `kvshrink calibrate`)")
        warnings.warn(msg, stacklevel=3)
        tensors = calibrate(model, method, ids)
        per_model[key] = {i: tensors[f"layer.{i}.perm"] for i in range(info.num_layers) if f"layer.{i}.perm" in tensors}
    return per_model[key]
