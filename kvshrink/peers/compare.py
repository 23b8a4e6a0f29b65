"""Side-by-side comparison of kvshrink with its peers, through one protocol, in one run.

What is compared (all on the same model, the same token ids, the same budget):

- kvshrink's own methods, in kvshrink's environment (``engine="kvshrink"``);
- NVIDIA kvpress presses, in a kvpress venv (:data:`kvshrink.peers.envs.PEER_ENVS`);
- transformers' ``QuantizedCache`` (optimum-quanto, HQQ, fp8 backends), in a venv with those.

Each environment runs :mod:`kvshrink.peers.worker` (the same file) with its own Python; only token
ids and numbers are exchanged. The text is tokenized here once, so every environment scores the
very same ids. See the worker's docstring for the protocol itself.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import KVShrinkError

WORKER = Path(__file__).with_name("worker.py")

__all__ = [
    "KVPRESS_METHODS",
    "HFQUANT_METHODS",
    "OURS_SPECS",
    "PeerMethod",
    "build_job_inputs",
    "build_passkey_trials",
    "format_table",
    "ours_methods",
    "passkey_success",
    "pareto_plot",
    "run_worker",
    "summarize",
]


@dataclass(frozen=True)
class PeerMethod:
    """One method to run: a table label, the env it runs in, its engine description, its family.

    ``budget`` is the nominal share of the context kept (1.0 for quantizers: they keep every
    token), for the reader; the bytes column is the measured truth.
    """

    label: str
    env: str  # "ours", or a key of PEER_ENVS
    desc: dict[str, Any]
    kind: str  # "quantization", "eviction", "channels" or "reference"
    budget: float = 1.0
    note: str = ""

    @property
    def library(self) -> str:
        return {"ours": "kvshrink", "kvpress": "kvpress", "hfquant": "transformers"}.get(self.env, self.env)


#: kvshrink specs compared (label = spec). Methods not registered in this checkout are skipped.
#: Budgets match the peers' ``compression_ratio=0.5`` (half the context kept).
OURS_SPECS: list[tuple[str, str, float]] = [
    ("none", "reference", 1.0),
    ("kivi:bits=4", "quantization", 1.0),
    ("kivi:bits=2", "quantization", 1.0),
    ("int4", "quantization", 1.0),
    ("rotatekv:bits=2", "quantization", 1.0),
    ("streamingllm:budget=0.5", "eviction", 0.5),
    ("snapkv:budget=0.5", "eviction", 0.5),
    ("pyramidkv:budget=0.5", "eviction", 0.5),
    ("h2o:budget=0.5", "eviction", 0.5),
    ("ems:budget=0.5", "eviction", 0.5),
    ("think:ratio=0.5", "channels", 0.75),
    ("snapkv:budget=0.5+kivi:bits=4", "eviction", 0.5),
]

#: kvpress presses compared, at the same budget (compression_ratio=0.5: half the context evicted).
KVPRESS_METHODS: list[PeerMethod] = [
    PeerMethod("StreamingLLMPress(0.5)", "kvpress", {"engine": "kvpress", "press": "StreamingLLMPress",
               "kwargs": {"compression_ratio": 0.5}}, "eviction", 0.5),
    PeerMethod("SnapKVPress(0.5)", "kvpress", {"engine": "kvpress", "press": "SnapKVPress",
               "kwargs": {"compression_ratio": 0.5}}, "eviction", 0.5),
    PeerMethod("PyramidKVPress(0.5)", "kvpress", {"engine": "kvpress", "press": "PyramidKVPress",
               "kwargs": {"compression_ratio": 0.5}}, "eviction", 0.5),
    PeerMethod("ObservedAttentionPress(0.5) [H2O-like, eager]", "kvpress",
               {"engine": "kvpress", "press": "ObservedAttentionPress", "kwargs": {"compression_ratio": 0.5},
                "attn": "eager"}, "eviction", 0.5),
    PeerMethod("TOVAPress(0.5)", "kvpress", {"engine": "kvpress", "press": "TOVAPress",
               "kwargs": {"compression_ratio": 0.5}}, "eviction", 0.5),
    PeerMethod("KnormPress(0.5)", "kvpress", {"engine": "kvpress", "press": "KnormPress",
               "kwargs": {"compression_ratio": 0.5}}, "eviction", 0.5),
    PeerMethod("ExpectedAttentionPress(0.5)", "kvpress", {"engine": "kvpress", "press": "ExpectedAttentionPress",
               "kwargs": {"compression_ratio": 0.5}}, "eviction", 0.5),
    PeerMethod("ThinKPress(0.5)", "kvpress", {"engine": "kvpress", "press": "ThinKPress",
               "kwargs": {"key_channel_compression_ratio": 0.5}}, "channels", 0.75,
               "zeroes pruned key channels in place: no bytes freed (kvpress docstring)"),
]

#: transformers' QuantizedCache, each backend with transformers' defaults (group 64, residual 128).
HFQUANT_METHODS: list[PeerMethod] = [
    PeerMethod("QuantizedCache(quanto, 4-bit)", "hfquant",
               {"engine": "hf_quantized", "backend": "quanto", "kwargs": {"nbits": 4}}, "quantization"),
    PeerMethod("QuantizedCache(quanto, 2-bit)", "hfquant",
               {"engine": "hf_quantized", "backend": "quanto", "kwargs": {"nbits": 2}}, "quantization"),
    PeerMethod("QuantizedCache(hqq, 4-bit)", "hfquant",
               {"engine": "hf_quantized", "backend": "hqq", "kwargs": {"nbits": 4}}, "quantization"),
    PeerMethod("QuantizedCache(hqq, 2-bit)", "hfquant",
               {"engine": "hf_quantized", "backend": "hqq", "kwargs": {"nbits": 2}}, "quantization"),
    PeerMethod("QuantizedCache(fp8)", "hfquant", {"engine": "hf_quantized", "backend": "fp8"}, "quantization"),
]


def ours_methods(specs: Sequence[tuple[str, str, float]] = OURS_SPECS) -> tuple[list[PeerMethod], list[dict]]:
    """kvshrink methods whose spec parses in this checkout, and a record for each one skipped."""
    from ..registry import parse_spec

    methods, skipped = [], []
    for spec, kind, budget in specs:
        try:
            parse_spec(spec)
        except Exception as exc:  # a method another engineer has not landed yet: skip, say why
            skipped.append({"label": spec, "library": "kvshrink", "ok": False,
                            "error": f"not available in this checkout: {type(exc).__name__}: {exc}"})
            continue
        methods.append(PeerMethod(spec, "ours", {"engine": "kvshrink", "spec": spec}, kind, budget))
    return methods, skipped


# --------------------------------------------------------------------------------------------------
# Inputs: token ids of the text, and passkey trials
# --------------------------------------------------------------------------------------------------


def build_job_inputs(ids: Sequence[int], n_context: int, n_score: int, n_decode: int) -> dict[str, list[int]]:
    """Split the text's token ids into context (N), scored continuation (M) and decode-timing (D) parts."""
    need = n_context + n_score + n_decode
    if len(ids) < need:
        raise KVShrinkError(f"the text has {len(ids)} tokens; context+score+decode needs {need}")
    return {
        "context_ids": list(ids[:n_context]),
        "score_ids": list(ids[n_context : n_context + n_score]),
        "decode_ids": list(ids[n_context + n_score : need]),
    }


