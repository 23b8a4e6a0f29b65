"""RotateKV with a decode step that CUDA graphs can capture: fixed buffers, the length on the device, no host syncs.

The eager kernel layer (:class:`~.rotatekv_layer.KernelRotateKVLayer`) pays for every decode step on the host:
the packed past is re-wrapped with host token counts, the split grid is sized by the length, sink detection
reads its answer back (a device-to-host sync per layer and step) and the sink store grows. On an H100 that
host work, not the kernel, sets the pace of an eager step. :class:`StaticRotateKVLayer` keeps the same
storage and semantics with everything that changes per step on the device:

* the quantized streams, positions and sinks live in buffers sized once (``capacity`` tokens; sinks: those of
  the prompt plus ``sink_slots`` more); ``lens = [tq]`` (int32, device) counts the quantized tokens;
* a decode token is rotated, quantized and packed by the fused kernel (:mod:`.rotatekv_pack`) into a staging
  row, then copied to row ``lens[0]`` by ``index_copy_`` (device index); its position likewise;
* sink detection runs on the device (:meth:`~kvshrink.methods.rotatekv.RotateKVLayer.token_is_sink`: exactly
  what the eager layer decides for a one-token chunk); a sink is written into the next free sink slot with
  ``torch.where`` + ``scatter_``. If a row runs out of sink slots the token stays quantized only: counted on
  the device, reported by :meth:`StaticRotateKVLayer.settle` (a warning), never silently;
* attention is :func:`~.rotatekv_decode.decode_attention_rotatekv` in graph mode (fixed split count, each
  program finds its slice from ``lens``) over the past, plus the dense segment (sinks, masked to tokens
  before this one, and the new token, exact), then ``lens`` advances.

The prompt (one chunk into an empty layer) takes the eager layer's path (host syncs allowed there); the first
decode step freezes the layer (allocations, host work) -- :class:`~.graph.GraphDecoder` runs warm-up steps
before capturing, so capture sees only the static step. A left-padded prompt's mask is given once
(:meth:`StaticRotateKVLayer.set_padding`, or ``GraphDecoder(..., attention_mask=...)``) and masks the padded slots
in every step. With ``residual=R > 0`` the newest ``R`` tokens stay 16-bit in rings of ``R + 1`` rows (token ``t``
at row ``t % (R + 1)``, in the stored rotated domain, as the eager layer holds them); each step quantizes the
oldest into row ``lens[0]`` (the layer's torch quantizer, no host value involved) and puts the new token in the
freed row; the ring's tokens join the dense segment (un-rotated and re-RoPE'd there). Limits: one prefill chunk
(of more than ``residual`` tokens), a model whose rotary embedding the kernel recomputes (see
:meth:`KernelRotateKVLayer.kernel_refusal`).
"""
from __future__ import annotations

import warnings

import torch

from ..methods.rotatekv import quantize_clipped
from ..storage import QuantizedTensor, packed_size
from ._triton import device_guard, kernels_usable
from .decode_attention import partials_workspace
from .graph import GraphDecode, _splits, padding_buffer
from .rotatekv_decode import LAUNCH, MAX_SPLITS, RotateKVState, decode_attention_rotatekv
from .rotatekv_layer import KernelRotateKVLayer
from .rotatekv_pack import rotatekv_quantize_keys, rotatekv_quantize_values


