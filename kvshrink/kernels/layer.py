"""A KIVI cache layer for the GPU kernels: in-place appends, and a handle instead of dense K/V at decode.

:class:`KernelUniformLayer` stores exactly what :class:`~kvshrink.layer.UniformLayer` stores (same
layouts, same KIVI flush rule, same bytes per token), with two differences:

* quantized streams live in *capacity buffers* that grow by at most 1/8 (at least 256 tokens) at a
  time, or to a reserved size (:meth:`reserve`); new codes are written in place by the Triton
  quantize kernel. ``UniformLayer`` concatenates the whole packed history on every value flush, i.e.
  every decode step once the residual is full: an O(T) copy per token. Slack capacity is real memory,
  so :meth:`nbytes` counts it (``tensor_nbytes`` counts whole storages).
* for a one-token decode step on CUDA, :meth:`update` returns a :class:`PackedDecode` handle (the packed
  past plus the new token in full precision) instead of dense tensors; the ``"kvshrink"`` attention
  function (``kvshrink.kernels.attention``) hands it to the packed decode kernel. So does a prefill chunk
  that arrives over a packed past (served by ``chunk_attention``: the past is never dequantized to
  16 bits). A first prefill chunk and every other case return dense K/V exactly as the base layer does.

Storage order: where both streams allow it (``strided.strided_supported``: 2/4/8 bits, value groups at
least ``head_dim * bits / 8`` channels), codes are kept in the *channel-strided* layout of ``strided.py``
(same bytes per token, another bit order; ``StridedQuantizedTensor.codes()/dequantize()`` read it), which
the faster ``decode_strided.py`` kernel reads; otherwise in KIVI's storage layout.

Attention semantics are the base layer's: the new token attends to the compressed past and to its own
keys/values in full precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layer import UniformLayer, _cat
from ..storage import QuantizedTensor, check_finite, packed_size, quantize
from ._triton import device_guard, kernels_usable
from .quant_pack import kernel_supports, quantize_pack
from .reference import PackedKV
from .strided import StridedQuantizedTensor, quantize_pack_strided, quantize_strided_ref, strided_supported

GROW_MIN_TOKENS = 256


def grow_capacity(reserved: int, need: int, cur: int) -> int:
    """Tokens of capacity that hold ``need``: the reserved size if it fits, else at least 1/8 (and
    ``GROW_MIN_TOKENS``) more than the current ``cur``, so regrowth copies stay amortized."""
    return reserved if reserved >= need else max(need, cur + max(cur // 8, GROW_MIN_TOKENS))


#: serve prefill chunks over a packed past with ``chunk_attention`` (no 16-bit copy of the past); False: they
#: dequantize the past and use SDPA, as the base layer does (each layer also has its own ``chunk_kernel``)
CHUNK_KERNEL = True

#: store the channel-strided layout (strided.py) where it applies. Off by default: on the H100 its kernel was
#: faster only at small batch x length (1x32K) and slower at 8x32K / 16x32K / 1x128K and end to end than the
#: kernel over KIVI's layout (benchmarks/results/kernels_h100_v2_final.json, docs/KERNELS.md)
PREFER_STRIDED = False

try:  # the base layer keeps residuals in 16 bits (fp32 models: fp16); follow it where it does
    from ..layer import half_dtype as _half_dtype
except ImportError:  # pragma: no cover - older core
    def _half_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype


@dataclass
class PackedDecode:
    """What a kernel layer's ``update`` returns for a decode step (as both key and value)."""

    kv: PackedKV
    layer: "KernelUniformLayer"

    @property
    def shape(self) -> tuple[int, int, int, int]:  # what code that inspects key.shape expects
        r = self.kv.k_res
        return (r.shape[0], r.shape[1], self.kv.tokens, r.shape[3])  # type: ignore[union-attr]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K/V in the model's dtype (fallback when the kernel cannot serve a call)."""
        return self.kv.dense(getattr(self.layer, "dtype", self.kv.k_res.dtype))  # type: ignore[union-attr]


class _Stream:
    """One quantized stream in a capacity buffer: ``packed/scale/zero`` with room along dim 2.

    ``rows`` counts quantization rows (groups for keys, tokens for values); buffer ``i`` holds
    ``mults[i]`` dim-2 entries per row (the strided layout stores key codes per token: ``group`` each).
    """

    def __init__(self) -> None:
        self.bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.rows = 0
        self.mults = (1, 1, 1)

    def cap(self) -> int:
        return 0 if self.bufs is None else self.bufs[1].shape[2]

    def ensure(self, rows: int, make) -> None:
        """Make room for ``rows`` used rows; ``make(cap)`` allocates empty buffers of capacity ``cap``."""
        if rows <= self.cap():
            return
        new = make(rows)
        if self.bufs is not None and self.rows:
            for dst, src, m in zip(new, self.bufs, self.mults):
                dst[:, :, :self.rows * m].copy_(src[:, :, :self.rows * m])
        self.bufs = new

    def views(self, rows: int, first: int = 0) -> tuple[torch.Tensor, ...]:
        assert self.bufs is not None
        return tuple(b[:, :, first * m:rows * m] for b, m in zip(self.bufs, self.mults))


