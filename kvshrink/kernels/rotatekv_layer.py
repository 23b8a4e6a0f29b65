"""A RotateKV cache layer for the GPU kernels: in-place appends, and a handle instead of dense K/V at decode.

:class:`KernelRotateKVLayer` stores exactly what :class:`~kvshrink.methods.rotatekv.RotateKVLayer` stores
(same rotations, channel order, centre, clipped quantizer, sinks, positions, bytes per token), with two
differences, both for ``key_axis="channel"`` (the default layout):

* the quantized streams and the positions live in *capacity buffers* grown by >= 1/8 at a time (or to a
  reserved size, :meth:`reserve`) and written in place: the base layer concatenates its whole packed history
  on every flush -- with the default ``residual=0`` that is every decode step, an O(T) copy per token;
* for a one-token decode step on CUDA (or under ``TRITON_INTERPRET=1``) whose layout the kernel reads,
  :meth:`update` returns a :class:`RotateKVDecode` handle (the packed past, the exact sinks, the residual and
  the new token) instead of dense tensors; the ``"kvshrink"`` attention function hands it to
  :func:`~.rotatekv_decode.decode_attention_rotatekv`. Prefill, CPU and everything the kernel does not read
  take the base layer's path unchanged (dense K/V + SDPA).

Attention semantics are the base layer's: the new token attends to the compressed past and to itself exactly.

Storing: with ``residual=0`` (the paper's default) every chunk goes, whole, through the fused Triton
rotate+quantize+pack kernel (:mod:`.rotatekv_pack`: inverse RoPE, grouped-head FWHT, centre, channel order,
clipped quantization and packing in one launch per stream, bit-identical to the torch path), written in place
into the capacity buffers. Otherwise (a residual, the CPU, layouts the kernel does not cover) new tokens take
the base layer's torch transform and are quantized by :meth:`_quantize_block`, which receives the block in
the stored (rotated, centred) domain and the capacity-buffer views to write (keys are grouped in the
calibrated channel order there, :meth:`~kvshrink.methods.rotatekv.RotateKVLayer.quantize_keys`).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from ..methods.rotatekv import RotateKVLayer, _cat, quantize_clipped
from ..rope import apply_rope
from ..storage import QuantizedTensor, check_finite, packed_size
from ._triton import device_guard, kernels_usable
from .layer import _Stream, grow_capacity
from .rotatekv_pack import rotatekv_pack_supported, rotatekv_quantize_keys, rotatekv_quantize_values
from .rotatekv_decode import (RKV_BITS, RKV_HEAD_DIMS, RotateKVState, hadamard_normalized, rope_tables,
                              state_dense)

log = logging.getLogger("kvshrink")

#: rotary types whose (cos, sin) at a position do not depend on the sequence length: the kernel recomputes
#: them from ``inv_freq`` and ``attention_scaling`` (dynamic NTK / LongRoPE switch tables with the length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


@dataclass
class RotateKVDecode:
    """What :class:`KernelRotateKVLayer.update` returns for a decode step (as both key and value)."""

    state: RotateKVState
    layer: "KernelRotateKVLayer"

    @property
    def shape(self) -> tuple[int, int, int, int]:  # what code that inspects key.shape expects
        k = self.state.dense_k
        return (k.shape[0], k.shape[1], self.state.tokens, k.shape[3])

    def dense(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K/V in ``dtype`` (default: the model's): the fallback when the kernel cannot serve a call."""
        return state_dense(self.state, dtype or self.layer.dtype)


