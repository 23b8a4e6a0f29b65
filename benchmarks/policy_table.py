#!/usr/bin/env python
"""Every token policy at budgets 50%, 25% and 10%, alone and composed with a 2-bit quantizer (issue 7).

Runs ``kvshrink eval`` once per budget (decode-mode perplexity, KL/top-1, passkey, bytes; the demo's
settings; prompts prefilled in one pass so that observation-window methods see the question) and merges
the three ``results.json`` into one Markdown table and one JSON file:

    python benchmarks/policy_table.py                       # run all three budgets, then build the table
    python benchmarks/policy_table.py --no-run --dirs DIR…   # rebuild the table from earlier runs

How a budget maps onto methods without a token budget: ``lminfinite`` keeps ``local = budget × prompt``
recent tokens (plus its 10 global ones); ``think`` keeps ``budget`` of the key channels
(``ratio = 1 − budget``; values untouched, so its bytes stay above the budget); ``minicache`` has no budget
(its merge is across layers) and runs once at its defaults.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (0.5, 0.25, 0.1)
PROMPT = 896  # --prompt-tokens of the runs below (the demo's)


def specs(budget: float, quantizer: str) -> list[str]:
    local = round(budget * PROMPT)
    alone = [f"streamingllm:budget={budget}", f"lminfinite:local={local}", f"h2o:budget={budget}",
             f"snapkv:budget={budget}", f"pyramidkv:budget={budget}", f"cake:budget={budget}",
             f"windowkv:budget={budget}", f"kvmerger:budget={budget}", f"ems:budget={budget}",
             f"think:ratio={round(1 - budget, 4)}"]
    out = alone + [f"{s}+{quantizer}" for s in alone]
    if budget == BUDGETS[0]:  # methods without a budget, and the quantizer alone, once
        out += ["minicache", f"minicache+{quantizer}", quantizer]
    return out


def run(budget: float, quantizer: str, out_dir: Path, threads: int) -> None:
    methods_file = out_dir / "methods.txt"
    out_dir.mkdir(parents=True, exist_ok=True)
    methods_file.write_text("\n".join(specs(budget, quantizer)) + "\n")
    cmd = [str(Path(sys.executable).with_name("kvshrink")), "eval", "--model", "default", "--methods-file",
           str(methods_file), "--tasks", "ppl,kl,passkey,memory", "--max-tokens", "2048", "--window", "1024",
           "--prompt-tokens", str(PROMPT), "--passkey-lengths", "512,1024", "--passkey-depths", "0,0.5,1",
           "--threads", str(threads), "--prefill-chunk", "1024", "--no-progress", "--out", str(out_dir)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def policy_of(method: str) -> str:
    return method.split("+")[0].split(":")[0]


def build(dirs: list[Path], quantizer: str) -> tuple[str, dict]:
    rows: dict[str, dict] = {}
    none = None
    for d in dirs:
        for r in json.loads((d / "results.json").read_text()):
            if r["method"] == "none":
                none = r
                continue
            rows[r["method"]] = r
    def cell(method: str) -> str:
        r = rows.get(method)
        if r is None:
            return "—"
        return " / ".join("—" if r.get(k) is None else fmt.format(r[k]) for k, fmt in
                          (("delta_ppl", "{:+.2f}"), ("top1", "{:.2f}"), ("passkey_acc", "{:.2f}"),
                           ("bytes_vs_fp16", "{:.3f}")))

    policies = ["streamingllm", "lminfinite", "h2o", "snapkv", "pyramidkv", "cake", "windowkv", "kvmerger",
                "ems", "think"]
    lines = [f"| method | " + " | ".join(f"{int(b * 100)}%" for b in BUDGETS) + " | "
             + " | ".join(f"{int(b * 100)}% + `{quantizer}`" for b in BUDGETS) + " |",
             "|---|" + "---:|" * (2 * len(BUDGETS))]
    for p in policies:
        alone = [next((s for s in specs(b, quantizer) if policy_of(s) == p and "+" not in s), "") for b in BUDGETS]
        lines.append(f"| `{p}` | " + " | ".join(cell(s) for s in alone) + " | "
                     + " | ".join(cell(f"{s}+{quantizer}") for s in alone) + " |")
    for s in ("minicache", f"minicache+{quantizer}", quantizer):
        if s in rows:
            lines.append(f"| `{s}` (no budget) | {cell(s)} |" + " |" * (2 * len(BUDGETS) - 1))
    head = ""
    if none is not None:
        head = (f"Cells: ΔPPL / top-1 / passkey / bytes × fp16. Policies alone keep the model's dtype (fp32 on this "
                f"CPU, `none` = 2.000), so alone their × fp16 is twice their share of `none`'s bytes. "
                f"`none`: PPL {none['ppl']:.3f}, passkey {none['passkey_acc']:.2f}.\n\n")
    sys.path.insert(0, str(REPO))
    from kvshrink.peers.compare import git_commit, now_utc

    record = {"date": now_utc(), "git_commit": git_commit(REPO), "device": "cpu", "quantizer": quantizer,
              "budgets": list(BUDGETS), "runs": [str(d) for d in dirs], "none": none, "rows": rows}
    return head + "\n".join(lines) + "\n", record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantizer", default="kivi:bits=2", help="the 2-bit quantizer composed with every policy")
    p.add_argument("--out", default=str(REPO / "results" / "policies"), help="one subfolder per budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-run", action="store_true", help="only build the table from --dirs")
    p.add_argument("--dirs", nargs="*", default=None, help="result folders (default: OUT/b<budget>)")
    p.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "policies_cpu.json"))
    p.add_argument("--out-md", default=str(REPO / "benchmarks" / "results" / "policies_cpu.md"))
    args = p.parse_args(argv)
    out = Path(args.out)
    dirs = [Path(d) for d in args.dirs] if args.dirs else [out / f"b{b}" for b in BUDGETS]
    if not args.no_run:
        for b, d in zip(BUDGETS, dirs):
            run(b, args.quantizer, d, args.threads)
    table, record = build(dirs, args.quantizer)
    print(table)
    Path(args.out_md).write_text(table)
    Path(args.out_json).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out_md} and {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
