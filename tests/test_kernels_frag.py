"""Fragment-ordered 2-bit codes (kvshrink/kernels/frag.py) and the Gluon decode kernel over them (decode_frag.py).

The layout and the kernel's unpack PTX are checked here on any machine (the PTX by executing its instructions in
Python); the kernel itself needs an sm_80+ GPU (Gluon has no interpreter) and is compared with the float32
reference there."""
from __future__ import annotations

import os
import re
import struct

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the KIVI-layout kernels run interpreted (must precede triton)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.kernels import frag
from kvshrink.kernels.decode_frag import HAS_GLUON, FragKV, decode_frag_ref
from kvshrink.kernels.reference import PackedKV, decode_attention_ref
from kvshrink.storage import quantize

GPU = torch.cuda.is_available() and HAS_GLUON and torch.version.hip is None


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([32, 64, 128]), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(D, tiles, heads, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (2, heads, 32 * tiles, D), generator=g, dtype=torch.uint8)
    kp, vp = frag.pack_keys(codes), frag.pack_values(codes)
    assert kp.shape == (2, heads, 2 * tiles, 32, D // 32) and kp.dtype == torch.int32
    assert vp.shape == (2, heads, tiles, 32, D // 16) and vp.dtype == torch.int32
    assert torch.equal(frag.unpack_keys(kp), codes)
    assert torch.equal(frag.unpack_values(vp), codes)
    # same bytes as KIVI's 2-bit codes
    assert kp.numel() * 4 == vp.numel() * 4 == codes.numel() // 4


def _one_code(D: int, t: int, c: int, T: int = 32) -> torch.Tensor:
    codes = torch.zeros(1, 1, T, D, dtype=torch.uint8)
    codes[0, 0, t, c] = 3
    return codes


def test_documented_bit_positions():
    # key (t=9, c=42): g=1, t8=1, q=1, c0=0, c3=1, c4=0, word 1 -> lane 5, bit 2*(1 + 0 + 4) = 10
    kp = frag.pack_keys(_one_code(128, 9, 42, T=16))
    assert kp[0, 0, 0, 5, 1].item() == 3 << 10 and int(kp.ne(0).sum()) == 1
    # value (t=19, c=13): t0=1, q=1, t3=0, t4=1, g=5, c3=1, word 0 -> lane 21, bit 16 + 2*(0 + 2 + 4) = 28
    vp = frag.pack_values(_one_code(128, 19, 13))
    assert vp[0, 0, 0, 21, 0].item() == 3 << 28 and int(vp.ne(0).sum()) == 1
    # the top bit lands in the sign of the int32 word: still the same 32 bits
    vp = frag.pack_values(_one_code(128, 17, 8))  # t0=1, t3=0, t4=1, c3=1 -> bit 16 + 2*6 = 28 (lane 0)
    kp = frag.pack_keys(_one_code(128, 8, 25, T=16))  # t8=1, c0=1, c3=1, c4=1 -> bit 16 + 2*7 = 30
    assert kp[0, 0, 0, 0, 0].item() == struct.unpack("<i", struct.pack("<I", 3 << 30))[0]
    assert frag.unpack_keys(kp)[0, 0, 8, 25] == 3 and frag.unpack_values(vp)[0, 0, 17, 8] == 3


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="whole tiles of 32 tokens"):
        frag.pack_values(torch.zeros(1, 1, 48, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        frag.pack_keys(torch.zeros(1, 1, 16, 48, dtype=torch.uint8))


def _kivi(B=2, H=2, T=256, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g).half()
    k[..., 3] *= 8  # an outlier channel, as real keys have
    v = torch.randn(B, H, T, D, generator=g).half()
    return quantize(k, 2, "token", 128), quantize(v, 2, "channel", D)


def test_fragkv_holds_kivis_cache_exactly():
    kq, vq = _kivi()
    f = FragKV.from_kivi(kq, vq)
    k, v = f.dense()
    assert torch.equal(k, kq.dequantize(torch.float32)) and torch.equal(v, vq.dequantize(torch.float32))
    assert f.tokens == 256
    q = torch.randn(2, 8, 128).half()
    assert torch.equal(decode_frag_ref(q, f), decode_attention_ref(q, PackedKV(kq, None, vq, None)))


def test_fragkv_refuses_other_caches():
    kq, vq = _kivi()
    with pytest.raises(ValueError, match="2-bit asymmetric KIVI"):
        FragKV.from_kivi(kq, quantize(torch.randn(2, 2, 256, 128).half(), 2, "channel", 32))
    with pytest.raises(ValueError, match="2-bit asymmetric KIVI"):
        FragKV.from_kivi(quantize(torch.randn(2, 2, 256, 128).half(), 4, "token", 128), vq)


# ------------------------------------------------------------------------ the unpack PTX, executed in Python
def _run_ptx(ptx: str, word: int) -> list[tuple[float, float]]:
    """Execute the unpack's instructions (mov/shr/lop3 0xea/sub.rn.f16x2) on one word; the 8 outputs as fp16 pairs."""
    regs = {f"${i}": word for i in range(8, 24)}

    def val(x: str) -> int:
        return regs[x] if x in regs else int(x, 0)

    def halves(x: int) -> tuple[float, float]:
        return tuple(struct.unpack("<2e", struct.pack("<I", x & 0xFFFFFFFF)))

    for ins in re.findall(r"([a-z0-9.]+) ([^;]+);", ptx):
        op, args = ins[0], [a.strip() for a in ins[1].split(",")]
        if op.startswith(".reg"):
            continue
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "shr.b32":
            regs[args[0]] = (val(args[1]) & 0xFFFFFFFF) >> int(args[2])
        elif op == "lop3.b32":
            assert args[4] == "0xea"  # (a & b) | c
            regs[args[0]] = (val(args[1]) & val(args[2])) | val(args[3])
        elif op == "sub.rn.f16x2":
            a, b = halves(val(args[1])), halves(val(args[2]))
            regs[args[0]] = struct.unpack("<I", struct.pack("<2e", a[0] - b[0], a[1] - b[1]))[0]
        else:
            raise AssertionError(f"unexpected PTX {op}")
    return [halves(regs[f"${j}"]) for j in range(8)]


@pytest.mark.skipif(not HAS_GLUON, reason="needs Triton's Gluon")
@pytest.mark.parametrize("fold", [False, True])
def test_unpack_ptx_reads_each_field(fold):
    from kvshrink.kernels.decode_frag import _unpack_ptx

    ptx = _unpack_ptx(fold)
    g = torch.Generator().manual_seed(1)
    for word in [0, 0xFFFFFFFF, 0x1B1B1B1B] + torch.randint(0, 2**32, (20,), generator=g, dtype=torch.int64).tolist():
        out = _run_ptx(ptx, word)
        for j in range(8):
            f = j // 2 + 4 * (j % 2)  # register j holds field f (frag.py)
            lo, hi = (word >> 2 * f) & 3, (word >> (16 + 2 * f)) & 3
            scale = 4 ** (f % 4) if fold else 1
            assert out[j] == (lo * scale, hi * scale), (hex(word), j)


# ------------------------------------------------------------------------ the kernel (GPU)
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU (sm_80+) and Gluon")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("fold", [False, True])
def test_decode_frag_matches_reference(D, G, block, fold):
    from kvshrink.kernels.decode_frag import decode_attention_frag

    B, H, T = 2, 2, 640
    kq, vq = _kivi(B, H, T, D, seed=D + G)
    f = FragKV.from_kivi(kq, vq)
    f = FragKV(*(x.cuda() for x in (f.kf, f.vf, f.k_scale, f.k_zero, f.v_scale, f.v_zero)), f.key_group)
    q = torch.randn(B, H * G, D, generator=torch.Generator().manual_seed(D + G + block)).half().cuda()
    ref = decode_frag_ref(q, f)
    for splits in (None, 1, 3):
        out = decode_attention_frag(q, f, num_splits=splits, block=block, fold=fold)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        # fp16 operands: the query times each key group's scale and p times each value scale are rounded to
        # fp16 (~2x the KIVI-layout kernel's error, which rounds dequantized keys and p instead)
        assert err < 3e-3, (splits, err)


@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU (sm_80+) and Gluon")
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("maxnreg,lazy", [(0, False), (128, False), (0, True), (168, True)])
def test_decode_frag_launch_options_keep_the_result(block, stages, maxnreg, lazy):
    """The pipeline depth, a register cap, lazy rescaling and the split count change the schedule, not the math;
    splits of a single key group (fewer steps than pipeline stages) included. The query is scaled up so the running
    max moves by more than the lazy threshold within a split."""
    from kvshrink.kernels.decode_frag import decode_attention_frag

    B, H, G, D, T = 3, 2, 4, 128, 1024
    kq, vq = _kivi(B, H, T, D, seed=7)
    f = FragKV.from_kivi(kq, vq)
    f = FragKV(*(x.cuda() for x in (f.kf, f.vf, f.k_scale, f.k_zero, f.v_scale, f.v_zero)), f.key_group)
    q = 3 * torch.randn(B, H * G, D, generator=torch.Generator().manual_seed(11)).half().cuda()
    ref = decode_frag_ref(q, f)
    for kw in ({"num_splits": 8}, {"num_splits": 3}, {"waves": 1}, {"scale_pipe": False}, {}):
        out = decode_attention_frag(q, f, block=block, stages=stages, maxnreg=maxnreg, lazy=lazy, **kw)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 3e-3, kw


def test_resident_warps_follow_the_per_scheduler_register_file():
    """ncu's block limit on an H200 (one-warp blocks): 172 registers -> 8 per SM (2 per scheduler), not
    65536 // (172 * 32 rounded to 256) = 11; 168 -> 12; 128 -> 16; shared memory and the 32-block cap bind too."""
    from kvshrink.kernels.decode_frag import resident_warps_per_sm

    assert resident_warps_per_sm(172, 9728) == 8
    assert resident_warps_per_sm(168, 9728) == 12
    assert resident_warps_per_sm(162, 9728) == 12
    assert resident_warps_per_sm(128, 9728) == 16
    assert resident_warps_per_sm(255, 9728) == 8
    assert resident_warps_per_sm(32, 0) == 32
    assert resident_warps_per_sm(64, 100_000) == 2


def test_wave_splits_fill_whole_waves():
    from kvshrink.kernels.decode_frag import _wave_splits

    # 64 heads x 24 splits = 1536 programs in 1584 slots: one full wave of 11 groups each
    assert _wave_splits(64, 1584, 256) == 24
    # 936 heads (117 sequences x 8): 5 splits of 13 groups in 3 waves, not 32 tiny splits (merge work)
    assert _wave_splits(936, 1584, 64) == 5
    assert _wave_splits(1, 1584, 1) == 1


@pytest.mark.parametrize("dtype,group,qheads,want_gpu", [
    (torch.bfloat16, 64, 8, "frag"), (torch.float16, 64, 16, "frag"), (torch.float32, 64, 8, "kivi"),
    (torch.bfloat16, 32, 8, "kivi"), (torch.bfloat16, 64, 32, "kivi"), (torch.bfloat16, 64, None, "kivi")])
def test_static_layer_auto_layout(dtype, group, qheads, want_gpu):
    """The graph layer's default layout: the fragment order for 16-bit models where it applies (2 bits, one value
    group per token, at most 8 query heads per KV head and known to be so), KIVI's layout otherwise (fp32 models
    keep fp32 dot products; 16 query heads per KV head; a layer not told its query heads) and on machines without
    a GPU."""
    from kvshrink.kernels.graph import StaticKiviLayer

    dev = "cuda" if GPU else "cpu"
    layer = StaticKiviLayer(256, bits=2, group=group, residual=64, query_heads=qheads)
    x = torch.randn(1, 2, 80, 64, device=dev).to(dtype)
    layer.update(x, x)
    assert layer.layout == (want_gpu if GPU else "kivi")


@pytest.mark.parametrize("D,group,T,tokens", [(64, 64, 128, 128), (128, 128, 256, 200), (64, 128, 256, 33)])
def test_repack_kernels_match_the_torch_reorder(D, group, T, tokens):
    """The prefill's Triton reorder (KIVI bytes -> fragment words) is bit-identical to frag.pack_* on the codes;
    a partial last value tile holds zeros past ``tokens``."""
    from kvshrink.kernels.frag_pack import repack_keys, repack_values

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, T, D).half().to(dev)
    kq = quantize(x, 2, "token", group)
    vq = quantize(x[:, :, :tokens], 2, "channel", D)
    kw = repack_keys(kq.packed, group, torch.empty(2, 3, T // 16, 32, D // 32, dtype=torch.int32, device=dev))
    kc = kq.codes().permute(0, 1, 2, 4, 3).reshape(2, 3, T, D)
    assert torch.equal(kw, frag.pack_keys(kc))
    n = -(-tokens // 32)
    vw = repack_values(vq.packed, tokens, torch.full((2, 3, n, 32, D // 16), -1, dtype=torch.int32, device=dev))
    vc = torch.nn.functional.pad(vq.codes(), (0, 0, 0, 32 * n - tokens))
    assert torch.equal(vw, frag.pack_values(vc))


_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from kvshrink.kernels import decode_frag as F
part, has_mask, maxnreg = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
names = ["Q", "KF", "VF", "KS", "KZ", "VS", "VZ", "M_OUT", "L_OUT", "ACC_OUT", "KR", "VR", "MASK", "LENS", "sq_b",
         "sq_h", "skf", "svf", "sks", "svs", "srb", "srh", "srt", "smask_b", "H", "T", "per_split", "num_splits",
         "main_splits", "RING", "qk_scale"]
ptr = dict(Q="*fp16", KF="*i32", VF="*i32", KS="*fp16", KZ="*fp16", VS="*fp16", VZ="*fp16", M_OUT="*fp32",
           L_OUT="*fp32", ACC_OUT="*fp32", KR="*bf16", VR="*bf16", MASK="*i8", LENS="*i32")
sig = {n: ptr.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
const = F._consts(4, 128, 128, part, has_mask, F.launch_options(maxnreg=maxnreg))
opts = {k: const.pop(k) for k in ("num_warps", "maxnreg") if k in const}
sig.update({k: "constexpr" for k in const})
# what the launcher specializes at run time: 16-byte aligned buffers, strides of whole tiles and capacities
aligned = set(ptr) | {"sq_b", "sq_h", "skf", "svf", "sks", "svs", "srb", "srh", "srt", "smask_b", "T", "per_split"}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
k = triton.compile(GluonASTSource(fn=F._frag_decode_kernel, signature=sig, constexprs=const, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options=opts)
ptx = k.asm["ptx"]
print("OK", len(k.asm["cubin"]) > 0, "mma.sync.aligned.m16n8k16" in ptx, "cp.async" in ptx)
"""


@pytest.mark.skipif(not HAS_GLUON, reason="needs Triton's Gluon")
@pytest.mark.parametrize("part,has_mask,maxnreg", [(0, False, 0), (1, False, 168), (1, True, 168), (2, True, 0)])
def test_gluon_kernel_compiles_for_sm90_with_this_triton(part, has_mask, maxnreg):
    """The kernel cannot run without a GPU, but it compiles for sm_90 with Triton's bundled ptxas (in a fresh
    process: this module runs Triton interpreted): it catches an API the installed Triton renamed (Gluon moves
    fast) before a GPU does."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, str(part), str(int(has_mask)), str(maxnreg)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("OK"))
    # a cubin, the tensor-core MMA, and the cp.async pipeline in the main loops only
    assert line == f"OK True True {part != 2}"


@pytest.mark.skipif(not HAS_GLUON, reason="needs Triton's Gluon")
def test_launch_options_and_input_checks_name_the_problem():
    """Options resolve against LAUNCH (an unknown name is refused); a query that does not match the cache, and
    sliced (non-contiguous) cache tensors, are refused before anything is compiled or launched."""
    from kvshrink.kernels.decode_frag import LAUNCH, decode_attention_frag, launch_options

    assert launch_options() == LAUNCH
    assert launch_options(block=128, lazy=False) == {**LAUNCH, "block": 128, "lazy": False}
    with pytest.raises(TypeError, match="unknown launch option.*'blocks'"):
        launch_options(blocks=64)
    kq, vq = _kivi(2, 2, 256, 64, seed=3)
    f = FragKV.from_kivi(kq, vq)
    with pytest.raises(ValueError, match="does not match the cache"):
        decode_attention_frag(torch.randn(3, 8, 64).half(), f)  # batch 3 over a batch-2 cache
    with pytest.raises(ValueError, match="does not match the cache"):
        decode_attention_frag(torch.randn(2, 8, 128).half(), f)  # head_dim 128 over 64
    vs_t = f.v_scale.transpose(1, 2).contiguous().transpose(1, 2)  # same values and shape, strided
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention_frag(torch.randn(2, 8, 64).half(), FragKV(f.kf, f.vf, f.k_scale, f.k_zero, vs_t, f.v_zero,
                                                                    f.key_group))
