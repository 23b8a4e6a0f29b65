"""Wiring the packed decode kernel into transformers through its public attention interface.

``AttentionInterface.register("kvshrink", fn)`` adds an attention implementation; a model switched to it
(``model.set_attn_implementation("kvshrink")``) calls ``fn`` with whatever its cache's ``update``
returned. :class:`~.layer.KernelUniformLayer` returns a :class:`~.layer.PackedDecode` handle for
one-token decode steps on CUDA, which ``fn`` serves with :func:`~.decode_attention.decode_attention`, and for
prefill chunks over a packed past (:func:`~.chunk_attention.chunk_attention`);
everything else (prefill, CPU, layers that are not kernel layers, sliding-window layers) arrives as
dense tensors and goes to transformers' own SDPA function, unchanged. The mask side is registered
as ``sdpa_mask`` so padding masks are built exactly as for ``"sdpa"`` (a name without a mask
function would receive ``attention_mask=None``).

Usage::

    cache = kvshrink.kernels.make_kernel_cache(model, "kivi:bits=2")   # enables the model too
    model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
"""
from __future__ import annotations

from typing import Any

import torch

from ._triton import device_guard
from .chunk_attention import chunk_attention, chunk_supported
from .decode_attention import decode_attention, packed_decode_supported
from .decode_strided import decode_attention_strided, strided_decode_supported
from .graph import GraphDecode
from .layer import KernelUniformLayer, PackedDecode
from .rotatekv_decode import decode_attention_rotatekv, unsupported_reason
from .rotatekv_layer import KernelRotateKVLayer, RotateKVDecode

NAME = "kvshrink"
_registered = False


