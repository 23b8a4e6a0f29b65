"""The evaluation harness: runs every method spec through the same tokens, tasks and settings, and
collects one result row per method (``kvshrink eval`` is a thin CLI over :func:`run`).

Tasks (``EvalConfig.tasks``):

* ``ppl``: perplexity with the compressed cache in the loop (:mod:`.ppl`; mode ``chunked`` by default);
* ``kl``: KL(none || method) and top-1 agreement of next-token distributions on the same scored tokens
  (same forward passes as ``ppl``; ``none`` is the reference and is always evaluated, first);
* ``passkey`` / ``needle``: retrieval over a context-length x depth grid (:mod:`.passkey`);
* ``memory`` / ``speed``: bytes per token, peak memory, prefill and decode tokens/s (:mod:`.memory`),
  each also as a ratio to ``none`` measured in the same run.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import resolve_methods
from ..errors import KVShrinkError
from . import memory as mem
from . import passkey as pk
from .fidelity import Accumulator, kl_divergence, token_nll, top1_agreement
from .ppl import MODES, check_window, first_scored_position, run_window, split_windows

TASKS = ("ppl", "kl", "passkey", "needle", "memory", "speed")
REFERENCE = "none"


@dataclass
class EvalConfig:
    """Every setting of an evaluation (all of it is written beside the results)."""

    methods: list[str] = field(default_factory=lambda: ["none", "int8", "kivi:bits=2"])
    tasks: list[str] = field(default_factory=lambda: ["ppl", "kl", "passkey", "memory", "speed"])
    model: str = "default"
    texts: list[str] = field(default_factory=lambda: ["lcet10"])
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    # perplexity / fidelity
    # Default mode: decode (each scored token predicted from the compressed past alone, as in generation)
    # after a long prompt, which bounds the cost to the scored tokens. Chunked evaluation is cheaper but
    # flatters methods without a full-precision residual, since a chunk attends to itself uncompressed:
    # measured on the default model (lcet10, int4, one 1024-token window), dPPL 5.02 in decode mode but
    # 3.43 / 3.13 / 2.29 / 0.96 at chunk sizes 4 / 8 / 32 / 128 (kivi:bits=2, with its 128-token residual:
    # 9.8 vs 10.0 / 10.1 / 9.9 / 9.7).
    max_tokens: int = 2048
    window: int = 1024
    mode: str = "decode"
    chunk_size: int = 32
    prompt_tokens: int = 768
    # retrieval
    haystack: list[str] = field(default_factory=lambda: ["lcet10"])
    passkey_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_trials: int = 1
    prefill_chunk: int = 256
    # memory / speed
    speed_tokens: int = 1024
    decode_tokens: int = 32
    verify: bool = True
    progress: bool = True
    # GPU kernels: "auto" serves the caches with kvshrink's Triton kernels on CUDA (decode over the packed cache,
    # chunked prefill over it), "on" insists (an error off CUDA), "off" keeps the torch path everywhere
    kernels: str = "auto"
    threads: int | None = None  # torch CPU threads; None: torch's default

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise KVShrinkError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(TASKS)}")
        if not self.methods:
            raise KVShrinkError("no methods to evaluate; pass --methods SPEC [SPEC ...] or --methods-file FILE")
        for spec in self.methods:  # fail on a bad spec before loading anything
            resolve_methods(spec)
        if self.mode not in MODES:
            raise KVShrinkError(f"unknown --mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if {"ppl", "kl"} & set(self.tasks):
            check_window(min(self.window, self.max_tokens), self.prompt_tokens, self.chunk_size, self.mode)
        for name, v in (("--prefill-chunk", self.prefill_chunk), ("--passkey-trials", self.passkey_trials),
                        ("--speed-tokens", self.speed_tokens)):
            if v < 1:
                raise KVShrinkError(f"{name} must be at least 1, got {v}")
        if self.threads is not None and self.threads < 1:
            raise KVShrinkError(f"--threads must be at least 1, got {self.threads}")
        if self.decode_tokens < 1:
            raise KVShrinkError(f"--decode-tokens must be at least 1, got {self.decode_tokens}")
        from ..kernels._triton import KERNEL_CHOICES

        if self.kernels not in KERNEL_CHOICES:
            raise KVShrinkError(f"unknown --kernels {self.kernels!r}; choose one of {', '.join(KERNEL_CHOICES)}")

    def ordered_methods(self) -> list[str]:
        """The specs to run, ``none`` first (the reference every ratio and KL is taken against), no duplicates."""
        out: list[str] = [REFERENCE]
        for s in self.methods:
            s = s.strip()
            if s and s not in out:
                out.append(s)
        return out


PRESETS: dict[str, dict[str, Any]] = {
    # The README's first command: the headline comparison in a few minutes on 2 CPU cores.
    "demo": dict(methods=["none", "int8", "kivi:bits=2", "rotatekv:bits=2"],
                 tasks=["ppl", "kl", "passkey", "memory", "speed"], max_tokens=2048, window=1024, mode="decode",
                 prompt_tokens=896, passkey_lengths=[512, 1024],
                 passkey_depths=[0.0, 0.5, 1.0], passkey_trials=1, speed_tokens=1024, decode_tokens=16,
                 # one thread: on a CPU shared with other jobs, torch's 2 busy-waiting threads can run 10-20x
                 # slower than one (measured here); on an idle 2-core machine one thread costs ~1.5x
                 threads=1),
    # The baselines table (README): uniform quantizers at 8/4/2 bits.
    "baselines": dict(methods=["none", "int8", "int4", "kivi:bits=4", "kivi:bits=2"],
                      tasks=["ppl", "kl", "passkey", "memory", "speed"], max_tokens=2048, window=1024,
                      mode="decode", prompt_tokens=768, passkey_lengths=[512, 1024, 2048],
                      passkey_depths=[0.0, 0.5, 1.0], passkey_trials=1),
}


def preset(name: str) -> dict[str, Any]:
    """A preset's settings; methods not registered in this installation are dropped (e.g. rotatekv)."""
    from ..registry import method_names

    if name not in PRESETS:
        raise KVShrinkError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    p = dict(PRESETS[name])
    known = set(method_names())
    p["methods"] = [m for m in p["methods"] if m.split(":")[0] in known]
    return p


