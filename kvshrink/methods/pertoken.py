"""``int8`` / ``int4``: plain per-token uniform quantization of keys and values, the usual baselines
(e.g. the INT8/INT4 rows of KIVI's and KVQuant's tables). No residual window, no calibration."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..layer import UniformLayer
from ..registry import register
from ..storage import SCALE_DTYPES
from .base import Quantizer, check_choice, require


@dataclass
class PerToken(Quantizer):
    bits: int = 8
    group: int = field(default=0, metadata={"help": "channels per group; 0 = the whole head (one scale per token per head)"})
    symmetric: bool = field(default=False, metadata={"help": "absmax (symmetric) instead of min/max (asymmetric)"})
    residual: int = field(default=0, metadata={"help": "newest tokens kept in full precision"})
    scale_dtype: str = field(default="float16", metadata={"help": "dtype of scales and zero points"})

    def __post_init__(self) -> None:
        check_choice(self.name, "bits", self.bits, (1, 2, 3, 4, 8))
        check_choice(self.name, "scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        require(self.group >= 0 and self.residual >= 0, f"{self.name}: group and residual must be >= 0")
        require(not (self.symmetric and self.bits < 2), f"{self.name}: symmetric quantization needs at least 2 bits")

    def validate(self, info) -> None:
        g = self.group or info.head_dim
        require(info.head_dim % g == 0,
                f"{self.name}: group={g} does not divide head_dim={info.head_dim}; use a divisor of it or 0 (whole head)")

    def make_layer(self, layer_idx, info):
        g = self.group or info.head_dim
        return UniformLayer(self.bits, "channel", "channel", g, g, self.residual, self.symmetric,
                            SCALE_DTYPES[self.scale_dtype])


@register
@dataclass
class Int8(PerToken):
    """Per-token 8-bit baseline: one min/max scale per token and head for keys and values."""

    name = "int8"
    bits: int = field(default=8, metadata={"help": "bits per code"})


@register
@dataclass
class Int4(PerToken):
    """Per-token 4-bit baseline: one min/max scale per token and head for keys and values."""

    name = "int4"
    bits: int = field(default=4, metadata={"help": "bits per code"})
