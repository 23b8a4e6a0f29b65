"""Triton kernels (kvshrink.kernels) against their torch references.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here before Triton
is imported) on small shapes; on a GPU the same tests run compiled, and ``KVSHRINK_FULL_GRID=1`` widens
the shape grid (batch, heads, GQA ratio, lengths not a multiple of the block, head_dim 64/128, fp16/bf16).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from kvshrink.cache import make_cache  # noqa: E402
from kvshrink.kernels import (KernelUniformLayer, PackedKV, chunk_attention, chunk_attention_ref,  # noqa: E402
                              decode_attention, decode_attention_ref, disable, make_kernel_cache, quantize_pack)
from kvshrink.kernels import attention as kattn  # noqa: E402
from kvshrink.kernels import layer as klayer  # noqa: E402
from kvshrink.kernels.decode_strided import decode_attention_strided  # noqa: E402
from kvshrink.kernels.strided import (StridedQuantizedTensor, pack_strided, quantize_pack_strided,  # noqa: E402
                                      quantize_strided_ref, strided_supported, unpack_strided)
from kvshrink.layer import UniformLayer  # noqa: E402
from kvshrink.storage import quantize  # noqa: E402
from kvshrink.testing import greedy_steps, tiny_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("KVSHRINK_FULL_GRID") == "1" and DEV == "cuda"
GEN = torch.Generator().manual_seed(1234)


def rand(*shape, dtype=torch.float16, outliers=True):
    """Random K/V-like data on DEV; a few large channels, as real keys have."""
    x = torch.randn(*shape, generator=GEN)
    if outliers and shape[-1] >= 8:
        x[..., 3] *= 8
    return x.to(dtype=dtype, device=DEV)


def check_codes(got, ref, got_q, ref_q):
    """Codes equal except at rounding ties (<= 1 apart there, and rare); scales and zeros bit-equal."""
    assert torch.equal(got_q.scale, ref_q.scale)
    assert torch.equal(got_q.zero, ref_q.zero)
    diff = (got.int() - ref.int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 1e-3


# ---------------------------------------------------------------- quantize + pack
QP_GRID = [  # (bits, axis, group, D, tokens, dtype)
    (2, "token", 32, 64, 64, torch.float16), (2, "channel", 32, 64, 37, torch.bfloat16),
    (4, "token", 16, 128, 32, torch.bfloat16), (4, "channel", 128, 128, 5, torch.float16),
    (1, "channel", 16, 64, 3, torch.float16), (8, "token", 8, 64, 16, torch.float16),
]
if FULL:
    QP_GRID = [(b, ax, g, D, n, dt) for b, ax, g, D, dt in itertools.product(
        (2, 4), ("token", "channel"), (32, 128), (64, 128), (torch.float16, torch.bfloat16))
        if g <= D for n in ((g * 3,) if ax == "token" else (131,))]
    QP_GRID += [(1, "channel", 32, 64, 7, torch.float16), (8, "token", 32, 128, 64, torch.bfloat16)]


@pytest.mark.parametrize("bits,axis,group,D,n,dtype", QP_GRID)
def test_quantize_pack_matches_storage_quantize(bits, axis, group, D, n, dtype):
    x = rand(2, 3, n, D, dtype=dtype)
    got = quantize_pack(x, bits, axis, group)
    ref = quantize(x, bits, axis, group)
    assert got.packed.shape == ref.packed.shape and got.scale.shape == ref.scale.shape
    check_codes(got.codes(), ref.codes(), got, ref)
    torch.testing.assert_close(got.dequantize(), ref.dequantize(), atol=float(ref.scale.float().max()) * 1.01, rtol=0)


def test_quantize_pack_writes_into_views_only():
    """Outputs given as views into capacity buffers: the slice is written, the rest is untouched."""
    x = rand(2, 2, 5, 64)
    packed = torch.full((2, 2, 9, 16), 0xAB, dtype=torch.uint8, device=DEV)
    scale = torch.full((2, 2, 9, 2), float("nan"), dtype=torch.float16, device=DEV)
    zero = scale.clone()
    q = quantize_pack(x, 2, "channel", 32, out=(packed[:, :, 3:8], scale[:, :, 3:8], zero[:, :, 3:8]))
    ref = quantize(x, 2, "channel", 32)
    check_codes(q.codes(), ref.codes(), q, ref)
    assert bool((packed[:, :, :3] == 0xAB).all()) and bool((packed[:, :, 8:] == 0xAB).all())
    assert bool(scale[:, :, :3].isnan().all()) and bool(zero[:, :, 8:].isnan().all())
    assert not bool(scale[:, :, 3:8].isnan().any())


def test_quantize_pack_rejects_what_it_cannot_do():
    x = rand(1, 1, 48, 64)
    with pytest.raises(ValueError, match="whole groups"):
        quantize_pack(x[:, :, :40], 2, "token", 32)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_pack(x, 3, "channel", 32)


# ---------------------------------------------------------------- decode attention
def build_cache(B, H, T, D, bits, group, residual, dtype, kernel_layer=False):
    """A KIVI cache of T tokens filled the way decoding fills it (prefill then single tokens), so the
    quantized key and value streams end at different tokens, as they do in use."""
    layer = (KernelUniformLayer if kernel_layer else UniformLayer)(bits, "token", "channel", group, group, residual)
    k, v = rand(B, H, T, D, dtype=dtype), rand(B, H, T, D, dtype=dtype, outliers=False)
    pre = max(0, T - 5)
    if pre:
        layer.append(k[:, :, :pre], v[:, :, :pre])
    for i in range(pre, T):
        layer.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    return layer, PackedKV(layer.kq, layer.k_res, layer.vq, layer.v_res)


DA_GRID = [  # (B, Hq, Hkv, T, D, bits, group, residual, dtype, masked, splits)
    (2, 4, 2, 45, 64, 2, 16, 16, torch.float16, False, 2),
    (1, 3, 1, 70, 64, 4, 32, 0, torch.float16, True, None),
    (2, 8, 8, 33, 128, 2, 32, 32, torch.bfloat16, True, 3),
    (1, 2, 2, 20, 64, 2, 16, 32, torch.float32, False, 5),  # all keys still in the residual
    (1, 4, 1, 300, 64, 4, 32, 32, torch.float16, True, 2),  # whole quantized blocks: the main loop runs
]
if FULL:  # every compiled specialization (heads, dims, dtype, bits/group) at 3 lengths
    DA_GRID = [(B, Hkv * r, Hkv, T, D, bits, g, R, dt, masked, None)
               for (Hkv, r), D, dt, (bits, g) in itertools.product(
                   ((8, 4), (2, 1), (1, 7)), (64, 128), (torch.float16, torch.bfloat16), ((2, 32), (2, 128), (4, 64)))
               if g <= D and (r == 4 or (D == 128 and dt == torch.bfloat16))
               for B, T, R, masked in ((1, 1, 0, False), (3, 100, 128, True), (2, 4133, 128, False))]


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,bits,group,residual,dtype,masked,splits", DA_GRID)
def test_decode_attention_matches_reference(B, Hq, Hkv, T, D, bits, group, residual, dtype, masked, splits):
    _, kv = build_cache(B, Hkv, T, D, bits, group, residual, dtype)
    q = rand(B, Hq, D, dtype=dtype, outliers=False)
    mask = None
    if masked:  # left padding of a different length per row, and one hole
        mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
        for b in range(B):
            mask[b, : (3 * b + 1) % max(T, 1)] = False
        mask[:, T // 2] = False
        mask[:, -1] = True
    out = torch.full((B, Hq, D), float("nan"), dtype=dtype, device=DEV)  # poisoned: every element must be written
    decode_attention(q, kv, mask=mask, out=out, num_splits=splits)
    ref = decode_attention_ref(q, kv, mask)
    assert not bool(out.isnan().any())
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < tolerance(dtype), err


@pytest.mark.skipif(DEV != "cuda", reason="inline PTX runs compiled only (the interpreter takes the Triton path)")
@pytest.mark.parametrize("bits,group,D,dtype", [(2, 128, 128, torch.float16), (2, 32, 64, torch.bfloat16),
                                                (4, 64, 128, torch.float16), (8, 32, 64, torch.float16)])
def test_decode_attention_ptx_unpack_equals_triton_unpack(bits, group, D, dtype):
    """The main loop's codes unpacked by inline PTX are the Triton path's exactly: same fp16 operands, same sums."""
    _, kv = build_cache(2, 2, 700, D, bits, group, 128, dtype)
    q = rand(2, 8, D, dtype=dtype, outliers=False)
    mask = torch.ones(2, 700, dtype=torch.bool, device=DEV)
    mask[1, :37] = False
    a = decode_attention(q, kv, mask=mask, num_splits=3, asm=True)
    b = decode_attention(q, kv, mask=mask, num_splits=3, asm=False)
    assert torch.equal(a, b)
    err = float((a.float() - decode_attention_ref(q, kv, mask)).norm() / a.float().norm())
    assert err < tolerance(dtype), err


def test_decode_attention_split_count_does_not_change_result():
    _, kv = build_cache(1, 2, 300, 64, 2, 32, 32, torch.float32)
    q = rand(1, 4, 64, dtype=torch.float32)
    outs = [decode_attention(q, kv, num_splits=s, block_n=32) for s in (1, 4, 64)]  # 64 > blocks: clipped
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_decode_attention_main_loop_equals_general_loop():
    """The main loop (whole quantized blocks, per-byte unpacking) computes what the general loop does."""
    _, kv = build_cache(2, 2, 260, 64, 2, 32, 32, torch.float32)
    q = rand(2, 4, 64, dtype=torch.float32)
    fast = decode_attention(q, kv, num_splits=2)
    slow = decode_attention(q, kv, num_splits=2, fast=False)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_decode_attention_fully_masked_row_is_zero_and_scale_is_used():
    _, kv = build_cache(2, 1, 40, 64, 2, 16, 16, torch.float32)
    q = rand(2, 2, 64, dtype=torch.float32)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEV)
    mask[1] = False
    out = decode_attention(q, kv, mask=mask, scale=0.3)
    assert bool((out[1] == 0).all())
    ref = decode_attention_ref(q, kv, mask, scale=0.3)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
    assert float((decode_attention(q, kv, mask=mask)[0] - out[0]).abs().max()) > 1e-3  # the scale matters


# ---------------------------------------------------------------- chunked prefill over the packed past
def build_chunk(B, H, T, C, D, bits, group, residual, dtype):
    """A KIVI cache of the first ``T - C`` tokens, seen as the chunk kernel sees it: the chunk's ``C`` tokens
    appended to the full-precision residual (what the kernel layer's handle holds)."""
    layer, _ = build_cache(B, H, T - C, D, bits, group, residual, dtype)
    k, v = rand(B, H, C, D, dtype=dtype), rand(B, H, C, D, dtype=dtype, outliers=False)
    kr = k if layer.k_res is None else torch.cat([layer.k_res, k], 2)
    vr = v if layer.v_res is None else torch.cat([layer.v_res, v], 2)
    return PackedKV(layer.kq, kr, layer.vq, vr)


CA_GRID = [  # (B, Hq, Hkv, T, C, D, bits, group, residual, dtype, masked, rows, splits)
    (2, 4, 2, 150, 7, 64, 2, 32, 16, torch.float32, True, 16, 2),
    (1, 4, 1, 300, 9, 64, 4, 32, 32, torch.float16, False, 16, None),  # 36 rows: 3 row tiles; main loop runs
    (1, 2, 2, 80, 5, 64, 2, 16, 0, torch.float32, True, 64, 3),
    (2, 3, 1, 40, 40, 64, 2, 16, 16, torch.bfloat16, False, 32, None),  # nothing packed yet: all causal
    (1, 4, 2, 420, 12, 128, 2, 128, 128, torch.float16, True, 32, None),  # key groups span blocks: scale vectors
    (1, 2, 1, 200, 6, 64, 8, 32, 32, torch.float32, False, 16, 2),
]
if FULL:
    CA_GRID = [(B, Hkv * r, Hkv, T, C, D, bits, g, 128, dt, masked, rows, None)
               for (Hkv, r), D, dt, (bits, g) in itertools.product(
                   ((8, 4), (1, 7)), (64, 128), (torch.float16, torch.bfloat16), ((2, 32), (2, 128), (4, 64)))
               if g <= D for B, T, C, masked, rows in ((1, 700, 33, True, 64), (2, 4133, 256, False, 64),
                                                         (3, 300, 17, True, 16))]


@pytest.mark.parametrize("B,Hq,Hkv,T,C,D,bits,group,residual,dtype,masked,rows,splits", CA_GRID)
def test_chunk_attention_matches_reference(B, Hq, Hkv, T, C, D, bits, group, residual, dtype, masked, rows, splits):
    kv = build_chunk(B, Hkv, T, C, D, bits, group, residual, dtype)
    q = rand(B, Hq, C, D, dtype=dtype, outliers=False)
    mask = None
    if masked:  # left padding of a different length per row
        mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
        for b in range(B):
            mask[b, : (5 * b + 2) % (T - C)] = False
    got = chunk_attention(q, kv, mask=mask, rows=rows, num_splits=splits)
    ref = chunk_attention_ref(q, kv, mask)
    assert got.shape == (B, Hq, C, D) and not bool(got.isnan().any())
    err = float((got.float() - ref).norm() / ref.norm())
    assert err < tolerance(dtype), err


@pytest.mark.parametrize("bits,group,D", [(2, 32, 64), (4, 64, 64), (8, 32, 64), (2, 128, 128)])
def test_chunk_attention_byte_orders_agree(bits, group, D):
    """Packed blocks read per element (each lane loads its byte) and per byte (lanes interleaved back into token
    and channel order: ``join``) give the same result, the reference's."""
    kv = build_chunk(1, 2, 400, 10, D, bits, group, max(group, 32), torch.float32)
    q = rand(1, 4, 10, D, dtype=torch.float32)
    a = chunk_attention(q, kv, join=False, rows=16)
    b = chunk_attention(q, kv, join=True, rows=16)
    ref = chunk_attention_ref(q, kv)
    for got in (a, b):
        assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_chunk_attention_retries_smaller_tiles_when_out_of_resources(monkeypatch):
    """A launch the GPU cannot hold (shared memory: float32 models, wide heads) is retried with half the token block,
    then half the rows, never below what the kernel needs; other errors are not swallowed."""
    import importlib

    from triton.runtime.errors import OutOfResources

    ca = importlib.import_module("kvshrink.kernels.chunk_attention")  # the module (the package exports the function)

    kv = build_chunk(1, 2, 200, 20, 64, 2, 32, 32, torch.float32)
    q = rand(1, 4, 20, 64, dtype=torch.float32)  # 2 heads x 20 tokens = 40 rows per KV head
    tried = []

    def fake(q, kv, mask, scale, rows, block_n, *a, **kw):
        tried.append((rows, block_n))
        if block_n > 64 or rows > 16:
            raise OutOfResources(300000, 232448, "shared memory")
        return "ok"
    monkeypatch.setattr(ca, "_launch", fake)
    assert ca.chunk_attention(q, kv, rows=32, block_n=256) == "ok"
    assert tried == [(32, 256), (32, 128), (32, 64), (16, 64)]

    def broken(*a, **kw):
        raise ValueError("not a resource problem")
    monkeypatch.setattr(ca, "_launch", broken)
    with pytest.raises(ValueError, match="resource problem"):
        ca.chunk_attention(q, kv)


def test_chunk_attention_is_causal_and_its_last_row_is_decode():
    """Query c sees tokens up to T - C + c: the chunk's last query is a decode step over the whole cache, and
    its first query does not see the rest of the chunk (changing those tokens leaves it unchanged)."""
    B, H, T, C, D = 1, 2, 120, 6, 64
    kv = build_chunk(B, H, T, C, D, 2, 32, 32, torch.float32)
    q = rand(B, 4, C, D, dtype=torch.float32)
    got = chunk_attention(q, kv, num_splits=2)
    dec = decode_attention(q[:, :, -1], kv, num_splits=2)
    assert float((got[:, :, -1] - dec).norm() / dec.norm()) < 1e-5  # float32 sums in another order
    later = kv.k_res.clone()
    later[:, :, -(C - 1):] += 3.0  # the chunk's tokens after its first
    moved = chunk_attention(q, replace(kv, k_res=later), num_splits=2)
    torch.testing.assert_close(moved[:, :, 0], got[:, :, 0], atol=1e-6, rtol=1e-6)
    assert float((moved[:, :, -1] - got[:, :, -1]).abs().max()) > 1e-3
    k_all, v_all = kv.dense(torch.float32)
    kq = quantize(k_all[:, :, :T - 2], 2, "token", 2)  # keys packed into the chunk: a state it must refuse
    with pytest.raises(ValueError, match="not quantized"):
        chunk_attention(q, PackedKV(kq, k_all[:, :, T - 2:], None, v_all))


def test_chunked_prefill_through_the_model_matches_reference_path(tiny):
    """A left-padded prompt prefilled in four chunks: every chunk after the first attends over the packed past
    through chunk_attention (both layers), with the logits of the dequantize-then-SDPA path."""
    model = tiny("llama", head_dim=32) if DEV == "cpu" else tiny_model("llama", head_dim=32).to(DEV)
    ids = torch.randint(3, 200, (2, 56), generator=GEN).to(DEV)
    am = torch.ones_like(ids)
    am[1, :5] = 0
    spec = "kivi:bits=2,group=16,residual=16"

    @torch.no_grad()
    def prefill(cache):
        outs = []
        for lo, hi in ((0, 24), (24, 40), (40, 47), (47, 56)):
            pos = (am[:, :hi].cumsum(-1) - 1).clamp(min=0)[:, lo:hi]
            outs.append(model(input_ids=ids[:, lo:hi], attention_mask=am[:, :hi], position_ids=pos,
                              past_key_values=cache, use_cache=True).logits)
        return torch.cat(outs, 1)

    ref = prefill(make_cache(model, spec))
    calls = []
    real = kattn.chunk_attention
    try:
        kattn.chunk_attention = lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw)
        got = prefill(make_kernel_cache(model, spec))
        assert calls == [16, 16, 7, 7, 9, 9]  # chunks 2-4, two layers each; the first chunk had no packed past
        off = make_kernel_cache(model, spec)
        for layer in off.layers:
            layer.chunk_kernel = False  # chunks dequantize the past instead
        same = prefill(off)
        assert len(calls) == 6
    finally:
        kattn.chunk_attention = real
        disable(model)
    keep = am.bool()
    assert float((got - ref)[keep].norm() / ref[keep].norm()) < 1e-5
    assert float((same - ref)[keep].norm() / ref[keep].norm()) < 1e-6