def _tqdm(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr, dynamic_ncols=True)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_kernels(cfg: EvalConfig, device: torch.device) -> bool:
    """Whether caches are served by the GPU kernels: ``cfg.kernels`` resolved for ``device``."""
    from ..kernels._triton import kernels_for

    return kernels_for(cfg.kernels, device)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)  # methods that draw random numbers (random rotations) get the same draws


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------

def eval_ppl(model: Any, ids: torch.Tensor, specs: list[str], cfg: EvalConfig,
             kernels: bool = False) -> dict[str, dict[str, Any]]:
    """Perplexity, KL and top-1 of every spec over the same windows; ``specs[0]`` is the reference."""
    windows = split_windows(ids, cfg.window, cfg.max_tokens)
    first = first_scored_position(cfg.prompt_tokens)
    accs = {s: Accumulator() for s in specs}
    times = {s: 0.0 for s in specs}
    bytes_ = {s: [0, 0, 0] for s in specs}  # nbytes, fp16 nbytes, tokens, summed over windows
    bar = _tqdm(len(windows) * len(specs), f"ppl ({cfg.mode})", cfg.progress)
    for w in windows:
        targets_all = w[0]
        n_scored = w.shape[1] - 1 - first
        ref: dict[str, torch.Tensor] = {}  # the reference's log-probs of this window's scored positions
        ref_nbytes = None
        for spec in specs:
            is_ref = spec == specs[0]

            def on_logits(pos: int, logits: torch.Tensor, spec=spec, is_ref=is_ref) -> None:
                logp = torch.log_softmax(logits.float(), dim=-1)
                n = logp.shape[0]
                i = pos - first
                nll = token_nll(logp, targets_all[pos + 1:pos + 1 + n])
                if is_ref:
                    if "logp" not in ref:
                        ref["logp"] = torch.empty(n_scored, logp.shape[1], dtype=torch.float32, device=logp.device)
                    ref["logp"][i:i + n] = logp
                    accs[spec].add(nll.cpu(), torch.zeros(n), torch.ones(n, dtype=torch.bool))
                else:
                    r = ref["logp"][i:i + n]
                    accs[spec].add(nll.cpu(), kl_divergence(r, logp).cpu(), top1_agreement(r, logp).cpu())

            _seed(cfg.seed)
            t0 = time.perf_counter()
            res = run_window(model, w, spec, on_logits, mode=cfg.mode, chunk_size=cfg.chunk_size,
                             prompt_tokens=cfg.prompt_tokens, kernels=kernels)
            times[spec] += time.perf_counter() - t0
            if cfg.verify:
                mem.verify(spec, seen=res.seq_length, fed=res.tokens_fed, nbytes=res.nbytes,
                           ref_nbytes=None if is_ref else ref_nbytes, tokens_held=res.tokens_held, where="perplexity window")
            if is_ref:
                ref_nbytes = res.nbytes
            b = bytes_[spec]
            b[0] += res.nbytes
            b[1] += res.fp16_nbytes
            b[2] += res.seq_length
            bar.update(1)
        del ref
    bar.close()
    out = {}
    for s in specs:
        a = accs[s]
        expected = len(windows) * (windows[0].shape[1] - 1 - first)
        if a.tokens != expected:  # every scored token must have been predicted exactly once
            raise KVShrinkError(f"{s}: scored {a.tokens} tokens, expected {expected} (internal error)")
        out[s] = dict(ppl=a.ppl, nll=a.nll_sum / a.tokens, kl=a.kl, kl_max=a.kl_max, top1=a.top1, ppl_tokens=a.tokens,
                      ppl_windows=len(windows), ppl_window_tokens=int(windows[0].shape[1]),
                      ppl_bytes_per_token=bytes_[s][0] / bytes_[s][2], ppl_fp16_bytes_per_token=bytes_[s][1] / bytes_[s][2],
                      ppl_time_s=times[s])
    return out


