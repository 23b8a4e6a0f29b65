#!/usr/bin/env python
"""kvshrink side by side with NVIDIA kvpress and transformers' QuantizedCache, in one run.

Same model, same token ids, same budget, same protocol (see ``kvshrink/peers/worker.py``) for all:
kvshrink's methods run in this environment; each peer runs in a virtual environment of its own,
created once under ``<kvshrink cache>/peers/`` (torch pinned first, then the peer's pinned
packages), so a peer's pins never hold back kvshrink's dependencies.

    python benchmarks/peers.py                       # CPU, default model and text, all envs
    python benchmarks/peers.py --envs ours,hfquant   # a subset of environments
    python benchmarks/peers.py --only snap           # methods whose label contains "snap"
    python benchmarks/peers.py --device cuda --torch-pin torch==2.11.0 --out-json benchmarks/results/peers_gpu.json

Writes a Markdown table (stdout and ``--out-md``), a JSON record (date, git commit, versions of
every environment, every raw number) and a Pareto plot (bytes/token vs KL; peers marked apart).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvshrink.peers.compare import (  # noqa: E402
    HFQUANT_METHODS,
    KVPRESS_METHODS,
    build_job_inputs,
    build_passkey_trials,
    format_table,
    git_commit,
    now_utc,
    ours_methods,
    pareto_plot,
    run_worker,
    summarize,
    timed,
)
from kvshrink.peers.worker import versions as local_versions  # noqa: E402
from kvshrink.peers.envs import DEFAULT_TORCH_PIN, PEER_ENVS, PeerEnvError, peers_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="kvshrink short model name or local HF model dir")
    p.add_argument("--text", default="lcet10", help="named text (kvshrink.assets) or a file path")
    p.add_argument("--context", type=int, default=1024, help="N: context tokens prefilled into the cache")
    p.add_argument("--score", type=int, default=128, help="M: continuation tokens scored against the cache")
    p.add_argument("--chunk", type=int, default=1,
                   help="scored tokens fed per forward pass (1 = token by token: every method sees plain decoding; "
                   "kvshrink's prompt-time policies treat a multi-token chunk as more prompt)")
    p.add_argument("--decode", type=int, default=0,
                   help="D: extra tokens decoded one at a time for the speed figure (0: time the scoring loop)")
    p.add_argument("--passkey-trials", type=int, default=2, help="passkey trials (0 = none)")
    p.add_argument("--passkey-len", type=int, default=1024, help="passkey context length in tokens")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU numbers need a CUDA torch in every env)")
    p.add_argument("--dtype", default="float32", help="model dtype in every env (float32, bfloat16, float16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each worker")
    p.add_argument("--envs", default="ours,kvpress,hfquant", help="comma list: ours, " + ", ".join(PEER_ENVS))
    p.add_argument("--only", default="", help="run only methods whose label contains this substring")
    p.add_argument("--methods", default="", help="run only these exact labels, separated by ';'")
    p.add_argument("--torch-pin", default=DEFAULT_TORCH_PIN, help="torch requirement installed first in peer venvs")
    p.add_argument("--no-install", action="store_true", help="never create a peer venv; skip missing ones")
    p.add_argument("--resume", action="store_true",
                   help="reuse an environment's saved answer to the identical job (after an interruption)")
    p.add_argument("--answer", action="append", default=[], metavar="ENV=PATH",
                   help="use a worker answer (JSON) saved earlier for ENV instead of running it; repeat to "
                   "merge several answers of one env (same settings, different methods)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per environment")
    p.add_argument("--out-json", default=str(RESULTS / "peers_cpu.json"))
    p.add_argument("--out-md", default=str(RESULTS / "peers_cpu.md"))
    p.add_argument("--plot", default=str(RESULTS / "peers_cpu.png"))
    return p.parse_args(argv)


def answer_from_progress(path: str) -> dict:
    """A worker answer rebuilt from its progress file (one JSON line per finished run)."""
    done = [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not done or done[0].get("label") != "reference (DynamicCache)" or not done[0].get("ok"):
        return {"fatal": f"{path} has no finished reference run"}
    refs = [r.get("decode_ms_per_token") for r in done if r["label"].startswith("reference") and r.get("ok")]
    base = min((x for x in refs if x), default=None)
    for r in done:
        if r.get("ok") and base and r.get("decode_ms_per_token"):
            r["decode_vs_ref"] = r["decode_ms_per_token"] / base
    return {"partial": f"rebuilt from {path}", "versions": {}, "device": "?", "threads": None,
            "results": [r for r in done if r["label"] != "reference (repeat)"],
            "reference_decode_ms_per_token": refs}


def merge_answers(paths: list[str]) -> dict:
    """One answer from several worker answers of one environment (the first one's reference kept)."""
    answers = [answer_from_progress(p) if p.endswith(".jsonl") else json.loads(Path(p).read_text(encoding="utf-8"))
               for p in paths]
    bad = [p for p, a in zip(paths, answers) if "fatal" in a]
    if bad:
        return {"fatal": f"saved answer(s) {bad} hold a fatal error"}
    merged = {**answers[0], "results": list(answers[0]["results"]),
              "merged_from": [{"path": p, "versions": a["versions"],
                               "reference_ppl": a["results"][0]["ppl"],
                               "reference_decode_ms_per_token": a.get("reference_decode_ms_per_token")}
                              for p, a in zip(paths, answers)]}
    labels = {r["label"] for r in merged["results"]}
    for a in answers[1:]:
        for r in a["results"]:
            if r["label"] not in labels:  # speed ratios stay relative to each answer's own reference
                merged["results"].append(r)
                labels.add(r["label"])
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    from kvshrink.assets import read_texts
    from kvshrink.models import MODEL_ALIASES, cached_model_dir

    model_dir = cached_model_dir(args.model) if args.model in MODEL_ALIASES else Path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    fp16_per_token = 2 * 2 * cfg.num_hidden_layers * kv_heads * head_dim  # K and V, 2 bytes each

    ids = tok(read_texts([args.text]), add_special_tokens=False)["input_ids"]
    inputs = build_job_inputs(ids, args.context, args.score, args.decode)
    used = args.context + args.score + args.decode
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    trials = (build_passkey_trials(encode, ids[used:], args.passkey_len, args.passkey_trials)
              if args.passkey_trials else [])
    job_base = {"model_dir": str(model_dir), "device": args.device, "dtype": args.dtype, "threads": args.threads,
                "chunk": args.chunk, **inputs,
                "passkey": [{k: t[k] for k in ("context_ids", "question_ids", "max_new_tokens")} for t in trials]}

    given: dict[str, list[str]] = {}
    for item in args.answer:
        env_name, _, path = item.partition("=")
        given.setdefault(env_name, []).append(path)
    ours, skipped = ours_methods()
    by_env = {"ours": ours, "kvpress": KVPRESS_METHODS, "hfquant": HFQUANT_METHODS}
    wanted_envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    rows, envs_info, raw = [], {}, {}
    for skip in skipped:
        rows.append(summarize(skip, None, fp16_per_token, None, trials))
    for env_name in wanted_envs:
        methods = [m for m in by_env.get(env_name, []) if args.only.lower() in m.label.lower()]
        if args.methods:
            exact = {x.strip() for x in args.methods.split(";") if x.strip()}
            methods = [m for m in methods if m.label in exact]
        if env_name == "ours":
            methods = [m for m in methods if m.label != "none"] if not args.only else methods
            if args.only and not methods:
                continue
        if not methods:
            continue
        if env_name == "ours":
            python = sys.executable
        else:
            env = PEER_ENVS[env_name]
            if args.no_install and not env.ready(args.torch_pin):
                for m in methods:
                    rows.append(summarize(m, {"ok": False, "error": f"peer env {env_name} not installed "
                                          "(--no-install)"}, fp16_per_token, None, trials))
                continue
            try:
                python = str(env.ensure(args.torch_pin, log=lambda s: print(s, file=sys.stderr)))
            except PeerEnvError as exc:
                for m in methods:
                    rows.append(summarize(m, {"ok": False, "error": str(exc)}, fp16_per_token, None, trials))
                continue
        job = {**job_base, "methods": [{"label": m.label, "desc": m.desc} for m in methods]}
        # Each environment's answer is kept under the cache dir, keyed by the job: --resume reuses it,
        # so an interrupted comparison restarts where it stopped.
        key = hashlib.sha256(json.dumps([python, job], sort_keys=True).encode()).hexdigest()[:16]
        saved = peers_dir() / "answers" / f"{env_name}-{key}.json"
        if env_name in given:
            answer, secs = merge_answers(given[env_name]), 0.0
            print(f"[peers] {env_name}: using answers {given[env_name]}", file=sys.stderr, flush=True)
        elif args.resume and saved.is_file():
            answer, secs = json.loads(saved.read_text(encoding="utf-8")), 0.0
            print(f"[peers] {env_name}: reusing {saved}", file=sys.stderr, flush=True)
        else:
            progress = saved.with_suffix(".progress.jsonl")
            progress.parent.mkdir(parents=True, exist_ok=True)
            progress.unlink(missing_ok=True)
            print(f"[peers] {env_name}: {len(methods)} methods (progress: {progress}) ...", file=sys.stderr,
                  flush=True)
            answer, secs = timed(lambda: run_worker(python, {**job, "progress_path": str(progress)},
                                                    timeout=args.timeout))
            answer["wall_s"] = secs
            print(f"[peers] {env_name}: done in {secs:.0f} s", file=sys.stderr, flush=True)
            if "fatal" not in answer:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(answer), encoding="utf-8")
            if "fatal" in answer and progress.is_file():  # keep what finished before the failure/timeout
                done = [json.loads(ln) for ln in progress.read_text(encoding="utf-8").splitlines() if ln.strip()]
                if done and done[0].get("label") == "reference (DynamicCache)" and done[0].get("ok"):
                    print(f"[peers] {env_name}: {answer['fatal']}; keeping {len(done) - 1} finished methods",
                          file=sys.stderr, flush=True)
                    base = done[0].get("decode_ms_per_token")
                    for r in done:
                        if r.get("ok") and base and r.get("decode_ms_per_token"):
                            r["decode_vs_ref"] = r["decode_ms_per_token"] / base
                    answer = {"partial": answer["fatal"], "versions": answer.get("versions") or {},
                              "device": args.device, "threads": args.threads, "results": done,
                              "reference_decode_ms_per_token": [done[0].get("decode_ms_per_token")]}
        secs = answer.get("wall_s", secs)
        raw[env_name] = answer
        if "fatal" in answer:
            for m in methods:
                rows.append(summarize(m, {"ok": False, "error": f"worker failed: {answer['fatal']}"},
                                      fp16_per_token, None, trials))
            envs_info[env_name] = {"fatal": answer["fatal"], "stderr": answer.get("stderr", "")[-2000:],
                                   "versions": answer.get("versions")}
            continue
        results = {r["label"]: r for r in answer["results"]}
        ref = results["reference (DynamicCache)"]
        envs_info[env_name] = {
            "versions": answer.get("versions") or (local_versions() if env_name == "ours" else {}),
            "device": answer.get("device") if answer.get("device") not in (None, "?") else args.device,
            "threads": answer.get("threads") or args.threads, "merged_from": answer.get("merged_from"),
            "reference_ppl": ref["ppl"], "partial": answer.get("partial"),
            "reference_decode_ms_per_token": answer.get("reference_decode_ms_per_token"), "wall_s": secs,
        }
        for m in methods:
            stopped = f"not run: its worker stopped before reaching it ({answer.get('partial', 'no result')})"
            res = results.get(m.label) or {"ok": False, "error": stopped}
            rows.append(summarize(m, res, fp16_per_token, tok.decode, trials))
        if env_name == "ours":  # the uncompressed reference, once, from our env
            from kvshrink.peers.compare import PeerMethod

            refm = PeerMethod("uncompressed (DynamicCache)", "ours", {"engine": "dynamic"}, "reference")
            rows.insert(0, summarize(refm, ref, fp16_per_token, tok.decode, trials))

    refs = {k: v["reference_ppl"] for k, v in envs_info.items() if "reference_ppl" in v}
    title = (f"{args.model} ({args.dtype}, {args.device}), text {args.text}: prefill {args.context}, "
             f"score {args.score} (chunks of {args.chunk}); budgets: evictions keep 50% of the context")
    table = format_table(rows)
    header = (f"# kvshrink vs peers — {title}\n\n"
              f"Reference perplexity per environment (must agree): "
              + ", ".join(f"{k} {v:.4f}" for k, v in refs.items()) + "\n\n")
    print(header + table)
    record = {
        "date": now_utc(),
        "git_commit": git_commit(REPO),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items()},
        "protocol": "kvshrink/peers/worker.py (docstring); bytes measured after N+M-1 tokens",
        "fp16_bytes_per_token": fp16_per_token,
        "passkey_trials": [{"key": t["key"], "depth": t["depth"], "length": len(t["context_ids"])} for t in trials],
        "environments": envs_info,
        "rows": [{k: v for k, v in vars(r).items() if k != "raw"} | {"raw": r.raw} for r in rows],
    }
    for path, text in ((args.out_json, json.dumps(record, indent=1)), (args.out_md, header + table + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
    if args.plot and any(r.ok for r in rows):
        pareto_plot(rows, args.plot, title, fp16_per_token)
    if len(set(round(v, 3) for v in refs.values())) > 1:
        print(f"WARNING: reference perplexities differ between environments: {refs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