PASSKEY_PREFIX = ("There is an important pass key hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about the pass key.\n\n")
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def build_passkey_trials(encode: Callable[[str], list[int]], filler_ids: Sequence[int], length: int,
                         trials: int, seed: int = 0, max_new_tokens: int = 8) -> list[dict[str, Any]]:
    """Passkey trials: ``length``-token contexts of real prose with a 5-digit key inserted.

    The needle sits at depths spread evenly over (0, 1) (trial i of n at (i + 0.5) / n). The
    context is built from token ids (prefix + filler + needle + filler), so its length is exact and
    the filler's tokens are those of the text; the question is appended after the context, outside
    the compressed part, as a user's question would be.
    """
    rng = random.Random(seed)
    prefix = encode(PASSKEY_PREFIX)
    question = encode(PASSKEY_QUESTION)
    out = []
    for i in range(trials):
        key = str(rng.randint(10000, 99999))
        needle = encode(PASSKEY_NEEDLE.format(key=key))
        n_fill = length - len(prefix) - len(needle)
        if n_fill <= 0 or n_fill > len(filler_ids):
            raise KVShrinkError(f"passkey length {length} does not fit the prefix+needle or the filler text")
        depth = (i + 0.5) / trials
        cut = int(n_fill * depth)
        ctx = [*prefix, *filler_ids[:cut], *needle, *filler_ids[cut:n_fill]]
        out.append({"key": key, "depth": depth, "context_ids": ctx, "question_ids": question,
                    "max_new_tokens": max_new_tokens})
    return out


