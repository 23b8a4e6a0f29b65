"""GPU benchmarks of kvshrink's Triton kernels (issue 9). Needs CUDA; writes one JSON file.

Sections (``--only`` picks some):

* ``roof``    device-to-device copy bandwidth (bytes read + written), the memory roof used below.
* ``decode``  packed decode attention vs fp16 SDPA (flash) decode, side by side, for B x T in
              {1x32K, 8x8K, 8x32K, 1x128K, 16x32K}, 32 query heads, 8 KV heads, head_dim 128; achieved
              bandwidth over the bytes the kernel actually reads; accuracy vs the float32 reference.
* ``quant``   quantize + pack cost as a fraction of an 8K-token prefill (Llama-3-8B shape, bf16).
* ``graph``   decode tokens/s with one greedy step captured in a CUDA graph and replayed (graph.py's static
              layers; 16-bit baseline: preallocated K/V + split-K Triton kernel, also graph-captured), at
              fp16's largest batch and at each one's largest batch, random-weight Llama-3-8B shape.
* ``e2e``     the same in eager mode (host-bound: HF eager Llama needs ~33 ms CPU per step), fp16 cache vs
              ``kivi:bits=2`` served by the kernels, and the largest batch whose cache fits a fixed budget.

* ``chunk``   chunked prefill over a packed past (``chunk_attention``) vs dequantize-then-SDPA and vs SDPA over an
              uncompressed fp16 cache: time and extra memory per call (B x past x chunk in CHUNK_CONFIGS).
* ``chunk_e2e`` a 32K prompt prefilled in 2K chunks through ``kivi:bits=2`` kernel layers, with and without
              ``chunk_attention`` (random-weight Llama-3-8B shape): wall time and peak memory.
* ``rdecode`` only the RotateKV decode kernel rows (``rkv_*`` keys, with SDPA beside them); the ``decode`` section
              carries the same rows after KIVI's. RotateKV layout: key_axis=channel, G=4 heads per Hadamard
              group, a random channel permutation, key centre, 4 sink tokens, pre-RoPE keys (RoPE in the kernel).
* ``e2e`` also runs ``rotatekv:bits=2`` (kernel layers; channel order calibrated with the calibrate API on
  random token ids), next to fp16 and kivi.
* ``graph_rkv`` ``rotatekv:bits=2`` in graph mode (rotatekv_graph.py's static layers) beside the 16-bit static
              baseline, CUDA-graph replayed, at B=8, fp16's largest batch and RotateKV's largest batch.

Decode rows carry both kernels: ``g128``/``g32`` = the channel-strided layout (decode_strided.py),
``g128_kivi``/``g32_kivi`` = KIVI's storage layout (decode_attention.py); ``dense_triton`` = the graph-mode
16-bit baseline kernel.

Timings: ``triton.testing.do_bench`` medians (CUDA events), inputs rotated among copies so that
repeated runs do not read L2 (50 MB on an H100).

    PYTHONPATH=. python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100_v2_final.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation at max batch

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HQ, HKV, D = 32, 8, 128
DECODE_CONFIGS = [(1, 32768), (8, 8192), (8, 32768), (1, 131072), (16, 32768)]
L2_BYTES = 50 * 2**20
LOG: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def bench(fn, warmup=25, rep=100) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copies_for(nbytes: int) -> int:
    """Input copies to rotate among so the working set is >= 4x L2."""
    return max(1, min(16, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


class Rotator:
    def __init__(self, n: int) -> None:
        self.i, self.n = 0, n

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


# ----------------------------------------------------------------------------------------- roof
def sec_roof(res: dict) -> float:
    n = 2 * 2**30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    bw = 2 * n / (ms * 1e-3)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = bench(lambda: x @ y)
    res["roof"] = {"copy_bytes": 2 * n, "copy_ms": ms, "copy_GBps": bw / 1e9,
                   "bf16_matmul_TFLOPs": 2 * 8192**3 / (mm * 1e-3) / 1e12}
    log(f"roof: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {res['roof']['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    del a, b, x, y
    torch.cuda.empty_cache()
    return bw


# ----------------------------------------------------------------------------------------- decode
def make_packed(B, T, bits, group, residual=128, dtype=torch.float16, seed=0, strided=False):
    """A packed KIVI cache of T tokens (incl. the new one) as decoding leaves it: keys quantized in
    whole ``residual`` blocks (the rest in the fp residual), values with exactly ``residual`` fp tokens + new.
    ``strided``: the kernel layer's channel-strided layout (same bytes), else KIVI's storage layout."""
    from kvshrink.kernels import PackedKV
    from kvshrink.kernels import quantize_pack as qp_kivi
    from kvshrink.kernels.strided import quantize_pack_strided

    quantize_pack = quantize_pack_strided if strided else qp_kivi

    g = torch.Generator(device="cuda").manual_seed(seed)
    tkq = max(0, (T - 65) // residual * residual)
    tvq = max(0, T - residual - 1)
    k = torch.randn(B, HKV, T, D, device="cuda", dtype=dtype, generator=g)
    k[..., 5] *= 6
    kq = quantize_pack(k[:, :, :tkq], bits, "token", group) if tkq else None
    k_res = k[:, :, tkq:].clone()
    del k
    v = torch.randn(B, HKV, T, D, device="cuda", dtype=dtype, generator=g)
    vq = quantize_pack(v[:, :, :tvq], bits, "channel", group) if tvq else None
    v_res = v[:, :, tvq:].clone()
    del v
    return PackedKV(kq, k_res, vq, v_res)


def sdpa_decode_fn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def sec_decode(res: dict, copy_bw: float, variants: list[dict], svariants: list[dict],
               rvariants: list[dict] | None = None) -> None:
    from kvshrink.kernels import decode_attention, decode_attention_ref
    from kvshrink.kernels.decode_strided import decode_attention_strided
    from kvshrink.kernels.graph import _splits, decode_attention_dense

    rows = []
    for B, T in DECODE_CONFIGS:
        torch.cuda.empty_cache()
        row = {"B": B, "T": T, "Hq": HQ, "Hkv": HKV, "D": D}
        # fp16 SDPA flash over dense K/V
        dense_bytes = 2 * B * HKV * T * D * 2
        n = copies_for(dense_bytes)
        qs = [torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16) for _ in range(n)]
        ks = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16) for _ in range(n)]
        vs = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16) for _ in range(n)]
        rot = Rotator(n)
        fns = [sdpa_decode_fn(qs[i], ks[i], vs[i]) for i in range(n)]
        try:
            fns[0]()
            row["sdpa_ms"] = bench(lambda: fns[rot()]())
            row["sdpa_backend"] = "flash"
        except RuntimeError as e:  # no flash for this shape: let SDPA choose
            log(f"flash backend refused ({e}); default SDPA backend")
            row["sdpa_ms"] = bench(lambda: F.scaled_dot_product_attention(qs[rot()], ks[0], vs[0], enable_gqa=True))
            row["sdpa_backend"] = "default"
        row["sdpa_bytes"] = dense_bytes
        row["sdpa_GBps"] = dense_bytes / (row["sdpa_ms"] * 1e-3) / 1e9
        # the graph-mode 16-bit baseline kernel (graph.py: device length, fixed splits) on the same inputs
        try:
            lens = torch.tensor([T], dtype=torch.int32, device="cuda")
            S = _splits(B * HKV, torch.device("cuda"), tokens=T)
            q3 = [x[:, :, 0] for x in qs]
            decode_attention_dense(q3[0], ks[0], vs[0], lens, S)
            row["dense_triton_ms"] = bench(lambda: decode_attention_dense(q3[(j := rot())], ks[j], vs[j], lens, S))
            row["dense_triton_GBps"] = dense_bytes / (row["dense_triton_ms"] * 1e-3) / 1e9
        except Exception as e:  # noqa: BLE001
            log(f"dense triton kernel failed at B={B} T={T}: {type(e).__name__}: {e}")
        del qs, ks, vs, fns
        torch.cuda.empty_cache()
        for group, layout in ((128, "strided"), (128, "kivi"), (32, "strided"), (32, "kivi")):
            strided = layout == "strided"
            kvs = [make_packed(B, T, 2, group, seed=i, strided=strided)
                   for i in range(copies_for(make_packed_bytes(B, T, group)))]
            qs = [torch.randn(B, HQ, D, device="cuda", dtype=torch.float16) for _ in kvs]
            rot = Rotator(len(kvs))
            kv = kvs[0]
            read = kv.nbytes() + qs[0].numel() * 2 * 2
            key = f"g{group}" if strided else f"g{group}_kivi"
            fn_ = decode_attention_strided if strided else decode_attention
            # KIVI's layout: its launch with the codes unpacked by Triton only and by inline PTX (the default)
            vlist = svariants if strided else [dict(v, asm=a) for v in [
                v for v in variants if v["block_n"] == (128 if group == 128 else 64)][:1] for a in (False, True)]
            row[f"{key}_bytes"] = read
            row[f"{key}_roof_ms"] = read / copy_bw * 1e3  # HBM moves copy_bw bytes/s in all, reads alone too
            best = None
            for var in vlist:
                try:
                    fn_(qs[0], kv, **var)
                    ms = bench(lambda: fn_(qs[(j := rot())], kvs[j], **var))
                except Exception as e:  # noqa: BLE001 - record and go on
                    log(f"variant {var} failed at B={B} T={T} g={group}: {type(e).__name__}: {e}")
                    continue
                row.setdefault(f"{key}_variants", []).append({**var, "ms": ms})
                if best is None or ms < best[0]:
                    best = (ms, var)
            if best is None:
                continue
            ms, var = best
            by_asm = {v.get("asm"): v["ms"] for v in row[f"{key}_variants"]}
            if not strided and False in by_asm and True in by_asm:
                row[f"{key}_ptx_unpack_speedup"] = by_asm[False] / by_asm[True]  # same launch, side by side
            row[f"{key}_ms"] = ms
            row[f"{key}_variant"] = var
            row[f"{key}_GBps"] = read / (ms * 1e-3) / 1e9
            row[f"{key}_roof_frac"] = row[f"{key}_roof_ms"] / ms
            row[f"{key}_speedup_vs_sdpa"] = row["sdpa_ms"] / ms
            # accuracy on a fresh input
            q = torch.randn(B, HQ, D, device="cuda", dtype=torch.float16)
            if B * T <= 8 * 32768:
                ref = decode_attention_ref(q, kv)
                out = fn_(q, kv, **var)
                row[f"{key}_rel_err"] = float((out.float() - ref).norm() / ref.norm())
                del ref
            # today's path: dequantize to fp16, then SDPA (measured once, at 8x32K)
            if (B, T) == (8, 32768) and group == 128 and strided:
                def deq():
                    k, v = kv.dense(torch.float16)
                    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
                        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                row["dequant_sdpa_ms"] = bench(deq, warmup=5, rep=20)
            del kvs, qs
            torch.cuda.empty_cache()
        finish_row(rows, row, "decode", copy_bw, rvariants or None)
    res["decode"] = rows


CHUNK_CONFIGS = [(1, 8192, 512), (1, 32768, 512), (1, 32768, 2048), (8, 8192, 512), (4, 32768, 1024)]


def chunk_kv(B, T, C, seed=0):
    """A packed 2-bit group-128 past of ``T - C`` tokens (as decoding leaves it) with a 16-bit chunk of ``C`` tokens
    appended to its residual: what a prefill chunk's handle holds."""
    from kvshrink.kernels import PackedKV

    kv = make_packed(B, T - C, 2, 128, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1000)
    k = torch.randn(B, HKV, C, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(B, HKV, C, D, device="cuda", dtype=torch.float16, generator=g)
    return PackedKV(kv.kq, torch.cat([kv.k_res, k], 2), kv.vq, torch.cat([kv.v_res, v], 2))


def sdpa_chunk(q, k, v):
    """SDPA for a chunk that ends the sequence (causal, aligned to the lower right), GQA by expanding K/V if the
    backend refuses ``enable_gqa`` with a causal bias."""
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(q.shape[2], k.shape[2])
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    except (RuntimeError, TypeError):
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              attn_mask=bias)


