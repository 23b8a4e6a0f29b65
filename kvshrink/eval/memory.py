"""KV bytes, peak memory and speed, measured (never computed from formulas), and run-time checks that
the cache really holds what its method says.

* Bytes: ``cache.nbytes()`` (every stored tensor: codes, scales, zero points, residuals, indices) and
  ``cache.fp16_nbytes()`` (what a 16-bit DynamicCache would hold for the same tokens), each divided by
  the tokens the cache has seen.
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the level before the cache was made;
  on CPU the peak resident set size above the level before the run, sampled every millisecond by a
  background thread after returning freed heap memory to the OS (``malloc_trim``), so that an earlier
  method's freed memory is not silently reused. It includes activations and logits, not only the cache.
* Speed: prefill (chunked, ``prefill_chunk`` tokens per forward pass) and greedy decoding through the
  compressed cache, tokens per second of wall time, after a short warm-up with a throwaway cache.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..hf_compat import cache_kw
from ..cache import make_cache
from ..errors import KVShrinkError
from .passkey import prefill


def _rss() -> int | None:
    try:
        import psutil  # optional: /proc works on Linux without it

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS baseline may then include reusable free memory
        pass


class PeakMemory:
    """Context manager measuring peak memory above the level at entry (bytes, in ``.peak``)."""

    def __init__(self, device: torch.device, interval: float = 0.001) -> None:
        self.device, self.interval = device, interval
        self.peak: int | None = None
        self.how = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.how = "torch.cuda.max_memory_allocated above the level before the run"
            return self
        _trim_heap()
        self._base = _rss()
        self._max = self._base or 0
        self._stop = threading.Event()
        self.how = "peak RSS above the level before the run (sampled every 1 ms, heap trimmed first)"
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = _rss()
            if r is not None and r > self._max:
                self._max = r
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        r = _rss()
        self._max = max(self._max, r or 0)
        self.peak = self._max - self._base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SpeedResult:
    context_tokens: int
    decode_tokens: int
    prefill_chunk: int
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float
    kv_bytes: int
    kv_tokens: int
    bytes_per_token: float
    fp16_bytes_per_token: float
    tokens_held: list[int]
    peak_mem_bytes: int | None
    peak_mem_how: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(model: Any, spec: str, ids: torch.Tensor, *, prefill_chunk: int, decode_tokens: int,
            warmup: bool = True, kernels: bool = False) -> SpeedResult:
    """Prefill ``ids (1, n)`` into a fresh cache of ``spec`` then greedy-decode ``decode_tokens``; time,
    peak memory and the bytes the cache holds at the end."""
    device = ids.device
    with torch.no_grad():
        if warmup:  # first calls pay one-off costs (allocator growth, kernel selection)
            c = make_cache(model, spec, kernels=kernels)
            try:
                prefill(model, c, ids[:, :16], prefill_chunk)
            finally:
                c.close()
            del c
        cache = make_cache(model, spec, kernels=kernels)
        try:
            with PeakMemory(device) as mem:
                _sync(device)
                t0 = time.perf_counter()
                logits = prefill(model, cache, ids, prefill_chunk)
                _sync(device)
                t1 = time.perf_counter()
                pos = ids.shape[1]
                for _ in range(decode_tokens):
                    nxt = logits.argmax().view(1, 1)
                    logits = model(input_ids=nxt, **cache_kw(model, cache), position_ids=torch.tensor([[pos]], device=device),
                                   use_cache=True).logits[0, -1]
                    pos += 1
                _sync(device)
                t2 = time.perf_counter()
            seen = cache.get_seq_length()
            if seen != pos:
                raise KVShrinkError(f"{spec}: the cache saw {seen} tokens but {pos} were fed: the model did not "
                                    "run through the compressed cache")
            cache.compact()  # after the timed steps: the bytes of what is stored (see KVShrinkCache.compact)
            nbytes, fp16 = cache.nbytes(), cache.fp16_nbytes()
            return SpeedResult(
                context_tokens=ids.shape[1], decode_tokens=decode_tokens, prefill_chunk=prefill_chunk,
                prefill_s=t1 - t0, decode_s=t2 - t1, prefill_tok_s=ids.shape[1] / (t1 - t0),
                decode_tok_s=decode_tokens / (t2 - t1) if decode_tokens else float("nan"),
                kv_bytes=nbytes, kv_tokens=seen, bytes_per_token=nbytes / seen, fp16_bytes_per_token=fp16 / seen,
                tokens_held=cache.tokens_held(), peak_mem_bytes=mem.peak, peak_mem_how=mem.how)
        finally:
            cache.close()


def is_reference(spec: str) -> bool:
    """Whether ``spec`` is the uncompressed cache (nothing to verify against it)."""
    from ..cache import resolve_methods

    return [m.name for m in resolve_methods(spec)] == ["none"]


def verify(spec: str, *, seen: int, fed: int, nbytes: int, ref_nbytes: int | None, tokens_held: list[int],
           where: str) -> None:
    """Fail loudly when compression silently did not apply (peers' complaint: KVCache-Factory #15/#54).

    * the cache must have seen every token fed (else the model ran with some other cache);
    * no layer may hold more tokens than it has seen;
    * a compressing spec must hold fewer bytes than ``none`` did for the same tokens.
    """
    if seen != fed:
        raise KVShrinkError(f"{spec} ({where}): the cache saw {seen} tokens but {fed} were fed: the model did not "
                            "run through the compressed cache")
    if any(h > seen for h in tokens_held):
        raise KVShrinkError(f"{spec} ({where}): a layer holds more tokens ({max(tokens_held)}) than it has seen ({seen})")
    if ref_nbytes is not None and not is_reference(spec) and nbytes >= ref_nbytes:
        raise KVShrinkError(
            f"{spec} ({where}): the cache holds {nbytes:,} bytes for {seen} tokens, not less than the uncompressed "
            f"cache's {ref_nbytes:,}: compression did not apply. If that is expected (e.g. a full-precision "
            "residual longer than the context), use a longer context or pass --no-verify.")
