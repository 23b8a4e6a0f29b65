"""The keyword a transformers forward call takes its KV cache by.

transformers up to 5.2x names it ``past_key_values``; from 5.25 models and ``generate`` take ``cache`` (the old
name is still accepted, with a FutureWarning, until 5.40; decoder layers and attention modules receive only
the new one). kvshrink runs on both (the GPU machine has 5.17), so hooks read whichever is there and calls
pass the name the model declares.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

#: keyword names a forward hook may find the running cache under, newest first
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_in(kwargs: dict) -> Any:
    """The cache a hooked module's forward call runs with (None if it runs without one)."""
    for name in CACHE_KWARGS:
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def call_padding_mask(kwargs: dict) -> Any:
    """The 2-D ``attention_mask`` (batch, past + new; 0 = padding) a hooked model call was given, else None (no
    mask, or a 4-D one already expanded)."""
    import torch

    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


@functools.lru_cache(maxsize=None)
def _cache_name(forward) -> str:
    try:
        params = inspect.signature(forward).parameters  # follows the deprecation wrapper's __wrapped__
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kw(model: Any, cache: Any) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``, with the keyword ``model`` declares."""
    forward = getattr(type(model), "forward", None)
    return {_cache_name(forward) if forward is not None else "past_key_values": cache}


__all__ = ["CACHE_KWARGS", "cache_in", "cache_kw"]
