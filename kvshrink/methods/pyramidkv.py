"""PyramidKV: SnapKV-style selection with budgets shrinking with depth.

Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao. "PyramidKV: Dynamic KV Cache Compression based
on Pyramidal Information Funneling" (arXiv 2406.02069), Sec. 3.2: the total budget is kept, but lower
layers get more tokens and upper layers fewer, on an arithmetic sequence: with ``b = budget - window``
per layer on average, the top layer keeps ``b / beta`` prefix tokens and the bottom one ``2b - b/beta``
(beta = 20); the window's tokens are kept in every layer. Selection inside a layer is SnapKV's
(window votes, pooling). As in the reference code, when the prompt is too short for the bottom layer's
share, the sequence is re-anchored at the prompt length so the total is unchanged; the per-layer
shares are rounded so that they sum to exactly the total budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..policy import resolve_budget
from ..registry import register
from .base import require
from .snapkv import SnapKV, SnapKVLayer


def pyramid_capacity(avg: int, total: int, window: int, layers: int, position: int, beta: float) -> int:
    """Tokens kept by the layer at ``position`` (0 = bottom) of ``layers``, for an average of ``avg``.

    The prefix shares form the arithmetic sequence from ``high`` down to ``low`` (their mean is ``avg - window``);
    rounding is done so that the shares sum to exactly ``layers * (avg - window)`` (the reference code's
    integer step can overshoot the total by up to ``layers`` tokens per layer)."""
    base = avg - window
    if base <= 0 or layers <= 1:
        return avg
    low = base / beta
    high = 2 * base - low
    if high >= total - window:
        high = total - window
        low = 2 * base - high
    shares = [high - l * (high - low) / (layers - 1) for l in range(layers)]
    floors = [int(s) for s in shares]
    for l in range(layers * base - sum(floors)):  # hand the rounding remainder to the lowest layers
        floors[l % layers] += 1
    return max(1, floors[position] + window)


class PyramidLayer(SnapKVLayer):
    def __init__(self, inner, layer_idx, info, budget, window, kernel, pooling, beta, position, layers) -> None:
        super().__init__(inner, layer_idx, info, budget, window, kernel, pooling)
        self.beta, self.position, self.layers = beta, position, layers

    def capacity(self, total: int) -> int:
        avg = resolve_budget(self.budget, total)
        return pyramid_capacity(avg, total, min(self.window, avg - 1), self.layers, self.position, self.beta)


@register
@dataclass
class PyramidKV(SnapKV):
    """SnapKV selection with per-layer budgets decreasing linearly with depth, same total (Cai et al. 2024)."""

    name = "pyramidkv"
    paper = "Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (arXiv 2406.02069)"

    beta: float = field(default=20.0, metadata={"help": "top layer keeps (budget - window) / beta prefix tokens (paper: 20)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta >= 1, f"pyramidkv: beta={self.beta} must be >= 1 (1 = uniform budgets)")

    def wrap(self, inner, layer_idx, info):
        pos, count = self.full_layer_position(layer_idx, info)
        return PyramidLayer(inner, layer_idx, info, self.budget, self.window, self.kernel, self.pooling,
                            self.beta, pos, count)
