"""GPU kernels (Triton) that quantize into, and attend directly over, KIVI's packed KV cache.

* :func:`quantize_pack` — quantize + pack new K/V into the packed layouts (bit-exact with
  :func:`kvshrink.storage.quantize` up to rounding ties).
* :func:`decode_attention` — flash-decoding over the packed cache (+ full-precision residual, GQA, padding).
* :func:`make_kernel_cache` / :func:`enable` — use them from ``model.generate`` through transformers'
  attention interface (CUDA); on CPU everything stays on the torch reference path.

Triton is optional: without it (or without CUDA, unless ``TRITON_INTERPRET=1`` was set before Triton was
imported), the layers fall back to the reference path and the attention function to SDPA.
"""
from ._triton import HAS_TRITON, kernels_usable
from .attention import convert_cache, disable, enable, kvshrink_attention, make_kernel_cache, register
from .decode_attention import decode_attention, packed_decode_supported
from .layer import KernelUniformLayer, PackedDecode
from .quant_pack import kernel_supports, quantize_pack
from .reference import PackedKV, decode_attention_ref

__all__ = ["HAS_TRITON", "kernels_usable", "convert_cache", "disable", "enable", "kvshrink_attention",
           "make_kernel_cache", "register", "decode_attention", "packed_decode_supported", "KernelUniformLayer",
           "PackedDecode", "kernel_supports", "quantize_pack", "PackedKV", "decode_attention_ref"]
