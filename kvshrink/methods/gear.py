"""GEAR: uniform quantization + low-rank residual + sparse outliers, with a streaming buffer.

Kang, Zhang, Kundu, Jeong, Liu, Krishna, Zhao. "GEAR: An Efficient KV Cache Compression Recipe for
Near-Lossless Generative Inference of LLM" (arXiv 2403.05527). For each compressed chunk ``X`` of keys or
values (Sec. 3, Alg. 1):

1. ``S``: sparse outliers, the ``s`` fraction of entries farthest from each token vector's median, kept
   exactly (fp16) with their channel index;
2. ``D̂ = Quant_b(X - S)``: uniform ``b``-bit quantization of the rest (KIVI-style axes: keys per channel
   over the chunk's tokens, values per token over ``group`` channels);
3. ``L = A B``: rank-``r`` approximation of the residual ``X - D̂ - S`` (per head), by power iteration
   (the paper's choice) or SVD; ``A (T, r)`` and ``B (r, D)`` are stored in fp16.

``X ≈ D̂ + L + S``. Streaming (Sec. 3, "streaming buffer"): the prompt is compressed as one chunk; during
decoding new tokens wait in a full-precision buffer of ``buffer`` tokens and are compressed as a chunk
when it is full, so the factorisation runs once every ``buffer`` steps.

Layout per layer, every tensor counted by ``nbytes()``: per chunk ``kq``/``vq`` (packed codes + fp16
scale/zero), ``k_a``/``k_b``/``v_a``/``v_b`` (fp16 factors); for all compressed tokens ``k_oval``/``v_oval``
(fp16 outlier values, ``(B, H, T, k)``) and ``k_oidx``/``v_oidx`` (uint8 channel indices); ``k_buf``/``v_buf``
(the buffer, 16-bit: the model's dtype if 16-bit, else fp16).

Deviation: the paper selects outliers per channel for keys; here both keys and values keep a fixed
``round(s * head_dim)`` outliers per token vector, which keeps the sparse part a fixed-shape tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant_utils import StateLayer, half_dtype, low_rank, merge_outliers, outlier_count, split_outliers
from ..registry import register
from ..storage import QuantizedTensor, quantize
from .base import Quantizer, check_choice, require


class GEARLayer(StateLayer):
    state_fields = ("kq", "vq", "k_a", "k_b", "v_a", "v_b", "k_oval", "k_oidx", "v_oval", "v_oidx",
                    "k_buf", "v_buf")

    def __init__(self, bits: int, group: int, rank: int, outliers: float, buffer: int, lowrank: str,
                 power_iters: int) -> None:
        super().__init__()
        self.bits, self.group, self.rank, self.outliers = bits, group, rank, outliers
        self.buffer, self.lowrank, self.power_iters = buffer, lowrank, power_iters

    def _compress(self, x: torch.Tensor, axis: str):
        """One chunk -> (QuantizedTensor, A, B, outlier values, outlier index)."""
        k = outlier_count(self.outliers, x.shape[-1])
        dense, oval, oidx = split_outliers(x, k)
        group = x.shape[2] if axis == "token" else self.group
        q = quantize(dense, self.bits, axis, group)
        a = b = None
        if self.rank > 0:
            resid = dense.float() - q.dequantize().float()
            if oidx is not None:  # the outlier positions are exact anyway: do not spend rank on them
                resid = resid.scatter(-1, oidx.long(), 0.0)
            a, b = low_rank(resid, self.rank, self.lowrank, self.power_iters)
            a, b = a.to(torch.float16), b.to(torch.float16)
        return q, a, b, oval, oidx

    def _flush(self, k: torch.Tensor, v: torch.Tensor) -> None:
        kq, ka, kb, kov, koi = self._compress(k, "token")
        vq, va, vb, vov, voi = self._compress(v, "channel")
        self.kq = (self.kq or []) + [kq]
        self.vq = (self.vq or []) + [vq]
        if self.rank > 0:
            self.k_a, self.k_b = (self.k_a or []) + [ka], (self.k_b or []) + [kb]
            self.v_a, self.v_b = (self.v_a or []) + [va], (self.v_b or []) + [vb]
        if kov is not None:
            self.k_oval = kov if self.k_oval is None else torch.cat([self.k_oval, kov], 2)
            self.k_oidx = koi if self.k_oidx is None else torch.cat([self.k_oidx, koi], 2)
            self.v_oval = vov if self.v_oval is None else torch.cat([self.v_oval, vov], 2)
            self.v_oidx = voi if self.v_oidx is None else torch.cat([self.v_oidx, voi], 2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.kq is None and self.k_buf is None:
            self._flush(k, v)  # the prompt: one chunk
            return
        k, v = k.to(half_dtype(k.dtype)), v.to(half_dtype(v.dtype))
        self.k_buf = k if self.k_buf is None else torch.cat([self.k_buf, k], 2)
        self.v_buf = v if self.v_buf is None else torch.cat([self.v_buf, v], 2)
        if self.k_buf.shape[2] >= self.buffer:
            kb, vb = self.k_buf, self.v_buf
            self.k_buf = self.v_buf = None
            self._flush(kb, vb)

    def _dense(self, qs: list[QuantizedTensor] | None, a_s, b_s, oval, oidx, buf) -> torch.Tensor | None:
        buf = None if buf is None else buf.to(self.dtype)
        if qs is None:
            return buf
        parts = []
        for i, q in enumerate(qs):
            x = q.dequantize().float()
            if a_s is not None:
                x = x + a_s[i].float() @ b_s[i].float()
            parts.append(x)
        x = merge_outliers(torch.cat(parts, 2), oval, oidx).to(self.dtype)
        return x if buf is None else torch.cat([x, buf], 2)

    def dense(self):
        return (self._dense(self.kq, self.k_a, self.k_b, self.k_oval, self.k_oidx, self.k_buf),
                self._dense(self.vq, self.v_a, self.v_b, self.v_oval, self.v_oidx, self.v_buf))


@register
@dataclass
class GEAR(Quantizer):
    """Uniform quantization + low-rank approximation of its residual + sparse outliers (GEAR)."""

    name = "gear"
    paper = ("Kang et al. 2024, GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative "
             "Inference of LLM (arXiv 2403.05527)")

    bits: int = field(default=4, metadata={
        "help": "bits of the uniform quantization backbone (paper: 4, or 2 with KIVI)"})
    rank: int = field(default=4, metadata={
        "help": "rank r of the residual approximation, per head and chunk (0 = none)"})
    outliers: float = field(default=0.02, metadata={
        "help": "fraction s of entries kept exactly as sparse outliers (0 = none)"})
    buffer: int = field(default=20, metadata={"help": "streaming buffer n_b: decoded tokens compressed together"})
    group: int = field(default=0, metadata={"help": "channels per value group (0 = whole head)"})
    lowrank: str = field(default="power", metadata={"help": "power (power iteration, paper) or svd"})
    power_iters: int = field(default=2, metadata={"help": "power iterations of the low-rank step"})

    def __post_init__(self) -> None:
        check_choice("gear", "bits", self.bits, (2, 3, 4, 8))
        check_choice("gear", "lowrank", self.lowrank, ("power", "svd"))
        require(self.rank >= 0, f"gear: rank={self.rank} must be >= 0 (0 disables the low-rank part)")
        require(0 <= self.outliers < 0.5, f"gear: outliers={self.outliers} must be a fraction in [0, 0.5), e.g. 0.02")
        require(self.buffer >= 1, f"gear: buffer={self.buffer} must be >= 1 token")
        require(self.group >= 0, f"gear: group={self.group} must be >= 0 (0 = whole head)")
        require(self.power_iters >= 0, f"gear: power_iters={self.power_iters} must be >= 0")

    def validate(self, info) -> None:
        g = self.group or info.head_dim
        require(info.head_dim % g == 0,
                f"gear: group={g} does not divide head_dim={info.head_dim}; use a divisor of it or 0 (whole head)")
        require(self.rank <= info.head_dim, f"gear: rank={self.rank} exceeds head_dim={info.head_dim}")

    def make_layer(self, layer_idx, info):
        return GEARLayer(self.bits, self.group or info.head_dim, self.rank, self.outliers, self.buffer,
                         self.lowrank, self.power_iters)