def peak_extra(fn) -> int:
    """Bytes ``fn`` allocates beyond what is held before it runs (peak)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def sec_chunk(res: dict, cvariants: list[dict]) -> None:
    """Chunked prefill over a packed past (``chunk_attention``) beside the path without it (dequantize the past to
    fp16, then SDPA) and beside an uncompressed fp16 cache (SDPA over 16-bit K/V): time and the extra memory of one
    call, per layer, Llama-3-8B attention shape, 2-bit group 128."""
    from kvshrink.kernels import chunk_attention, chunk_attention_ref

    rows = []
    for B, T, C in CHUNK_CONFIGS:
        torch.cuda.empty_cache()
        row = {"B": B, "T": T, "chunk": C, "Hq": HQ, "Hkv": HKV, "D": D}
        try:
            kvs = [chunk_kv(B, T, C, seed=i) for i in range(copies_for(make_packed_bytes(B, T, 128)))]
            qs = [torch.randn(B, HQ, C, D, device="cuda", dtype=torch.float16) for _ in kvs]
            rot = Rotator(len(kvs))
            kf, vf = (torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16) for _ in range(2))
            row["fp16_sdpa_ms"] = bench(lambda: sdpa_chunk(qs[rot()], kf, vf))
            row["fp16_sdpa_extra_bytes"] = peak_extra(lambda: sdpa_chunk(qs[0], kf, vf))
            del kf, vf

            def deq(j):
                k, v = kvs[j].dense(torch.float16)
                return sdpa_chunk(qs[j], k, v)
            row["dequant_sdpa_ms"] = bench(lambda: deq(rot()), warmup=5, rep=30)
            row["dequant_sdpa_extra_bytes"] = peak_extra(lambda: deq(0))
            best = None
            for var in cvariants:
                try:
                    chunk_attention(qs[0], kvs[0], **var)
                    ms = bench(lambda: chunk_attention(qs[(j := rot())], kvs[j], **var))
                except Exception as e:  # noqa: BLE001 - record and go on
                    log(f"chunk variant {var} failed at B={B} T={T} C={C}: {type(e).__name__}: {e}")
                    continue
                row.setdefault("kernel_variants", []).append({**var, "ms": ms})
                if best is None or ms < best[0]:
                    best = (ms, var)
            if best is not None:
                row["kernel_ms"], row["kernel_variant"] = best
                row["kernel_extra_bytes"] = peak_extra(lambda: chunk_attention(qs[0], kvs[0], **best[1]))
                row["kernel_speedup_vs_dequant"] = row["dequant_sdpa_ms"] / best[0]
                row["kernel_vs_fp16"] = row["fp16_sdpa_ms"] / best[0]
                if B * T * C <= 8192 * 512:  # float32 reference: (B, Hq, C, T) scores
                    ref = chunk_attention_ref(qs[0], kvs[0])
                    row["kernel_rel_err"] = float((chunk_attention(qs[0], kvs[0], **best[1]).float() - ref).norm()
                                                  / ref.norm())
                    del ref
            log(f"chunk B={B} T={T} C={C}: fp16 sdpa {row['fp16_sdpa_ms']:.3f} ms, dequant+sdpa "
                f"{row['dequant_sdpa_ms']:.3f} ms ({row['dequant_sdpa_extra_bytes'] / 2**20:.0f} MiB extra), kernel "
                f"{row.get('kernel_ms', float('nan')):.3f} ms ({row.get('kernel_extra_bytes', 0) / 2**20:.0f} MiB), "
                f"variant {row.get('kernel_variant')}, rel err {row.get('kernel_rel_err', float('nan')):.1e}")
            del kvs, qs
        except Exception as e:  # noqa: BLE001
            log(f"chunk row B={B} T={T} C={C} failed: {type(e).__name__}: {e}")
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    res["chunk"] = rows


def make_rotatekv_state(B, T, bits=2, G=4, sinks=4, seed=0, dtype=torch.float16, prerope=True):
    """A RotateKV decode state (kvshrink.kernels.rotatekv_decode.RotateKVState) of T quantized tokens + the new one,
    with random codes, scales, centre, channel permutation and ``sinks`` exact sink tokens (timing and the kernel's
    accuracy against its own reference do not depend on the values being real keys). ``prerope=False``: keys
    stored post-RoPE (``rotatekv:prerope=false``: ``H_D`` moves onto the query, no RoPE in the kernel)."""
    from kvshrink.kernels.rotatekv_decode import RotateKVState
    from kvshrink.storage import QuantizedTensor

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def stream():
        packed = torch.randint(0, 256, (B, HKV, T, D * bits // 8), device=dev, dtype=torch.uint8, generator=g)
        scale = (torch.rand(B, HKV, T, 1, device=dev, generator=g) * 0.3 + 0.05).to(torch.float16)
        zero = (-scale.float() * (2 ** bits - 1) / 2).to(torch.float16)
        return QuantizedTensor(packed, scale, zero, bits, "channel", D, T, D, dtype)

    kq, vq = stream(), stream()
    slots = torch.randperm(HKV * D, device=dev, generator=g)
    kq.slots = slots  # keys grouped in a (random) calibrated order, as RotateKV's default layout
    sidx = torch.arange(sinks, device=dev, dtype=torch.int32)[None].expand(B, sinks).contiguous()
    didx = torch.cat([sidx.long(), torch.full((B, 1), T, device=dev, dtype=torch.long)], 1)
    return RotateKVState(
        kq=kq, vq=vq, k_mu=(torch.randn(B, HKV, 1, D, device=dev, generator=g) * 0.1).to(torch.float16),
        key_slots=slots.to(torch.int32),
        pos=torch.arange(T, device=dev, dtype=torch.int32)[None].expand(B, T).contiguous() if prerope else None,
        inv_freq=1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)) if prerope else None,
        rope_scale=1.0,
        head_group=G, rotate_values=True, sink_idx=sidx,
        dense_k=torch.randn(B, HKV, sinks + 1, D, device=dev, dtype=dtype, generator=g),
        dense_v=torch.randn(B, HKV, sinks + 1, D, device=dev, dtype=dtype, generator=g), dense_idx=didx, tokens=T + 1)


def rotatekv_rows(row: dict, B: int, T: int, copy_bw: float, rvariants: list[dict]) -> None:
    """RotateKV decode kernel at B x T (keys ``rkv_*``): time, GB/s over the bytes it reads, roof, accuracy."""
    from kvshrink.kernels.rotatekv_decode import attention_ref, decode_attention_rotatekv, state_dense

    per_copy = B * HKV * T * (2 * D * 2 // 8 + 8) * 1.0
    states = [make_rotatekv_state(B, T, seed=i) for i in range(copies_for(per_copy))]
    qs = [torch.randn(B, HQ, D, device="cuda", dtype=torch.float16) for _ in states]
    rot = Rotator(len(states))
    read = states[0].nbytes() + qs[0].numel() * 2 * 2
    row["rkv_bytes"] = read
    row["rkv_roof_ms"] = read / copy_bw * 1e3
    best = None
    for var in rvariants:
        try:
            decode_attention_rotatekv(qs[0], states[0], **var)
            ms = bench(lambda: decode_attention_rotatekv(qs[(j := rot())], states[j], **var))
        except Exception as e:  # noqa: BLE001 - record and go on
            log(f"rotatekv variant {var} failed at B={B} T={T}: {type(e).__name__}: {e}")
            continue
        row.setdefault("rkv_variants", []).append({**var, "ms": ms})
        if best is None or ms < best[0]:
            best = (ms, var)
    if best is None:
        return
    ms, var = best
    row.update(rkv_ms=ms, rkv_variant=var, rkv_GBps=read / (ms * 1e-3) / 1e9, rkv_roof_frac=row["rkv_roof_ms"] / ms)
    if "sdpa_ms" in row:
        row["rkv_speedup_vs_sdpa"] = row["sdpa_ms"] / ms
    # rotatekv:prerope=false (keys stored post-RoPE): the same launch, H_D on the query, no RoPE per token
    post = [make_rotatekv_state(B, T, seed=i, prerope=False) for i in range(len(states))]
    try:
        decode_attention_rotatekv(qs[0], post[0], **var)
        row["rkv_postrope_ms"] = bench(lambda: decode_attention_rotatekv(qs[(j := rot())], post[j], **var))
        if "sdpa_ms" in row:
            row["rkv_postrope_speedup_vs_sdpa"] = row["sdpa_ms"] / row["rkv_postrope_ms"]
    except Exception as e:  # noqa: BLE001
        log(f"rotatekv post-RoPE at B={B} T={T} failed: {type(e).__name__}: {e}")
    del post
    if B * T <= 8 * 32768:  # accuracy vs the state's float32 torch reference (validated against RotateKVLayer.dense)
        q = torch.randn(B, HQ, D, device="cuda", dtype=torch.float16)
        k, v = state_dense(states[0], torch.float32)
        ref = attention_ref(q, k, v)
        del k, v
        out = decode_attention_rotatekv(q, states[0], **var)
        row["rkv_rel_err"] = float((out.float() - ref).norm() / ref.norm())
        if (B, T) == (8, 32768):  # today's path: dense K/V of the whole cache, then SDPA
            def deq():
                k, v = state_dense(states[0], torch.float16)
                with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
            row["rkv_dequant_sdpa_ms"] = bench(deq, warmup=2, rep=5)
    del states, qs
    torch.cuda.empty_cache()


def sec_rdecode(res: dict, copy_bw: float, rvariants: list[dict]) -> None:
    """Only the RotateKV rows, with fp16 SDPA flash beside them (same inputs as the decode section's)."""
    rows = []
    for B, T in DECODE_CONFIGS:
        torch.cuda.empty_cache()
        row = {"B": B, "T": T, "Hq": HQ, "Hkv": HKV, "D": D}
        n = copies_for(2 * B * HKV * T * D * 2)
        qs = [torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16) for _ in range(n)]
        ks = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16) for _ in range(n)]
        vs = [torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16) for _ in range(n)]
        rot = Rotator(n)
        fns = [sdpa_decode_fn(qs[i], ks[i], vs[i]) for i in range(n)]
        row["sdpa_ms"] = bench(lambda: fns[rot()]())
        del qs, ks, vs, fns
        torch.cuda.empty_cache()
        finish_row(rows, row, "rdecode", copy_bw, rvariants)
    res["rdecode"] = rows


