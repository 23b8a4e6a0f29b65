"""The one evaluation protocol every KV-cache method goes through: kvshrink's and its peers' alike.

This file is executed as a script by the Python of each environment (kvshrink's own, or a peer's
virtual environment made by :mod:`kvshrink.peers.envs`), so that every method, ours and theirs, is
measured by the very same code. It imports nothing from kvshrink at module level (a peer venv does
not have kvshrink installed); only the ``kvshrink`` engine imports it, inside kvshrink's own env.

Only token ids and numbers cross the process boundary: a JSON job on stdin, a JSON answer on stdout
(everything else the libraries print goes to stderr).

Protocol (one job = one model, one text, one list of methods; fp32 unless ``dtype`` says otherwise):

1. **Reference**: an uncompressed ``DynamicCache`` goes through the steps below first; its
   next-token distributions are kept in memory to compare every method against. It runs again
   after the last method, and the faster of its two decode timings is the speed baseline.
2. **Prefill** the ``context_ids`` (N tokens) in one forward pass into the method's cache; the
   method compresses as it would in use (kvpress presses are active during this pass only, as in
   kvpress's own pipeline; kvshrink and ``QuantizedCache`` compress inside their cache).
3. **Score** the ``score_ids`` (M tokens) against that cache: the prefill's last logits predict
   score token 1; score tokens 1..M-1 are then fed in chunks of ``chunk`` tokens (1 = token by
   token), each position predicting the next, with ``position_ids`` given explicitly (continuing
   from N, so evicting caches keep true positions). Reported: perplexity over the M tokens, mean
   and max KL(reference || method) of the next-token distributions, top-1 agreement with the
   reference.
4. **Bytes**, after step 3 (N + M - 1 tokens seen): every tensor the cache holds is collected and
   its storage bytes summed, each tensor counted once. Tensor subclasses (optimum-quanto's packed
   tensors) are flattened to their plain storage tensors (codes, scales, shifts); HQQ's metadata
   dicts and any other attribute of a layer are walked; kvshrink layers list their ``stored()``
   tensors. Also reported as ``bytes16``: the same with every float tensor wider than 16 bits
   counted at 2 bytes/element, i.e. what the cache would hold if the model ran in 16-bit, so an
   fp32 CPU run does not make uncompressed or evicting caches look twice their size.
5. **Decode speed**: ``decode_ids`` (D tokens, the text after the scored part) are fed one at a
   time against the same cache; wall time per token, and its ratio to the reference's. With D = 0
   and ``chunk`` = 1, the token-by-token scoring loop of step 3 is the timed decode.
6. **Passkey**: for each trial, prefill its context (compressed as in step 2), feed the question
   uncompressed in one forward pass (positions continuing after the context), then decode greedily
   ``max_new_tokens`` tokens token by token. The generated ids are returned; the caller checks them.

A second task, ``"task": "speed"`` (:func:`run_speed_job`), measures decode speed and memory at long
context on a random-weight model built from a config (no text, no weights to ship): see its docstring.

Run: ``python worker.py < job.json > answer.json``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

PROTOCOL_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Bytes held by a cache, measured the same way for every engine
# --------------------------------------------------------------------------------------------------


def plain_tensors(obj: Any, seen_objs: set[int] | None = None, depth: int = 0) -> Iterator[Any]:
    """Every plain ``torch.Tensor`` reachable from ``obj`` (tensor subclasses flattened).

    Walks tensors, tensor subclasses implementing ``__tensor_flatten__`` (optimum-quanto's
    ``QBitsTensor``/``PackedTensor``, torch's wrapper-subclass protocol), lists, tuples, dicts, and
    the ``__dict__`` of other objects (e.g. a cache layer), at most 6 levels deep. Modules, classes
    and functions are not entered (a layer may point at the model or a quantizer object).
    """
    import types

    import torch

    seen_objs = set() if seen_objs is None else seen_objs
    if id(obj) in seen_objs or depth > 6:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) and flatten is not None:
            names, _ctx = flatten()
            for name in names:
                yield from plain_tensors(getattr(obj, name), seen_objs, depth + 1)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from plain_tensors(v, seen_objs, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from plain_tensors(v, seen_objs, depth + 1)
    elif isinstance(obj, (torch.nn.Module, type, types.FunctionType, types.MethodType, types.ModuleType,
                          str, bytes, int, float, bool)) or obj is None:
        return
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from plain_tensors(v, seen_objs, depth + 1)


def tensors_nbytes(tensors: Iterator[Any]) -> tuple[int, int]:
    """``(bytes, bytes16)`` of distinct tensors: storage bytes, and the same with float32/64 at 2 B/elem.

    Tensors are deduplicated by (data pointer, shape) so two views of one buffer count once; views
    are counted by their own extent (``numel``), not their base buffer's, which is what a cache that
    slices its storage really keeps alive only if it copies — caches here hold contiguous tensors.
    """
    total = total16 = 0
    seen: set[tuple[int, tuple[int, ...], Any]] = set()
    for t in tensors:
        if t.numel() == 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        total += n
        wide_float = t.is_floating_point() and t.element_size() > 2
        total16 += t.numel() * 2 if wide_float else n
    return total, total16


def cache_tensors(cache: Any) -> Iterator[Any]:
    """Tensors a cache holds: kvshrink layers list theirs (``stored()``); others are walked."""
    for layer in getattr(cache, "layers", []):
        stored = getattr(layer, "stored", None)
        if callable(stored):
            yield from stored()
        else:
            yield from plain_tensors(layer)


# --------------------------------------------------------------------------------------------------
# Engines: how one method builds its cache and what is active during prefill
# --------------------------------------------------------------------------------------------------


class Engine:
    """One method under test. ``new_cache()`` per run; ``prefill_context()`` wraps the prefill pass."""

    attn: str | None = None  # attention implementation the method needs (None: the model's default)

    def new_cache(self, model: Any) -> Any:
        raise NotImplementedError

    def prefill_context(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self, cache: Any) -> None:
        close = getattr(cache, "close", None)
        if callable(close):
            close()

    def extra(self, cache: Any) -> dict[str, Any]:
        return {}


class DynamicEngine(Engine):
    """Uncompressed reference: transformers' ``DynamicCache``."""

    def new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache()


class HFQuantizedEngine(Engine):
    """transformers' ``QuantizedCache`` (backends quanto / hqq / fp8), its own parameters passed through."""

    def __init__(self, backend: str, **kwargs: Any) -> None:
        self.backend, self.kwargs = backend, kwargs

    def new_cache(self, model):
        from transformers import QuantizedCache

        return QuantizedCache(backend=self.backend, config=model.config, **self.kwargs)


class KVPressEngine(Engine):
    """A kvpress press (by class name + constructor kwargs) applied during the prefill pass only.

    Nested presses are given as ``{"press": "Name", "kwargs": {...}}`` inside ``kwargs`` (e.g. the
    ``press`` argument of ``AdaKVPress``, or the list ``presses`` of ``ComposedPress``).
    """

    def __init__(self, press: str, kwargs: dict[str, Any] | None = None, attn: str | None = None) -> None:
        kvpress = importlib.import_module("kvpress")
        self.press = self._build(kvpress, press, kwargs or {})
        self.attn = attn

    @classmethod
    def _build(cls, kvpress: Any, name: str, kwargs: dict[str, Any]) -> Any:
        def conv(v: Any) -> Any:
            if isinstance(v, dict) and "press" in v:
                return cls._build(kvpress, v["press"], v.get("kwargs", {}))
            if isinstance(v, list):
                return [conv(x) for x in v]
            return v

        return getattr(kvpress, name)(**{k: conv(v) for k, v in kwargs.items()})

    def new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache()

    def prefill_context(self, model):
        return self.press(model)


class KVShrinkEngine(Engine):
    """A kvshrink spec (``make_cache(model, spec)``); only usable in kvshrink's own environment."""

    def __init__(self, spec: str, attn: str | None = None, kernels: bool = False,
                 reserve: int | str | None = None) -> None:
        self.spec = spec
        self.attn = attn
        self.kernels = kernels  # GPU: kernel layers + the "kvshrink" attention (kvshrink.kernels)
        # kernel layers' buffer size in tokens; "auto": each speed run sizes them for itself (tokens=...)
        self.reserve = reserve
        self._make_cache: Callable | None = None

    def new_cache(self, model, tokens: int | None = None):
        if self.kernels:
            from kvshrink.kernels import make_kernel_cache

            reserve = tokens if self.reserve == "auto" else self.reserve
            return make_kernel_cache(model, self.spec, reserve=reserve if isinstance(reserve, int) else None)
        if self._make_cache is None:
            from kvshrink.cache import make_cache

            self._make_cache = make_cache
        return self._make_cache(model, self.spec)

    def close(self, cache):
        super().close(cache)
        if self.kernels:
            _disable_kernels()

    def extra(self, cache):
        nbytes = getattr(cache, "nbytes", None)
        return {"own_nbytes": int(nbytes())} if callable(nbytes) else {}


class KVShrinkGraphEngine(Engine):
    """kvshrink's graph-capturable static layers (``kvshrink.kernels.graph``: ``kind`` "kivi" or "dense"),
    decoded by replaying one greedy step captured in a CUDA graph. CUDA only; speed task only (the static
    layers take one prefill into an empty cache, then single tokens, with no padding)."""

    def __init__(self, kind: str, kw: dict[str, Any] | None = None) -> None:
        self.kind, self.kw = kind, dict(kw or {})
        self.capacity = 0

    def new_cache(self, model):
        from kvshrink.kernels import make_static_cache

        return make_static_cache(model, self.capacity, kind=self.kind, **self.kw)

    def decode(self, model, cache, first, position: int, warmup: int, steps: int, sync) -> float:
        """Capture (after ``warmup`` real steps), replay ``steps`` times; seconds for the replays."""
        from kvshrink.kernels import GraphDecoder

        dec = GraphDecoder(model, cache, first, position, warmup=max(1, warmup))
        dec.step()  # the first replay (not timed)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            dec.step()
        sync()
        return time.perf_counter() - t

    def close(self, cache):
        _disable_kernels()


def make_engine(desc: dict[str, Any]) -> Engine:
    """Build an engine from its JSON description (``{"engine": ..., ...}``)."""
    kind = desc["engine"]
    if kind == "dynamic":
        return DynamicEngine()
    if kind == "hf_quantized":
        return HFQuantizedEngine(desc["backend"], **desc.get("kwargs", {}))
    if kind == "kvpress":
        return KVPressEngine(desc["press"], desc.get("kwargs"), desc.get("attn"))
    if kind == "kvshrink":
        return KVShrinkEngine(desc["spec"], desc.get("attn"), bool(desc.get("kernels")), desc.get("reserve"))
    if kind == "kvshrink_graph":
        return KVShrinkGraphEngine(desc["kind"], desc.get("kw"))
    raise ValueError(f"unknown engine {kind!r}: expected dynamic, hf_quantized, kvpress, kvshrink or kvshrink_graph")


# --------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------


_MODELS: list[Any] = []  # models built in this process (an engine that switched their attention resets it)


def _disable_kernels() -> None:
    """Give every model of this process back the attention it had before kvshrink's kernels were enabled."""
    from kvshrink.kernels import disable

    for model in list(_MODELS):
        disable(model)


class Runner:
    """Holds the model (one per attention implementation) and runs the protocol for engines."""

    def __init__(self, job: dict[str, Any]) -> None:
        import torch

        self.torch = torch
        self.job = job
        self.device = torch.device(job.get("device", "cpu"))
        self.dtype = getattr(torch, job.get("dtype", "float32"))
        self._models: dict[str | None, Any] = {}
        self.ctx = torch.tensor([job["context_ids"]], dtype=torch.long, device=self.device)
        self.score = torch.tensor([job["score_ids"]], dtype=torch.long, device=self.device)
        self.decode = [int(t) for t in job.get("decode_ids", [])]
        self.ref_logp: Any = None  # (M, V) float32 log-probs of the reference, on CPU

    def model(self, attn: str | None) -> Any:
        if attn not in self._models:
            from transformers import AutoModelForCausalLM

            kw: dict[str, Any] = {"dtype": self.dtype, "local_files_only": True}
            if attn:
                kw["attn_implementation"] = attn
            m = AutoModelForCausalLM.from_pretrained(self.job["model_dir"], **kw)
            self._models[attn] = m.to(self.device).eval()
            _MODELS.append(self._models[attn])
        return self._models[attn]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def score_run(self, engine: Engine) -> dict[str, Any]:
        """Steps 2-5: prefill, chunked scoring, bytes, timed decode steps. Returns metrics."""
        torch = self.torch
        model = self.model(engine.attn)
        n, m = self.ctx.shape[1], self.score.shape[1]
        chunk = max(1, int(self.job.get("chunk", 32)))
        cache = engine.new_cache(model)
        logps = []
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            with engine.prefill_context(model):
                out = model(input_ids=self.ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
            self._sync()
            t1 = time.perf_counter()
            logps.append(torch.log_softmax(out.logits[0, -1:].float(), -1).cpu())
            # Score tokens 2..M: feed score tokens 1..M-1 in chunks, each predicting the next one.
            for start in range(0, m - 1, chunk):
                stop = min(start + chunk, m - 1)
                pos = torch.arange(n + start, n + stop, device=self.device)[None]
                out = model(input_ids=self.score[:, start:stop], past_key_values=cache, position_ids=pos,
                            use_cache=True)
                logps.append(torch.log_softmax(out.logits[0].float(), -1).cpu())
            self._sync()
            t2 = time.perf_counter()
            seen = n + m - 1
            nbytes, nbytes16 = tensors_nbytes(cache_tensors(cache))
            extra = engine.extra(cache)
            seq_len = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else None
            # Step 6: decode speed, token by token, on the text that follows the scored tokens.
            steps = 0
            self._sync()
            t3 = time.perf_counter()
            for j, tok in enumerate(self.decode):
                pos = torch.tensor([[seen + j]], device=self.device)
                model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=cache,
                      position_ids=pos, use_cache=True)
                steps += 1
            self._sync()
            t4 = time.perf_counter()
        engine.close(cache)
        logp = torch.cat(logps)  # (M, V)
        target = self.score[0].cpu()
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        res: dict[str, Any] = {
            "ppl": math.exp(nll.mean().item()),
            "nll_mean": nll.mean().item(),
            "prefill_s": t1 - t0,
            "score_s": t2 - t1,
            "decode_s": t4 - t3,
            "decode_steps": steps,
            # speed: the dedicated decode steps if any, else the scoring loop when it is token by token
            "decode_ms_per_token": (1000 * (t4 - t3) / steps if steps else
                                    1000 * (t2 - t1) / (m - 1) if chunk == 1 and m > 1 else None),
            "tokens_seen": seen,
            "bytes": nbytes,
            "bytes16": nbytes16,
            "cache_seq_length": seq_len,
            **extra,
        }
        if self.ref_logp is None:
            self.ref_logp = logp
        ref = self.ref_logp
        kl = (ref.exp() * (ref - logp)).sum(-1)  # KL(reference || method) per scored position
        res["kl_mean"] = kl.mean().item()
        res["kl_max"] = kl.max().item()
        res["top1_agree"] = (ref.argmax(-1) == logp.argmax(-1)).float().mean().item()
        return res

    def passkey(self, engine: Engine) -> list[list[int]]:
        """Step 5: greedy answers (token ids) for each passkey trial."""
        torch = self.torch
        model = self.model(engine.attn)
        answers = []
        for trial in self.job.get("passkey", []):
            ctx = torch.tensor([trial["context_ids"]], dtype=torch.long, device=self.device)
            q = torch.tensor([trial["question_ids"]], dtype=torch.long, device=self.device)
            n = ctx.shape[1]
            cache = engine.new_cache(model)
            with torch.inference_mode():
                with engine.prefill_context(model):
                    model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
                pos = torch.arange(n, n + q.shape[1], device=self.device)[None]
                out = model(input_ids=q, past_key_values=cache, position_ids=pos, use_cache=True,
                            logits_to_keep=1)
                nxt = int(out.logits[0, -1].argmax())
                gen = [nxt]
                p = n + q.shape[1]
                for _ in range(int(trial.get("max_new_tokens", 8)) - 1):
                    out = model(input_ids=torch.tensor([[nxt]], device=self.device), past_key_values=cache,
                                position_ids=torch.tensor([[p]], device=self.device), use_cache=True)
                    nxt = int(out.logits[0, -1].argmax())
                    gen.append(nxt)
                    p += 1
            engine.close(cache)
            answers.append(gen)
        return answers


# --------------------------------------------------------------------------------------------------
# Speed and memory at long context (GPU): random-weight model, random token ids, no text needed
# --------------------------------------------------------------------------------------------------


def random_model(job: dict[str, Any], attn: str | None) -> Any:
    """A random-weight model from ``job["model_config"]`` (``model_type`` + config fields), built on the
    job's device in its dtype with seed ``job["seed"]``: the same weights in every environment that has
    the same torch. No weights travel and no hub is reached."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(job["model_config"])
    dtype = getattr(torch, job.get("dtype", "bfloat16"), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {job.get('dtype')!r} is not a torch dtype (bfloat16, float16, float32)")
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(int(job.get("seed", 0)))
    with torch.device(job.get("device", "cuda")):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn or "sdpa")
    model.eval()
    _MODELS.append(model)
    return model


def speed_run(model: Any, engine: Engine, batch: int, context: int, steps: int, warmup: int, seed: int
              ) -> dict[str, Any]:
    """Prefill ``batch`` x ``context`` random token ids into the method's cache (its press active), then
    ``warmup`` + ``steps`` greedy decode steps, the last ``steps`` timed. Memory from torch's allocator,
    relative to what was allocated before the prefill (the weights): peak during prefill, held after it
    (the cache, plus a few KB of logits), peak during decoding. Bytes of the cache counted as in
    :func:`cache_tensors` after the last step."""
    import torch

    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(dev)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    mem = (lambda: torch.cuda.memory_allocated(dev)) if cuda else (lambda: 0)
    peak = (lambda: torch.cuda.max_memory_allocated(dev)) if cuda else (lambda: 0)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    base = mem()
    total = context + warmup + steps + 2
    if isinstance(engine, KVShrinkGraphEngine):
        engine.capacity = total
    # kernel layers with reserve="auto": buffers sized once for exactly this run (no regrowth copies)
    cache = engine.new_cache(model, tokens=total) if isinstance(engine, KVShrinkEngine) else engine.new_cache(model)
    with torch.inference_mode() if not isinstance(engine, KVShrinkGraphEngine) else torch.no_grad():
        sync()
        t0 = time.perf_counter()
        with engine.prefill_context(model):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync()
        t1 = time.perf_counter()
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        prefill_peak = peak() - base
        held = mem() - base
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        if isinstance(engine, KVShrinkGraphEngine):
            elapsed = engine.decode(model, cache, nxt, context, warmup, steps, sync)
        else:
            t2 = time.perf_counter()
            for i in range(warmup + steps):
                if i == warmup:
                    sync()
                    t2 = time.perf_counter()
                pos = torch.full((batch, 1), context + i, device=dev, dtype=torch.long)
                out = model(input_ids=nxt, past_key_values=cache, position_ids=pos, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                del out
            sync()
            elapsed = time.perf_counter() - t2
    decode_peak = peak() - base
    nbytes, nbytes16 = tensors_nbytes(cache_tensors(cache))
    extra = engine.extra(cache)
    engine.close(cache)
    del cache
    ms = 1000 * elapsed / steps if steps else None
    tokens = context + warmup + steps
    return {"batch": batch, "context": context, "steps": steps, "prefill_s": t1 - t0, "decode_ms_per_step": ms,
            "decode_tokens_per_s": batch * 1000 / ms if ms else None, "bytes": nbytes, "bytes16": nbytes16,
            "bytes_per_token": nbytes / (batch * tokens), "mem_after_prefill": held,
            "prefill_peak_mem": prefill_peak, "decode_peak_mem": decode_peak, **extra}


def run_speed_job(job: dict[str, Any]) -> dict[str, Any]:
    """For every setting (batch, context): the uncompressed reference, then every method, then the
    reference again (its faster decode is the baseline of ``decode_speedup_vs_ref``). With ``warm_context``,
    each run is preceded by an untimed one over that many tokens (first-call costs: Triton compiling a
    kernel, a backend building its extension, cuBLAS picking algorithms, stay out of the timings). A
    failing method (out of memory, an unsupported model) is recorded with its error, and the allocator is
    emptied."""
    import torch

    if job.get("device", "cuda").startswith("cuda") and job.get("sdpa_flash", True):
        # The same SDPA kernel for every library: PyTorch's default on Hopper (cuDNN attention) plans again
        # for every new KV length, ~1.5 ms of host time per call, so the first run over a set of lengths
        # is 2-4x slower than a repeat (measured: 64-105 vs 20-28 ms per step for DynamicCache).
        torch.backends.cuda.enable_cudnn_sdp(False)
    models: dict[str | None, Any] = {}
    results: list[dict[str, Any]] = []
    steps, warmup, seed = int(job.get("steps", 16)), int(job.get("warmup", 4)), int(job.get("seed", 0))
    warm_context = int(job.get("warm_context", 0))  # a short untimed run of each method before its timed one
    ref_desc = {"engine": "dynamic"}
    for batch, context in job["settings"]:
        rows: list[dict[str, Any]] = []
        todo = [("reference (DynamicCache)", ref_desc), *[(m["label"], m["desc"]) for m in job.get("methods", [])],
                ("reference (repeat)", ref_desc)]
        for label, desc in todo:
            entry: dict[str, Any] = {"label": label, "desc": desc, "batch": batch, "context": context}
            try:
                engine = make_engine(desc)
                if engine.attn not in models:
                    models[engine.attn] = random_model(job, engine.attn)
                if warm_context:  # compile kernels / tune libraries on a short run first: not timed
                    speed_run(models[engine.attn], engine, batch, min(warm_context, context), 2, 1, seed)
                entry.update(speed_run(models[engine.attn], engine, batch, context, steps, warmup, seed))
                entry["ok"] = True
            except Exception as exc:
                entry.update(ok=False, error=f"{type(exc).__name__}: {exc}".strip()[:2000],
                             traceback=traceback.format_exc()[-4000:])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if job.get("progress_path"):
                with open(job["progress_path"], "a", encoding="utf-8") as f:
                    f.write(json.dumps({k: v for k, v in entry.items() if k != "traceback"}) + "\n")
            rows.append(entry)
        refs = [r["decode_ms_per_step"] for r in rows if r["label"].startswith("reference") and r.get("ok")]
        base = min(refs, default=None)
        for r in rows:
            if r.get("ok") and base and r.get("decode_ms_per_step"):
                r["decode_speedup_vs_ref"] = base / r["decode_ms_per_step"]
        results.extend(r for r in rows if r["label"] != "reference (repeat)")
        results.append({"label": "reference decode ms (both runs)", "batch": batch, "context": context,
                        "ok": True, "reference_ms": refs})
    dev = torch.device(job.get("device", "cuda"))
    return {"protocol_version": PROTOCOL_VERSION, "task": "speed", "versions": versions(), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "dtype": job.get("dtype", "bfloat16"), "results": results}


def versions() -> dict[str, str]:
    """Versions of the packages that matter, as installed in this environment."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "kvpress", "optimum-quanto", "hqq", "kvshrink", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run the reference then every method of ``job``; a failing method is recorded, not fatal."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job.get("seed", 0)))
    runner = Runner(job)
    results: list[dict[str, Any]] = []
    ref_speed: list[float | None] = []

    def one(label: str, desc: dict[str, Any], is_ref: bool = False) -> dict[str, Any]:
        entry: dict[str, Any] = {"label": label, "desc": desc}
        try:
            engine = make_engine(desc)
            entry.update(runner.score_run(engine))
            entry["passkey_answers"] = runner.passkey(engine) if job.get("passkey") else []
            entry["ok"] = True
        except Exception as exc:  # a peer failing is a result to record, not a crash
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
            if is_ref:
                raise
        if job.get("progress_path"):  # one JSON line per finished method: a long run can be followed
            with open(job["progress_path"], "a", encoding="utf-8") as f:
                f.write(json.dumps({k: v for k, v in entry.items() if k != "traceback"}) + "\n")
        return entry

    ref = one("reference (DynamicCache)", {"engine": "dynamic"}, is_ref=True)
    ref_speed.append(ref["decode_ms_per_token"])
    results.append(ref)
    for item in job.get("methods", []):
        results.append(one(item["label"], item["desc"]))
    # A second reference run at the end: CPU time on a shared machine drifts; the speed ratio uses
    # the faster of the two reference runs, and their spread is reported as the timing noise.
    if job.get("methods"):
        again = one("reference (repeat)", {"engine": "dynamic"}, is_ref=True)
        ref_speed.append(again["decode_ms_per_token"])
    base = min((x for x in ref_speed if x), default=None)
    for r in results:
        if r.get("ok") and base and r.get("decode_ms_per_token"):
            r["decode_vs_ref"] = r["decode_ms_per_token"] / base
    return {
        "protocol_version": PROTOCOL_VERSION,
        "versions": versions(),
        "device": str(runner.device),
        "dtype": job.get("dtype", "float32"),
        "threads": torch.get_num_threads(),
        "reference_decode_ms_per_token": ref_speed,
        "results": results,
    }


def main() -> int:
    job = json.load(sys.stdin)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the JSON answer
    try:
        answer = run_speed_job(job) if job.get("task") == "speed" else run_job(job)
    except Exception as exc:
        answer = {"fatal": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:],
                  "versions": versions()}
    finally:
        sys.stdout = real_stdout
    json.dump(answer, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0 if "fatal" not in answer else 1


if __name__ == "__main__":
    raise SystemExit(main())
