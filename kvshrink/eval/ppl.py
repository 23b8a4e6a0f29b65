"""Perplexity with the compressed cache in the loop: every scored token is predicted from the
*compressed* past, as a serving engine would predict it.

Three modes (the same scored tokens in each, so their numbers compare):

* ``decode``: the prompt (if any) is prefilled at once, then one token per forward pass: each
  prediction attends to the compressed past plus the current token. The reference, and the slowest.
* ``chunked``: chunked prefill. The prompt is prefilled at once, then ``chunk_size`` tokens per
  forward pass: each chunk attends to the compressed past plus itself in full precision (what a
  serving engine's chunked prefill does). At ``chunk_size=1`` this is ``decode`` exactly.
* ``simulated``: the papers' evaluation (e.g. KIVI's and KVQuant's perplexity tables): the whole window
  in one forward pass with a simulated cache (``make_cache(..., simulated=True)``) so that every token
  attends to the quantized copy of the window's K/V, its own included. Labelled as such in reports.

Scored tokens: in each window of ``W`` tokens, the targets ``W[max(prompt, 1):]``. The first ``prompt``
tokens are the prompt; predictions inside it never see a compressed token in ``chunked``/``decode``
mode, so they are identical for every method and would only dilute the differences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..hf_compat import cache_kw
from ..cache import KVShrinkCache, make_cache
from ..errors import KVShrinkError

MODES = ("chunked", "decode", "simulated")

#: on_logits(first_position, logits (n, V)): logits at positions first..first+n-1 of the window.
LogitsCallback = Callable[[int, torch.Tensor], None]


def first_scored_position(prompt_tokens: int) -> int:
    """Position whose logits predict the first scored target (the target is the next token)."""
    return max(prompt_tokens, 1) - 1


def check_window(window: int, prompt_tokens: int, chunk_size: int, mode: str) -> None:
    if mode not in MODES:
        raise KVShrinkError(f"unknown perplexity mode {mode!r}; choose one of {', '.join(MODES)}")
    if chunk_size < 1:
        raise KVShrinkError(f"--chunk-size must be at least 1, got {chunk_size}")
    if window < 2:
        raise KVShrinkError(f"--window must be at least 2 tokens, got {window}")
    if not 0 <= prompt_tokens < window - 1:
        raise KVShrinkError(
            f"--prompt-tokens={prompt_tokens} leaves nothing to score in a {window}-token window; "
            f"use a value from 0 to {window - 2}, or a longer --window")


def _forward(model: Any, ids: torch.Tensor, cache: KVShrinkCache, start: int) -> torch.Tensor:
    """One forward pass of ``ids`` at positions ``start...`` through ``cache``; logits ``(n, V)``.

    Positions are passed explicitly: an evicting cache holds fewer tokens than it has seen, and a
    model would otherwise derive positions from the cache (see docs: TRANSFORMERS_NOTES)."""
    n = ids.shape[1]
    pos = torch.arange(start, start + n, device=ids.device).unsqueeze(0)
    out = model(input_ids=ids, **cache_kw(model, cache), position_ids=pos, use_cache=True)
    return out.logits[0]


def chunk_bounds(length: int, prompt_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each forward pass feeding tokens ``0..length-1``: the prompt, then chunks."""
    bounds = []
    s = 0
    if prompt_tokens > 0:
        bounds.append((0, min(prompt_tokens, length)))
        s = bounds[-1][1]
    while s < length:
        e = min(s + chunk_size, length)
        bounds.append((s, e))
        s = e
    return bounds


@dataclass
class WindowResult:
    """What one window's run left in its cache (measured, for bytes and for run-time checks)."""

    tokens_fed: int
    seq_length: int
    nbytes: int
    fp16_nbytes: int
    tokens_held: list[int]


def run_window(model: Any, window_ids: torch.Tensor, spec: str, on_logits: LogitsCallback, *, mode: str = "chunked",
               chunk_size: int = 32, prompt_tokens: int = 0, kernels: bool = False) -> WindowResult:
    """Run one window (``(1, W)`` token ids) through a fresh cache of ``spec`` and hand the scored
    positions' logits to ``on_logits``. Tokens ``0..W-2`` are fed (the last one is only a target).
    ``kernels``: the cache's layers served by kvshrink's GPU kernels (``make_cache(..., kernels=True)``)."""
    W = window_ids.shape[1]
    check_window(W, prompt_tokens, chunk_size, mode)
    first = first_scored_position(prompt_tokens)
    feed = W - 1
    cache = make_cache(model, spec, simulated=(mode == "simulated"), kernels=kernels and mode != "simulated")
    try:
        with torch.no_grad():
            if mode == "simulated":
                logits = _forward(model, window_ids[:, :feed], cache, 0)
                on_logits(first, logits[first:])
            elif mode == "decode":
                # Kept deliberately separate from the chunked loop: the test that chunked at chunk
                # size 1 equals decode then compares two implementations.
                t = 0
                if prompt_tokens:
                    logits = _forward(model, window_ids[:, :prompt_tokens], cache, 0)
                    on_logits(first, logits[first:])
                    t = prompt_tokens
                while t < feed:
                    logits = _forward(model, window_ids[:, t:t + 1], cache, t)
                    if t >= first:
                        on_logits(t, logits)
                    t += 1
            else:
                for s, e in chunk_bounds(feed, prompt_tokens, chunk_size):
                    logits = _forward(model, window_ids[:, s:e], cache, s)
                    lo = max(s, first)
                    if lo < e:
                        on_logits(lo, logits[lo - s:])
        cache.compact()  # bytes of what is stored, not of a half-used block of pending sink columns (GPU)
        return WindowResult(feed, cache.get_seq_length(), cache.nbytes(), cache.fp16_nbytes(), cache.tokens_held())
    finally:
        cache.close()


def split_windows(ids: torch.Tensor, window: int, max_tokens: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``window`` tokens from the first ``max_tokens`` of ``ids (1, N)``.

    A shorter text gives one shorter window (at least 2 tokens); a partial last window is dropped so that
    every window has the same length and position range."""
    n = min(ids.shape[1], max_tokens)
    if n < 2:
        raise KVShrinkError(f"the text has {ids.shape[1]} tokens; perplexity needs at least 2")
    if n < window:
        return [ids[:, :n]]
    return [ids[:, i:i + window] for i in range(0, n - window + 1, window)]
