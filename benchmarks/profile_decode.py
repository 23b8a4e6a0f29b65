"""Launch one decode-attention kernel a few times on the benchmark's inputs, for a profiler (GPU).

    ncu --clock-control none -k regex:_rkv_split_kernel --launch-skip 3 --launch-count 1 --set full \\
        python benchmarks/profile_decode.py --kernel rotatekv --B 8 --T 32768 --variant 32:4:2:4:dot

``--kernel rotatekv`` (RotateKV's packed cache, :mod:`kvshrink.kernels.rotatekv_decode`), ``kivi`` (KIVI's
storage layout, :mod:`kvshrink.kernels.decode_attention`), ``strided`` (the kernel layer's layout,
:mod:`kvshrink.kernels.decode_strided`) or ``frag`` (fragment order, :mod:`kvshrink.kernels.decode_frag`);
``--variant`` as bench_kernels.py's ``--rvariants`` / ``--variants``, or bench_frag.py's for ``frag``.
Prints the median time of the launches (events) so a run without a profiler is a quick timing too.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=("rotatekv", "kivi", "strided", "frag"), default="rotatekv")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--variant", default="")
    ap.add_argument("--launches", type=int, default=6)
    args = ap.parse_args()
    import bench_kernels as bk

    if args.kernel == "frag":
        import bench_frag

        from kvshrink.kernels.decode_frag import decode_attention_frag

        state = bench_frag.full_cache(args.B, args.T, seed=0)[1]
        var = bench_frag.parse_variant(args.variant or bench_frag.VARIANTS.split(",")[0])

        def fn(q, kv, **kw):
            return decode_attention_frag(q, kv, **kw)
    elif args.kernel == "rotatekv":
        from kvshrink.kernels.rotatekv_decode import decode_attention_rotatekv as fn

        keys = ("block_n", "num_warps", "num_stages", "waves", "scale_lookup", "maxnreg", "kron")
        state = bk.make_rotatekv_state(args.B, args.T)
    else:
        from kvshrink.kernels import decode_attention
        from kvshrink.kernels.decode_strided import decode_attention_strided

        fn = decode_attention_strided if args.kernel == "strided" else decode_attention
        keys = ("block_n", "num_warps", "num_stages", "maxnreg", "waves", "pv_rows")
        state = bk.make_packed(args.B, args.T, 2, args.group, strided=args.kernel == "strided")
    if args.kernel != "frag":
        var = {k: (int(v) if v.isdigit() else v) for k, v in zip(keys, args.variant.split(":")) if args.variant}
    q = torch.randn(args.B, bk.HQ, bk.D, device="cuda", dtype=torch.float16)
    times = []
    for _ in range(args.launches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(q, state, **var)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    print(f"{args.kernel} B={args.B} T={args.T} {var}: median {times[len(times) // 2]:.3f} ms over {len(times)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
