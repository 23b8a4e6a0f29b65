"""``KVShrinkCache``: a transformers ``Cache`` whose full-attention layers are kvshrink layers."""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from .errors import SpecError
from .layer import CompressedLayer, tensor_nbytes
from .methods.base import Method, Policy, Quantizer
from .model_info import ModelInfo, model_info
from .registry import create, parse_spec


class KVShrinkCache(Cache):
    """A compressed KV cache. Pass it to ``model(...)`` or ``model.generate(past_key_values=...)``.

    Full-attention layers are built by the method(s); sliding-window layers (Gemma2/3, Mistral with a
    window) stay transformers' ``DynamicSlidingWindowLayer`` in full precision: they hold at most
    ``sliding_window - 1`` tokens whatever the context, so they do not grow with it. Their bytes are
    counted in :meth:`nbytes` all the same.
    """

    def __init__(self, layers: list, methods: Sequence[Method], info: ModelInfo, simulated: bool = False) -> None:
        super().__init__(layers=layers)
        self.methods = list(methods)
        self.info = info
        self._handles: list = []
        self.set_simulated(simulated)

    # -- what users ask of a cache ---------------------------------------------------------------
    @property
    def spec(self) -> str:
        return "+".join(m.spec() for m in self.methods)

    def set_simulated(self, simulated: bool) -> None:
        """Papers' simulated mode: each chunk attends to its own compressed K/V (evaluation only)."""
        self.simulated = simulated
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.simulated = simulated

    def nbytes_per_layer(self) -> list[int]:
        """Bytes really held by each layer (codes, scales, zero points, residuals, indices)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                out.append(layer.nbytes())
            else:
                out.append(tensor_nbytes(t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                                         if isinstance(t, torch.Tensor)))
        return out

    def nbytes(self) -> int:
        """Total bytes really held by the cache."""
        return sum(self.nbytes_per_layer())

    def compact(self) -> None:
        """Give back what layers hold only for speed (RotateKV's block of pending decode-step sink columns on the
        GPU, up to 15 unused ones per layer); what the cache reads back is unchanged. Byte reports
        (eval, ``kvshrink generate``) call it before :meth:`nbytes`, which always counts what is held now."""
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.compact()

    def tokens_held(self) -> list[int]:
        """Per layer, tokens whose K/V are held (after eviction/merging) — sliding layers: their window."""
        out = []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                out.append(layer.held())
            else:
                k = getattr(layer, "keys", None)
                out.append(int(k.shape[-2]) if isinstance(k, torch.Tensor) and k.dim() == 4 else 0)
        return out

    def fp16_nbytes(self) -> int:
        """Bytes a 16-bit DynamicCache would hold for the same tokens seen (sliding layers: their window)."""
        batch = self._batch()
        total = 0
        for kind, layer in zip(self.info.layer_kinds, self.layers):
            seen = layer.get_seq_length()
            if kind == "sliding" and self.info.sliding_window:
                seen = min(seen, self.info.sliding_window - 1)
            total += 2 * 2 * batch * self.info.num_kv_heads * self.info.head_dim * seen
        return total

    def _batch(self) -> int:
        for t in (t for layer in self.layers if isinstance(layer, CompressedLayer) for t in layer.stored()):
            return t.shape[0]
        for layer in self.layers:
            k = getattr(layer, "keys", None)
            if isinstance(k, torch.Tensor) and k.dim() == 4:
                return k.shape[0]
        return 0

    def close(self) -> None:
        """Remove the hooks this cache's methods installed on the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"KVShrinkCache({self.spec!r}, layers={len(self.layers)})"


def resolve_methods(spec: str | Method | Sequence[Method], **params: Any) -> list[Method]:
    """Turn a spec string, a method, or a list of methods (+ keyword parameters) into methods."""
    if isinstance(spec, Method):
        methods = [spec]
    elif isinstance(spec, str):
        if params:
            if ":" in spec or "+" in spec:
                raise SpecError("give parameters either in the spec string or as keyword arguments, not both")
            methods = [create(spec, **params)]
        else:
            methods = parse_spec(spec)
    else:
        methods = list(spec)
    if params and not isinstance(spec, str):
        raise SpecError("keyword parameters go with a method name, e.g. make_cache(model, 'kivi', bits=2)")
    quantizers = [m for m in methods if isinstance(m, Quantizer)]
    if len(quantizers) > 1:
        raise SpecError(
            f"a spec may hold at most one quantizer, got {', '.join(m.name for m in quantizers)}; "
            "compose one quantizer with eviction/merging policies, e.g. 'snapkv:budget=0.25+kivi:bits=2'"
        )
    if quantizers and methods[-1] is not quantizers[0]:
        raise SpecError("write the quantizer last in a composed spec, e.g. 'snapkv:budget=0.25+kivi:bits=2'")
    return methods


def make_cache(model: Any, spec: str | Method | Sequence[Method] = "none", *, simulated: bool = False,
               kernels: bool = False, **params: Any) -> KVShrinkCache:
    """Build a compressed cache for ``model`` (a causal LM, or its config) from a method spec.

    ``kernels=True`` switches the model to kvshrink's attention function so that, on CUDA, decode steps
    attend directly over the packed cache with the Triton kernels (see :mod:`kvshrink.kernels`); on CPU
    and for layers the kernels do not serve, attention stays transformers' SDPA over dense tensors.

    >>> cache = make_cache(model, "kivi:bits=2,group=32,residual=128")
    >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    >>> cache.nbytes()
    """
    info = model_info(model)
    methods = resolve_methods(spec, **params)
    for m in methods:
        m.validate(info)
    quantizer = next((m for m in methods if isinstance(m, Quantizer)), None) or create("none")
    policies = [m for m in methods if isinstance(m, Policy)]
    stock = DynamicCache(config=info.config).layers
    layers: list = []
    for idx, kind in enumerate(info.layer_kinds):
        if kind != "full":
            layers.append(stock[idx])
            continue
        layer = quantizer.make_layer(idx, info)
        for policy in reversed(policies):
            layer = policy.wrap(layer, idx, info)
        layers.append(layer)
    cache = KVShrinkCache(layers, methods if quantizer in methods else [*methods, quantizer], info, simulated)
    if hasattr(model, "config") and isinstance(model, torch.nn.Module):
        for m in cache.methods:
            cache._handles.extend(m.attach(model, cache))
        weakref.finalize(cache, _remove_all, list(cache._handles))
        if kernels:
            from .kernels import enable

            enable(model, cache)
    elif kernels:
        raise SpecError("kernels=True needs the model itself (not its config): it switches the model's attention")
    return cache


def _remove_all(handles: list) -> None:
    for h in handles:
        h.remove()