class KernelUniformLayer(UniformLayer):
    """KIVI storage (per-channel keys, per-token values, asymmetric) served to the Triton kernels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.key_axis != "token" or self.value_axis != "channel" or self.symmetric:
            raise ValueError("KernelUniformLayer serves KIVI's layout: asymmetric, keys along tokens, values along channels")
        self._k, self._v = _Stream(), _Stream()
        self._reserved = 0
        self.use_kernels = True
        self.strided: bool | None = None  # storage order, decided once head_dim is known (see _layout)
        self.chunk_kernel: bool | None = None  # None: the module's CHUNK_KERNEL

    @classmethod
    def from_uniform(cls, layer: UniformLayer) -> "KernelUniformLayer":
        """A kernel layer with ``layer``'s parameters and (copied) state."""
        new = cls(layer.key_bits, layer.key_axis, layer.value_axis, layer.key_group, layer.value_group,
                  layer.residual, layer.symmetric, layer.scale_dtype, layer.key_bits, layer.value_bits)
        new.seen, new.simulated, new.check_finite = layer.seen, layer.simulated, layer.check_finite
        if layer.is_initialized:
            new.dtype, new.device = layer.dtype, layer.device
            new.num_heads, new.head_dim = layer.num_heads, layer.head_dim
            new.is_initialized = True
        new.kq, new.vq, new.k_res, new.v_res = layer.kq, layer.vq, layer.k_res, layer.v_res
        new._adopt()
        return new

    # -- capacity ----------------------------------------------------------------------------------
    def reserve(self, tokens: int) -> None:
        """Pre-size the buffers for ``tokens`` tokens in all (prompt + generated): no regrowth, no slack."""
        self._reserved = max(self._reserved, int(tokens))

    def _grow_to(self, need_rows: int, per: int, cur_rows: int) -> int:
        """Capacity in rows (of ``per`` tokens) that holds ``need_rows``: the reserved size if it fits,
        else at least 1/8 (and ``GROW_MIN_TOKENS``) more than now, so regrowth copies stay amortized."""
        return -(-grow_capacity(self._reserved, need_rows * per, cur_rows * per) // per)

    def _layout(self, head_dim: int) -> bool:
        """Whether this layer stores the channel-strided layout (``strided.py``): when both streams fit it and
        the kernels can run; else KIVI's storage layout, read by ``decode_attention.py``."""
        if self.strided is None:
            self.strided = PREFER_STRIDED and (strided_supported(self.key_bits, self.key_group, "token", head_dim)
                            and strided_supported(self.value_bits, self.value_group, "channel", head_dim))
        return self.strided

    def _make_key_bufs(self, like: torch.Tensor, rows_needed: int):
        B, H, _, D = like.shape
        cap = self._grow_to(rows_needed, self.key_group, self._k.cap())
        gb = packed_size(self.key_group, self.key_bits)
        if self._layout(D):
            return (torch.empty(B, H, cap * self.key_group, packed_size(D, self.key_bits), dtype=torch.uint8,
                                device=like.device),
                    torch.empty(B, H, cap, D, dtype=self.scale_dtype, device=like.device),
                    torch.empty(B, H, cap, D, dtype=self.scale_dtype, device=like.device))
        return (torch.empty(B, H, cap, D, gb, dtype=torch.uint8, device=like.device),
                torch.empty(B, H, cap, D, dtype=self.scale_dtype, device=like.device),
                torch.empty(B, H, cap, D, dtype=self.scale_dtype, device=like.device))

    def _make_value_bufs(self, like: torch.Tensor, rows_needed: int):
        B, H, _, D = like.shape
        cap = self._grow_to(rows_needed, 1, self._v.cap())
        return (torch.empty(B, H, cap, packed_size(D, self.value_bits), dtype=torch.uint8, device=like.device),
                torch.empty(B, H, cap, D // self.value_group, dtype=self.scale_dtype, device=like.device),
                torch.empty(B, H, cap, D // self.value_group, dtype=self.scale_dtype, device=like.device))

    def _adopt(self) -> None:
        """Take the current ``kq``/``vq`` tensors as the buffers (after state was replaced wholesale)."""
        if getattr(self, "head_dim", None) is not None and getattr(self, "is_initialized", False):
            self._layout(self.head_dim)
        if self.strided:  # state from a storage-layout layer (from_uniform) or a wholesale replacement
            if self.kq is not None and not isinstance(self.kq, StridedQuantizedTensor):
                self.kq = StridedQuantizedTensor.from_kivi(self.kq)
            if self.vq is not None and not isinstance(self.vq, StridedQuantizedTensor):
                self.vq = StridedQuantizedTensor.from_kivi(self.vq)
        for stream, q in ((self._k, self.kq), (self._v, self.vq)):
            stream.mults = (self.key_group, 1, 1) if (self.strided and stream is self._k) else (1, 1, 1)
            if q is None:
                stream.bufs, stream.rows = None, 0
            else:
                stream.bufs, stream.rows = (q.packed, q.scale, q.zero), q.scale.shape[2]  # type: ignore[assignment]

    # -- storing -----------------------------------------------------------------------------------
    def _quantize_into(self, stream: _Stream, x: torch.Tensor, bits: int, axis: str, group: int, make) -> QuantizedTensor:
        """Quantize ``x`` and write it after the stream's used rows; return the stream's whole view."""
        B, H, n, D = x.shape
        rows = n // group if axis == "token" else n
        strided = self._layout(D)
        if strided and axis == "token":
            stream.mults = (group, 1, 1)
        stream.ensure(stream.rows + rows, lambda need: make(x, need))
        dst = stream.views(stream.rows + rows, stream.rows)
        if strided:
            if kernels_usable(x.device):
                with device_guard(x.device):
                    quantize_pack_strided(x, bits, axis, group, self.scale_dtype, out=dst)  # type: ignore[arg-type]
            else:
                for d_, s_ in zip(dst, quantize_strided_ref(x, bits, axis, group, self.scale_dtype).tensors()):
                    d_.copy_(s_)
        elif kernels_usable(x.device) and kernel_supports(bits, group, D):
            with device_guard(x.device):
                quantize_pack(x, bits, axis, group, self.scale_dtype, out=dst)  # type: ignore[arg-type]
        else:
            q = quantize(x, bits, axis, group, False, self.scale_dtype)  # type: ignore[arg-type]
            for d_, s_ in zip(dst, q.tensors()):
                d_.copy_(s_)
        stream.rows += rows
        packed, scale, zero = stream.views(stream.rows)
        tokens = stream.rows * (group if axis == "token" else 1)
        cls = StridedQuantizedTensor if strided else QuantizedTensor
        return cls(packed, scale, zero, bits, axis, group, tokens, D, x.dtype)  # type: ignore[arg-type]

    def _push_stream(self, stream: _Stream, res: torch.Tensor, bits: int, axis: str, group: int, make,
                     q: QuantizedTensor | None) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
        n = self._flush_count(res.shape[-2], axis, group)  # type: ignore[arg-type]
        if n == 0:
            return q, res
        q = self._quantize_into(stream, res[:, :, :n], bits, axis, group, make)
        rest = res[:, :, n:]
        return q, (rest.clone() if rest.shape[-2] else None)

    def _append_res(self, k_res: torch.Tensor, v_res: torch.Tensor) -> None:
        """Append given that ``k_res``/``v_res`` already hold old residual + new tokens."""
        self.kq, self.k_res = self._push_stream(self._k, k_res, self.key_bits, "token", self.key_group,
                                                self._make_key_bufs, self.kq)
        self.vq, self.v_res = self._push_stream(self._v, v_res, self.value_bits, "channel", self.value_group,
                                                self._make_value_bufs, self.vq)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        half = _half_dtype(k.dtype)
        self._append_res(_cat(self.k_res, k.to(half)), _cat(self.v_res, v.to(half)))

    # -- the decode seam ---------------------------------------------------------------------------
    def kernel_step(self, key_states: torch.Tensor) -> bool:
        """Whether this update returns a handle for the packed kernels: a decode step (one token), or a prefill
        chunk over a packed past (KIVI's layout: ``chunk_attention``). A first chunk, with nothing packed yet,
        stays dense: SDPA over its own 16-bit tokens is what a kernel would compute."""
        D = key_states.shape[-1]
        if not (self.use_kernels and not self.simulated and kernels_usable(key_states.device)):
            return False
        kivi = (kernel_supports(self.key_bits, self.key_group, D)
                and kernel_supports(self.value_bits, self.value_group, D))
        if key_states.shape[-2] == 1:
            return self._layout(D) or kivi
        chunks = CHUNK_KERNEL if self.chunk_kernel is None else self.chunk_kernel
        return chunks and kivi and not self._layout(D) and (self.kq is not None or self.vq is not None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.kernel_step(key_states):
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.check_finite and key_states.shape[-2] > 1:  # as the base layer: chunks yes, decode steps no (a sync)
            check_finite(key_states, "keys given to the cache")
            check_finite(value_states, "values given to the cache")
        dt, half = key_states.dtype, _half_dtype(key_states.dtype)
        k_res, v_res = _cat(self.k_res, key_states.to(half)), _cat(self.v_res, value_states.to(half))
        if half == dt:  # 16-bit models: what is stored is what attention reads
            k_att, v_att = k_res, v_res
        else:  # the new token attends to itself at the model's precision, as in the base layer
            k_att = _cat(None if self.k_res is None else self.k_res.to(dt), key_states)
            v_att = _cat(None if self.v_res is None else self.v_res.to(dt), value_states)
        handle = PackedDecode(PackedKV(self.kq, k_att, self.vq, v_att), self)
        self._append_res(k_res, v_res)  # in place past the handle's views, or into new residual tensors
        self.seen += key_states.shape[-2]
        return handle, handle

    # -- state ops that replace tensors wholesale ----------------------------------------------------
    def map_state(self, fn) -> None:
        super().map_state(fn)
        self._adopt()

    def reset(self) -> None:
        super().reset()
        self._adopt()
