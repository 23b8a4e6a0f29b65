"""Per-layer compressed KV storage that plugs into transformers' ``Cache`` as a ``CacheLayerMixin``.

A layer's ``update(k, v)`` is called by the model's attention with the new chunk's keys/values and
must return dense K/V covering exactly what ``get_mask_sizes`` announced. kvshrink's rule (what a
serving engine does): the current chunk attends to the *compressed* past plus its own keys/values in
full precision; then the chunk is compressed into storage. In the papers' ``simulated`` evaluation
mode the chunk is stored first and attends to its own compressed copy too.

Dequantization happens here, one layer at a time, so the extra memory is one layer's dense K/V while
that layer's attention runs. GPU kernels replace :meth:`CompressedLayer.attention_inputs` to hand the
packed storage to attention directly instead of dense tensors.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from transformers.cache_utils import CacheLayerMixin

from .storage import QuantizedTensor, check_finite, quantize
from .storage.quantize import Axis

Stored = torch.Tensor | QuantizedTensor | None


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type in which lossy methods keep their full-precision parts (residual window, sinks,
    outliers): the model's own if it is 16-bit, else float16 — the setting of the papers and of serving;
    an fp32 model (CPU evaluation) would otherwise double the bytes of those parts."""
    return dtype if torch.empty((), dtype=dtype).element_size() <= 2 else torch.float16


