"""Where an eager decode step's time goes (GPU): wall time, GPU kernel time, host syncs, Python hot spots.

Eager decoding (what ``model.generate`` does) is host-bound when the CPU work per step (transformers' Python,
the cache layers' bookkeeping, kernel launches) exceeds the GPU work, and a host sync per layer (a ``.item()``,
``.tolist()``, ``bool(tensor)``) stops the CPU from running ahead, so the two add up instead of overlapping.
For each cache kind and batch this prints and writes:

* ``wall_ms``: median step time over timed steps (synchronized at the end only, as generate runs);
* ``gpu_ms``: the sum of the step's CUDA kernel times (torch profiler);
* ``syncs``: device-to-host copies / synchronizations per step (``aten::_local_scalar_dense``, ``aten::item``,
  ``cudaStreamSynchronize``, ``cudaDeviceSynchronize``; the profiler's own end-of-run sync included), and
  ``sync_sites``: where the syncs come from (``torch.cuda.set_sync_debug_mode``);
* ``cprofile``: the Python functions with the most own time (cProfile), as text.

Random-weight Llama-3-8B shape (bench_kernels.build_model), cache filled to ``--T`` tokens without running attention.

    PYTHONPATH=. python benchmarks/profile_eager.py --kinds fp16,kivi,rotatekv --batches 8,56 --out x.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def make_cache(bk, model, kind: str, B: int, T: int, cap: int, rkv_spec: str | None):
    from kvshrink.kernels import disable, make_kernel_cache

    if kind == "fp16":
        c = bk.fp16_cache(model, B, cap)
        bk.fill_fp16(c, B, T)
        return c
    spec = "kivi:bits=2,group=128,residual=128" if kind == "kivi" else rkv_spec
    c = make_kernel_cache(model, spec, reserve=cap)
    disable(model)
    (bk.fill_kivi if kind == "kivi" else lambda c, B, T: bk.fill_rotatekv(model, c, B, T))(c, B, T)
    from kvshrink.kernels import enable
    enable(model)
    return c


def profile_one(model, cache, B: int, T: int, steps: int) -> dict:
    from torch.autograd import DeviceType
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    tok = torch.randint(0, model.config.vocab_size, (B, 1), device="cuda")
    pos = torch.full((B, 1), T, device="cuda", dtype=torch.long)
    i = 0

    def step():
        nonlocal tok, i
        out = model(input_ids=tok, past_key_values=cache, position_ids=pos + i, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        i += 1

    res: dict = {}
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(3):  # three timed runs of ``steps`` steps, synchronized at the end of each
            t = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / steps * 1e3)
        res["wall_ms"] = statistics.median(times)
        res["tokens_per_s"] = B / res["wall_ms"] * 1e3
        n = 3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        ka = p.key_averages()
        res["gpu_ms"] = sum(getattr(e, "self_device_time_total", 0) for e in ka
                            if getattr(e, "device_type", None) == DeviceType.CUDA) / n / 1e3
        res["syncs"] = {e.key: e.count / n for e in ka if e.key in SYNC_EVENTS and e.count}
        res["launches"] = sum(e.count for e in ka if e.key in ("cuLaunchKernel", "cudaLaunchKernel",
                                                                "cuLaunchKernelEx", "cudaLaunchKernelExC")) / n
        res["sync_sites"] = sync_sites(step)
        pr = cProfile.Profile()
        torch.cuda.synchronize()
        t = time.perf_counter()
        pr.enable()
        for _ in range(n):
            step()
        pr.disable()
        res["host_ms_cprofile"] = (time.perf_counter() - t) / n * 1e3  # CPU time under cProfile (slower)
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        res["cprofile"] = s.getvalue()[-9000:]
    return res


def sync_sites(step, steps: int = 2) -> dict:
    """Host syncs of ``steps`` steps by call site (``torch.cuda.set_sync_debug_mode``: a warning per sync), the
    innermost frame outside torch: ``{"file:line": count per step}``."""
    import traceback
    import warnings

    sites: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}"
        sites[where] = sites.get(where, 0) + 1 / steps

    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode(1)
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return dict(sorted(sites.items(), key=lambda kv: -kv[1])[:8])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="fp16,kivi,rotatekv")
    ap.add_argument("--batches", default="8,56")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/profile_eager.json")
    ap.add_argument("--no-cprofile-text", action="store_true")
    args = ap.parse_args()
    import bench_kernels as bk

    model = bk.build_model()
    rkv_spec = bk.rotatekv_calib_spec(model) if "rotatekv" in args.kinds else None
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": bk.git_commit(),
           "T": args.T, "steps": args.steps, "runs": []}
    for B in (int(b) for b in args.batches.split(",")):
        for kind in args.kinds.split(","):
            cap = args.T + 8 * args.steps + 16
            try:
                cache = make_cache(bk, model, kind, B, args.T, cap, rkv_spec)
                r = profile_one(model, cache, B, args.T, args.steps)
            except Exception as e:  # noqa: BLE001 - record and go on
                r = {"error": f"{type(e).__name__}: {e}"[:400]}
            finally:
                from kvshrink.kernels import disable
                disable(model)
                cache = None
                torch.cuda.empty_cache()
            r.update(kind=kind, B=B)
            text = r.pop("cprofile", "") if args.no_cprofile_text else r.get("cprofile", "")
            print(f"== {kind} B={B}: " + json.dumps({k: v for k, v in r.items() if k != "cprofile"}), flush=True)
            if text:
                print(text, flush=True)
            out["runs"].append(r)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