def passkey_success(answer_text: str, key: str) -> bool:
    """The trial passes if the key appears verbatim in the greedy answer."""
    return key in answer_text


# --------------------------------------------------------------------------------------------------
# Running a worker in an environment
# --------------------------------------------------------------------------------------------------


def run_worker(python: str | os.PathLike[str], job: dict[str, Any], timeout: float | None = None,
               extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the worker with ``python`` on ``job``; return its JSON answer (``fatal`` set on failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", **(extra_env or {})}
    env.pop("PYTHONPATH", None)  # a peer venv must not see kvshrink's environment
    if str(python) == sys.executable:
        # our own env runs the kvshrink engine: make this checkout importable even if not installed
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    try:
        proc = subprocess.run([str(python), str(WORKER)], input=json.dumps(job), capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"fatal": f"worker timed out after {timeout} s", "stderr": str(exc.stderr or "")[-3000:]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"fatal": f"worker exited {proc.returncode} without a JSON answer",
                "stderr": proc.stderr[-3000:]}
    if proc.returncode != 0 and "fatal" not in answer:
        answer["fatal"] = f"worker exited {proc.returncode}"
    return answer


# --------------------------------------------------------------------------------------------------
# Summaries, table, plot
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    library: str
    kind: str
    budget: float
    ok: bool
    env: str = ""
    ppl: float | None = None
    kl: float | None = None
    top1: float | None = None
    bytes_per_token: float | None = None
    bytes16_per_token: float | None = None
    x_vs_fp16: float | None = None
    decode_ms: float | None = None
    speed_vs_ref: float | None = None
    passkey: str = ""
    error: str = ""
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def summarize(method: PeerMethod | dict, result: dict[str, Any] | None, fp16_bytes_per_token: float,
              tokenizer_decode: Callable[[list[int]], str] | None,
              passkey_trials: Sequence[dict[str, Any]]) -> Row:
    """One table row from a worker result (or from a skip/failure record)."""
    if isinstance(method, dict):  # a skip record
        return Row(method["label"], method.get("library", ""), "", 0.0, False, error=method["error"])
    row = Row(method.label, method.library, method.kind, method.budget, bool(result and result.get("ok")),
              env=method.env, note=method.note)
    if not result:
        row.error = "no result"
        return row
    if not result.get("ok"):
        row.error = result.get("error", "failed")
        return row
    seen = result["tokens_seen"]
    row.ppl, row.kl, row.top1 = result["ppl"], result["kl_mean"], result["top1_agree"]
    row.bytes_per_token = result["bytes"] / seen
    row.bytes16_per_token = result["bytes16"] / seen
    row.x_vs_fp16 = fp16_bytes_per_token / row.bytes16_per_token if row.bytes16_per_token else None
    row.decode_ms = result.get("decode_ms_per_token")
    row.speed_vs_ref = result.get("decode_vs_ref")
    answers = result.get("passkey_answers") or []
    if answers and tokenizer_decode is not None:
        hits = sum(passkey_success(tokenizer_decode(a), t["key"]) for a, t in zip(answers, passkey_trials))
        row.passkey = f"{hits}/{len(answers)}"
    row.raw = {k: v for k, v in result.items() if k not in ("traceback",)}
    return row


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table of the rows that ran, then a list of those that did not."""
    head = ("| method | library | kind | kept | PPL | KL | top-1 | B/token (16-bit) | × vs fp16 | B/token (as run) "
            "| decode ms/tok | × time vs uncompressed | passkey |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        if not r.ok:
            continue
        lines.append(
            f"| {r.label} | {r.library} | {r.kind} | {r.budget:.2g} | {_fmt(r.ppl, '.3f')} | {_fmt(r.kl, '.4f')} "
            f"| {_fmt(r.top1, '.3f')} | {_fmt(r.bytes16_per_token, ',.0f')} | {_fmt(r.x_vs_fp16, '.2f')} "
            f"| {_fmt(r.bytes_per_token, ',.0f')} | {_fmt(r.decode_ms, '.1f')} | {_fmt(r.speed_vs_ref, '.2f')} "
            f"| {r.passkey or '—'} |"
        )
    failed = [r for r in rows if not r.ok]
    if failed:
        lines.append("")
        lines.append("Not run / failed:")
        for r in failed:
            lines.append(f"- {r.label} ({r.library}): {r.error.splitlines()[0] if r.error else 'failed'}")
    notes = [r for r in rows if r.ok and r.note]
    if notes:
        lines.append("")
        for r in notes:
            lines.append(f"- {r.label}: {r.note}")
    return "\n".join(lines)


def pareto_plot(rows: Sequence[Row], path: str | os.PathLike[str], title: str,
                fp16_bytes_per_token: float | None = None) -> None:
    """Bytes/token (16-bit) against KL to the uncompressed model; peers drawn apart from kvshrink.

    Each library gets its own marker and colour, and a dashed step line along its Pareto frontier.
    The uncompressed reference (KL 0) is off the log scale; a dotted line marks its 16-bit bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"kvshrink": ("o", "tab:blue"), "kvpress": ("s", "tab:orange"), "transformers": ("^", "tab:green")}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for lib, (marker, color) in style.items():
        pts = [r for r in rows if r.ok and r.library == lib and r.kl is not None and r.bytes16_per_token
               and r.kind != "reference"]
        if not pts:
            continue
        ax.scatter([r.bytes16_per_token for r in pts], [max(r.kl, 1e-5) for r in pts], marker=marker, s=55,
                   color=color, label=lib, edgecolors="black", linewidths=0.5, zorder=3)
        # the library's Pareto frontier: lowest KL reachable at or under each byte count
        front, best = [], float("inf")
        for r in sorted(pts, key=lambda r: (r.bytes16_per_token, r.kl)):
            if r.kl < best:
                best = r.kl
                front.append((r.bytes16_per_token, max(r.kl, 1e-5)))
        if len(front) > 1:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color=color, alpha=0.5,
                    linestyle="--", linewidth=1, zorder=2)
        for r in pts:
            ax.annotate(r.label, (r.bytes16_per_token, max(r.kl, 1e-5)), fontsize=6.5, xytext=(4, 3),
                        textcoords="offset points", color=color)
    if fp16_bytes_per_token:
        ax.axvline(fp16_bytes_per_token, color="grey", linestyle=":", linewidth=1)
        ax.annotate("uncompressed fp16", (fp16_bytes_per_token, ax.get_ylim()[0]), rotation=90, fontsize=7,
                    color="grey", xytext=(-10, 5), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per token held by the cache (float tensors counted at 16 bits), log")
    ax.set_ylabel("mean KL(uncompressed ‖ method) over scored tokens, log (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="library (marker)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit(repo: Path) -> str | None:
    if os.environ.get("KVSHRINK_GIT_COMMIT"):  # a run from an exported tree (no .git, or a stale one above it)
        return os.environ["KVSHRINK_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
