"""KIVI: tuning-free asymmetric 2-bit KV cache quantization.

Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu. "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", ICML 2024 (arXiv 2402.02750). Keys are quantized per channel (groups of ``group`` tokens along the
token axis, Sec. 3.3: key outliers live in fixed channels), values per token (groups of ``group`` channels);
the newest tokens stay in full precision in a residual of at most ``residual`` tokens (Alg. 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..layer import UniformLayer
from ..registry import register
from ..storage import SCALE_DTYPES
from .base import Quantizer, check_choice, require


@register
@dataclass
class KIVI(Quantizer):
    """Per-channel keys, per-token values, asymmetric uniform quantization, full-precision residual."""

    name = "kivi"
    paper = "Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (arXiv 2402.02750)"

    bits: int = field(default=2, metadata={"help": "bits per key/value code (paper: 2 or 4)"})
    group: int = field(default=32, metadata={"help": "group size: tokens per key group, channels per value group"})
    residual: int = field(default=128, metadata={"help": "full-precision residual length R (multiple of group)"})
    scale_dtype: str = field(default="float16", metadata={"help": "dtype of scales and zero points"})

    def __post_init__(self) -> None:
        check_choice("kivi", "bits", self.bits, (1, 2, 3, 4, 8))
        check_choice("kivi", "scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        require(self.group > 0, f"kivi: group must be positive, got {self.group}")
        require(self.residual >= 0 and self.residual % self.group == 0,
                f"kivi: residual={self.residual} must be a non-negative multiple of group={self.group} "
                "(keys are flushed in whole groups)")

    def validate(self, info) -> None:
        require(info.head_dim % self.group == 0,
                f"kivi: group={self.group} does not divide head_dim={info.head_dim} of this model; "
                f"use a divisor of {info.head_dim} (e.g. {info.head_dim // 2 if info.head_dim % 2 == 0 else info.head_dim})")

    def make_layer(self, layer_idx, info):
        return UniformLayer(self.bits, "token", "channel", self.group, self.group, self.residual,
                            scale_dtype=SCALE_DTYPES[self.scale_dtype])