def tensor_nbytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors`` (a view counts its whole storage, once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class CompressedLayer(CacheLayerMixin):
    """Base of kvshrink's cache layers. Subclasses name their stored fields in ``state_fields`` and
    implement :meth:`append` (store new tokens) and :meth:`dense` (held tokens as dense K/V)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    state_fields: tuple[str, ...] = ()
    # True: append() accepts ``index`` and uses it (per-token side data captured for the whole chunk by hooks,
    # e.g. pre-RoPE positions); an eviction policy then passes which chunk tokens it keeps, per head.
    takes_index = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0  # tokens given to this layer so far (positions advance by this)
        self.simulated = False
        self.check_finite = True
        for name in self.state_fields:
            setattr(self, name, None)

    # -- to implement -------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Store ``k, v (B, H, T', D)``. ``index`` (only passed to layers with ``takes_index``): LongTensor
        ``(B, H, T')``, the positions within the current chunk of the tokens given (an eviction policy in
        front keeps a subset, per head); None = the whole chunk, in order."""
        raise NotImplementedError

    def dense(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def held(self) -> int:
        """Tokens whose K/V this layer holds (less than ``seen`` once a policy evicts)."""
        return self.seen

    # -- CacheLayerMixin ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_heads, self.head_dim = key_states.shape[1], key_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.check_finite and (key_states.device.type == "cpu" or n > 1):
            check_finite(key_states, "keys given to the cache")
            check_finite(value_states, "values given to the cache")
        if self.simulated:
            self.append(key_states, value_states)
            self.seen += n
            return self.attention_inputs(None, None)
        out = self.attention_inputs(key_states, value_states)
        self.append(key_states, value_states)
        self.seen += n
        return out

    def attention_inputs(self, k_new: torch.Tensor | None, v_new: torch.Tensor | None):
        """What attention receives: the dense held past followed by the new chunk (if any)."""
        pk, pv = self.dense()
        if k_new is None:
            return pk, pv
        if pk is None:
            return k_new, v_new
        return torch.cat([pk, k_new], dim=-2), torch.cat([pv, v_new], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held()
        return held + query_length, self.seen - held

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    # -- state handling shared by every layer ---------------------------------------------------
    def stored(self) -> Iterator[torch.Tensor]:
        for name in self.state_fields:
            value = getattr(self, name)
            if isinstance(value, QuantizedTensor):
                yield from value.tensors()
            elif isinstance(value, torch.Tensor):
                yield value

    def nbytes(self) -> int:
        """Bytes really held by this layer: codes, scales, zero points, full-precision parts, indices."""
        return tensor_nbytes(self.stored())

    def compact(self) -> None:
        """Give back room held only for speed (none here; RotateKV's pending sink columns), reading back exactly
        as before. Byte reports call it first, so they do not depend on where a layer is in such a cycle."""

    def map_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in self.state_fields:
            value = getattr(self, name)
            if isinstance(value, QuantizedTensor):
                setattr(self, name, value.map(fn))
            elif isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))

    def reset(self) -> None:
        for name in self.state_fields:
            setattr(self, name, None)
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_state(lambda t: t[indices])

    def offload(self) -> None:
        self.map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self.map_state(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot drop tokens it has already compressed, so assisted/speculative "
            "decoding (which crops the cache) is not supported with this method; use method 'none' for it"
        )


class PassthroughLayer(CompressedLayer):
    """Exact 16/32-bit storage: the same tensors, concatenated the same way, as transformers' DynamicLayer."""

    is_croppable = True
    state_fields = ("keys", "values")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.simulated or key_states.device.type == "cpu" or key_states.shape[-2] > 1:
            if self.check_finite:
                check_finite(key_states, "keys given to the cache")
                check_finite(value_states, "values given to the cache")
        self.keys = _cat(self.keys, key_states)
        self.values = _cat(self.values, value_states)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys, self.values = _cat(self.keys, k), _cat(self.values, v)

    def dense(self):
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove and self.keys is not None:
            self.keys = self.keys[..., :tokens_to_remove, :].clone()
            self.values = self.values[..., :tokens_to_remove, :].clone()
            self.seen += tokens_to_remove


class UniformLayer(CompressedLayer):
    """Uniform integer quantization of keys and values with a full-precision residual window.

    Keys and values each have a group axis: ``"token"`` (per-channel quantization over groups of
    tokens, KIVI's keys) or ``"channel"`` (per-token quantization over groups of channels).
    Flushing follows KIVI (Liu et al. 2024, Alg. 1): a token-axis stream keeps a residual that is
    quantized whole each time it reaches ``residual`` tokens (or one group when ``residual`` is 0); a
    channel-axis stream keeps exactly the newest ``residual`` tokens and quantizes older ones.
    The residual is held in 16 bits (:func:`half_dtype`) and quantized from those 16-bit values.
    """

    state_fields = ("kq", "vq", "k_res", "v_res")

    def __init__(self, bits: int, key_axis: Axis, value_axis: Axis, key_group: int, value_group: int,
                 residual: int, symmetric: bool = False, scale_dtype: torch.dtype = torch.float16,
                 key_bits: int | None = None, value_bits: int | None = None) -> None:
        super().__init__()
        self.key_bits, self.value_bits = key_bits or bits, value_bits or bits
        self.key_axis, self.value_axis = key_axis, value_axis
        self.key_group, self.value_group = key_group, value_group
        self.residual, self.symmetric, self.scale_dtype = residual, symmetric, scale_dtype

    def _flush_count(self, length: int, axis: Axis, group: int) -> int:
        if axis == "token":
            block = self.residual or group
            return (length // block) * block
        return max(0, length - self.residual)

    def _push(self, q: QuantizedTensor | None, res: torch.Tensor | None, x: torch.Tensor, bits: int,
              axis: Axis, group: int) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
        res = _cat(res, x)
        n = self._flush_count(res.shape[-2], axis, group)
        if n == 0:
            return q, res
        new = quantize(res[:, :, :n], bits, axis, group, self.symmetric, self.scale_dtype)
        q = new if q is None else q.cat(new)
        rest = res[:, :, n:]
        return q, (rest.clone() if rest.shape[-2] else None)  # clone: free the flushed part's storage

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.is_initialized:  # policies append to their inner layer directly, without update()
            self.lazy_initialization(k, v)
        half = half_dtype(k.dtype)
        self.kq, self.k_res = self._push(self.kq, self.k_res, k.to(half), self.key_bits, self.key_axis, self.key_group)
        self.vq, self.v_res = self._push(self.vq, self.v_res, v.to(half), self.value_bits, self.value_axis,
                                         self.value_group)

    def dense(self):
        if not self.is_initialized:
            return None, None
        return _join(self.kq, self.k_res, self.dtype), _join(self.vq, self.v_res, self.dtype)


def _join(q: QuantizedTensor | None, res: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Dequantized codes followed by the full-precision residual, in the model's dtype."""
    parts = [p for p in (q.dequantize(dtype) if q is not None else None,
                         res.to(dtype) if res is not None else None) if p is not None]
    return parts[0] if len(parts) == 1 else (torch.cat(parts, dim=-2) if parts else None)
