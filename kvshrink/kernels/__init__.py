"""GPU kernels (Triton) that quantize into, and attend directly over, KIVI's packed KV cache.

* :func:`quantize_pack` — quantize + pack new K/V into the packed layouts (bit-exact with
  :func:`kvshrink.storage.quantize` up to rounding ties).
* :func:`decode_attention` — flash-decoding over the packed cache (+ full-precision residual, GQA, padding);
  :func:`chunk_attention` — the same kernel for a prefill chunk over a packed past (causal within the chunk).
* :func:`make_kernel_cache` / :func:`enable` — use them from ``model.generate`` through transformers'
  attention interface (CUDA); on CPU everything stays on the torch reference path.
* :func:`decode_attention_strided` / :func:`quantize_pack_strided` — the same over the channel-strided layout
  (``strided.py``; same bytes, codes packed along each token's channels with strided bit slots).
* :func:`decode_attention_rotatekv` / :class:`KernelRotateKVLayer` — RotateKV's packed cache attended directly
  (channel order, grouped-head Hadamard and RoPE undone inside the kernel; ``rotatekv_decode.py``).
* :func:`make_static_cache` / :class:`GraphDecoder` — static cache layers (device-side lengths, residual rings,
  fixed split counts) whose decode step a CUDA graph captures and replays (``graph.py``);
  :class:`StaticRotateKVLayer` the same for RotateKV (``rotatekv_graph.py``, ``make_static_cache(kind="rotatekv")``);
  :func:`generate_graph` — greedy generation over them in one call (``graph_generate.py``).

Triton is optional: without it (or without CUDA, unless ``TRITON_INTERPRET=1`` was set before Triton was
imported), the layers fall back to the reference path and the attention function to SDPA.
"""
from ._triton import HAS_TRITON, kernels_usable
from .attention import convert_cache, disable, enable, kvshrink_attention, make_kernel_cache, register
from .chunk_attention import chunk_attention
from .decode_attention import decode_attention, packed_decode_supported
from .decode_strided import decode_attention_strided, strided_decode_supported
from .graph import GraphDecoder, StaticDenseLayer, StaticKiviLayer, decode_attention_dense, make_static_cache
from .graph_generate import generate_graph
from .layer import KernelUniformLayer, PackedDecode
from .quant_pack import kernel_supports, quantize_pack
from .reference import PackedKV, chunk_attention_ref, decode_attention_ref
from .rotatekv_decode import RotateKVState, decode_attention_rotatekv
from .rotatekv_layer import KernelRotateKVLayer, RotateKVDecode
from .rotatekv_graph import StaticRotateKVLayer, make_static_rotatekv_cache
from .strided import StridedQuantizedTensor, quantize_pack_strided, strided_supported

__all__ = ["HAS_TRITON", "kernels_usable", "convert_cache", "disable", "enable", "kvshrink_attention",
           "make_kernel_cache", "register", "decode_attention", "chunk_attention", "chunk_attention_ref", "packed_decode_supported", "KernelUniformLayer",
           "PackedDecode", "kernel_supports", "quantize_pack", "PackedKV", "decode_attention_ref",
           "decode_attention_strided", "strided_decode_supported", "StridedQuantizedTensor", "quantize_pack_strided",
           "strided_supported", "GraphDecoder", "StaticDenseLayer", "StaticKiviLayer", "decode_attention_dense",
           "make_static_cache", "RotateKVState", "decode_attention_rotatekv", "KernelRotateKVLayer", "RotateKVDecode",
           "StaticRotateKVLayer", "make_static_rotatekv_cache", "generate_graph"]
