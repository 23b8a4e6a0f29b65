"""Compile kvshrink's decode kernel for sm_90 without a GPU (Triton's bundled ptxas) and report what costs
no device time: registers, spills, shared memory, layout conversions in the TTGIR, and a SASS histogram.

    python benchmarks/inspect_kernels.py [--block-n 64] [--warps 4] [--stages 2] [--group 128] [--sass]
    python benchmarks/inspect_kernels.py --module rotatekv_decode --hg 4 --rkv-g 4 [--prerope 0]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--hg", type=int, default=4)
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--tail", type=int, default=32)
    ap.add_argument("--kernel", default="_decode_split_kernel")
    ap.add_argument("--module", default="decode_attention", help="decode_attention (KIVI layout), decode_strided or rotatekv_decode")
    ap.add_argument("--lens", type=int, default=0, help="strided kernel: graph mode (device lengths, ring residual)")
    ap.add_argument("--pv-rows", type=int, default=1, help="strided kernel: p @ codes (1) or codes^T @ p^T (0)")
    ap.add_argument("--rkv-g", type=int, default=4, help="rotatekv_decode: KV heads per Hadamard group")
    ap.add_argument("--prerope", type=int, default=1, help="rotatekv_decode: RoPE in the kernel (1) or not (0)")
    ap.add_argument("--scale-lookup", default="dot", help="rotatekv_decode: key scales by one-hot dot or gather")
    ap.add_argument("--kron", type=int, default=1, help="rotatekv_decode: pre-RoPE keys by the Kronecker split (1) "
                                                        "or full D x D products (0)")
    ap.add_argument("--asm", type=int, default=1, help="KIVI-layout kernel: unpack codes by inline PTX (1, the "
                                                         "default on GPUs) or by Triton only (0)")
    ap.add_argument("--fast-trig", type=int, default=1, help="rotatekv_decode: RoPE by cos/sin.approx (1) or libdevice (0)")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--dump", default="")
    args = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    da = importlib.import_module(f"kvshrink.kernels.{args.module}")
    if args.module == "decode_strided" and args.kernel == "_decode_split_kernel":
        args.kernel = "_decode_strided_kernel"
    if args.module == "rotatekv_decode" and args.kernel == "_decode_split_kernel":
        args.kernel = "_rkv_split_kernel"

    fn = getattr(da, args.kernel)
    names = fn.arg_names
    const = dict(HG=args.hg, HG_PAD=max(16, 1 << (args.hg - 1).bit_length()), D=128, BLOCK_N=args.block_n,
                 TAIL_N=args.tail, KBITS=args.bits, KG=args.group, VBITS=args.bits, VG=args.group, HAS_MASK=False, DOT_F32=False,
                 F32=False, FAST=bool(args.fast), HAS_LENS=bool(args.lens), RING=256 if args.lens else 0,
                 PV_ROWS=bool(args.pv_rows), ASM=bool(args.asm), FAST_TRIG=bool(args.fast_trig))
    # RotateKV's kernel (--module rotatekv_decode): --hg is the query heads per KV head, --rkv-g the head group
    const.update(G=args.rkv_g, QROWS=max(16, 1 << (args.rkv_g * args.hg - 1).bit_length()), PREROPE=bool(args.prerope),
                 HAS_SLOTS=True, HAS_MU=True, HAS_SINKS=True, S_PAD=16, SCALE_DOT=args.scale_lookup == "dot",
                 NGK=8 * (128 // args.group), NGK_PAD=max(16, 8 * (128 // args.group)),
                 KRON=bool(args.kron and args.prerope and 128 // (8 // args.bits) >= 32))
    ptr = {"Q": "*fp16", "KP": "*u8", "KS": "*fp16", "KZ": "*fp16", "KR": "*fp16", "VP": "*u8", "VS": "*fp16",
           "VZ": "*fp16", "VR": "*fp16", "MASK": "*i8", "M_OUT": "*fp32", "L_OUT": "*fp32", "ACC_OUT": "*fp32", "LENS": "*i32",
           "MU": "*fp16", "KSLOT": "*i32", "HD": "*fp16", "POS": "*i32", "FREQ": "*fp32", "SINK": "*i32"}
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ptr:
            sig[n] = ptr[n]
        elif n in ("qk_scale", "rope_mult"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    # what the launcher specializes at run time: 16-byte aligned pointers, strides that are multiples of 16
    not16 = {"svs_t", "T", "TKQ", "TVQ", "H", "num_splits", "smask_b", "qk_scale", "HQ", "FAST_END", "MAIN_SPLITS",
             "TAIL_CHUNK", "tokens_per_split", "rope_mult", "R", "SLOTS", "NSINK", "spos_b", "ssink_b", "sks_t", "svs_t"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] != "constexpr" and n not in not16 and not n.startswith("so_")}
    src = ASTSource(fn=fn, signature=sig, constexprs={k: v for k, v in const.items() if k in names}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": args.warps, "num_stages": args.stages, **({"maxnreg": args.maxnreg} if args.maxnreg else {})})
    md = k.metadata
    print(f"regs? shared={md.shared} bytes, warps={md.num_warps}, stages={md.num_stages}")
    ttgir = k.asm["ttgir"]
    print("convert_layout:", ttgir.count("convert_layout"), " local_alloc:", ttgir.count("local_alloc"),
          " dot:", len(re.findall(r"tt\.dot |warp_group_dot", ttgir)), " wgmma:", ttgir.count("warp_group_dot"))
    cubin = k.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    nvdis = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    sass = subprocess.check_output([nvdis, "-c", f.name], text=True)
    ptx = k.asm["ptx"]
    m = re.search(r"\.maxnreg|\.reqntid", ptx)
    ops = collections.Counter()
    for line in sass.splitlines():
        mm = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if mm:
            ops[mm.group(1).split(".")[0]] += 1
    print("SASS instructions:", sum(ops.values()))
    print(" ", ", ".join(f"{o}:{c}" for o, c in ops.most_common(40)))
    res = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"), "-res-usage",
                          f.name], capture_output=True, text=True).stdout
    print(" ", " ".join(l.strip() for l in res.splitlines() if "REG" in l))
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for kind in ("ttgir", "ptx"):
            open(os.path.join(args.dump, f"kernel.{kind}"), "w").write(k.asm[kind])
        open(os.path.join(args.dump, "kernel.sass"), "w").write(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
