"""Rotary position embedding (RoPE) helpers: capture, exact inversion, re-application.

transformers' attention applies RoPE to the keys *before* calling ``cache.update``, and passes the cache
no cos/sin. Methods that must store keys before RoPE (RotateKV's Pre-RoPE Grouped-Head Rotation, Su et
al. 2025, arXiv 2501.16383) therefore

1. capture ``position_embeddings = (cos, sin)`` and ``position_ids`` with a forward pre-hook on each
   decoder layer (:func:`install_capture`; public ``register_forward_pre_hook(..., with_kwargs=True)``),
2. undo RoPE exactly: with ``cos = s cos(theta)``, ``sin = s sin(theta)`` (``s`` the attention scaling of
   YaRN/LongRoPE, 1 otherwise), ``k = k_pre cos + rotate_half(k_pre) sin`` is inverted by
   ``k_pre = (k cos - rotate_half(k) sin) / (cos^2 + sin^2)`` (:func:`invert_rope`),
3. keep each stored token's position id, and re-apply RoPE for those positions when the keys are used
   (:class:`RopeSource` calls the model's own rotary-embedding module for the stored positions, so
   left padding, where positions differ per row, is right).

Only the rotate-half ("NeoX"/Llama) pairing, optionally on the leading ``partial_rotary_factor``
channels, is supported; models pairing adjacent channels (GPT-J-style interleaved RoPE) are refused
by :func:`check_rope_style`.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from .errors import UnsupportedModelError

#: Model types whose RoPE pairs adjacent (interleaved) channels: not the rotate-half layout handled here.
INTERLEAVED_ROPE_MODEL_TYPES = frozenset({"gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "chatglm",
                                          "gpt_neox_japanese", "persimmon_interleaved", "deepseek_v2",
                                          "deepseek_v3"})


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cos/sin (B, T, r) -> (B, 1, T, r) against x (B, H, T, D)."""
    return t.unsqueeze(1).to(x.dtype) if t.dim() == 3 else t.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half pairing) on the leading ``cos.shape[-1]`` channels of ``x`` (B, H, T, D)."""
    c, s = _bcast(cos, x), _bcast(sin, x)
    r = c.shape[-1]
    if r == x.shape[-1]:
        return x * c + rotate_half(x) * s
    rot = x[..., :r]
    return torch.cat([rot * c + rotate_half(rot) * s, x[..., r:]], dim=-1)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope` (also with an attention scaling folded into cos/sin)."""
    c, s = _bcast(cos, x), _bcast(sin, x)
    r = c.shape[-1]
    norm = c * c + s * s  # = scaling^2 per channel; 1 for plain RoPE
    rot = x[..., :r] if r != x.shape[-1] else x
    pre = (rot * c - rotate_half(rot) * s) / norm
    return pre if r == x.shape[-1] else torch.cat([pre, x[..., r:]], dim=-1)


def check_rope_style(config: Any) -> None:
    """Refuse models whose RoPE is not the rotate-half layout (pre-RoPE storage would be wrong there)."""
    model_type = getattr(config, "model_type", "")
    if model_type in INTERLEAVED_ROPE_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} applies RoPE to interleaved (adjacent) channel pairs, which "
            "kvshrink's pre-RoPE key storage does not invert; use prerope=false for this model"
        )
    if getattr(config, "rope_interleaved", False) or getattr(config, "rotary_interleaved", False):
        raise UnsupportedModelError("this model's config sets interleaved RoPE, which kvshrink's pre-RoPE key "
                                    "storage does not invert; use prerope=false")


class RopeSource:
    """Recomputes (cos, sin) for stored position ids with the model's own rotary-embedding module.

    A forward hook on every rotary module records, for each (cos, sin) it returns, the extra arguments
    of that call (e.g. Gemma3's ``layer_type``); a layer that captured that cos then knows how to
    recompute cos/sin for any positions: ``module(x, position_ids, *extra)``.
    """

    def __init__(self) -> None:
        self._calls: list[tuple[weakref.ref, torch.nn.Module, tuple, dict]] = []

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor)):
            return
        extra_args = tuple(args[2:])
        extra_kwargs = {k: v for k, v in kwargs.items() if k not in ("x", "position_ids")}
        self._calls = [c for c in self._calls if c[0]() is not None][-16:]
        self._calls.append((weakref.ref(output[0]), module, extra_args, extra_kwargs))

    def recompute_fn(self, cos: torch.Tensor) -> Callable[[torch.Tensor, torch.dtype], tuple] | None:
        """A function ``(position_ids (B, T), dtype) -> (cos, sin)`` for the module that produced ``cos``."""
        for ref, module, extra_args, extra_kwargs in reversed(self._calls):
            if ref() is cos:
                def fn(position_ids: torch.Tensor, dtype: torch.dtype, _m=module, _a=extra_args, _k=extra_kwargs):
                    dummy = torch.empty(0, dtype=dtype, device=position_ids.device)
                    return _m(dummy, position_ids.long(), *_a, **_k)
                return fn
        return None


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def decoder_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layers by index: modules holding a ``self_attn`` child that knows its ``layer_idx``."""
    out = {}
    for m in model.modules():
        attn = getattr(m, "self_attn", None)
        idx = getattr(attn, "layer_idx", None) if attn is not None else None
        if isinstance(idx, int) and isinstance(m, torch.nn.Module):
            out[idx] = m
    return out


__all__ = ["rotate_half", "apply_rope", "invert_rope", "check_rope_style", "RopeSource", "rotary_modules",
           "decoder_layers", "INTERLEAVED_ROPE_MODEL_TYPES"]


def append_positions(held: torch.Tensor | None, new: torch.Tensor, heads: int) -> torch.Tensor:
    """Append the position ids of newly stored tokens to those already held.

    Positions stay ``(B, T)`` int32 while every head holds the same tokens and become per head,
    ``(B, H, T)``, once an eviction policy keeps different tokens per head (the extra bytes are real and
    counted in ``nbytes``). The result never views a larger storage, which ``nbytes`` would count whole.
    """
    new = new.to(torch.int32)
    if new.dim() == 3 and (held is None or held.dim() == 2) and bool((new == new[:, :1]).all()):
        new = new[:, 0]
    if held is not None and held.dim() != new.dim():
        if new.dim() == 2:
            new = new[:, None].expand(new.shape[0], heads, new.shape[-1])
        else:
            held = held[:, None].expand(held.shape[0], heads, held.shape[-1])
    return new.clone(memory_format=torch.contiguous_format) if held is None else torch.cat([held, new], -1)