@pytest.mark.parametrize("mode", ["decode", "chunked"])
def test_eval_window_through_the_kernels_matches_the_torch_path(tiny, mode):
    """The evaluation harness with kernels on (``--kernels``): the same logits as the torch path, decode steps served
    by the decode kernel and chunks after the first by chunk_attention."""
    from kvshrink.eval.ppl import run_window

    model = tiny("llama", head_dim=32) if DEV == "cpu" else tiny_model("llama", head_dim=32).to(DEV)
    ids = torch.randint(3, 200, (1, 57), generator=GEN).to(DEV)
    spec = "kivi:bits=2,group=16,residual=16"
    calls = {"decode": 0, "chunk": 0}
    real_d, real_c = kattn.decode_packed, kattn.chunk_attention
    outs = {}
    try:
        kattn.decode_packed = lambda *a, **kw: calls.__setitem__("decode", calls["decode"] + 1) or real_d(*a, **kw)
        kattn.chunk_attention = lambda *a, **kw: calls.__setitem__("chunk", calls["chunk"] + 1) or real_c(*a, **kw)
        for kernels in (False, True):
            got = []
            run_window(model, ids, spec, lambda pos, lg: got.append(lg.float()), mode=mode, chunk_size=8,
                       prompt_tokens=24, kernels=kernels)
            outs[kernels] = torch.cat(got)
    finally:
        kattn.decode_packed, kattn.chunk_attention = real_d, real_c
        disable(model)
    assert float((outs[True] - outs[False]).norm() / outs[False].norm()) < 1e-5
    if mode == "decode":
        assert calls == {"decode": 2 * 32, "chunk": 0}  # 32 decode steps after the prompt, two layers
    else:
        assert calls == {"decode": 0, "chunk": 2 * 4}  # 4 chunks of 8 after the prompt, two layers