class KernelRotateKVLayer(RotateKVLayer):
    """RotateKV storage (``key_axis="channel"``) served to :func:`~.rotatekv_decode.decode_attention_rotatekv`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_kernels = True
        self._k, self._v = _Stream(), _Stream()
        self._pos_buf: torch.Tensor | None = None
        self._reserved = 0
        self._rope: tuple[torch.Tensor, float] | bool | None = None  # None: not checked yet; False: refused
        self._device_copies: dict[str, torch.Tensor] = {}

    @classmethod
    def from_layer(cls, layer: RotateKVLayer) -> "KernelRotateKVLayer":
        """A kernel layer with ``layer``'s method, channel order and (shared) state."""
        new = cls(layer.m, layer.layer_idx, layer.H, layer.D, layer.G, layer.perm)
        for name in (*layer.state_fields, "seen", "simulated", "check_finite", "rope_fn", "pending", "deferred_sinks",
                     "_sink_free", "_sink_block_of"):
            setattr(new, name, getattr(layer, name))
        if layer.is_initialized:
            new.dtype, new.device = layer.dtype, layer.device
            new.num_heads, new.head_dim = layer.num_heads, layer.head_dim
            new.is_initialized = True
        return new

    # -- capacity ----------------------------------------------------------------------------------
    def reserve(self, tokens: int) -> None:
        """Pre-size the buffers for ``tokens`` tokens in all (prompt + generated): no regrowth, no slack."""
        self._reserved = max(self._reserved, int(tokens))

    def _grow_to(self, need: int, cur: int) -> int:
        """Capacity (tokens) holding ``need``: the reserved size if it fits, else >= 1/8 more than now."""
        return grow_capacity(self._reserved, need, cur)

    @staticmethod
    def _sync(stream: _Stream, q: QuantizedTensor | None) -> None:
        """Adopt ``q`` as the stream's buffers when the state was replaced wholesale (map_state, select, reset)."""
        if q is None:
            stream.bufs, stream.rows = None, 0
        elif stream.bufs is None or stream.bufs[0].data_ptr() != q.packed.data_ptr() or stream.rows != q.tokens:
            stream.bufs, stream.rows = (q.packed, q.scale, q.zero), q.tokens  # type: ignore[assignment]

    def _claim_rows(self, stream: _Stream, like: torch.Tensor, n: int, bits: int, group: int):
        """Views ``(packed, scale, zero)`` for ``n`` new tokens after the stream's used rows (grown if needed)."""
        B, H, _, D = like.shape

        def make(need: int):
            cap = self._grow_to(need, stream.cap())
            dev, sd = like.device, self.scale_dtype
            return (torch.empty(B, H, cap, packed_size(D, bits), dtype=torch.uint8, device=dev),
                    torch.empty(B, H, cap, D // group, dtype=sd, device=dev),
                    torch.empty(B, H, cap, D // group, dtype=sd, device=dev))

        stream.ensure(stream.rows + n, make)
        return stream.views(stream.rows + n, stream.rows)

    def _commit_rows(self, stream: _Stream, n: int, bits: int, group: int, D: int,
                     dtype: torch.dtype) -> QuantizedTensor:
        stream.rows += n
        packed, scale, zero = stream.views(stream.rows)
        order = self.channel_order(packed.device) if stream is self._k else None  # keys: slots of the channels
        return QuantizedTensor(packed, scale, zero, bits, "channel", group, stream.rows, D, dtype,
                               None if order is None else order[1])

    # -- storing -------------------------------------------------------------------------------------
    def fused_store(self, k: torch.Tensor, pos: torch.Tensor | None) -> bool:
        """Whether a chunk is stored by the fused pack kernel: nothing stays unquantized (``residual=0``, no
        residual held), positions shared by all heads, and a layout/device the kernel covers."""
        return (self.use_kernels and not self.simulated and self.key_axis == "channel" and self.m.residual == 0
                and self.k_res is None and self.v_res is None and (pos is None or pos.dim() == 2)
                and (self.pos is None or self.pos.dim() == 2) and rotatekv_pack_supported(self, k))

    def _store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None, cos: torch.Tensor | None,
               sin: torch.Tensor | None, slots: torch.Tensor | None) -> None:
        """The base layer's ``_store`` (same steps, same bytes), through the fused kernel when it applies."""
        if not self.fused_store(k, pos):
            return super()._store(k, v, pos, cos, sin, slots)
        if slots is not None:
            self._add_sink_slots(k, v, slots, self._held())
        if self.m.prerope:
            if cos is None:
                cos, sin = self._rope_at(pos)
            self._add_pos(pos)
        n = k.shape[-2]
        for stream, q in ((self._k, self.kq), (self._v, self.vq)):
            self._sync(stream, q)
        out = self._claim_rows(self._k, k, n, self.bits, self.key_group)
        with device_guard(k.device):
            rotatekv_quantize_keys(self, k, cos, sin, out=out)  # sets k_mu from this chunk first (center)
        self.kq = self._commit_rows(self._k, n, self.bits, self.key_group, self.D, self.stored_dtype(k.dtype))
        out = self._claim_rows(self._v, v, n, self.bits, self.value_group)
        with device_guard(v.device):
            rotatekv_quantize_values(self, v, out=out)
        self.vq = self._commit_rows(self._v, n, self.bits, self.value_group, self.D, self.stored_dtype(v.dtype))

    # -- the quantization seam (torch path) ---------------------------------------------------------------
    def _quantize_block(self, block: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        keys: bool) -> None:
        """Quantize stored-domain keys (``keys``: per-token groups formed in the calibrated channel order) or
        rotated values ``block (B, H, n, D)`` into ``out`` (views of the capacity buffers)."""
        if keys:
            q = self.quantize_keys(block)
        else:
            q = quantize_clipped(block, self.bits, "channel", self.value_group, self.clip, self.scale_dtype)
        for dst, src in zip(out, q.tensors()):
            dst.copy_(src)

    def _push_into(self, stream: _Stream, q: QuantizedTensor | None, res: torch.Tensor | None, x: torch.Tensor,
                   group: int) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
        """The base layer's flush rule (newest ``residual`` tokens stay unquantized), writing in place."""
        res = _cat(res, x)
        n = self._flush_count(res.shape[-2], "channel", group)
        if n == 0:
            return q, res
        self._sync(stream, q)
        out = self._claim_rows(stream, res, n, self.bits, group)
        self._quantize_block(res[:, :, :n], out, stream is self._k)
        q = self._commit_rows(stream, n, self.bits, group, res.shape[-1], res.dtype)
        rest = res[:, :, n:]
        return q, (rest.clone() if rest.shape[-2] else None)

    def _push_keys(self, kr: torch.Tensor) -> None:
        if self.key_axis != "channel":
            return super()._push_keys(kr)
        self.kq, self.k_res = self._push_into(self._k, self.kq, self.k_res, kr, self.key_group)

    def _push_values(self, vr: torch.Tensor) -> None:
        if self.key_axis != "channel":  # token-axis keys: the base layer's path for both streams
            return super()._push_values(vr)
        self.vq, self.v_res = self._push_into(self._v, self.vq, self.v_res, vr, self.value_group)

    def _add_pos(self, pos: torch.Tensor) -> None:
        """Positions ``(B, n)`` appended in place into a capacity buffer (per-head positions: base layer)."""
        if pos.dim() != 2 or (self.pos is not None and self.pos.dim() != 2):
            self._pos_buf = None
            return super()._add_pos(pos)
        B, n = pos.shape
        cur = 0 if self.pos is None else self.pos.shape[-1]
        buf = self._pos_buf
        if (buf is None or self.pos is None or buf.data_ptr() != self.pos.data_ptr() or buf.shape[0] != B
                or buf.shape[1] < cur + n):
            new = torch.empty(B, self._grow_to(cur + n, cur), dtype=torch.int32, device=pos.device)
            if cur:
                new[:, :cur].copy_(self.pos)
            buf = new
        buf[:, cur:cur + n].copy_(pos)
        self._pos_buf, self.pos = buf, buf[:, :cur + n]

    def reset(self) -> None:
        super().reset()
        self._k, self._v, self._pos_buf = _Stream(), _Stream(), None

    # -- the decode seam ---------------------------------------------------------------------------
    def _rope_params(self) -> tuple[torch.Tensor, float] | None:
        """``(inv_freq, attention_scaling)`` of this layer's rotary module, checked once against ``rope_fn``
        (the model's own module) at a few positions; None when the module is not the standard HF form."""
        if self._rope is None:
            self._rope = self._check_rope() or False
        return self._rope or None

    def _check_rope(self) -> tuple[torch.Tensor, float] | None:
        fn = self.rope_fn
        module = (getattr(fn, "__defaults__", None) or (None,))[0]
        inv, scale = getattr(module, "inv_freq", None), getattr(module, "attention_scaling", None)
        rtype = getattr(module, "rope_type", "default")
        if not isinstance(inv, torch.Tensor) or scale is None or rtype not in STATIC_ROPE_TYPES \
                or inv.numel() != self.D // 2:
            _warn_once(f"rotatekv kernels: layer {self.layer_idx}'s rotary embedding (type {rtype!r}) is not the "
                       "standard static form the decode kernel recomputes; decoding stays on the dense path")
            return None
        probe = torch.tensor([[0, 1, 5, 1000, 4097, 65537, 131071]], device=inv.device)
        cos, sin = fn(probe, torch.float32)
        c2, s2 = rope_tables(probe, inv, float(scale))
        if cos.shape != c2.shape or not (torch.allclose(cos.float(), c2, atol=1e-5, rtol=1e-5)
                                         and torch.allclose(sin.float(), s2, atol=1e-5, rtol=1e-5)):
            _warn_once(f"rotatekv kernels: layer {self.layer_idx}'s rotary module does not compute "
                       "cos/sin(pos * inv_freq) * attention_scaling; decoding stays on the dense path")
            return None
        return inv.detach().float().contiguous().clone(), float(scale)

    def kernel_refusal(self, key_states: torch.Tensor) -> str | None:
        """Why this layer's decode step is not served by the kernel (None: it is)."""
        D = key_states.shape[-1]
        if self.key_axis != "channel":
            return "key_axis=token"
        if not self.m.fwht:
            return "fwht=false"
        if self.bits not in RKV_BITS:
            return f"bits={self.bits}"
        if D not in RKV_HEAD_DIMS or self.G & (self.G - 1):
            return f"head_dim {D} / head_group {self.G}"
        for g in (self.key_group, self.value_group):
            if g & (g - 1) or D % g or g < 8 // self.bits:
                return f"group {g}"
        if self.pos is not None and self.pos.dim() != 2 or self.sink_idx is not None and self.sink_idx.dim() != 2:
            return "per-head positions or sinks (eviction policy)"
        if self.m.prerope and (self.rope_fn is None or self._rope_params() is None):
            return "rotary embedding not recomputable in the kernel"
        return None

    def kernel_step(self, key_states: torch.Tensor) -> bool:
        """Whether this update is served by the decode kernel."""
        return (self.use_kernels and not self.simulated and key_states.shape[-2] == 1 and self.is_initialized
                and kernels_usable(key_states.device) and self.kernel_refusal(key_states) is None)

    def _key_slots_on(self, slots: torch.Tensor | None) -> torch.Tensor | None:
        """The keys' own quantization slots (``kq.slots``) as int32 for the kernel (cached per device copy)."""
        if slots is None:
            return None
        key = f"slots:{slots.device}:{slots.data_ptr()}"
        if key not in self._device_copies:
            self._device_copies[key] = slots.to(torch.int32).contiguous()
        return self._device_copies[key]

    def _inv_freq_on(self, inv_freq: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The rotary module's inverse frequencies on this layer's device (a model split over GPUs keeps its
        rotary module on the first one; the kernel reads a pointer on its own)."""
        if inv_freq.device == device:
            return inv_freq
        key = "freq:" + str(device)
        if key not in self._device_copies:
            self._device_copies[key] = inv_freq.to(device)
        return self._device_copies[key]

    def _attended_keys(self, stored: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Post-RoPE float32 keys of unquantized stored-domain keys at positions ``pos (B, n)`` (prerope), as
        :meth:`dense` computes them for the residual."""
        K = stored.float()
        if self.k_mu is not None:
            K = K + self.k_mu.float()
        K = self.unrotate_keys(K)
        if self.m.prerope:
            cos, sin = self._rope_at(pos)
            K = apply_rope(K, cos.float(), sin.float())
        return K

    def _value_domain(self, v: torch.Tensor) -> torch.Tensor:
        """Float32 values in the stored value domain (``v @ H_D`` when values are rotated); ``H_D`` cached per device."""
        if not (self.m.fwht and self.m.rotate_values):
            return v.float()
        key = f"hdn:{v.device}"
        if key not in self._device_copies:
            self._device_copies[key] = hadamard_normalized(self.D, v.device)
        return v.float() @ self._device_copies[key]

    @staticmethod
    def _without_sinks(idx: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
        """Residual token indices ``idx (B, n)`` with sinks set to -1: a sink is read from its exact copy only."""
        if sinks is None:
            return idx
        return torch.where((idx[:, :, None] == sinks.long()[:, None, :]).any(-1), -1, idx)

    def decode_state(self, k_new: torch.Tensor, v_new: torch.Tensor) -> RotateKVState:
        """The held past (before ``k_new, v_new`` are stored) plus the new token, as the kernel reads it."""
        B, dev = k_new.shape[0], k_new.device
        tq = self.kq.tokens if self.kq is not None else 0
        nres = self.k_res.shape[-2] if self.k_res is not None else 0
        T = tq + nres + 1
        rotv = bool(self.m.fwht and self.m.rotate_values)
        ks, vs, idx = [], [], []
        sinks = self.sink_idx.long() if self.sink_idx is not None else None
        if sinks is not None:  # exact post-RoPE copies; their codes are skipped by the kernel
            ks.append(self.sink_k.float())
            vs.append(self._value_domain(self.sink_v))
            idx.append(sinks)
        if nres:
            ks.append(self._attended_keys(self.k_res, self.pos[:, tq:tq + nres] if self.m.prerope else None))
            vs.append(self.v_res.float())
            idx.append(self._without_sinks(torch.arange(tq, tq + nres, device=dev).expand(B, nres), sinks))
        ks.append(k_new.float())
        vs.append(self._value_domain(v_new))
        idx.append(torch.full((B, 1), T - 1, device=dev, dtype=torch.long))
        rope = self._rope_params() if self.m.prerope else None
        return RotateKVState(
            kq=self.kq, vq=self.vq, k_mu=self.k_mu,
            key_slots=self._key_slots_on(self.kq.slots if self.kq is not None else None),
            pos=self.pos if self.m.prerope else None, inv_freq=self._inv_freq_on(rope[0], dev) if rope else None,
            rope_scale=rope[1] if rope else 1.0, head_group=self.G, rotate_values=rotv, sink_idx=self.sink_idx,
            dense_k=torch.cat(ks, 2), dense_v=torch.cat(vs, 2), dense_idx=torch.cat(idx, 1), tokens=T)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.kernel_step(key_states):
            return super().update(key_states, value_states, *args, **kwargs)
        if self.check_finite and key_states.device.type == "cpu":  # as the base layer (no host sync on GPU)
            check_finite(key_states, "keys given to the cache")
            check_finite(value_states, "values given to the cache")
        handle = RotateKVDecode(self.decode_state(key_states, value_states), self)
        self.append(key_states, value_states)  # in place past the handle's views, or into new buffers
        self.seen += 1
        return handle, handle


__all__ = ["KernelRotateKVLayer", "RotateKVDecode", "STATIC_ROPE_TYPES"]