def eval_retrieval(model: Any, tokenizer: Any, hay: pk.Haystack, specs: list[str], cfg: EvalConfig,
                   kind: str, kernels: bool = False) -> dict[str, dict[str, Any]]:
    samples = pk.build_grid(tokenizer, hay, kind, cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_trials, cfg.seed)
    digits = pk.TEMPLATES[kind].digits
    bar = _tqdm(len(samples) * len(specs), kind, cfg.progress)
    out = {}
    for spec in specs:
        t0 = time.perf_counter()
        answers = []
        for s in samples:
            _seed(cfg.seed)
            answers.append(pk.greedy_answer(model, tokenizer, spec, s.input_ids, prefill_chunk=cfg.prefill_chunk,
                                            max_new_tokens=digits + 12,  # room for a few words before the number
                                            kernels=kernels))
            bar.update(1)
        sc = pk.score(samples, answers)
        out[spec] = {f"{kind}_acc": sc["acc"], f"{kind}_grid": sc["grid"], f"{kind}_time_s": time.perf_counter() - t0,
                     f"{kind}_answers": [{"length": s.length, "depth": s.depth, "actual_depth": round(s.actual_depth, 4),
                                          "key": s.key, "answer": a} for s, a in zip(samples, answers)]}
    bar.close()
    return out


def eval_memory_speed(model: Any, ids: torch.Tensor, specs: list[str], cfg: EvalConfig,
                      kernels: bool = False) -> dict[str, dict[str, Any]]:
    n = min(cfg.speed_tokens, ids.shape[1])
    context = ids[:, :n]
    bar = _tqdm(len(specs), "memory/speed", cfg.progress)
    out: dict[str, dict[str, Any]] = {}
    ref = None
    for spec in specs:
        _seed(cfg.seed)
        r = mem.measure(model, spec, context, prefill_chunk=cfg.prefill_chunk, decode_tokens=cfg.decode_tokens,
                        kernels=kernels)
        if cfg.verify:
            mem.verify(spec, seen=r.kv_tokens, fed=n + cfg.decode_tokens, nbytes=r.kv_bytes,
                       ref_nbytes=None if ref is None else ref.kv_bytes, tokens_held=r.tokens_held, where="memory/speed run")
        if ref is None:
            ref = r
        d = r.as_dict()
        d.pop("tokens_held")
        d["speed_context_tokens"] = d.pop("context_tokens")
        d["prefill_tok_s_ratio"] = r.prefill_tok_s / ref.prefill_tok_s
        d["decode_tok_s_ratio"] = r.decode_tok_s / ref.decode_tok_s
        d["peak_mem_ratio"] = (r.peak_mem_bytes / ref.peak_mem_bytes
                               if r.peak_mem_bytes is not None and ref.peak_mem_bytes else None)
        out[spec] = d
        bar.update(1)
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------

