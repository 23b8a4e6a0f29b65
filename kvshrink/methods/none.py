"""``none``: the uncompressed reference cache."""
from __future__ import annotations

from dataclasses import dataclass

from ..layer import PassthroughLayer
from ..registry import register
from .base import Quantizer


@register
@dataclass
class NoCompression(Quantizer):
    """Exact passthrough: holds the K/V tensors as transformers' DynamicCache does (bit for bit)."""

    name = "none"
    paper = ""

    def make_layer(self, layer_idx, info):
        return PassthroughLayer()
