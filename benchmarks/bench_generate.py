"""Greedy generation as a user runs it (GPU): ``model.generate`` over a kernel cache vs ``generate_graph``.

Random-weight Llama-3-8B shape (bench_kernels.build_model), a batch of random prompts, ``--new`` tokens each; for
every spec: wall time of ``model.generate(past_key_values=make_kernel_cache(model, spec))`` (eager steps) and of
``kvshrink.kernels.generate_graph(model, ids, spec=spec)`` (one step captured in a CUDA graph), each the faster of
two runs (the first compiles), and whether the two produced the same tokens (where not: the first step that
differs per row, and generate's logit margin there between its token and the graph's). ``none`` is the 16-bit baseline
(transformers' DynamicCache for generate, static 16-bit layers for the graph). Ratios are within one run.

    PYTHONPATH=. python benchmarks/bench_generate.py --batches 8,32 --prompt 1024 --new 128 --out x.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def timed(fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="none;kivi:bits=2,group=128,residual=128;rotatekv:bits=2", help="';'-separated")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/generate.json")
    args = ap.parse_args()
    import bench_kernels as bk
    from transformers import DynamicCache

    from kvshrink.kernels import disable, generate_graph, make_kernel_cache

    specs = [x for x in args.specs.split(";") if x]
    model = bk.build_model()
    rkv = bk.rotatekv_calib_spec(model)  # a calibrated channel order (random ids: no tokenizer)
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": bk.git_commit(),
           "prompt": args.prompt, "new": args.new, "runs": []}
    for B in (int(b) for b in args.batches.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (B, args.prompt), device="cuda")
        for spec in specs:
            run_spec = rkv if spec == "rotatekv:bits=2" else spec
            row = {"spec": spec, "B": B}
            try:
                def eager():
                    cache = DynamicCache(config=model.config) if spec == "none" else make_kernel_cache(model, run_spec)
                    try:
                        with torch.no_grad():
                            return model.generate(input_ids=ids, max_new_tokens=args.new, min_new_tokens=args.new,
                                                  do_sample=False, past_key_values=cache, pad_token_id=0,
                                                  output_scores=True, return_dict_in_generate=True)
                    finally:
                        disable(model)
                t_e, res_e = timed(eager)
                seq_e = res_e.sequences
                t_g, (seq_g, _) = timed(lambda: generate_graph(model, ids, spec=run_spec, max_new_tokens=args.new))
                row.update(generate_s=t_e, graph_s=t_g, generate_tok_s=B * args.new / t_e,
                           graph_tok_s=B * args.new / t_g, graph_speedup=t_e / t_g,
                           same_tokens=bool(torch.equal(seq_e, seq_g)),
                           same_token_frac=float((seq_e[:, args.prompt:] == seq_g[:, args.prompt:]).float().mean()))
                # where the two first disagree, and generate's margin there between its pick and the graph's (a
                # near-tie that rounding decides, or a real difference): random weights give near-flat logits
                diff = seq_e[:, args.prompt:] != seq_g[:, args.prompt:]
                firsts, margins = [], []
                for b in range(B):
                    if bool(diff[b].any()):
                        i = int(diff[b].nonzero()[0])
                        sc = res_e.scores[i][b].float()
                        firsts.append(i)
                        margins.append(float(sc[seq_e[b, args.prompt + i]] - sc[seq_g[b, args.prompt + i]]))
                row.update(first_mismatch=firsts, logit_margin_at_mismatch=margins,
                           logit_std=float(res_e.scores[0].float().nan_to_num(0.0, 0.0, 0.0).std()))
            except Exception as e:  # noqa: BLE001 - record and go on
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            torch.cuda.empty_cache()
            print("==", json.dumps(row), flush=True)
            out["runs"].append(row)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