def evaluate(model: Any, tokenizer: Any, text: str, cfg: EvalConfig, haystack_text: str | None = None) -> list[dict[str, Any]]:
    """Run ``cfg.tasks`` for every method on ``model``; one result dict per method, ``none`` first."""
    cfg.check()
    specs = cfg.ordered_methods()
    tasks = set(cfg.tasks)
    device = next(model.parameters()).device
    rows: dict[str, dict[str, Any]] = {}
    for s in specs:
        canon = "+".join(m.spec() for m in resolve_methods(s))
        rows[s] = dict(method=s, spec=canon, ppl=None, delta_ppl=None, kl=None, top1=None, passkey_acc=None,
                       needle_acc=None, bytes_per_token=None, fp16_bytes_per_token=None, bytes_vs_fp16=None,
                       peak_mem_bytes=None, peak_mem_mb=None, peak_mem_ratio=None, prefill_tok_s=None,
                       decode_tok_s=None, prefill_tok_s_ratio=None, decode_tok_s_ratio=None)
    kernels = use_kernels(cfg, device)
    try:
        _evaluate(model, tokenizer, text, cfg, haystack_text, specs, tasks, device, rows, kernels)
    finally:
        if kernels:  # make_cache(..., kernels=True) switched the model's attention: switch it back
            from ..kernels import disable

            disable(model)
    for r in rows.values():
        r["kernels_used"] = kernels
        if r["bytes_per_token"] is not None:
            r["bytes_vs_fp16"] = r["bytes_per_token"] / r["fp16_bytes_per_token"]
    return list(rows.values())


def _evaluate(model, tokenizer, text, cfg, haystack_text, specs, tasks, device, rows, kernels) -> None:
    needs_text = bool(tasks & {"ppl", "kl", "memory", "speed"})
    ids = None
    if needs_text:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
    if tasks & {"ppl", "kl"}:
        res = eval_ppl(model, ids, specs, cfg, kernels)
        ref_ppl = res[specs[0]]["ppl"]
        for s in specs:
            r = res[s]
            rows[s].update(r)
            rows[s]["delta_ppl"] = r["ppl"] - ref_ppl
            if "ppl" not in tasks:
                rows[s]["ppl"] = rows[s]["delta_ppl"] = None
            if "kl" not in tasks:
                rows[s]["kl"] = rows[s]["kl_max"] = rows[s]["top1"] = None
            rows[s]["bytes_per_token"] = r["ppl_bytes_per_token"]
            rows[s]["fp16_bytes_per_token"] = r["ppl_fp16_bytes_per_token"]
            rows[s]["bytes_measured_on"] = f"cache at the end of each {r['ppl_window_tokens']}-token perplexity window"
    for kind in ("passkey", "needle"):
        if kind in tasks:
            hay = pk.Haystack(tokenizer, haystack_text if haystack_text is not None else text)
            for s, r in eval_retrieval(model, tokenizer, hay, specs, cfg, kind, kernels).items():
                rows[s].update(r)
    if tasks & {"memory", "speed"}:
        for s, r in eval_memory_speed(model, ids, specs, cfg, kernels).items():
            if "memory" in tasks:
                rows[s].update(bytes_per_token=r["bytes_per_token"], fp16_bytes_per_token=r["fp16_bytes_per_token"],
                               kv_bytes=r["kv_bytes"], kv_tokens=r["kv_tokens"], peak_mem_bytes=r["peak_mem_bytes"],
                               peak_mem_mb=None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20,
                               peak_mem_ratio=r["peak_mem_ratio"], peak_mem_how=r["peak_mem_how"],
                               bytes_measured_on=f"cache after prefilling {r['speed_context_tokens']} tokens "
                                                 f"and decoding {r['decode_tokens']}")
            if "speed" in tasks:
                rows[s].update({k: r[k] for k in ("prefill_tok_s", "decode_tok_s", "prefill_tok_s_ratio",
                                                   "decode_tok_s_ratio", "prefill_s", "decode_s", "prefill_chunk",
                                                   "speed_context_tokens", "decode_tokens")})