def finish_row(rows: list, row: dict, section: str, copy_bw: float, rvariants: list[dict] | None) -> None:
    """Add the RotateKV kernel's keys to a decode row (unless ``rvariants`` is None; a failure is logged), keep
    the row and log it."""
    if rvariants is not None:
        try:
            rotatekv_rows(row, row["B"], row["T"], copy_bw, rvariants)
        except Exception:  # noqa: BLE001
            log(f"rotatekv rows failed at B={row['B']} T={row['T']}:\n{traceback.format_exc()}")
    rows.append(row)
    log(f"{section} " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))


def make_packed_bytes(B, T, group, bits=2):
    """Packed bytes of K and V per (sequence, head, token): codes + fp16 scale and zero per group."""
    per_tok = 2 * (D * bits // 8) + 2 * (2 * 2 * D / group)
    return B * HKV * T * per_tok


# ----------------------------------------------------------------------------------------- model helpers
def llama3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_model():
    from transformers import AutoModelForCausalLM

    cfg = llama3_8b_config()
    cfg._attn_implementation = "sdpa"
    t = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    log(f"built random Llama-3-8B-shaped model in {time.time() - t:.1f}s, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    return model


def fp16_cache(model, B, cap):
    """fp16 baseline as a serving engine keeps it: K/V preallocated for ``cap`` tokens, written in place,
    views returned (transformers' DynamicCache instead concatenates the whole cache every step)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class Layer(CacheLayerMixin):
        is_sliding = False
        is_compileable = False

        def __init__(self):
            super().__init__()
            self.n = 0

        def lazy_initialization(self, k, v):
            self.dtype, self.device = k.dtype, k.device
            self.kb = torch.empty(k.shape[0], k.shape[1], cap, k.shape[3], dtype=k.dtype, device=k.device)
            self.vb = torch.empty_like(self.kb)
            self.is_initialized = True

        def update(self, k, v, *a, **kw):
            if not self.is_initialized:
                self.lazy_initialization(k, v)
            m = k.shape[-2]
            self.kb[:, :, self.n:self.n + m].copy_(k)
            self.vb[:, :, self.n:self.n + m].copy_(v)
            self.n += m
            return self.kb[:, :, :self.n], self.vb[:, :, :self.n]

        def get_mask_sizes(self, q):
            return self.n + q, 0

        def get_seq_length(self):
            return self.n

        def get_max_length(self):
            return -1

        def nbytes(self):
            return self.kb.numel() * 2 + self.vb.numel() * 2

    return Cache(layers=[Layer() for _ in range(model.config.num_hidden_layers)])


def fill_fp16(cache, B, T, chunk=2048):
    for layer in cache.layers:
        for s in range(0, T, chunk):
            n = min(chunk, T - s)
            layer.update(torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16),
                         torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16))


def random_chunks(layer, B: int, T: int, chunk: int):
    """Random bf16 K/V of ``T`` tokens in chunks, ``(start, n, k, v)``, the layer initialized from the first."""
    for s in range(0, T, chunk):
        n = min(chunk, T - s)
        k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        yield s, n, k, v


def fill_kivi(cache, B, T, chunk=256):
    """Fill kernel layers with T random tokens without running attention (append + bookkeeping only)."""
    from kvshrink.kernels import KernelUniformLayer

    for layer in cache.layers:
        assert isinstance(layer, KernelUniformLayer)
        for _, n, k, v in random_chunks(layer, B, T, chunk):
            layer.append(k, v)
            layer.seen += n


def decode_tps(model, cache, B, T, steps):
    tok = torch.randint(0, model.config.vocab_size, (B, 1), device="cuda")
    pos = torch.full((B, 1), T, device="cuda", dtype=torch.long)

    def step(i, tok):
        out = model(input_ids=tok, past_key_values=cache, position_ids=pos + i, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # flash for the dense (fp16) attention: PyTorch's default pick on the H100 (cuDNN) re-plans for every new
    # length and costs ~1.5 ms of CPU per call, which would make the fp16 baseline look slower than it is
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for i in range(4):  # warm-up (compiles kernels)
            tok = step(i, tok)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(4, 4 + steps):
            tok = step(i, tok)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return B * steps / dt, dt / steps * 1e3


# ----------------------------------------------------------------------------------------- quant cost
def sec_quant(res: dict, model) -> None:
    from kvshrink.kernels import make_kernel_cache, quantize_pack
    from kvshrink.storage import quantize
    from kvshrink.kernels import disable

    T = 8192
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    out = {"T": T, "B": 1}

    def prefill_fp16():
        c = fp16_cache(model, 1, T)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1)

    out["prefill_fp16_ms"] = bench(prefill_fp16, warmup=1, rep=5)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=torch.bfloat16)
    L = model.config.num_hidden_layers
    from kvshrink.kernels.strided import quantize_pack_strided

    for group in (128, 32):
        qk = bench(lambda: quantize_pack_strided(k, 2, "token", group))
        qv = bench(lambda: quantize_pack_strided(k, 2, "channel", group))
        out[f"g{group}_quant_pack_kivi_layout_ms_all_layers"] = L * (bench(lambda: quantize_pack(k, 2, "token", group))
                                                                     + bench(lambda: quantize_pack(k, 2, "channel", group)))
        tk = bench(lambda: quantize(k, 2, "token", group), warmup=3, rep=10)
        tv = bench(lambda: quantize(k, 2, "channel", group), warmup=3, rep=10)
        out[f"g{group}_quant_pack_ms_all_layers"] = L * (qk + qv)
        out[f"g{group}_torch_quantize_ms_all_layers"] = L * (tk + tv)
        out[f"g{group}_frac_of_prefill"] = L * (qk + qv) / out["prefill_fp16_ms"]

        def prefill_kivi():
            c = make_kernel_cache(model, f"kivi:bits=2,group={group},residual=128", reserve=T + 64)
            with torch.no_grad():
                model(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1)
        out[f"g{group}_prefill_kivi_kernel_cache_ms"] = bench(prefill_kivi, warmup=1, rep=5)
        disable(model)
        out[f"g{group}_prefill_overhead_frac"] = out[f"g{group}_prefill_kivi_kernel_cache_ms"] / out["prefill_fp16_ms"] - 1
    # the graph layer's prefill per layout (quantize + pack + rings; 'frag' adds frag_pack's Triton reorder)
    from kvshrink.kernels.graph import StaticKiviLayer

    for layout in ("kivi", "frag"):
        def prefill_static():
            layer = StaticKiviLayer(T + 64, bits=2, group=128, residual=128, layout=layout)
            layer.update(k, k)
        out[f"g128_static_{layout}_prefill_ms_all_layers"] = L * bench(prefill_static, warmup=2, rep=10)
        out[f"g128_static_{layout}_frac_of_prefill"] = out[f"g128_static_{layout}_prefill_ms_all_layers"] / \
            out["prefill_fp16_ms"]
    res["quant"] = out
    log("quant " + json.dumps(out))


def sec_chunk_e2e(res: dict, model, T: int = 32768, chunk: int = 2048) -> None:
    """A ``T``-token prompt prefilled in ``chunk``-token chunks through ``kivi:bits=2`` kernel layers (random-weight
    Llama-3-8B shape), with chunks over the packed past served by ``chunk_attention`` and, beside it, by the path
    without it (dequantize the past, SDPA): wall time and peak memory of the whole prefill."""
    from kvshrink.kernels import disable, make_kernel_cache
    from kvshrink.kernels import layer as klayer

    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    out: dict = {"T": T, "chunk": chunk, "B": 1, "spec": "kivi:bits=2,group=128,residual=128"}
    for name, on in (("kernel", True), ("dequant", False), ("kernel_again", True)):
        klayer.CHUNK_KERNEL = on
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            cache = make_kernel_cache(model, out["spec"], reserve=T)
            t0 = time.time()
            with torch.no_grad():
                for lo in range(0, T, chunk):
                    model(input_ids=ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            out[f"{name}_s"] = time.time() - t0
            out[f"{name}_peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            out[f"{name}_cache_MiB"] = sum(layer.nbytes() for layer in cache.layers) / 2**20
            del cache
        finally:
            klayer.CHUNK_KERNEL = True
            disable(model)
    out["speedup"] = out["dequant_s"] / min(out["kernel_s"], out["kernel_again_s"])
    res["chunk_e2e"] = out
    log("chunk_e2e " + json.dumps(out))


# ----------------------------------------------------------------------------------------- e2e
def sec_e2e(res: dict, model, T: int, steps: int, group: int) -> None:
    from kvshrink.kernels import disable, make_kernel_cache

    out = {"T": T, "steps": steps, "spec": f"kivi:bits=2,group={group},residual=128"}
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    headroom = 6 * 2**30  # decode activations, logits, workspaces, allocator slack
    budget = free - headroom
    out["kv_budget_bytes"] = budget
    cap = T + steps + 4
    # bytes per sequence, measured on a batch-2 cache of each kind
    c = fp16_cache(model, 2, cap)
    fill_fp16(c, 2, 128)
    per_fp16 = sum(layer.nbytes() for layer in c.layers) / 2
    del c
    c = make_kernel_cache(model, out["spec"], reserve=cap)
    disable(model)
    fill_kivi(c, 2, T)
    per_kivi = c.nbytes() / 2
    del c
    torch.cuda.empty_cache()
    out["bytes_per_seq_fp16"] = per_fp16
    out["bytes_per_seq_kivi"] = per_kivi
    out["max_batch_fp16"] = int(budget // per_fp16)
    out["max_batch_kivi"] = int(budget // per_kivi)
    out["max_batch_ratio"] = out["max_batch_kivi"] / max(1, out["max_batch_fp16"])
    log(f"e2e budget {budget / 2**30:.1f} GiB: per seq fp16 {per_fp16 / 2**20:.0f} MiB, kivi {per_kivi / 2**20:.0f} MiB; "
        f"max batch fp16 {out['max_batch_fp16']}, kivi {out['max_batch_kivi']}")

    def run_fp16(B):
        c = fp16_cache(model, B, cap)
        fill_fp16(c, B, T)
        r = decode_tps(model, c, B, T, steps)
        del c
        torch.cuda.empty_cache()
        return r

    def run_kivi(B):
        c = make_kernel_cache(model, out["spec"], reserve=cap)
        fill_kivi(c, B, T)
        try:
            r = decode_tps(model, c, B, T, steps)
        finally:
            disable(model)
        del c
        torch.cuda.empty_cache()
        return r

    def profile(label, make, B, steps=3):
        """Top CUDA kernels of a few decode steps (what the GPU time goes to), as text."""
        from torch.profiler import ProfilerActivity, profile as prof

        c = make(B)
        tok = torch.randint(0, model.config.vocab_size, (B, 1), device="cuda")
        with torch.no_grad():
            model(input_ids=tok, past_key_values=c, position_ids=torch.full((B, 1), T, device="cuda"), use_cache=True,
                  logits_to_keep=1)
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
                for i in range(steps):
                    model(input_ids=tok, past_key_values=c, position_ids=torch.full((B, 1), T + 1 + i, device="cuda"),
                          use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
        ka = p.key_averages()
        table = ka.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        log(f"profile {label} B={B} T={T}, {steps} steps:\n{table}")
        from torch.autograd import DeviceType

        # kernels only: operator rows repeat their kernels' time (the table footer's "Self CUDA time total")
        gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in ka if getattr(e, "device_type", None) == DeviceType.CUDA)
        cpu_us = sum(e.self_cpu_time_total for e in ka)
        log(f"profile {label} B={B}: GPU {gpu_us / steps / 1e3:.2f} ms/step, CPU {cpu_us / steps / 1e3:.2f} ms/step (profiled)")
        out.setdefault("profiled", []).append({"cache": label, "B": B, "gpu_ms_per_step": gpu_us / steps / 1e3,
                                               "cpu_ms_per_step_profiled": cpu_us / steps / 1e3})
        del c
        torch.cuda.empty_cache()
        return gpu_us / steps / 1e3

    def make_fp16(B):
        c = fp16_cache(model, B, cap)
        fill_fp16(c, B, T)
        return c

    def make_kivi(B):
        c = make_kernel_cache(model, out["spec"], reserve=cap)
        fill_kivi(c, B, T)
        return c

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out["gpu_ms_per_step_fp16"] = profile("fp16", make_fp16, out["max_batch_fp16"])
        out["gpu_ms_per_step_kivi"] = profile("kivi", make_kivi, out["max_batch_fp16"])
        out["gpu_time_speedup_at_fp16_max_batch"] = out["gpu_ms_per_step_fp16"] / out["gpu_ms_per_step_kivi"]
    except Exception:  # noqa: BLE001
        log(f"profiling failed:\n{traceback.format_exc()}")
    finally:
        disable(model)

    runs = []
    Bf = out["max_batch_fp16"]

    def run_kivi_max(B):
        """Largest kivi batch that really runs: the computed one, else 7% less, up to 3 tries."""
        for _ in range(3):
            try:
                r = run_kivi(B)
                out["max_batch_kivi_ran"] = B
                return r
            except torch.cuda.OutOfMemoryError:
                log(f"e2e kivi B={B}: OOM, retrying smaller")
                torch.cuda.empty_cache()
                B = int(B * 0.93)
        raise torch.cuda.OutOfMemoryError("kivi max batch did not fit")
    for label, fn, B in (("fp16", run_fp16, Bf), ("kivi", run_kivi, Bf), ("kivi", run_kivi_max, out["max_batch_kivi"]),
                         ("fp16", run_fp16, 1), ("kivi", run_kivi, 1), ("fp16", run_fp16, 8), ("kivi", run_kivi, 8)):
        try:
            tps, ms = fn(B)
            runs.append({"cache": label, "B": B, "tokens_per_s": tps, "ms_per_step": ms,
                         "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
            log(f"e2e {label} B={B} T={T}: {tps:.0f} tok/s, {ms:.2f} ms/step")
        except torch.cuda.OutOfMemoryError as e:
            runs.append({"cache": label, "B": B, "error": f"OOM: {e}"[:300]})
            log(f"e2e {label} B={B}: OOM")
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out["runs"] = runs
    f16 = next((r for r in runs if r["cache"] == "fp16" and r["B"] == Bf and "tokens_per_s" in r), None)
    kv = next((r for r in runs if r["cache"] == "kivi" and r["B"] == Bf and "tokens_per_s" in r), None)
    kvmax = next((r for r in runs if r["cache"] == "kivi" and r["B"] == out["max_batch_kivi"] and "tokens_per_s" in r), None)
    if kvmax and out.get("max_batch_kivi_ran"):
        kvmax["B_ran"] = out["max_batch_kivi_ran"]
        out["max_batch_ratio_ran"] = out["max_batch_kivi_ran"] / max(1, Bf)
    if f16 and kv:
        out["speedup_at_fp16_max_batch"] = kv["tokens_per_s"] / f16["tokens_per_s"]
    if f16 and kvmax:
        out["throughput_ratio_at_each_max_batch"] = kvmax["tokens_per_s"] / f16["tokens_per_s"]
    res.setdefault("e2e", []).append(out)


def rotatekv_calib_spec(model, n_tokens: int = 512, prerope: bool = True) -> str:
    """``rotatekv:bits=2,calib=FILE`` with the channel order calibrated by kvshrink's calibrate API on seeded random
    token ids (the random-weight model has no tokenizer, so no built-in text), saved as a calibration file
    (``prerope=False``: ``rotatekv:bits=2,prerope=false``, calibrated on post-RoPE keys)."""
    import tempfile

    from kvshrink.calibration import make_metadata, save_calibration, tokens_sha256
    from kvshrink.methods.rotatekv import RotateKV, calibrate
    from kvshrink.model_info import model_info

    method, info = RotateKV(bits=2, prerope=prerope), model_info(model)
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    tensors = calibrate(model, method, ids)
    meta = make_metadata(method.name, method.calib_params(info), info.identity(), tensors, tokens_sha256(ids), n_tokens)
    path = save_calibration(os.path.join(tempfile.mkdtemp(prefix="kvshrink_bench_"), "rotatekv.safetensors"), tensors,
                            meta)
    return f"rotatekv:bits=2,calib={path}" + ("" if prerope else ",prerope=false")


def fill_rotatekv(model, cache, B, T, chunk=1024, sinks=(0,)):
    """Fill RotateKV kernel layers with T random post-RoPE tokens at positions 0..T-1 through the layer's own store
    path (RoPE inverted, rotated, reordered, centred, quantized; ``sinks`` kept exact), without running attention."""
    from kvshrink.kernels import KernelRotateKVLayer
    from kvshrink.rope import RopeSource, rotary_modules

    src = RopeSource()
    rot = rotary_modules(model)[0]
    h = rot.register_forward_hook(src.hook, with_kwargs=True)
    cos, _ = rot(torch.empty(0, device="cuda", dtype=torch.bfloat16), torch.arange(2, device="cuda")[None])
    h.remove()
    fn = src.recompute_fn(cos)
    for layer in cache.layers:
        assert isinstance(layer, KernelRotateKVLayer)
        layer.rope_fn = fn
        for s0, n, k, v in random_chunks(layer, B, T, chunk):
            pos = torch.arange(s0, s0 + n, device="cuda", dtype=torch.int32)[None].expand(B, n)
            slots = torch.tensor(list(sinks), device="cuda")[None].expand(B, len(sinks)) if s0 == 0 and sinks else None
            layer._store(k, v, pos, None, None, slots)
            layer.seen += n


def sec_rpack(res: dict) -> None:
    """RotateKV's fused rotate+quantize+pack kernel vs its torch path (kvshrink.kernels.rotatekv_pack): K and V
    of all 32 layers at an 8K prefill of the Llama-3-8B shape (G=4, prerope, reorder, centre), as a share of
    the 16-bit prefill the ``quant`` section measured, and one decode token at B=1 and B=64."""
    from kvshrink.kernels.rotatekv_pack import bench_rotatekv_pack

    out = {"prefill": bench_rotatekv_pack(T=8192), "decode_b1": bench_rotatekv_pack(T=1, B=1),
           "decode_b64": bench_rotatekv_pack(T=1, B=64)}
    pre = res.get("quant", {}).get("prefill_fp16_ms")
    if pre:
        out["prefill_fp16_ms"] = pre
        out["fused_share_of_prefill"] = out["prefill"].get("fused_ms", 0) / pre
    res["rpack"] = out
    log(f"rpack: {json.dumps(out)}")


def sec_e2e_rotatekv(res: dict, model, T: int, steps: int) -> None:
    """Eager decode tok/s with ``rotatekv:bits=2`` kernel layers at the fp16 max batch of the e2e section (if it
    ran) and B=8, its bytes per sequence and largest batch in the same budget; the dense path (dequantize the
    whole cache every step, no kernel) once at B=8 for comparison."""
    from kvshrink.kernels import disable, make_kernel_cache

    spec = rotatekv_calib_spec(model)
    out = {"T": T, "steps": steps, "spec": "rotatekv:bits=2 (calib: random ids)", "runs": []}
    cap = T + steps + 4
    c = make_kernel_cache(model, spec, reserve=cap)
    disable(model)
    fill_rotatekv(model, c, 2, T)
    out["bytes_per_seq"] = c.nbytes() / 2
    del c
    torch.cuda.empty_cache()
    prev = res.get("e2e", {})
    prev = prev[-1] if isinstance(prev, list) and prev else prev if isinstance(prev, dict) else {}
    budget = prev.get("kv_budget_bytes") or (torch.cuda.mem_get_info()[0] - 6 * 2**30)
    out["kv_budget_bytes"] = budget
    out["max_batch"] = int(budget // out["bytes_per_seq"])
    log(f"e2e rotatekv: per seq {out['bytes_per_seq'] / 2**20:.0f} MiB, max batch {out['max_batch']} "
        f"(budget {budget / 2**30:.1f} GiB)")
    if not prev.get("max_batch_fp16"):  # the e2e section did not run: measure the 16-bit baseline here
        c = fp16_cache(model, 2, cap)
        fill_fp16(c, 2, 128)
        per_fp16 = sum(layer.nbytes() for layer in c.layers) / 2
        del c
        torch.cuda.empty_cache()
        prev = {"max_batch_fp16": int(budget // per_fp16)}
        out["bytes_per_seq_fp16"] = per_fp16
        out["max_batch_fp16"] = prev["max_batch_fp16"]
        out["max_batch_ratio"] = out["max_batch"] / max(1, prev["max_batch_fp16"])
        B = prev["max_batch_fp16"]
        try:
            c = fp16_cache(model, B, cap)
            fill_fp16(c, B, T)
            tps, ms = decode_tps(model, c, B, T, steps)
            del c
            out["runs"].append({"cache": "fp16", "B": B, "tokens_per_s": tps, "ms_per_step": ms})
            log(f"e2e fp16 B={B} T={T}: {tps:.0f} tok/s, {ms:.2f} ms/step")
        except Exception as e:  # noqa: BLE001
            out["runs"].append({"cache": "fp16", "B": B, "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()

    def run(B, kernels=True):
        c = make_kernel_cache(model, spec, reserve=cap)
        try:
            fill_rotatekv(model, c, B, T)
            for layer in c.layers:  # off: the base layer's decode step (dense K/V of the whole cache + SDPA)
                layer.use_kernels = kernels
            return decode_tps(model, c, B, T, steps)
        finally:
            disable(model)
            del c
            torch.cuda.empty_cache()

    out.setdefault("max_batch_ratio", out["max_batch"] / max(1, prev.get("max_batch_fp16") or 1))
    batches = list(dict.fromkeys(b for b in (prev.get("max_batch_fp16"), out["max_batch"], 8) if b))
    torch.cuda.reset_peak_memory_stats()  # each run's peak_GiB is its own (the 16-bit run above excluded)
    for B, kernels in [(b, True) for b in batches] + [(8, False)]:
        label = "rotatekv" if kernels else "rotatekv_dense_path"
        try:
            tps, ms = run(B, kernels)
            out["runs"].append({"cache": label, "B": B, "tokens_per_s": tps, "ms_per_step": ms,
                                "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
            log(f"e2e {label} B={B} T={T}: {tps:.0f} tok/s, {ms:.2f} ms/step")
        except Exception as e:  # noqa: BLE001 - OOM or a failure: record and go on
            out["runs"].append({"cache": label, "B": B, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"e2e {label} B={B} failed:\n{traceback.format_exc()}")
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res["e2e_rotatekv"] = out


def pick_rkv_launch(res: dict) -> None:
    """Use the fastest RotateKV decode variant at 8x32K as its default for what follows (e2e_rkv)."""
    from kvshrink.kernels import rotatekv_decode as rd

    for sec in ("rdecode", "decode"):
        row = next((r for r in res.get(sec, []) if (r["B"], r["T"]) == (8, 32768) and "rkv_variant" in r), None)
        if row:
            rd.LAUNCH.update(row["rkv_variant"])
            res["rkv_launch_used_for_e2e"] = dict(rd.LAUNCH)
            log(f"rotatekv decode launch settings for e2e: {rd.LAUNCH}")
            return


def pick_launch(res: dict) -> None:
    """Use the fastest strided-kernel variant at 8x32K (group 128) as its default for what follows (e2e)."""
    import importlib

    ds = importlib.import_module("kvshrink.kernels.decode_strided")
    row = next((r for r in res.get("decode", []) if (r["B"], r["T"]) == (8, 32768) and "g128_variant" in r), None)
    if row:
        var = dict(row["g128_variant"])
        var["maxnreg"] = var.get("maxnreg") or 0
        ds.LAUNCH.update(var)
        res["launch_used_for_e2e"] = dict(ds.LAUNCH)
        log(f"decode launch settings for e2e: {ds.LAUNCH}")


# ----------------------------------------------------------------------------------------- e2e, graphs
def graph_kernel_profile(dec, steps: int = 3) -> dict:
    """GPU time per replayed step by kernel name (torch.profiler over ``steps`` replays of a captured step), in ms,
    largest first: where an end-to-end step's time goes."""
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            dec.step()
        torch.cuda.synchronize()
    per: dict = {}
    for e in p.events():
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
            name = e.name[:80]
            per[name] = per.get(name, 0.0) + e.device_time_total / 1e3 / steps
    return dict(sorted(per.items(), key=lambda kv: -kv[1])[:25])


def time_graph(model, cache, B: int, T: int, steps: int, profile: bool = False) -> dict:
    """Capture one greedy step over ``cache`` (holding ``T`` tokens per row) and time ``steps`` replays;
    ``profile``: also the GPU time per step by kernel (:func:`graph_kernel_profile`)."""
    from kvshrink.kernels.graph import GraphDecoder

    tok = torch.randint(0, model.config.vocab_size, (B,), device="cuda")
    t0 = time.perf_counter()
    dec = GraphDecoder(model, cache, tok, position=T)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - t0
    for _ in range(3):
        dec.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        dec.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {"splits": cache.layers[0].splits, "tokens_per_s": B * steps / dt, "ms_per_step": dt / steps * 1e3,
           "capture_s": capture_s, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
    if profile:
        try:
            out["kernel_ms_per_step"] = graph_kernel_profile(dec)
        except Exception as e:  # noqa: BLE001 - a profiler that does not see graph kernels: the timing stands
            out["kernel_ms_per_step"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def record_graph_run(runs: list, meta: dict, measure) -> None:
    """Append ``measure()`` (a run's dict) to ``runs``, or, when it fails, ``meta`` with the error (OOM or the
    traceback): one graph run that fails is recorded and the section goes on."""
    try:
        runs.append(measure())
    except torch.cuda.OutOfMemoryError as e:
        runs.append({**meta, "error": f"OOM: {e}"[:300]})
        log(f"graph e2e {meta}: OOM")
    except Exception:  # noqa: BLE001
        runs.append({**meta, "error": traceback.format_exc()[-1500:]})
        log(f"graph e2e {meta} failed:\n{traceback.format_exc()}")


def fill_static_dense(cache, B: int, T: int) -> None:
    """Random 16-bit K/V of ``T`` tokens into StaticDenseLayer/StaticKiviLayer layers, 1 GiB of K (and V) at a time."""
    chunk = max(1, 2**30 // (HKV * T * D * 2))
    for layer in cache.layers:
        for b0 in range(0, B, chunk):
            b = min(chunk, B - b0)
            k = torch.randn(b, HKV, T, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, HKV, T, D, device="cuda", dtype=torch.bfloat16)
            if not layer.is_initialized:
                layer.lazy_initialization(torch.empty(B, HKV, 1, D, device="cuda", dtype=torch.bfloat16), None)
            layer.prefill(k, v, batch_start=b0)
            del k, v


#: the runs of graph_rkv (kind, batch: 8, "fp16" = the baseline's largest, "max" = RotateKV's largest);
#: ``rotatekv_libdevice_trig`` is the default kernel with RoPE's cos/sin by libdevice (the pre-session-8 kernel)
GRAPH_RKV_RUNS = "fp16:8,rotatekv:8,fp16:fp16,rotatekv:fp16,rotatekv_libdevice_trig:fp16,rotatekv_postrope:fp16," \
                 "rotatekv_residual64:fp16,rotatekv:max"


def sec_graph_rotatekv(res: dict, model, T: int, steps: int, runs: str = GRAPH_RKV_RUNS) -> None:
    """Graph-captured decode tok/s with ``rotatekv:bits=2`` static layers (kvshrink.kernels.rotatekv_graph) beside
    the 16-bit static baseline, at the baseline's largest batch, RotateKV's largest batch and B=8."""
    from kvshrink.kernels import disable
    from kvshrink.kernels.graph import make_static_cache
    from kvshrink.kernels.rotatekv_decode import LAUNCH as RKV_LAUNCH

    spec = rotatekv_calib_spec(model)
    cap = T + steps + 16
    out = {"T": T, "steps": steps, "spec": "rotatekv:bits=2 (calib: random ids), static layers, sink_slots=16",
           "runs": []}
    torch.cuda.empty_cache()
    budget = torch.cuda.mem_get_info()[0] - 6 * 2**30
    L = model.config.num_hidden_layers
    per_dense = L * 2 * HKV * cap * D * 2

    def make_rkv(B, spec=spec):
        c = make_static_cache(model, cap, kind="rotatekv", spec=spec)
        fill_rotatekv(model, c, B, T)
        for layer in c.layers:
            layer.lazy_initialization(torch.empty(B, HKV, 1, D, device="cuda", dtype=torch.bfloat16), None)
        return c

    c = make_rkv(2)
    for layer in c.layers:  # what a decode step allocates: capacity rows, sink slots
        layer._freeze(torch.empty(2, HKV, 1, D, device="cuda", dtype=torch.bfloat16))
    per_rkv = c.nbytes() / 2
    disable(model)
    del c
    torch.cuda.empty_cache()
    out.update(bytes_per_seq_fp16=per_dense, bytes_per_seq_rotatekv=per_rkv, kv_budget_bytes=budget,
               max_batch_fp16=int(budget // per_dense), max_batch_rotatekv=int(budget // per_rkv))
    out["max_batch_ratio"] = out["max_batch_rotatekv"] / max(1, out["max_batch_fp16"])
    log(f"graph e2e rotatekv: per seq fp16 {per_dense / 2**20:.0f} MiB, rotatekv {per_rkv / 2**20:.0f} MiB; max batch "
        f"fp16 {out['max_batch_fp16']} rotatekv {out['max_batch_rotatekv']} ({out['max_batch_ratio']:.2f}x)")

    def measure(kind, B):
        if kind == "fp16":
            cache = make_static_cache(model, cap, kind="dense")
            fill_static_dense(cache, B, T)
        elif kind == "rotatekv_postrope":
            cache = make_rkv(B, rotatekv_calib_spec(model, prerope=False))
        elif kind == "rotatekv_residual64":  # the setting that halves KIVI-2's ΔPPL on the demo model
            cache = make_rkv(B, spec + ",residual=64")
        else:
            cache = make_rkv(B)
        fast_trig = RKV_LAUNCH["fast_trig"]
        RKV_LAUNCH["fast_trig"] = kind != "rotatekv_libdevice_trig"  # read when the step is captured
        try:
            r = {"cache": kind, "B": B, **time_graph(model, cache, B, T, steps)}
            r["len_after"] = int(cache.layers[0].lens[0])
            if kind != "fp16":
                cache.layers[0].settle()  # warns if a sink found no slot
            log(f"graph e2e {kind} B={B} T={T}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.2f} ms/step "
                f"(len after {r['len_after']}, capture {r['capture_s']:.1f} s)")
            return r
        finally:
            RKV_LAUNCH["fast_trig"] = fast_trig
            disable(model)
            del cache

    def attempt(kind, B):
        record_graph_run(out["runs"], {"cache": kind, "B": B}, lambda: measure(kind, B))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    Bf = out["max_batch_fp16"]
    batches = {"fp16": Bf, "max": out["max_batch_rotatekv"]}
    for kind, b in (r.split(":") for r in runs.split(",")):
        attempt(kind, batches[b] if b in batches else int(b))
    tps0 = {(r["cache"], r["B"]): r["tokens_per_s"] for r in out["runs"] if "tokens_per_s" in r}
    if ("rotatekv", Bf) in tps0 and ("rotatekv_libdevice_trig", Bf) in tps0:
        out["fast_trig_speedup_at_fp16_max_batch"] = tps0[("rotatekv", Bf)] / tps0[("rotatekv_libdevice_trig", Bf)]
    tps = {(r["cache"], r["B"]): r["tokens_per_s"] for r in out["runs"] if "tokens_per_s" in r}
    if ("fp16", Bf) in tps and ("rotatekv", Bf) in tps:
        out["speedup_at_fp16_max_batch"] = tps[("rotatekv", Bf)] / tps[("fp16", Bf)]
    if ("fp16", Bf) in tps and ("rotatekv", out["max_batch_rotatekv"]) in tps:
        out["throughput_ratio_at_each_max_batch"] = tps[("rotatekv", out["max_batch_rotatekv"])] / tps[("fp16", Bf)]
    res["graph_rotatekv"] = out


def graph_kivi_budget(model, cap: int, group: int) -> dict:
    """Bytes per sequence of 16-bit and kivi:bits=2 static layers holding ``cap`` tokens, the KV budget (free
    memory less 6 GiB for the model's activations) and the largest batch of each in it."""
    from kvshrink.kernels.graph import StaticKiviLayer

    torch.cuda.empty_cache()
    budget = torch.cuda.mem_get_info()[0] - 6 * 2**30
    L = model.config.num_hidden_layers
    per_dense = L * 2 * HKV * cap * D * 2
    kl = StaticKiviLayer(cap, bits=2, group=group)
    kl.lazy_initialization(torch.empty(1, HKV, 1, D, device="cuda", dtype=torch.bfloat16), None)
    per_kivi = L * kl.nbytes()
    return {"bytes_per_seq_fp16": per_dense, "bytes_per_seq_kivi": per_kivi, "kv_budget_bytes": budget,
            "max_batch_fp16": int(budget // per_dense), "max_batch_kivi": int(budget // per_kivi)}


def sec_graph_asm(res: dict, model, T: int, steps: int, group: int) -> None:
    """CUDA-graph decode tok/s at the 16-bit baseline's largest batch: fp16 (StaticDenseLayer), then
    kivi:bits=2 (KIVI's layout) with the decode kernel's codes unpacked by Triton only and by inline PTX, then
    fp16 again (the baseline's spread); all in one run, side by side."""
    from kvshrink.kernels import disable
    from kvshrink.kernels.decode_attention import LAUNCH
    from kvshrink.kernels.graph import make_static_cache

    cap = T + steps + 16
    out = {"T": T, "steps": steps, "spec": f"kivi:bits=2,group={group},residual=128", "runs": [],
           **graph_kivi_budget(model, cap, group)}
    Bf = out["max_batch_fp16"]
    asm_default = LAUNCH["asm"]

    def run(kind, asm):
        LAUNCH["asm"] = asm
        cache = make_static_cache(model, cap, kind="kivi" if kind == "kivi" else "dense",
                                  **({"group": group, "layout": "kivi", "waves": 32} if kind == "kivi" else {}))
        try:
            fill_static_dense(cache, B=Bf, T=T)
            r = {"cache": kind, "B": Bf, "asm": asm if kind == "kivi" else None,
                 **time_graph(model, cache, Bf, T, steps)}
            log(f"graph asm {kind} asm={r['asm']} B={Bf}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.2f} ms/step")
            return r
        finally:
            LAUNCH["asm"] = asm_default
            disable(model)
            del cache
            torch.cuda.empty_cache()

    for kind, asm in (("fp16", None), ("kivi", False), ("kivi", True), ("fp16", None)):
        record_graph_run(out["runs"], {"cache": kind, "asm": asm, "B": Bf}, lambda: run(kind, asm))
    ok = [r for r in out["runs"] if "tokens_per_s" in r]
    f16 = max((r["tokens_per_s"] for r in ok if r["cache"] == "fp16"), default=None)
    for asm in (False, True):
        kv = next((r["tokens_per_s"] for r in ok if r["cache"] == "kivi" and r["asm"] == asm), None)
        if f16 and kv:
            out[f"speedup_at_fp16_max_batch_asm_{str(asm).lower()}"] = kv / f16
    res["graph_asm"] = out


#: decode_frag.LAUNCH overrides that graph_frag runs beside the default (JSON list; --graph-frag-launches)
GRAPH_FRAG_LAUNCHES = '[{"tail_splits": 2}, {"maxnreg": 0, "scale_pipe": false}, {"scale_pipe": false}]'


def sec_graph_frag(res: dict, model, T: int, steps: int, group: int, launches: str = GRAPH_FRAG_LAUNCHES) -> None:
    """CUDA-graph decode tok/s at the 16-bit baseline's largest batch: fp16 (StaticDenseLayer), kivi:bits=2 in
    KIVI's layout (Triton kernel) and in fragment order (layout 'frag': Gluon kernel, decode_frag.py; same codes,
    same bytes), then fp16 again (the baseline's spread); all in one run, side by side."""
    from kvshrink.kernels import disable
    from kvshrink.kernels.graph import make_static_cache

    cap = T + steps + 16
    out = {"T": T, "steps": steps, "spec": f"kivi:bits=2,group={group},residual=128", "runs": [],
           **graph_kivi_budget(model, cap, group)}
    Bf = out["max_batch_fp16"]

    from kvshrink.kernels.decode_frag import LAUNCH

    def run(kind, layout, tail, launch):
        kw = {"group": group, "layout": layout, "tail_splits": tail, **({"waves": 32} if layout == "kivi" else {})}
        cache = make_static_cache(model, cap, kind="dense" if kind == "fp16" else "kivi",
                                  **({} if kind == "fp16" else kw))
        saved = dict(LAUNCH)
        LAUNCH.update(launch)
        try:
            fill_static_dense(cache, B=Bf, T=T)
            r = {"cache": kind, "layout": layout, "B": Bf, "tail_splits": tail, "launch": dict(LAUNCH),
                 **time_graph(model, cache, Bf, T, steps, profile=True),
                 "frag_splits": getattr(cache.layers[0], "_frag_splits", None)}
            log(f"graph frag {kind} {layout} tail={tail} {launch} B={Bf}: {r['tokens_per_s']:.0f} tok/s, "
                f"{r['ms_per_step']:.2f} ms/step; kernels {json.dumps(r.get('kernel_ms_per_step'))[:1500]}")
            return r
        finally:
            LAUNCH.clear()
            LAUNCH.update(saved)
            disable(model)
            del cache
            torch.cuda.empty_cache()

    from kvshrink.kernels.decode_frag import launch_options

    extra = [("kivi", "frag", d.pop("tail_splits", 4), d) for d in json.loads(launches)]
    for *_, d in extra:
        launch_options(**d)  # an unknown option name fails here, before any model work
    for kind, layout, tail, launch in (("fp16", None, 4, {}), ("kivi", "kivi", 4, {}), ("kivi", "frag", 4, {}),
                                       *extra, ("fp16", None, 4, {})):
        record_graph_run(out["runs"], {"cache": kind, "layout": layout, "B": Bf, "tail_splits": tail, "launch": launch},
                         lambda: run(kind, layout, tail, launch))
    ok = [r for r in out["runs"] if "tokens_per_s" in r]
    f16 = max((r["tokens_per_s"] for r in ok if r["cache"] == "fp16"), default=None)
    for layout in ("kivi", "frag"):
        kv = max((r["tokens_per_s"] for r in ok if r["cache"] == "kivi" and r["layout"] == layout), default=None)
        if f16 and kv:
            out[f"speedup_at_fp16_max_batch_{layout}"] = kv / f16  # frag: its best variant
    res["graph_frag"] = out


def sec_graph(res: dict, model, T: int, steps: int, group: int) -> None:
    """Decode tokens/s with one greedy step captured in a CUDA graph and replayed, for the 16-bit baseline
    (StaticDenseLayer: preallocated K/V, device length, split-K Triton kernel) and kivi:bits=2 (StaticKiviLayer:
    strided layout, rings, device lengths). Same model, same capture method, measured side by side."""
    from kvshrink.kernels import disable
    from kvshrink.kernels.graph import make_static_cache

    cap = T + steps + 16
    out = {"T": T, "steps": steps, "spec": f"kivi:bits=2,group={group},residual=128", "runs": [],
           **graph_kivi_budget(model, cap, group)}
    per_dense, per_kivi = out["bytes_per_seq_fp16"], out["bytes_per_seq_kivi"]
    out["max_batch_ratio"] = out["max_batch_kivi"] / max(1, out["max_batch_fp16"])
    log(f"graph e2e: per seq fp16 {per_dense / 2**20:.0f} MiB, kivi {per_kivi / 2**20:.0f} MiB; max batch "
        f"fp16 {out['max_batch_fp16']} kivi {out['max_batch_kivi']} ({out['max_batch_ratio']:.2f}x)")

    def run(kind, B, layout="strided", waves=4):
        cache = make_static_cache(model, cap, kind="kivi" if kind == "kivi" else "dense",
                                  **({"group": group, "layout": layout, "waves": waves} if kind == "kivi" else {}))
        try:
            fill_static_dense(cache, B, T)
            r = {"cache": kind, "layout": layout if kind == "kivi" else "dense", "B": B,
                 "waves": waves if kind == "kivi" else None, **time_graph(model, cache, B, T, steps)}
            # the replayed steps really advanced the cache: lengths on the device
            r["len_after"] = int(cache.layers[0].lens[0])
            log(f"graph e2e {kind} ({r['layout']}, splits {r['splits']}) B={B} T={T}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.2f} ms/step "
                f"(len after {r['len_after']})")
            return r
        finally:
            disable(model)
            del cache
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    Bf = out["max_batch_fp16"]

    def attempt(kind, B, layout="strided", waves=4):
        record_graph_run(out["runs"], {"cache": kind, "layout": layout, "B": B}, lambda: run(kind, B, layout, waves))

    attempt("fp16", Bf)
    for layout, waves in (("kivi", 16), ("kivi", 32), ("strided", 16)):
        attempt("kivi", Bf, layout, waves)
    attempt("fp16", Bf)  # again: the spread of the baseline
    done = [r for r in out["runs"] if r["cache"] == "kivi" and "tokens_per_s" in r]
    top = max(done, key=lambda r: r["tokens_per_s"]) if done else {"layout": "strided", "waves": 4}
    best, best_waves = top["layout"], top["waves"]
    out["layout_used_beyond_fp16_max_batch"] = {"layout": best, "waves": best_waves}
    attempt("kivi", out["max_batch_kivi"], best, best_waves)
    attempt("fp16", 8)
    attempt("kivi", 8, best, best_waves)
    f16 = max((r for r in out["runs"] if r["cache"] == "fp16" and r["B"] == Bf and "tokens_per_s" in r),
              key=lambda r: r["tokens_per_s"], default=None)  # the faster of the two baseline runs
    kv = max((r for r in out["runs"] if r["cache"] == "kivi" and r["B"] == Bf and "tokens_per_s" in r),
             key=lambda r: r["tokens_per_s"], default=None)
    kvm = next((r for r in out["runs"] if r["cache"] == "kivi" and r["B"] == out["max_batch_kivi"]
                and "tokens_per_s" in r), None)
    if f16 and kv:
        out["speedup_at_fp16_max_batch"] = kv["tokens_per_s"] / f16["tokens_per_s"]
    if f16 and kvm:
        out["throughput_ratio_at_each_max_batch"] = kvm["tokens_per_s"] / f16["tokens_per_s"]
    res["graph_e2e"] = out


# ----------------------------------------------------------------------------------------- main
def git_commit() -> str:
    env = os.environ.get("KVSHRINK_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    ap.add_argument("--only", default="roof,decode,quant,graph,e2e",
                    help="sections: roof, chunk (chunked prefill over a packed past), chunk_e2e, decode (KIVI + RotateKV rows), rdecode (RotateKV rows only), quant, graph, "
                         "graph_asm (kivi graph e2e with the codes unpacked by Triton vs inline PTX, beside fp16), "
                         "graph_frag (kivi graph e2e in KIVI's layout vs fragment order, beside fp16), "
                         "e2e (fp16, kivi and rotatekv:bits=2), e2e_rkv (rotatekv:bits=2 beside fp16 only), graph_rkv "
                         "(rotatekv:bits=2 static layers beside fp16 ones, CUDA graphs), rpack (RotateKV's "
                         "fused rotate+quantize+pack vs its torch path; after quant for the prefill share)")
    ap.add_argument("--rvariants", default="32:4:2:4:dot,16:4:2:4:dot,16:4:2:4:gather,16:4:3:4:dot,64:8:2:4:dot",
                    help="RotateKV decode kernel variants block_n:num_warps:num_stages:waves[:scale_lookup dot|gather"
                         "[:maxnreg[:kron 0|1[:fast_trig 0|1]]]] "
                         "(fastest reported); empty: no RotateKV rows in the decode section")
    ap.add_argument("--cvariants", default="128:64:8:2:1,128:64:8:3:1,64:64:4:2:1,128:128:8:2:1,128:64:4:2:1,"
                                          "128:64:8:3:0",
                    help="chunk_attention variants rows:block_n:num_warps:num_stages:join (chunk section)")
    ap.add_argument("--e2e-T", type=int, default=8192)
    ap.add_argument("--e2e-steps", type=int, default=16)
    ap.add_argument("--graph-steps", type=int, default=32)
    ap.add_argument("--e2e-group", type=int, default=128)
    ap.add_argument("--graph-frag-launches", default=GRAPH_FRAG_LAUNCHES,
                    help="graph_frag: JSON list of decode_frag.LAUNCH overrides run beside the default (tail_splits "
                         "sets the graph layer's)")
    ap.add_argument("--graph-rkv-runs", default=GRAPH_RKV_RUNS,
                    help="graph_rkv runs kind:batch, comma-separated (batch: a number, fp16 or max)")
    ap.add_argument("--svariants", default="128:4:3:0:8:1,64:4:2:0:4:1,64:2:2:0:4:1",
                    help="strided decode kernel variants (as --variants, then pv_rows 0/1)")
    ap.add_argument("--variants", default="64:2:2:0:4,64:2:3:0:4,64:2:2:168:8,64:2:3:168:8,64:2:2:128:8,128:2:2:168:8,64:4:2:128:8,64:2:3:168:16",
                    help="decode kernel variants block_n:num_warps:num_stages:maxnreg:waves, the fastest is reported "
                         "(each variant's time is kept in the JSON)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    import transformers

    only = set(args.only.split(","))
    res: dict = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
                 "git_dirty_note": os.environ.get("KVSHRINK_GIT_NOTE", ""),
                 "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version()}
    def parse(spec):
        keys = ("block_n", "num_warps", "num_stages", "maxnreg", "waves", "pv_rows")
        return [dict(zip(keys, map(int, v.split(":")))) for v in spec.split(",")]

    variants, svariants = parse(args.variants), parse(args.svariants)
    rvariants = [dict(zip(("block_n", "num_warps", "num_stages", "waves", "scale_lookup", "maxnreg", "kron", "fast_trig"),
                          [int(x) if x.isdigit() else x for x in v.split(":")]))
                 for v in args.rvariants.split(",") if v]
    t0 = time.time()
    copy_bw = 3.0e12

    def dump() -> None:  # after every section: a run stopped at its time limit keeps what it measured
        res["wall_s"] = time.time() - t0
        res["log"] = LOG
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    cvariants = [dict(zip(("rows", "block_n", "num_warps", "num_stages", "join"), map(int, v.split(":"))))
                 for v in args.cvariants.split(",") if v]
    sections = [("roof", lambda: sec_roof(res)),
                ("chunk", lambda: sec_chunk(res, cvariants)),
                ("decode", lambda: sec_decode(res, copy_bw, variants, svariants, rvariants)),
                ("rdecode", lambda: sec_rdecode(res, copy_bw, rvariants))]
    for name, fn in sections:
        if name in only:
            try:
                r = fn()
                if name == "roof":
                    copy_bw = r
                if name == "decode":
                    pick_launch(res)
                if name in ("decode", "rdecode"):
                    pick_rkv_launch(res)
            except Exception:  # noqa: BLE001
                log(f"section {name} failed:\n{traceback.format_exc()}")
            dump()
    if only & {"quant", "e2e", "graph", "graph_asm", "graph_frag", "graph_rkv", "e2e_rkv", "rpack", "chunk_e2e"}:
        try:
            model = build_model()
            if "chunk_e2e" in only:
                try:
                    sec_chunk_e2e(res, model)
                    dump()
                except Exception:  # noqa: BLE001
                    log(f"section chunk_e2e failed:\n{traceback.format_exc()}")
            if "quant" in only:
                try:
                    sec_quant(res, model)
                    dump()
                except Exception:  # noqa: BLE001
                    log(f"section quant failed:\n{traceback.format_exc()}")
            if "rpack" in only:
                try:
                    sec_rpack(res)
                    dump()
                except Exception:  # noqa: BLE001
                    log(f"section rpack failed:\n{traceback.format_exc()}")
            if "graph" in only:
                try:
                    sec_graph(res, model, args.e2e_T, args.graph_steps, args.e2e_group)
                    dump()
                except Exception:  # noqa: BLE001
                    log(f"section graph failed:\n{traceback.format_exc()}")
            if "graph_asm" in only:
                try:
                    sec_graph_asm(res, model, args.e2e_T, args.graph_steps, args.e2e_group)
                    dump()
                except Exception:  # noqa: BLE001
                    log(f"section graph_asm failed:\n{traceback.format_exc()}")
            if "graph_frag" in only:
                try:
                    sec_graph_frag(res, model, args.e2e_T, args.graph_steps, args.e2e_group, args.graph_frag_launches)
                    dump()
                except Exception:  # noqa: BLE001
                    log(f"section graph_frag failed:\n{traceback.format_exc()}")
            if "graph_rkv" in only:
                try:
                    sec_graph_rotatekv(res, model, args.e2e_T, args.graph_steps, args.graph_rkv_runs)
                    dump()
                except Exception:  # noqa: BLE001
                    log(f"section graph_rkv failed:\n{traceback.format_exc()}")
            if "e2e" in only:
                try:
                    sec_e2e(res, model, args.e2e_T, args.e2e_steps, args.e2e_group)
                except Exception:  # noqa: BLE001
                    log(f"section e2e failed:\n{traceback.format_exc()}")
                dump()
            if only & {"e2e", "e2e_rkv"}:
                try:
                    sec_e2e_rotatekv(res, model, args.e2e_T, args.e2e_steps)
                except Exception:  # noqa: BLE001
                    log(f"section e2e (rotatekv) failed:\n{traceback.format_exc()}")
        except Exception:  # noqa: BLE001
            log(f"model build failed:\n{traceback.format_exc()}")
    dump()
    summary(res)
    return 0


def summary(res: dict) -> None:
    print("\n== decode attention (ms; speedup vs fp16 SDPA flash; fraction of memory roof on bytes read) ==")
    for r in res.get("decode", []):
        parts = [f"B={r['B']:>2} T={r['T']:>6}  sdpa {r['sdpa_ms']:.3f}"]
        if "dense_triton_ms" in r:
            parts.append(f"dense-triton {r['dense_triton_ms']:.3f}")
        for key in ("g128", "g128_kivi", "g32", "g32_kivi", "rkv"):
            if f"{key}_ms" in r:
                parts.append(f"{key} {r[f'{key}_ms']:.3f} ({r[f'{key}_speedup_vs_sdpa']:.2f}x, "
                             f"{r[f'{key}_GBps']:.0f} GB/s, roof {r[f'{key}_roof_frac']:.0%})")
        print("  ".join(parts))
    for r in res.get("rdecode", []):
        if "rkv_ms" in r:
            print(f"B={r['B']:>2} T={r['T']:>6}  sdpa {r['sdpa_ms']:.3f}  rotatekv {r['rkv_ms']:.3f} "
                  f"({r.get('rkv_speedup_vs_sdpa', float('nan')):.2f}x, {r['rkv_GBps']:.0f} GB/s, "
                  f"roof {r['rkv_roof_frac']:.0%}, rel err {r.get('rkv_rel_err', float('nan')):.1e})")
    for r in res.get("chunk", []):
        if "kernel_ms" in r:
            print(f"chunk B={r['B']} T={r['T']} C={r['chunk']}: kernel {r['kernel_ms']:.3f} ms, dequant+sdpa "
                  f"{r['dequant_sdpa_ms']:.3f} ({r['kernel_speedup_vs_dequant']:.2f}x), fp16 sdpa {r['fp16_sdpa_ms']:.3f}")
    if "quant" in res:
        q = res["quant"]
        print(f"== quant+pack at 8K: prefill {q['prefill_fp16_ms']:.1f} ms; "
              + ", ".join(f"g{g}: {q.get(f'g{g}_frac_of_prefill', float('nan')):.2%} (kernels), "
                          f"prefill overhead {q.get(f'g{g}_prefill_overhead_frac', float('nan')):.1%}" for g in (128, 32)))
    g = res.get("graph_e2e")
    if g:
        print(f"== graph e2e T={g['T']}: max batch fp16 {g['max_batch_fp16']} kivi {g['max_batch_kivi']} "
              f"({g['max_batch_ratio']:.2f}x); speedup at fp16 max batch {g.get('speedup_at_fp16_max_batch', float('nan')):.2f}x; "
              f"at each max batch {g.get('throughput_ratio_at_each_max_batch', float('nan')):.2f}x")
        for r in g["runs"]:
            print("   ", {k: v for k, v in r.items() if k != "error"}, "ERROR" if "error" in r else "")
    er = res.get("e2e_rotatekv")
    if er:
        print(f"== e2e rotatekv:bits=2 T={er['T']}: {er['bytes_per_seq'] / 2**20:.0f} MiB/seq, max batch {er['max_batch']}")
        for r in er["runs"]:
            print("   ", r)
    for e in res.get("e2e", []):
        print(f"== e2e T={e['T']}: max batch fp16 {e['max_batch_fp16']} kivi {e['max_batch_kivi']} "
              f"({e['max_batch_ratio']:.2f}x); speedup at fp16 max batch {e.get('speedup_at_fp16_max_batch', float('nan')):.2f}x")
        for r in e["runs"]:
            print("   ", r)


if __name__ == "__main__":
    sys.exit(main())
