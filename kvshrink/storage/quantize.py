"""Uniform integer quantization of KV tensors into bit-packed storage.

Tensors are laid out as transformers' caches hold them, ``(batch, kv_heads, tokens, head_dim)``.
Groups run along one of two axes:

* ``axis="channel"``: per-token quantization, each group is ``group`` consecutive channels of one
  token (KIVI's layout for values). Codes packed along the channel axis:
  ``packed (B, H, T, packed_size(D, bits))``, ``scale/zero (B, H, T, D // group)``.
* ``axis="token"``: per-channel quantization, each group is ``group`` consecutive tokens of one
  channel (KIVI's layout for keys). Codes packed along the token axis inside each group:
  ``packed (B, H, T // group, D, packed_size(group, bits))``, ``scale/zero (B, H, T // group, D)``.

Both keep the token axis at dim 2, so appending tokens is a concatenation on dim 2 and selecting
batch rows is indexing dim 0 for every stored tensor.

Channel groups may also be formed in another order than the stored one (``axis="channel"`` with
``slots``): a layer-wide order puts the ``H * D`` channels of a token (all heads) into quantization
*slots*; slot ``j`` belongs to group ``j // group`` of the flat ``(H, D // group)`` scale grid. The codes
stay at their own channel (so a reader of one head's channels finds them contiguous) and ``slots[c]``
says which slot, hence which scale, channel ``c`` (flat over heads) used. :func:`regroup_channels`
builds the permuted view a quantizer works on.

The quantizer is the plain asymmetric (min/max) or symmetric (absmax) uniform quantizer with
``2**bits`` levels; scales and zero points are stored in a 16-bit float type and the codes are
computed from the *stored* (rounded) scales, so dequantization is exactly consistent with storage.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from .packing import check_bits, pack, packed_size, unpack

Axis = Literal["token", "channel"]
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_group(length: int, group: int, what: str) -> None:
    if group <= 0 or length % group:
        raise ValueError(
            f"group size {group} does not divide {what} ({length}); choose a group size that divides it"
            + (f", e.g. {', '.join(str(g) for g in (16, 32, 64, 128) if length % g == 0)}" if length % 16 == 0 else "")
        )


def check_finite(x: torch.Tensor, what: str = "KV cache input") -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(
            f"{bad} NaN/inf values in the {what}: the model produced non-finite keys/values "
            "(often fp16 overflow: load the model in bfloat16 or float32)"
        )


@dataclass
class QuantizedTensor:
    """Bit-packed codes plus per-group scale (and zero point, for asymmetric) of a (B, H, T, D) tensor."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    axis: Axis
    group: int
    tokens: int
    head_dim: int
    dtype: torch.dtype  # dtype that dequantize() returns
    #: axis="channel" only: (H*D,) int64, the quantization slot of each channel (flat over heads); None = each
    #: channel is its own slot (groups of ``group`` consecutive channels of one head). Shared, not owned: the
    #: order is calibration data held by whoever made it, so it is not counted in nbytes().
    slots: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def nbytes(self) -> int:
        n = self.packed.numel() * self.packed.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scale, self.zero) if t is not None]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedTensor":
        """Apply ``fn`` to every stored tensor (all have batch at dim 0, heads at dim 1). ``slots`` is kept:
        ``fn`` may select batch rows or tokens, not heads or channels."""
        return replace(self, packed=fn(self.packed), scale=fn(self.scale), zero=None if self.zero is None else fn(self.zero))

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes as uint8: ``(B, H, T, D)`` for channel groups (with ``slots``, each code at its own
        channel, not in group order), ``(B, H, T/g, D, g)`` for token groups."""
        if self.axis == "channel":
            return unpack(self.packed, self.bits, self.head_dim)
        return unpack(self.packed, self.bits, self.group)  # (B, H, T/g, D, g)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (B, H, T, D) values in ``dtype`` (default: the dtype that was quantized)."""
        if self.slots is not None:
            return _dequantize_slotted(self, dtype or self.dtype)
        return dequantize_codes(self.codes(), self.scale, self.zero, self.bits, self.axis, self.group,
                                dtype or self.dtype)

    def cat(self, other: "QuantizedTensor") -> "QuantizedTensor":
        if (other.bits, other.axis, other.group, other.head_dim, other.symmetric) != (
            self.bits, self.axis, self.group, self.head_dim, self.symmetric
        ) or not _same_slots(self.slots, other.slots):
            raise ValueError("cannot concatenate quantized tensors of different layouts")
        return replace(
            self,
            packed=torch.cat([self.packed, other.packed], dim=2),
            scale=torch.cat([self.scale, other.scale], dim=2),
            zero=None if self.zero is None else torch.cat([self.zero, other.zero], dim=2),
            tokens=self.tokens + other.tokens,
        )