class StaticRotateKVLayer(KernelRotateKVLayer):
    """RotateKV (``key_axis="channel"``) for graph-captured decoding (see module docstring)."""

    def __init__(self, *args, capacity: int = 0, sink_slots: int = 16, waves: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = int(capacity)
        self.sink_slots = int(sink_slots)
        self.waves = waves
        self.frozen = False
        self.lens: torch.Tensor | None = None
        self.splits = 0
        self.pad_mask: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer, capacity: int = 0, sink_slots: int = 16, waves: int = 4) -> "StaticRotateKVLayer":
        new = super().from_layer(layer)
        new.capacity, new.sink_slots, new.waves = int(capacity), int(sink_slots), waves
        new.frozen, new.lens, new.splits, new.pad_mask = False, None, 0, None
        new.reserve(capacity)
        return new

    def reset(self) -> None:
        super().reset()
        self.frozen, self.lens, self.splits, self.pad_mask = False, None, 0, None

    def compact(self) -> None:
        if not self.frozen:  # frozen: the sink slots are fixed (graph-captured addresses), free ones included
            super().compact()

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """The prompt's padding (``(B, T0)``, 0 = pad), masked out of every later decode step (None: no padding)."""
        self.pad_mask = None if attention_mask is None else padding_buffer(attention_mask,
                                                                           max(self.capacity, attention_mask.shape[1] + 1))

    def why_not_static(self, key_states: torch.Tensor) -> str | None:
        """Why this layer cannot take graph-mode decode steps (None: it can)."""
        why = self.kernel_refusal(key_states)
        if why is not None:
            return why
        R = self.m.residual
        if self.simulated:
            return "simulated quantization"
        if not kernels_usable(key_states.device):
            return f"no Triton kernels on {key_states.device} (CUDA, or TRITON_INTERPRET=1)"
        if self.kq is None:
            return f"no quantized tokens yet: one prefill chunk of more than residual={R} tokens first"
        held = [0 if x is None else x.shape[-2] for x in (self.k_res, self.v_res)]
        if held != [R, R]:
            return f"the unquantized residual holds {held} tokens, not residual={R}"
        if not R and not self.fused_store(key_states, None):
            return "the fused pack kernel does not cover this layer"
        if self.m.prerope and self._pos_buf is None:
            return "positions are not in a capacity buffer"
        return None

    # -- freezing (host work, once, before capture) ------------------------------------------------------
    def _freeze(self, k: torch.Tensor) -> None:
        why = self.why_not_static(k)
        if why is not None:
            raise ValueError(f"StaticRotateKVLayer (layer {self.layer_idx}): {why}")
        B, H, _, D = k.shape
        dev = k.device
        self.compact_sinks()  # a pending block of decode-step sinks (a one-token prompt) becomes fixed slots below
        self.batch = B  # what GraphDecode.shape reads
        tq = self.kq.tokens
        cap = max(self.capacity, tq + self.m.residual + 1)  # room for the next token and its position
        self.capacity = cap
        for stream, q in ((self._k, self.kq), (self._v, self.vq)):
            self._sync(stream, q)
            self._claim_rows(stream, k, cap - stream.rows, self.bits, q.group)  # capacity rows, nothing committed
        if self.m.prerope and self._pos_buf.shape[1] < cap:
            buf = torch.zeros(B, cap, dtype=torch.int32, device=dev)
            buf[:, :tq].copy_(self.pos)
            self._pos_buf = buf
        # the quantized streams over the whole capacity: the kernel reads lens[0] of their rows
        self.kq = self._commit_rows(self._k, cap - self._k.rows, self.bits, self.key_group, D, self.kq.dtype)
        self.vq = self._commit_rows(self._v, cap - self._v.rows, self.bits, self.value_group, D, self.vq.dtype)
        if self.m.prerope:
            self.pos = self._pos_buf[:, :cap]
        # sinks (sinks=true): the prompt's, then sink_slots free slots (index -1) per row
        s0 = 0 if self.sink_idx is None else self.sink_idx.shape[-1]
        if self.m.sinks:
            S = s0 + self.sink_slots
            sdt = self.sink_k.dtype if self.sink_k is not None else self._sink_dtype(k.dtype)
            sk = torch.zeros(B, H, S, D, dtype=sdt, device=dev)
            sv = torch.zeros(B, H, S, D, dtype=sdt, device=dev)
            si = torch.full((B, S), -1, dtype=torch.int32, device=dev)
            if s0:
                sk[:, :, :s0].copy_(self.sink_k)
                sv[:, :, :s0].copy_(self.sink_v)
                si[:, :s0].copy_(self.sink_idx)
            self.sink_k, self.sink_v, self.sink_idx = sk, sv, si
        self._sink_next = torch.full((B,), s0, dtype=torch.int32, device=dev)  # next free slot per row
        self._sinks_dropped = torch.zeros(B, dtype=torch.int32, device=dev)
        self.lens = torch.tensor([tq], dtype=torch.int32, device=dev)
        self._stage_k = self._staging(B, H, D, self.key_group, dev)
        self._stage_v = self._staging(B, H, D, self.value_group, dev)
        R = self.m.residual
        if R:  # the residual as rings of R + 1 rows (token t at row t % (R + 1)): flushing moves nothing
            rows = (tq + torch.arange(R, device=dev)) % (R + 1)
            for name in ("k_res", "v_res"):
                held = getattr(self, name)
                ring = held.new_zeros(B, H, R + 1, D)
                ring[:, :, rows] = held
                setattr(self, name, ring)
        R = H // self.G
        self.splits = min(MAX_SPLITS, _splits(B * R, dev, waves=self.waves, tokens=cap, block=LAUNCH["block_n"]))
        self._ws = None
        if self.pad_mask is not None and self.pad_mask.shape[1] < cap:  # every token after the prompt is real
            self.pad_mask = torch.cat([self.pad_mask, self.pad_mask.new_ones(B, cap - self.pad_mask.shape[1])], 1)
        self.frozen = True

    def _sink_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        from ..methods.rotatekv import SCALE_DTYPES

        return model_dtype if self.m.sink_dtype == "model" else SCALE_DTYPES[self.m.sink_dtype]

    def _staging(self, B: int, H: int, D: int, group: int, dev) -> tuple[torch.Tensor, ...]:
        sd = self.scale_dtype
        return (torch.empty(B, H, 1, packed_size(D, self.bits), dtype=torch.uint8, device=dev),
                torch.empty(B, H, 1, D // group, dtype=sd, device=dev),
                torch.empty(B, H, 1, D // group, dtype=sd, device=dev))

    # -- the step ------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] > 1:
            if self.frozen or self.seen:
                raise NotImplementedError("StaticRotateKVLayer takes one prefill chunk into an empty cache, then "
                                          "single-token decode steps")
            if key_states.shape[-2] > max(self.capacity, 1):
                raise ValueError(f"prompt of {key_states.shape[-2]} tokens exceeds capacity {self.capacity}")
            self.use_kernels = True
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.frozen:
            self._freeze(key_states)
        self._step(key_states, value_states)
        self.seen += 1
        handle = GraphDecode(self)
        return handle, handle

    def _step(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token per row at row ``lens[0]`` and build this step's attention state (device ops only)."""
        cap, self.pending = self.pending, None
        B = k.shape[0]
        if cap is None or (self.m.prerope and (cap.cos is None or cap.position_ids is None)):
            raise ValueError("StaticRotateKVLayer: the decode step needs the model's position ids and RoPE tables, "
                             "captured by the hooks make_static_cache installs; pass position_ids to the model")
        idx = self.lens.long()
        R = self.m.residual
        if R:  # the oldest residual token (index lens[0]) is quantized into row lens[0]; the new one takes its ring row
            ring = R + 1
            old = idx % ring
            stage = (self.quantize_keys(self.k_res.index_select(2, old)).tensors(),
                     quantize_clipped(self.v_res.index_select(2, old), self.bits, "channel", self.value_group,
                                      self.clip, self.scale_dtype).tensors())
            kr, vr = self.stored_domain(k, v, cap.cos, cap.sin)
            new_row = (idx + R) % ring
            self.k_res.index_copy_(2, new_row, kr)
            self.v_res.index_copy_(2, new_row, vr)
        else:  # every token is quantized on arrival: the fused rotate+quantize+pack kernel
            with device_guard(k.device):
                rotatekv_quantize_keys(self, k, cap.cos, cap.sin, out=self._stage_k)
                rotatekv_quantize_values(self, v, out=self._stage_v)
            stage = (self._stage_k, self._stage_v)
        for stream, rows in zip((self._k, self._v), stage):
            for buf, row in zip(stream.bufs, rows):
                buf.index_copy_(2, idx, row)
        held = self.lens + R  # the new token's index
        if self.m.prerope:
            pid = cap.position_ids.to(device=k.device, dtype=torch.int32).expand(B, 1)
            self._pos_buf.index_copy_(1, held.long(), pid)
        if self.m.sinks and cap.hidden is not None:
            self._add_sink_on_device(self.token_is_sink(cap.hidden), k, v, held)
        self._state = self._attention_state(k, v, held)

    def _add_sink_on_device(self, is_sink: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            held: torch.Tensor) -> None:
        """Rows where the new token (index ``held``) is a sink: write it exact into their next free sink slot."""
        B, H, _, D = k.shape
        S = self.sink_idx.shape[-1]
        room = self._sink_next < S
        take = is_sink & room
        self._sinks_dropped += (is_sink & ~room).to(torch.int32)
        slot = self._sink_next.clamp(max=S - 1).long()
        g = slot[:, None, None, None].expand(B, H, 1, D)
        t4 = take[:, None, None, None]
        for buf, x in ((self.sink_k, k), (self.sink_v, v)):
            buf.scatter_(2, g, torch.where(t4, x.to(buf.dtype), buf.gather(2, g)))
        s2 = slot[:, None]
        self.sink_idx.scatter_(1, s2, torch.where(take[:, None], held.expand(B, 1), self.sink_idx.gather(1, s2)))
        self._sink_next += take.to(torch.int32)

    def _attention_state(self, k: torch.Tensor, v: torch.Tensor, held: torch.Tensor) -> RotateKVState:
        """The kernel's view: the quantized past (``lens[0]`` of the capacity rows), and as the dense segment the
        sinks before this token, the residual ring's tokens ``[lens[0], held)`` (a sink among them is read from its
        exact copy only) and the new token (index ``held``); entries that are none of these carry index -1."""
        B = k.shape[0]
        ks, vs, idx = [], [], []
        if self.sink_idx is not None:
            ks.append(self.sink_k.float())
            vs.append(self._value_domain(self.sink_v))
            idx.append(torch.where(self.sink_idx < held, self.sink_idx, -1).long())
        if self.m.residual:
            ring = self.m.residual + 1
            tok = (self.lens + (torch.arange(ring, device=k.device) - self.lens) % ring).long()  # token in each row
            ridx = torch.where(tok < held, tok, -1)[None].expand(B, ring)
            pos = self._pos_buf.gather(1, tok[None].expand(B, ring)) if self.m.prerope else None
            ks.append(self._attended_keys(self.k_res, pos))
            vs.append(self.v_res.float())
            idx.append(self._without_sinks(ridx, self.sink_idx))
        ks.append(k.float())
        vs.append(self._value_domain(v))
        idx.append(held.long().expand(B, 1))
        dense_k, dense_v, dense_idx = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(idx, 1)
        rope = self._rope_params() if self.m.prerope else None
        return RotateKVState(
            kq=self.kq, vq=self.vq, k_mu=self.k_mu,
            key_slots=self._key_slots_on(self.kq.slots),
            pos=self.pos if self.m.prerope else None, inv_freq=self._inv_freq_on(rope[0], k.device) if rope else None,
            rope_scale=rope[1] if rope else 1.0, head_group=self.G,
            rotate_values=bool(self.m.fwht and self.m.rotate_values),
            sink_idx=self.sink_idx, dense_k=dense_k, dense_v=dense_v, dense_idx=dense_idx, tokens=self.capacity)

    def attend(self, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Attention of this step's query over the state :meth:`_step` built, then the length advances."""
        B, Hq, D = q.shape
        if self._ws is None or self._ws[0].shape != (B, Hq, self.splits + 1):
            self._ws = partials_workspace(B, Hq, self.splits + 1, D, q.device)
        with device_guard(q.device):
            out = decode_attention_rotatekv(q, self._state, mask=self.pad_mask, scale=scale, lens=self.lens,
                                            num_splits=self.splits, workspace=self._ws)
        self.lens.add_(1)
        return out

    # -- inspection (host syncs: tests, after generation) ------------------------------------------
    def settle(self) -> int:
        """Bring the host's view up to date after replayed steps: the streams and positions cover the ``lens[0]``
        tokens held, and a warning names sink tokens that found no free slot (kept quantized only). Returns the
        tokens held. Syncs with the device."""
        if not self.frozen:
            return self._held()
        held = int(self.lens[0]) + self.m.residual
        dropped = int(self._sinks_dropped.sum())
        if dropped:
            warnings.warn(f"rotatekv graph layer {self.layer_idx}: {dropped} sink token(s) found no free sink slot "
                          f"and were kept quantized only; build the cache with more sink_slots "
                          f"(now {self.sink_slots})", stacklevel=2)
        return held

    def held_state(self) -> tuple[QuantizedTensor, QuantizedTensor, torch.Tensor | None,
                                  torch.Tensor | None, torch.Tensor | None]:
        """``(kq, vq, pos, k_res, v_res)`` covering exactly the tokens held, residual in token order (syncs)."""
        R = self.m.residual
        tq = self.settle() - R
        kq = QuantizedTensor(*(t[:, :, :tq] for t in self.kq.tensors()), self.bits, "channel", self.key_group, tq,
                             self.D, self.kq.dtype, self.kq.slots)
        vq = QuantizedTensor(*(t[:, :, :tq] for t in self.vq.tensors()), self.bits, "channel", self.value_group, tq,
                             self.D, self.vq.dtype)
        res = (None, None)
        if R:
            rows = (tq + torch.arange(R, device=self.k_res.device)) % (R + 1)
            res = (self.k_res.index_select(2, rows), self.v_res.index_select(2, rows))
        return kq, vq, (self.pos[:, :tq + R] if self.m.prerope else None), *res

    def dense(self):
        if not self.frozen:
            return super().dense()
        names = ("kq", "vq", "pos", "k_res", "v_res")
        full = tuple(getattr(self, n) for n in names)
        for n, x in zip(names, self.held_state()):
            setattr(self, n, x)
        try:
            return super().dense()
        finally:
            for n, x in zip(names, full):
                setattr(self, n, x)


def make_static_rotatekv_cache(model: torch.nn.Module, spec="rotatekv:bits=2", capacity: int = 0,
                               sink_slots: int = 16, waves: int = 4, **params):
    """``make_cache(model, spec)`` with every RotateKV layer as a :class:`StaticRotateKVLayer` of ``capacity``
    tokens, and ``model`` switched to the ``"kvshrink"`` attention (undo with ``kvshrink.kernels.disable``).
    Feed one prompt, then decode single tokens with ``position_ids`` (e.g. :class:`~.graph.GraphDecoder`)."""
    from ..cache import make_cache
    from ..methods.rotatekv import RotateKVLayer
    from .attention import enable

    cache = make_cache(model, spec, **params)
    n = 0
    for i, layer in enumerate(cache.layers):
        if type(layer) is RotateKVLayer:
            if layer.key_axis != "channel":
                raise ValueError("graph-mode rotatekv needs key_axis=channel (the paper's layout)")
            cache.layers[i] = StaticRotateKVLayer.from_layer(layer, capacity, sink_slots, waves)
            n += 1
    if not n:
        raise ValueError(f"{spec!r} gives no RotateKV layers to run in graph mode")
    enable(model)
    return cache


__all__ = ["StaticRotateKVLayer", "make_static_rotatekv_cache"]
