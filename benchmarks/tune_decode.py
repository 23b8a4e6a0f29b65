"""KIVI-layout decode kernel: launch variants, with and without the inline-PTX unpack, timed without host overhead.

``bench_kernels.py``'s decode rows time each call with CUDA events around eager launches, so at small shapes
(1x32K, 8x8K: ~0.06 ms of GPU work) the host's Python per call sets the number on a slow CPU. Here every
measurement replays a CUDA graph holding one call per input copy (copies rotated so nothing is re-read from L2)
and divides by the copies: kernel time alone, for fp16 SDPA flash and for ``decode_attention`` alike. Same
shapes as the issue (32 query / 8 KV heads, head_dim 128, 2-bit, residual 128), side by side in one run.

    PYTHONPATH=. python benchmarks/tune_decode.py --out benchmarks/results/decode_tune.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from bench_kernels import (D, DECODE_CONFIGS, HKV, HQ, copies_for, git_commit, make_packed,  # noqa: E402
                           make_packed_bytes, sdpa_decode_fn)

#: (warps, stages, maxnreg, waves) per block size; the first of each is the shipped default (LAUNCH)
VARIANTS = {128: [(2, 2, 168, 8), (2, 2, 0, 8), (2, 2, 200, 8), (2, 3, 168, 8), (2, 2, 128, 8), (4, 2, 0, 8),
                  (2, 2, 168, 16)],
            64: [(2, 2, 168, 8), (2, 2, 0, 4), (2, 3, 168, 8), (2, 2, 128, 8), (4, 2, 128, 8)]}


def graph_ms(calls, reps: int = 20) -> float:
    """Median time of one call in ``calls`` (a list of thunks), replayed in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm up (and compile) outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(calls))
    del g
    return statistics.median(times)


def run_meta() -> dict:
    """The run's metadata (device, date, commit, versions, timing method) and an empty ``rows`` list."""
    import triton

    return {"device": torch.cuda.get_device_name(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "torch": torch.__version__, "triton": triton.__version__,
            "timing": "CUDA graph of one call per input copy, median of 20 replays / copies", "rows": []}


def sdpa_ms(B: int, T: int) -> float:
    """fp16 SDPA flash decode over ``B x T`` tokens (issue 9's heads), timed in a CUDA graph over rotated copies."""
    n = copies_for(2 * B * HKV * T * D * 2)
    qs = [torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16) for _ in range(n)]
    ks = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16) for _ in range(n)]
    vs = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16) for _ in range(n)]
    ms = graph_ms([sdpa_decode_fn(qs[i], ks[i], vs[i]) for i in range(n)])
    del qs, ks, vs
    torch.cuda.empty_cache()
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/decode_tune.json")
    ap.add_argument("--groups", default="128,32")
    ap.add_argument("--variants", default="",
                    help="replace VARIANTS: block:warps:stages:maxnreg:waves, comma-separated (the first of each "
                         "block size is also timed without the PTX unpack)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from kvshrink.kernels import decode_attention, decode_attention_ref

    if args.variants:
        VARIANTS.clear()
        for v in args.variants.split(","):
            blk, *rest = map(int, v.split(":"))
            VARIANTS.setdefault(blk, []).append(tuple(rest))

    res = run_meta()
    for B, T in DECODE_CONFIGS:
        row = {"B": B, "T": T, "sdpa_ms": sdpa_ms(B, T)}
        for group in map(int, args.groups.split(",")):
            block = 128 if group >= 128 else 64
            kvs = [make_packed(B, T, 2, group, seed=i) for i in range(copies_for(make_packed_bytes(B, T, group)))]
            qs = [torch.randn(B, HQ, D, device="cuda", dtype=torch.float16) for _ in kvs]
            runs = []
            for i, (w, st, nreg, waves) in enumerate(VARIANTS.get(block, [])):
                for asm in ((False, True) if i == 0 else (True,)):  # the default launch both ways, the rest with PTX
                    var = dict(block_n=block, num_warps=w, num_stages=st, maxnreg=nreg, waves=waves, asm=asm)
                    try:
                        ms = graph_ms([lambda j=j: decode_attention(qs[j], kvs[j], **var) for j in range(len(kvs))])
                    except Exception as e:  # noqa: BLE001 - record and go on
                        runs.append({**var, "error": f"{type(e).__name__}: {e}"[:300]})
                        continue
                    runs.append({**var, "ms": ms})
                    print(f"B={B} T={T} g{group} {var}: {ms:.4f} ms (sdpa {row['sdpa_ms']:.4f})", flush=True)
            ok = [r for r in runs if "ms" in r]
            base = next((r for r in ok if not r["asm"]), None)
            default = next((r for r in ok if r["asm"]), None)
            if base is None or default is None:  # recorded in runs; the row goes on without the comparison
                row[f"g{group}"] = {"runs": runs}
                continue
            best = min(ok, key=lambda r: r["ms"])
            ref = decode_attention_ref(qs[0], kvs[0]) if B * T <= 8 * 32768 else None
            err = None
            if ref is not None:
                out = decode_attention(qs[0], kvs[0], **{k: v for k, v in best.items() if k != "ms"})
                err = float((out.float() - ref).norm() / ref.norm())
            row[f"g{group}"] = {"runs": runs, "best": best, "default_ms": default["ms"], "triton_unpack_ms": base["ms"],
                                "ptx_speedup_default_launch": base["ms"] / default["ms"],
                                "best_vs_sdpa": row["sdpa_ms"] / best["ms"], "default_vs_sdpa": row["sdpa_ms"] / default["ms"],
                                "bytes": kvs[0].nbytes() + 4 * B * HQ * D, "rel_err": err}
            del kvs, qs
            torch.cuda.empty_cache()
        res["rows"].append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for row in res["rows"]:
        if not all("best" in row.get(f"g{g}", {}) for g in map(int, args.groups.split(","))):
            print(f"B={row['B']:2d} T={row['T']:6d}: a group has no comparison (see runs in the JSON)")
            continue
        print(f"B={row['B']:2d} T={row['T']:6d} sdpa {row['sdpa_ms']:.4f} ms", *(
            f"| g{g}: default {row[f'g{g}']['default_ms']:.4f} (PTX x{row[f'g{g}']['ptx_speedup_default_launch']:.2f}), "
            f"best {row[f'g{g}']['best']['ms']:.4f} = {row[f'g{g}']['best_vs_sdpa']:.2f}x sdpa"
            for g in map(int, args.groups.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