def _same_slots(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu())))


def regroup_channels(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x (B, H, T, D)`` with the ``H * D`` channels of each token (flat over heads) gathered by ``order``:
    position ``j`` of the result holds channel ``order[j]``. With ``order`` a permutation and ``slots`` its
    inverse, ``regroup_channels(regroup_channels(x, order), slots)`` is ``x``."""
    B, H, T, D = x.shape
    flat = x.transpose(1, 2).reshape(B, T, H * D).index_select(-1, order.to(x.device))
    return flat.reshape(B, T, H, D).transpose(1, 2)


def _dequantize_slotted(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a tensor whose channel ``c`` was quantized in slot ``slots[c]`` (see module docstring):
    each code times the scale (plus the zero) of its slot's group, float32 math, one cast."""
    codes = q.codes().float()  # (B, H, T, D), codes at their own channels
    B, H, T, D = codes.shape
    grp = (q.slots // q.group).to(codes.device)  # flat group over (H, D // group) of each channel

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        flat = t.float().transpose(1, 2).reshape(B, T, -1).index_select(-1, grp)
        return flat.reshape(B, T, H, D).transpose(1, 2)

    if q.zero is None:  # the same float32 operations as dequantize_codes, per element
        x = (codes + _levels(q.bits, True)[0]) * per_channel(q.scale)
    else:
        x = codes * per_channel(q.scale) + per_channel(q.zero)
    return x.to(dtype)


def _levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """(lowest code, highest code) of the signed/unsigned integer grid."""
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits (1 bit has no zero level); use asymmetric")
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def _grouped(x: torch.Tensor, axis: Axis, group: int) -> torch.Tensor:
    """View x (B,H,T,D) so that each quantization group is the last axis."""
    B, H, T, D = x.shape
    if axis == "channel":
        return x.reshape(B, H, T, D // group, group)
    return x.reshape(B, H, T // group, group, D).transpose(-1, -2)  # (B,H,T/g,D,g)


def quantize(
    x: torch.Tensor,
    bits: int,
    axis: Axis,
    group: int,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Quantize ``x`` (B, H, T, D) into a :class:`QuantizedTensor` (see module docstring for layouts)."""
    check_bits(bits)
    if x.dim() != 4:
        raise ValueError(f"expected a (batch, heads, tokens, head_dim) tensor, got shape {tuple(x.shape)}")
    B, H, T, D = x.shape
    check_group(D if axis == "channel" else T, group, "head_dim" if axis == "channel" else "the number of tokens")
    g = _grouped(x.float(), axis, group)
    lo, hi = _levels(bits, symmetric)
    if symmetric:
        scale = (g.abs().amax(-1) / hi).to(scale_dtype)
        s = scale.float().unsqueeze(-1)
        codes = torch.round(g / torch.where(s > 0, s, 1.0)).clamp_(lo, hi) - lo
        zero = None
    else:
        mn, mx = g.amin(-1), g.amax(-1)
        zero = mn.to(scale_dtype)
        scale = ((mx - zero.float()) / hi).to(scale_dtype)
        s = scale.float().unsqueeze(-1)
        codes = torch.round((g - zero.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0)).clamp_(lo, hi)
    codes = codes.to(torch.uint8)
    if axis == "channel":
        codes = codes.reshape(B, H, T, D)
    return QuantizedTensor(pack(codes, bits), scale, zero, bits, axis, group, T, D, x.dtype)


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    axis: Axis,
    group: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference dequantization: codes (uint8, grouped layout) -> (B, H, T, D) tensor of ``dtype``."""
    if axis == "channel":
        B, H, T, D = codes.shape
        c = codes.reshape(B, H, T, D // group, group).float()
    else:
        c = codes.float()  # (B,H,T/g,D,g)
    if zero is None:
        lo, _ = _levels(bits, True)
        x = (c + lo) * scale.float().unsqueeze(-1)
    else:
        x = c * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    if axis == "channel":
        return x.reshape(codes.shape).to(dtype)
    B, H, G, D, g = x.shape
    return x.transpose(-1, -2).reshape(B, H, G * g, D).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, axis: Axis, group: int, symmetric: bool = False,
                  scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Simulated quantization (quantize then dequantize): for the explicit 'simulated' evaluation mode."""
    return quantize(x, bits, axis, group, symmetric, scale_dtype).dequantize()


__all__ = ["QuantizedTensor", "quantize", "dequantize_codes", "fake_quantize", "check_group", "check_finite",
           "packed_size", "SCALE_DTYPES"]