def test_chunk_mask_rows_accepts_only_causal_plus_padding():
    B, C, T = 2, 4, 10
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :3] = False
    causal = torch.arange(T)[None, :] <= (T - C + torch.arange(C))[:, None]
    m = pad[:, None, None, :] & causal[None, None]
    assert torch.equal(kattn._chunk_mask_rows(m, B, C, T), pad)
    assert kattn._chunk_mask_rows(m[:1], 1, C, T) is None  # no padding: no mask for the kernel
    assert kattn._chunk_mask_rows(pad[:, None, None, :].expand(B, 1, C, T), B, C, T) is False  # bidirectional
    assert kattn._chunk_mask_rows(None, B, C, T) is False


# ---------------------------------------------------------------- the channel-strided layout
def test_strided_pack_places_channel_slices_in_bit_slots():
    codes = torch.randint(0, 4, (2, 3, 5, 64), generator=GEN, dtype=torch.uint8)
    packed = pack_strided(codes, 2)
    assert packed.shape == (2, 3, 5, 16)
    j, b = 2, 7  # byte b, slot j holds channel b + j * D/4
    assert torch.equal((packed[..., b] >> (2 * j)) & 3, codes[..., b + j * 16])
    assert torch.equal(unpack_strided(packed, 2), codes)


SQ_GRID = [(2, "token", 32, 64, 64, torch.float16), (2, "channel", 16, 64, 37, torch.bfloat16),
           (4, "token", 16, 128, 32, torch.bfloat16), (4, "channel", 64, 128, 5, torch.float16),
           (8, "channel", 64, 64, 3, torch.float16)]