def _dense_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Dense K/V through the attention the model used before :func:`enable` (SDPA, or the model's own eager function
    where it needs one, e.g. Gemma2's soft-capping, which SDPA refuses)."""
    import sys

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    prev = getattr(getattr(module, "config", None), "_kvshrink_dense_attn", None) or "sdpa"
    if prev == "eager":  # transformers' modeling files each define their own eager function
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None and attention_mask is not None and attention_mask.dtype == torch.bool:
            # the "kvshrink" mask is SDPA's boolean one (True = attend); eager functions add theirs to the scores
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
    else:
        fn = ALL_ATTENTION_FUNCTIONS.get(prev) if prev != NAME else None
    return (fn or sdpa_attention_forward)(module, query, key, value, attention_mask, **kwargs)


def _mask_rows(attention_mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
    """The decode row of transformers' 4-D mask as (B, T) bool (True = attend), or None."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
    elif m.dim() == 3:
        m = m[:, -1, :]
    if m.dtype != torch.bool:  # additive float mask: 0 = attend, very negative = masked
        m = m > torch.finfo(m.dtype).min / 2
    m = m[..., -tokens:]
    return m.expand(batch, tokens)


def decode_packed(q: torch.Tensor, kv, mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The packed decode kernel that reads ``kv``'s layout: strided (``decode_strided``) or KIVI's."""
    if strided_decode_supported(kv, q.shape[-1]):
        return decode_attention_strided(q, kv, mask=mask, scale=scale)
    return decode_attention(q, kv, mask=mask, scale=scale)


def packed_supported(kv, head_dim: int) -> bool:
    return strided_decode_supported(kv, head_dim) or packed_decode_supported(kv, head_dim)


def _call_refused(module: torch.nn.Module, query: torch.Tensor, dropout: float, kwargs: dict,
                  chunks: bool = False) -> bool:
    """What no packed decode kernel serves: more than one query token (unless ``chunks``), soft-capping, the
    model's own attention sinks (``s_aux``), a sliding window, or dropout in training."""
    return ((query.shape[2] != 1 and not chunks) or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None or kwargs.get("sliding_window") is not None
            or bool(dropout and module.training))


def _chunk_mask_rows(attention_mask: torch.Tensor | None, batch: int, chunk: int, tokens: int):
    """For a prefill chunk (the last ``chunk`` of ``tokens``): the key-padding rows ``(B, T)`` (or None) when
    ``attention_mask`` is causal over the chunk plus key padding -- the one mask ``chunk_attention`` applies --
    else ``False``. Its first and last query rows are checked (a bidirectional or windowed mask differs there)."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] < tokens:
        return False  # no mask with a past means SDPA's own causal rule: leave it to SDPA
    first, last = (_mask_rows(m, batch, tokens) for m in (attention_mask[:, :, :1], attention_mask[:, :, -1:]))
    early = torch.arange(tokens, device=attention_mask.device) <= tokens - chunk
    if not (torch.equal(first, last & early) and attention_mask.shape[2] == chunk):
        return False
    return None if bool(last.all()) else last


def kvshrink_attention(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: packed decode kernel for :class:`PackedDecode`, else SDPA."""
    if isinstance(key, GraphDecode) and query.shape[2] == 1:  # static layers: padding from set_padding, not this mask
        return key.attend(query[:, :, 0, :], scaling).unsqueeze(1), None
    if isinstance(key, RotateKVDecode):
        return _rotatekv_attention(module, query, key, attention_mask, dropout, scaling, **kwargs)
    if not isinstance(key, PackedDecode):
        return _dense_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    B, Hq, q_len, D = query.shape
    T = key.kv.tokens
    if q_len > 1:  # a prefill chunk over a packed past: KIVI's layout, causal + padding masks only
        mask = _chunk_mask_rows(attention_mask, B, q_len, T)
        served = (mask is not False and not _call_refused(module, query, dropout, kwargs, chunks=True)
                  and chunk_supported(key.kv, D) and not strided_decode_supported(key.kv, D))
    else:
        mask = _mask_rows(attention_mask, B, T)
        served = not _call_refused(module, query, dropout, kwargs) and packed_supported(key.kv, D)
    if not served:  # correctness first: dequantize this step and use SDPA
        k, v = key.kv.dense(query.dtype)
        return _dense_sdpa(module, query, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    with device_guard(query.device):
        if q_len > 1:
            return chunk_attention(query, key.kv, mask=mask, scale=scaling).transpose(1, 2), None
        out = decode_packed(query[:, :, 0, :], key.kv, mask=mask, scale=scaling)
    return out.unsqueeze(1), None  # (B, 1, Hq, D), as transformers' attention functions return


def _rotatekv_attention(module, query, handle: RotateKVDecode, attention_mask, dropout, scaling, **kwargs):
    """RotateKV's decode kernel (RoPE inside, sinks exact), or its dense K/V + SDPA when it cannot serve."""
    B, Hq, q_len, D = query.shape
    if _call_refused(module, query, dropout, kwargs) or unsupported_reason(handle.state, D, Hq) is not None:
        # correctness first: dequantize this step and use SDPA
        k, v = handle.dense(query.dtype)
        return _dense_sdpa(module, query, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    mask = _mask_rows(attention_mask, B, handle.state.tokens)
    with device_guard(query.device):
        out = decode_attention_rotatekv(query[:, :, 0, :], handle.state, mask=mask, scale=scaling)
    return out.unsqueeze(1), None


def register() -> None:
    """Register the ``"kvshrink"`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kvshrink_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def convert_cache(cache) -> int:
    """Swap every KIVI-layout :class:`~kvshrink.layer.UniformLayer` and every RotateKV layer with per-token key
    groups (``key_axis="channel"``, the default) of ``cache`` for a kernel layer (state copied). Returns how
    many layers were converted; others are left as they are."""
    from ..layer import UniformLayer
    from ..methods.rotatekv import RotateKVLayer

    n = 0
    for i, layer in enumerate(cache.layers):
        if (type(layer) is UniformLayer and layer.key_axis == "token" and layer.value_axis == "channel"
                and not layer.symmetric):
            cache.layers[i] = KernelUniformLayer.from_uniform(layer)
            n += 1
        elif type(layer) is RotateKVLayer and layer.key_axis == "channel":  # the RotateKV decode kernel's layout
            cache.layers[i] = KernelRotateKVLayer.from_layer(layer)
            n += 1
    return n


def enable(model: torch.nn.Module, cache=None) -> None:
    """Make ``model`` use the ``"kvshrink"`` attention (SDPA + the packed decode kernel), and convert
    ``cache``'s KIVI layers to kernel layers if a cache is given. Undo with :func:`disable`."""
    register()
    if getattr(model, "_kvshrink_prev_attn", None) is None:
        model._kvshrink_prev_attn = model.config._attn_implementation  # type: ignore[assignment]
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg._kvshrink_dense_attn = model._kvshrink_prev_attn  # what dense calls keep using (_dense_sdpa)
    model.set_attn_implementation(NAME)
    if cache is not None:
        convert_cache(cache)


def disable(model: torch.nn.Module) -> None:
    """Restore the attention implementation ``model`` had before :func:`enable`."""
    prev = getattr(model, "_kvshrink_prev_attn", None)
    if prev is not None:
        model.set_attn_implementation(prev)
        model._kvshrink_prev_attn = None  # type: ignore[assignment]
        for cfg in (model.config, model.config.get_text_config()):
            cfg.__dict__.pop("_kvshrink_dense_attn", None)  # nothing of ours left on the config (save_pretrained)


def make_kernel_cache(model: torch.nn.Module, spec: Any = "kivi", *, reserve: int | None = None, **params: Any):
    """``make_cache(model, spec, **params)`` with kernel layers, and ``model`` switched to them.

    ``reserve``: tokens per sequence the cache will hold in all (prompt + new tokens), to size its
    buffers once. Layers the kernels do not serve (policies, other quantizers) stay as they are.
    """
    from ..cache import make_cache

    cache = make_cache(model, spec, **params)
    enable(model, cache)
    if reserve:
        for layer in cache.layers:
            if isinstance(layer, (KernelUniformLayer, KernelRotateKVLayer)):
                layer.reserve(reserve)
    return cache
