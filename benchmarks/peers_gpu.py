#!/usr/bin/env python
"""Decode speed and memory at long context on the GPU: kvshrink beside kvpress and transformers'
QuantizedCache, in one run (issue 8's GPU part).

Same random-weight model (Llama-3-8B's shape, bf16, seeded: no weights travel), same random token ids,
same settings (batch x context) for everyone; each library runs the protocol of
``kvshrink/peers/worker.py`` (``"task": "speed"``) in its own environment: kvshrink in this one, kvpress
and QuantizedCache (quanto, HQQ) in peer venvs. Quality is not measured here (random weights have none):
the CPU table (``benchmarks/peers.py``, docs/PEERS.md) holds it on a real model.

Per method and setting: prefill time, greedy decode ms/step and tokens/s (``steps`` timed after
``warmup``), its speed-up over the uncompressed ``DynamicCache`` (faster of two runs), the cache's bytes
(counted by the same walker for everyone), and torch allocator memory above the weights: after prefill,
peak during prefill, peak during decode.

On the lent GPU (no package index there) the peer venvs inherit the host's CUDA torch and install the
peers' own pins from wheels carried along (``--wheelhouse``; docs/PEERS.md says which)::

    python benchmarks/peers_gpu.py --wheelhouse .whl/peers --out-json benchmarks/results/peers_gpu_h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvshrink.peers.compare import git_commit, now_utc, run_worker, timed  # noqa: E402
from kvshrink.peers.envs import INHERIT, PEER_ENVS, PeerEnvError  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

#: Llama-3-8B's shape (the kernel benchmarks use the same), random weights.
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False}


def methods() -> dict[str, list[dict]]:
    """What runs in each environment, at budgets matching the CPU table (half the context kept).
    ``[kernels]``: kvshrink's Triton decode kernels, eager; ``[CUDA graph]``: kvshrink's static layers with
    one greedy step captured in a CUDA graph (graph.py), beside its 16-bit static baseline under the same
    discipline, so what the graph alone gives is visible."""
    def ours(spec: str, kernels: bool) -> dict:
        label = spec + (" [kernels]" if kernels else "")
        return {"label": label, "desc": {"engine": "kvshrink", "spec": spec, "kernels": kernels, "reserve": "auto"}}

    def graph(kind: str, label: str, **kw) -> dict:
        return {"label": label, "desc": {"engine": "kvshrink_graph", "kind": kind, "kw": kw}}

    def press(name: str, **kw) -> dict:
        args = ", ".join(f"{v}" for v in kw.values())
        return {"label": f"{name}({args})", "desc": {"engine": "kvpress", "press": name, "kwargs": kw}}

    def hfq(backend: str, nbits: int | None) -> dict:
        kw = {"nbits": nbits} if nbits else {}
        label = f"QuantizedCache({backend}{f', {nbits}-bit' if nbits else ''})"
        return {"label": label, "desc": {"engine": "hf_quantized", "backend": backend, "kwargs": kw}}

    return {
        "ours": [ours("kivi:bits=2", True), ours("kivi:bits=4", True), ours("rotatekv:bits=2", True),
                 ours("kivi:bits=2", False), ours("snapkv:budget=0.5", False),
                 ours("snapkv:budget=0.5+kivi:bits=2", True),
                 graph("dense", "16-bit static [CUDA graph]"),
                 graph("kivi", "kivi:bits=2,group=128,residual=128 [CUDA graph]", bits=2, group=128, residual=128)],
        "kvpress": [press("StreamingLLMPress", compression_ratio=0.5), press("SnapKVPress", compression_ratio=0.5),
                    press("KnormPress", compression_ratio=0.5),
                    press("ExpectedAttentionPress", compression_ratio=0.5)],
        "hfquant": [hfq("quanto", 4), hfq("quanto", 2), hfq("hqq", 4), hfq("hqq", 2)],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="1x32768,16x8192", help="comma list of BATCHxCONTEXT")
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before them")
    p.add_argument("--warm-context", type=int, default=512,
                   help="tokens of an untimed run of each method before its timed one (0: none)")
    p.add_argument("--envs", default="ours,kvpress,hfquant")
    p.add_argument("--only", default="", help="run only methods whose label contains this substring")
    p.add_argument("--methods", default="", help="run only these exact labels, separated by ';'")
    p.add_argument("--wheelhouse", default=None, help="folder with <peer>/*.whl: offline peer installs")
    p.add_argument("--torch-pin", default=INHERIT, help="torch for peer venvs (default: inherit this one's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check), default all 32")
    p.add_argument("--model-config", default=None,
                   help="JSON object of config fields replacing Llama-3-8B's (e.g. a tiny model for a CPU check)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per environment")
    p.add_argument("--out-json", default=str(RESULTS / "peers_gpu.json"))
    p.add_argument("--out-md", default=None, help="default: --out-json with .md")
    return p.parse_args(argv)


def fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """Markdown: one block per setting, rows in run order, errors in the last column."""
    out = []
    GiB = 2**30
    for setting in dict.fromkeys((r["batch"], r["context"]) for r in rows):
        b, t = setting
        out += [f"\n**batch {b} x context {t}**\n",
                "| method | library | prefill s | decode ms/step | tok/s | vs DynamicCache | cache GiB | "
                "bytes/token | after prefill GiB | decode peak GiB | error |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if (r["batch"], r["context"]) != setting or "reference_ms" in r:
                continue
            if not r.get("ok"):
                out.append(f"| {r['label']} | {r['library']} | | | | | | | | | {r.get('error', '')[:160]} |")
                continue
            out.append(
                f"| {r['label']} | {r['library']} | {fmt(r['prefill_s'], '.2f')} | {fmt(r['decode_ms_per_step'], '.1f')} | "
                f"{fmt(r['decode_tokens_per_s'], '.0f')} | {fmt(r.get('decode_speedup_vs_ref'), '.2f')}x | "
                f"{r['bytes'] / GiB:.3f} | {r['bytes_per_token']:.0f} | {r['mem_after_prefill'] / GiB:.2f} | "
                f"{r['decode_peak_mem'] / GiB:.2f} | |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = [tuple(int(x) for x in s.lower().split("x")) for s in args.settings.split(",") if s]
    config = dict(LLAMA3_8B, **(json.loads(args.model_config) if args.model_config else {}))
    if args.layers:
        config["num_hidden_layers"] = args.layers
    wheelhouse = Path(args.wheelhouse) if args.wheelhouse else None
    record = {"date": now_utc(), "commit": git_commit(REPO), "settings": settings, "steps": args.steps,
              "warmup": args.warmup, "warm_context": args.warm_context, "model_config": config, "dtype": args.dtype,
              "envs": {}, "results": []}
    for env_name in [e for e in args.envs.split(",") if e]:
        wanted = {x.strip() for x in args.methods.split(";") if x.strip()}
        todo = [m for m in methods().get(env_name, [])
                if args.only in m["label"] and (not wanted or m["label"] in wanted)]
        if not todo and env_name != "ours":
            continue
        if env_name == "ours":
            python = sys.executable
        else:
            try:
                python, secs = timed(lambda: str(PEER_ENVS[env_name].ensure(
                    args.torch_pin, log=lambda s: print(s, file=sys.stderr), wheelhouse=wheelhouse)))
                print(f"[peers-gpu] {env_name} env ready in {secs:.0f} s", file=sys.stderr)
            except PeerEnvError as exc:
                record["envs"][env_name] = {"fatal": str(exc)[-3000:]}
                print(f"[peers-gpu] {env_name}: environment failed: {exc}", file=sys.stderr)
                continue
        job = {"task": "speed", "model_config": config, "dtype": args.dtype, "device": args.device,
               "settings": settings, "steps": args.steps, "warmup": args.warmup, "seed": 0, "methods": todo,
               "warm_context": args.warm_context}
        answer, secs = timed(lambda: run_worker(python, job, timeout=args.timeout))
        print(f"[peers-gpu] {env_name}: {secs:.0f} s", file=sys.stderr)
        record["envs"][env_name] = {k: v for k, v in answer.items() if k != "results"}
        library = {"ours": "kvshrink", "kvpress": "kvpress", "hfquant": "transformers"}[env_name]
        for r in answer.get("results", []):
            r["library"], r["env"] = library, env_name
            record["results"].append(r)
        if "fatal" in answer:
            print(f"[peers-gpu] {env_name}: {answer['fatal']}\n{answer.get('traceback', answer.get('stderr', ''))}",
                  file=sys.stderr)
        dump(record, args)  # after every environment: a run stopped at a time limit keeps what it measured
    print(table(record["results"]))
    return 0


def dump(record: dict, args: argparse.Namespace) -> None:
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    Path(args.out_md or out.with_suffix(".md")).write_text(table(record["results"]), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