if FULL:
    SQ_GRID = [(b, ax, g, D, n, dt) for b, ax, g, D, dt in itertools.product(
        (2, 4), ("token", "channel"), (32, 64, 128), (64, 128), (torch.float16, torch.bfloat16))
        if strided_supported(b, g, ax, D) for n in ((g * 3,) if ax == "token" else (131,))]


@pytest.mark.parametrize("bits,axis,group,D,n,dtype", SQ_GRID)
def test_quantize_pack_strided_matches_reference(bits, axis, group, D, n, dtype):
    x = rand(2, 3, n, D, dtype=dtype)
    got = quantize_pack_strided(x, bits, axis, group)
    ref = quantize_strided_ref(x, bits, axis, group)
    assert isinstance(got, StridedQuantizedTensor) and got.packed.shape == ref.packed.shape == (2, 3, n, D * bits // 8)
    check_codes(got.codes(), ref.codes(), got, ref)
    # the reference is storage's quantizer: same bytes per token, same dequantized values
    plain = quantize(x, bits, axis, group)
    assert got.nbytes() == plain.nbytes()
    assert torch.equal(ref.dequantize(), plain.dequantize())


def strided_kv(kv: PackedKV) -> PackedKV:
    conv = [None if q is None else StridedQuantizedTensor.from_kivi(q) for q in (kv.kq, kv.vq)]
    return PackedKV(conv[0], kv.k_res, conv[1], kv.v_res)


DS_GRID = [  # (B, Hq, Hkv, T, D, bits, group, residual, dtype, masked, splits, block_n)
    (2, 4, 2, 45, 64, 2, 16, 16, torch.float16, False, 2, 16),
    (1, 3, 1, 300, 64, 4, 32, 32, torch.float16, True, None, 32),
    (2, 8, 8, 133, 128, 2, 32, 32, torch.bfloat16, True, 3, 32),
    (1, 2, 2, 20, 64, 2, 16, 32, torch.float32, False, 5, 16),
    (1, 4, 1, 300, 64, 2, 32, 32, torch.float32, False, 2, 32),
]
if FULL:
    DS_GRID = [(B, Hkv * r, Hkv, T, D, bits, g, R, dt, masked, None, None)
               for (Hkv, r), D, dt, (bits, g) in itertools.product(
                   ((8, 4), (2, 1), (1, 7)), (64, 128), (torch.float16, torch.bfloat16), ((2, 32), (2, 128), (4, 64)))
               if g <= D and (r == 4 or (D == 128 and dt == torch.bfloat16))
               for B, T, R, masked in ((1, 1, 0, False), (3, 100, 128, True), (2, 4133, 128, False))]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,bits,group,residual,dtype,masked,splits,block_n", DS_GRID)
def test_decode_attention_strided_matches_reference(B, Hq, Hkv, T, D, bits, group, residual, dtype, masked, splits,
                                                    block_n):
    _, kv = build_cache(B, Hkv, T, D, bits, group, residual, dtype)
    kv = strided_kv(kv)
    q = rand(B, Hq, D, dtype=dtype, outliers=False)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
        for b in range(B):
            mask[b, : (3 * b + 1) % max(T, 1)] = False
        mask[:, T // 2] = False
        mask[:, -1] = True
    out = torch.full((B, Hq, D), float("nan"), dtype=dtype, device=DEV)
    decode_attention_strided(q, kv, mask=mask, out=out, num_splits=splits, block_n=block_n)
    ref = decode_attention_ref(q, kv, mask)
    assert not bool(out.isnan().any())
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < tolerance(dtype), err
    if dtype == torch.float32:  # main loop (scales folded into q and p) == general loop (dequantize)
        slow = decode_attention_strided(q, kv, mask=mask, num_splits=splits, block_n=block_n, fast=False)
        torch.testing.assert_close(out, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pv_rows", [0, 1])
def test_decode_attention_strided_operand_orders(pv_rows):
    """Both product orders for the values (code tile as second or first operand) compute the reference."""
    _, kv = build_cache(2, 2, 300, 64, 2, 32, 32, torch.float16)
    kv = strided_kv(kv)
    q = rand(2, 8, 64, dtype=torch.float16, outliers=False)
    out = decode_attention_strided(q, kv, block_n=32, pv_rows=pv_rows)
    ref = decode_attention_ref(q, kv)
    assert float((out.float() - ref).norm() / ref.norm()) < tolerance(torch.float16)


# ---------------------------------------------------------------- the layer and transformers' wiring
def test_kernel_layer_stores_what_uniform_layer_stores():
    kl, kkv = build_cache(2, 2, 150, 64, 2, 16, 32, torch.float16, kernel_layer=True)
    ul, ukv = build_cache(2, 2, 150, 64, 2, 16, 32, torch.float16)
    assert (kkv.tkq, kkv.tvq, kkv.tokens) == (ukv.tkq, ukv.tvq, ukv.tokens)
    assert kl.held() == ul.held() == kl.seen
    assert kl.nbytes() >= ul.nbytes()  # capacity is counted


@pytest.mark.parametrize("strided", [False, True])
def test_kernel_layer_same_codes_as_uniform_layer_and_reserve_stops_regrowth(monkeypatch, strided):
    monkeypatch.setattr(klayer, "PREFER_STRIDED", strided)
    GEN.manual_seed(11)
    k, v = rand(1, 2, 200, 64), rand(1, 2, 200, 64)
    kl = KernelUniformLayer(4, "token", "channel", 32, 32, 64)
    ul = UniformLayer(4, "token", "channel", 32, 32, 64)
    kl.reserve(200)
    kl.append(k[:, :, :150], v[:, :, :150])
    ul.append(k[:, :, :150], v[:, :, :150])
    ptr = kl.vq.packed.data_ptr()
    for i in range(150, 200):
        kl.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        ul.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert kl.vq.packed.data_ptr() == ptr  # written in place
    assert isinstance(kl.kq, StridedQuantizedTensor) == strided
    check_codes(kl.kq.codes(), ul.kq.codes(), kl.kq, ul.kq)
    check_codes(kl.vq.codes(), ul.vq.codes(), kl.vq, ul.vq)
    assert torch.equal(kl.k_res, ul.k_res) and torch.equal(kl.v_res, ul.v_res)
    kl.batch_select_indices(torch.tensor([0]))  # state replaced wholesale: buffers follow
    kl.append(k[:, :, :1], v[:, :, :1])
    assert kl.vq.tokens == ul.vq.tokens + 1


@pytest.mark.parametrize("head_dim", [32, 64])  # 32: KIVI's layout (strided needs 16 bytes/token); 64: strided
def test_generate_with_kernels_matches_reference_path(tiny, monkeypatch, head_dim):
    """Greedy generation through transformers' attention interface: the packed decode kernel serves every
    decode step of every layer, and gives the tokens the dequantize-then-SDPA path gives."""
    model = tiny("llama", head_dim=head_dim) if DEV == "cpu" else tiny_model("llama", head_dim=head_dim).to(DEV)
    ids = torch.randint(3, 200, (2, 20), generator=GEN).to(DEV)
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding
    spec = "kivi:bits=2,group=16,residual=16"
    monkeypatch.setattr(klayer, "PREFER_STRIDED", True)  # whatever the default, both layouts are tested here
    calls = []
    real = kattn.decode_packed
    monkeypatch.setattr(kattn, "decode_packed", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(past_key_values=make_cache(model, spec), **kw)
    try:
        cache = make_kernel_cache(model, spec, reserve=26)
        assert all(isinstance(layer, KernelUniformLayer) for layer in cache.layers)
        got = model.generate(past_key_values=cache, **kw)
        assert cache.layers[0].strided == (head_dim == 64)
        assert isinstance(cache.layers[0].vq, StridedQuantizedTensor) == (head_dim == 64)
    finally:
        disable(model)
    assert model.config._attn_implementation == "sdpa"
    assert len(calls) == 5 * 2  # 5 decode steps x 2 layers
    assert torch.equal(got.sequences, ref.sequences)
    s_ref, s_got = torch.stack(ref.scores), torch.stack(got.scores)
    assert float((s_got - s_ref).norm() / s_ref.norm()) < 1e-5


def test_nothing_quantized_yet_goes_to_the_kivi_layout_kernel():
    """Early decode steps (every token still in the 16-bit residual) have no stream to tell the layout by: the
    KIVI-layout kernel serves them (the strided one cannot compile head_dim 32 at 2 bits: 8 bytes per token)."""
    from kvshrink.kernels.decode_strided import strided_decode_supported

    k, v = rand(1, 2, 5, 32, dtype=torch.float32), rand(1, 2, 5, 32, dtype=torch.float32)
    kv = PackedKV(None, k, None, v)
    assert not strided_decode_supported(kv, 32)
    q = rand(1, 4, 32, dtype=torch.float32)
    torch.testing.assert_close(kattn.decode_packed(q, kv), decode_attention_ref(q, kv), atol=1e-5, rtol=1e-4)


def test_kernel_cache_generates_like_the_reference_path_in_every_family(tiny, family):
    """Every tested family through make_kernel_cache + generate (left padding): the reference path's tokens and
    scores, and the model's attention restored after. Calls the kernels cannot serve keep the attention the model
    used before: Gemma2's soft-capping needs its eager function (SDPA refuses it), fed an additive mask (found when
    the eval CLI began using the kernels on CUDA)."""
    kw = {} if family in ("qwen2", "phi3") else {"head_dim": 32}  # their configs derive head_dim
    model = tiny(family, **kw) if DEV == "cpu" else tiny_model(family, **kw).to(DEV)
    before = model.config._attn_implementation
    ids = torch.randint(3, 200, (2, 20), generator=GEN).to(DEV)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    spec = "kivi:bits=2,group=16,residual=16"
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(past_key_values=make_cache(model, spec), **kw)
    try:
        got = model.generate(past_key_values=make_kernel_cache(model, spec), **kw)
    finally:
        disable(model)
    assert model.config._attn_implementation == before and "_kvshrink_dense_attn" not in model.config.__dict__
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)


def test_attention_function_mask_rows_and_dense_fallback():
    """transformers' 4-D masks (bool or additive) become the kernel's (B, T) rows; a call the kernel cannot
    serve (here: soft-capping) falls back to dequantize + SDPA and still matches the reference."""
    B, T = 2, 37
    keep = torch.rand(B, T, generator=GEN) > 0.3
    keep[:, -1] = True
    additive = torch.zeros(B, 1, 1, T).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(kattn._mask_rows(keep[:, None, None, :], B, T), keep)
    assert torch.equal(kattn._mask_rows(additive, B, T), keep)
    assert kattn._mask_rows(None, B, T) is None

    layer, kv = build_cache(1, 2, 50, 64, 2, 16, 16, torch.float32, kernel_layer=True)
    handle = kattn.PackedDecode(kv, layer)
    q = rand(1, 4, 1, 64, dtype=torch.float32)

    class Module(torch.nn.Module):  # what transformers' SDPA function reads off an attention module
        is_causal = True
        num_key_value_groups = 2

    fast, _ = kattn.kvshrink_attention(Module(), q, handle, handle, None, scaling=0.125)
    dense, _ = kattn.kvshrink_attention(Module(), q, handle, handle, None, scaling=0.125, softcap=None,
                                        sliding_window=4096)  # sliding window: not served by the kernel
    ref = decode_attention_ref(q[:, :, 0], kv, scale=0.125)
    torch.testing.assert_close(fast[:, 0], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dense[:, 0].float(), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- graph-capturable static layers
@pytest.mark.parametrize("layout,bits", [("strided", 2), ("kivi", 2), ("strided", 4)])
def test_static_kivi_layer_matches_uniform_layer_step_by_step(layout, bits):
    """Device-side lengths, ring residuals and in-kernel flushes store what UniformLayer stores, and the
    graph-mode kernels (fixed splits, lengths read on the device) attend as the reference does."""
    from kvshrink.kernels.graph import StaticKiviLayer

    B, H, Hq, D, g, R = 2, 2, 4, 64, 16 if bits == 2 else 32, 32
    n0, steps = 37, 40
    k, v = rand(B, H, n0 + steps, D), rand(B, H, n0 + steps, D, outliers=False)
    ul = UniformLayer(bits, "token", "channel", g, g, R)
    sl = StaticKiviLayer(n0 + steps + 5, bits=bits, group=g, residual=R, layout=layout)
    ul.update(k[:, :, :n0], v[:, :, :n0])
    sl.update(k[:, :, :n0], v[:, :, :n0])
    for i in range(n0, n0 + steps):
        kt, vt = k[:, :, i:i + 1], v[:, :, i:i + 1]
        ref_kv = PackedKV(ul.kq, torch.cat([x for x in (ul.k_res, kt) if x is not None], -2),
                          ul.vq, torch.cat([x for x in (ul.v_res, vt) if x is not None], -2))
        handle, _ = sl.update(kt, vt)
        ul.append(kt, vt)
        if i % 7 == 0 or i == n0 + steps - 1:
            q = rand(B, Hq, D, outliers=False)
            out = handle.attend(q, None)
            ref = decode_attention_ref(q, ref_kv)
            assert float((out.float() - ref).norm() / ref.norm()) < tolerance(torch.float16)
    # the static layer flushes what an append made due at the start of the next step (same attention):
    # its quantized streams may lag the base layer's by that one pending flush
    st = sl.state()
    assert st.tokens == n0 + steps and st.tkq == ul.kq.tokens and ul.vq.tokens - 1 <= st.tvq <= ul.vq.tokens
    check_codes(st.kq.codes(), ul.kq.codes(), st.kq, ul.kq)
    n = st.tvq
    check_codes(st.vq.codes()[:, :, :n], ul.vq.codes()[:, :, :n], st.vq, replace(ul.vq, scale=ul.vq.scale[:, :, :n],
                                                                                 zero=ul.vq.zero[:, :, :n]))
    assert torch.equal(st.k_res, ul.k_res) and torch.equal(st.v_res[:, :, -ul.v_res.shape[2]:], ul.v_res)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [None, pytest.param(32, marks=pytest.mark.skipif(
    DEV != "cuda", reason="the kernel's step size acts on the GPU only"))])
def test_static_frag_layer_stores_what_the_kivi_layout_stores(dtype, block, monkeypatch):
    """Layout 'frag' (2-bit codes in the tensor cores' fragment order, kernels/frag.py): its prefill and its
    in-kernel flushes (keys a group at a time, values one token at a time into shared words) hold exactly the
    codes, scales and residual rows of the KIVI layout, over partial value tiles and several flushes; on a GPU its
    graph-mode attention (main splits + ring tail, decode_frag.py) matches the reference at every step."""
    from kvshrink.kernels import decode_frag
    from kvshrink.kernels.graph import StaticKiviLayer

    if block:
        monkeypatch.setitem(decode_frag.LAUNCH, "block", block)
    B, H, Hq, D, R = 2, 2, 8, 64, 64
    n0, steps = 150, 75  # prefill leaves a partial value tile; steps cross a key flush and value tile edges
    k, v = rand(B, H, n0 + steps, D, dtype=dtype), rand(B, H, n0 + steps, D, dtype=dtype, outliers=False)
    ref = StaticKiviLayer(n0 + steps + 5, bits=2, group=D, residual=R, layout="kivi")
    got = StaticKiviLayer(n0 + steps + 5, bits=2, group=D, residual=R, layout="frag")
    ul = UniformLayer(2, "token", "channel", D, D, R)
    got.lazy_initialization(k[:, :, :1], v[:, :, :1])
    got.kp.fill_(-1)  # every bit set, as a buffer an earlier sequence left behind: prefill and the steps' first
    got.vp.fill_(-1)  # token of each value word must overwrite, not OR into, what is there
    for layer in (ref, got, ul):
        layer.update(k[:, :, :n0], v[:, :, :n0])
    for i in range(n0, n0 + steps):
        kt, vt = k[:, :, i:i + 1], v[:, :, i:i + 1]
        ref_kv = PackedKV(ul.kq, torch.cat([x for x in (ul.k_res, kt) if x is not None], -2),
                          ul.vq, torch.cat([x for x in (ul.v_res, vt) if x is not None], -2))
        ref.update(kt, vt)
        handle, _ = got.update(kt, vt)
        ul.append(kt, vt)
        if DEV == "cuda" and (i % 9 == 0 or i == n0 + steps - 1):
            q = rand(B, Hq, D, dtype=dtype, outliers=False)
            want = decode_attention_ref(q, ref_kv)
            assert float((handle.attend(q, None).float() - want).norm() / want.norm()) < tolerance(dtype), i
    a, b = got.state(), ref.state()
    assert (a.tokens, a.tkq, a.tvq) == (b.tokens, b.tkq, b.tvq) == (n0 + steps, b.tkq, b.tvq)
    for x, y in ((a.kq, b.kq), (a.vq, b.vq)):
        assert torch.equal(x.codes(), y.codes()) and torch.equal(x.scale, y.scale) and torch.equal(x.zero, y.zero)
    assert torch.equal(a.k_res, b.k_res) and torch.equal(a.v_res, b.v_res)
    assert got.nbytes() == ref.nbytes()


def test_static_frag_layer_refuses_what_it_cannot_hold():
    from kvshrink.kernels.graph import StaticKiviLayer

    with pytest.raises(ValueError, match="2-bit codes"):
        StaticKiviLayer(256, bits=4, group=64, residual=64, layout="frag")
    with pytest.raises(ValueError, match="tail_splits >= 1"):
        StaticKiviLayer(256, bits=2, group=64, residual=64, layout="frag", tail_splits=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        StaticKiviLayer(256, bits=2, group=32, residual=64, layout="frag")
    layer = StaticKiviLayer(256, bits=2, group=64, residual=64, layout="frag")
    with pytest.raises(ValueError, match="must equal head_dim"):
        layer.update(rand(1, 2, 8, 128), rand(1, 2, 8, 128))


def test_static_dense_layer_attends_over_its_device_length():
    from kvshrink.kernels.graph import StaticDenseLayer

    B, H, Hq, D = 2, 2, 6, 64
    k, v = rand(B, H, 50, D), rand(B, H, 50, D)
    layer = StaticDenseLayer(64)
    layer.update(k[:, :, :45], v[:, :, :45])
    for i in range(45, 50):
        handle, _ = layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
    q = rand(B, Hq, D, outliers=False)
    out = handle.attend(q, 0.2)
    ref = decode_attention_ref(q, PackedKV(None, k, None, v), scale=0.2)
    assert int(layer.lens[0]) == 50
    assert float((out.float() - ref).norm() / ref.norm()) < tolerance(torch.float16)


@pytest.mark.parametrize("kind,layout", [("kivi", "strided"), ("kivi", "kivi"), ("dense", None),
                                         pytest.param("kivi", "frag", marks=pytest.mark.skipif(
                                             DEV != "cuda", reason="the frag layout attends in Gluon (GPU)"))])
def test_static_cache_with_left_padding_decodes_like_the_reference_path(tiny, kind, layout):
    """Rows of different prompt lengths (left padding): the static layers, given the prompt's mask once
    (``set_padding``, what ``GraphDecoder(attention_mask=...)`` does) and per-row positions, give the logits of the
    reference path fed the growing attention mask every step; without the mask they do not."""
    from kvshrink.kernels.graph import make_static_cache

    model = tiny("llama", head_dim=64) if DEV == "cpu" else tiny_model("llama", head_dim=64).to(DEV)
    B, n0, steps = 2, 21, 4
    ids = torch.randint(3, 200, (B, n0), generator=GEN).to(DEV)
    am = torch.ones(B, n0, dtype=torch.long, device=DEV)
    am[1, :7] = 0
    g = 64 if layout == "frag" else 16  # frag: one value group per token (group = head_dim)
    spec = f"kivi:bits=2,group={g},residual={g}"
    kw = {"group": g, "residual": g, "layout": layout} if kind == "kivi" else {}
    if layout == "frag":
        n0, ids, am = 150, torch.randint(3, 200, (B, 150), generator=GEN).to(DEV), am.new_ones(B, 150)
        am[1, :40] = 0
    try:
        from transformers import DynamicCache

        want = greedy_steps(model, make_cache(model, spec) if kind == "kivi" else DynamicCache(), ids, steps, am)
        got = greedy_steps(model, make_static_cache(model, n0 + steps + 4, kind=kind, **kw), ids, steps, am, "once")
        unmasked = greedy_steps(model, make_static_cache(model, n0 + steps + 4, kind=kind, **kw), ids, steps, am,
                                "none")
    finally:
        disable(model)
    assert float((got - want).norm() / want.norm()) < 2e-2
    assert float((unmasked[:, 1] - want[:, 1]).norm() / want[:, 1].norm()) > 2e-2  # the padded row needs the mask


@pytest.mark.parametrize("kind,layout", [("kivi", "strided"), ("kivi", "kivi"), ("dense", None)])
def test_static_cache_decodes_like_the_reference_path(tiny, kind, layout):
    """A model over a static cache (what GraphDecoder captures: explicit positions, device lengths) gives the
    logits of the reference path (kivi: the eager UniformLayer cache; dense: transformers' own cache)."""
    from kvshrink.kernels.graph import make_static_cache

    model = tiny("llama", head_dim=64) if DEV == "cpu" else tiny_model("llama", head_dim=64).to(DEV)
    B, n0, steps = 2, 21, 6
    ids = torch.randint(3, 200, (B, n0), generator=GEN).to(DEV)
    spec = "kivi:bits=2,group=16,residual=16"
    ref_cache = make_cache(model, spec) if kind == "kivi" else None
    try:
        cache = make_static_cache(model, n0 + steps + 4, kind=kind,
                                  **({"group": 16, "residual": 16, "layout": layout} if kind == "kivi" else {}))
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            if kind == "kivi":
                model(input_ids=ids, past_key_values=ref_cache, use_cache=True)
            seq = ids
            tok = out.logits[:, -1:].argmax(-1)
            for i in range(steps):
                pos = torch.full((B, 1), n0 + i, device=DEV)
                got = model(input_ids=tok, position_ids=pos, cache_position=pos[0], past_key_values=cache,
                            use_cache=True).logits
                seq = torch.cat([seq, tok], 1)
                if kind == "kivi":
                    want = model(input_ids=tok, past_key_values=ref_cache, use_cache=True).logits
                else:  # no cache: the whole sequence again
                    want = model(input_ids=seq).logits[:, -1:]
                assert float((got - want).norm() / want.norm()) < 2e-2, i
                tok = want[:, -1:].argmax(-1)
    finally:
        disable(model)
    assert int(cache.layers[0].lens[0]) == n0 + steps