def settings(cfg: EvalConfig, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Settings written into every result row: enough to reproduce the run."""
    d = dataclasses.asdict(cfg)
    d.pop("progress")
    d.pop("methods")
    p = next(model.parameters())
    d.update(model_name_or_path=getattr(model.config, "_name_or_path", ""), model_type=model.config.model_type,
             threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(), device_used=str(p.device),
             dtype_used=str(p.dtype).replace("torch.", ""),
             kv_dtype_note=("the uncompressed cache holds K/V in the model's dtype; bytes_vs_fp16 compares with "
                            "a 16-bit cache for the same tokens"))
    try:
        import transformers

        d["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return d


def describe_settings(cfg: EvalConfig, rows: list[dict[str, Any]]) -> str:
    """The lines printed under the table: what exactly was measured."""
    lines = []
    t = set(cfg.tasks)
    r0 = rows[0]
    if t & {"ppl", "kl"}:
        mode = {"chunked": f"chunked prefill, {cfg.chunk_size} tokens per forward pass after a {cfg.prompt_tokens}-token prompt",
                "decode": f"token-by-token decoding after a {cfg.prompt_tokens}-token prompt",
                "simulated": "SIMULATED (papers' mode: each window in one pass attending to its own quantized K/V)"}[cfg.mode]
        lines.append(f"- perplexity/KL/top-1: {r0.get('ppl_tokens')} scored tokens in {r0.get('ppl_windows')} windows of "
                     f"{r0.get('ppl_window_tokens')} tokens (fresh cache each) of {', '.join(cfg.texts)}; mode: {mode}. "
                     f"Tokens inside the prompt are not scored. KL = KL(none || method), nats/token.")
    for kind in ("passkey", "needle"):
        if kind in t:
            lines.append(f"- {kind}: greedy answer from the compressed cache after a chunked prefill "
                         f"({cfg.prefill_chunk} tokens per pass); lengths {cfg.passkey_lengths} x depths "
                         f"{cfg.passkey_depths} x {cfg.passkey_trials} trial(s); haystack: {', '.join(cfg.haystack)}.")
    if t & {"memory", "speed"}:
        lines.append(f"- memory/speed: prefill {r0.get('speed_context_tokens') or cfg.speed_tokens} tokens ({cfg.prefill_chunk} per pass), "
                     f"then {cfg.decode_tokens} greedy decode steps; KV bytes = cache.nbytes() / tokens seen; "
                     f"x fp16 = / cache.fp16_nbytes() (a 16-bit cache of the same tokens; 'none' holds the "
                     f"model's dtype, {r0.get('dtype_used', cfg.dtype)}); ratios are to 'none' in this run.")
    if r0.get("peak_mem_how"):
        lines.append(f"- peak memory: {r0['peak_mem_how']} (includes activations, not only the cache).")
    lines.append(f"- model {cfg.model} ({cfg.dtype}, {r0.get('device_used', cfg.device)}, "
                 f"{torch.get_num_threads()} CPU threads), seed {cfg.seed}; "
                 + ("attention over the packed caches by kvshrink's GPU kernels where they serve (--kernels)."
                    if r0.get("kernels_used") else "attention over dequantized K/V (torch path)."))
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], cfg: EvalConfig, out: Path) -> list[Path]:
    """results.json, results.csv, pareto.png and one heatmap per method and retrieval task, into ``out``."""
    from . import plots, report

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.csv"]
    report.write_json(rows, written[0])
    report.write_csv(rows, written[1])
    p = plots.pareto_plot(rows, out / "pareto.png", title=f"{cfg.model}, {', '.join(cfg.texts)}, mode {cfg.mode}")
    if p:
        written.append(p)
    for r in rows:
        for kind in ("passkey", "needle"):
            if r.get(f"{kind}_grid"):
                written.append(plots.heatmap(r[f"{kind}_grid"], out / f"{kind}_{plots.slug(r['method'])}.png",
                                             f"{kind}: {r['method']}"))
    return written


def run(cfg: EvalConfig, out: Path | None = None, echo=print) -> list[dict[str, Any]]:
    """Load the model and texts, evaluate, print the table and write the outputs (if ``out``)."""
    cfg.check()
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, echo)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: EvalConfig, out: Path | None, echo) -> list[dict[str, Any]]:
    from ..assets import read_texts
    from ..models import load_model
    from . import report

    t0 = time.perf_counter()
    device = _pick_device(cfg.device)
    text = read_texts(cfg.texts) if set(cfg.tasks) & {"ppl", "kl", "memory", "speed"} else ""
    hay = read_texts(cfg.haystack) if set(cfg.tasks) & {"passkey", "needle"} else None
    model, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=device)
    t1 = time.perf_counter()
    rows = evaluate(model, tokenizer, text, cfg, haystack_text=hay)
    t2 = time.perf_counter()
    common = settings(cfg, model, tokenizer)
    common.update(setup_s=round(t1 - t0, 2), eval_s=round(t2 - t1, 2))
    rows = [{**r, **{k: v for k, v in common.items() if k not in r}} for r in rows]
    label = {"chunked": f"chunked prefill ({cfg.chunk_size} tokens/pass)", "decode": "token-by-token decode",
             "simulated": "SIMULATED quantization (papers' one-pass mode, not what serving sees)"}[cfg.mode]
    echo(f"### KV cache methods: model {cfg.model}, text {', '.join(cfg.texts)}"
         + (f", perplexity mode: {label}" if set(cfg.tasks) & {"ppl", "kl"} else ""))
    echo("")
    echo(report.markdown_table(rows))
    echo("")
    echo(describe_settings(cfg, rows))
    echo(f"- wall time: {t2 - t1:.0f} s evaluating (+{t1 - t0:.0f} s loading).")
    if out is not None:
        for p in write_outputs(rows, cfg, out):
            echo(f"wrote {p}")
    return rows
