"""The fused rotate + quantize + pack kernel (kvshrink.kernels.rotatekv_pack) against RotateKVLayer's torch path.

Without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set here before Triton is
imported) on small shapes; on a GPU the same tests run compiled, and ``KVSHRINK_FULL_GRID=1`` widens the grid
to the full product (bits x head group x head_dim x tokens x prerope x reorder x center x dtype) plus a
prefill-sized chunk. The reference is the layer itself: ``RotateKVLayer._store`` on a twin layer (same channel
order, same centre), whose ``kq``/``vq`` the kernel must reproduce: same layout, bit-equal scales and zeros,
codes equal except 1 apart at rounding ties (counted, < 0.1%).
"""
from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from kvshrink.kernels.rotatekv_pack import (key_center, make_bench_layer, rotatekv_pack_supported,  # noqa: E402
                                            rotatekv_quantize_keys, rotatekv_quantize_keys_ref,
                                            rotatekv_quantize_values)
from kvshrink.methods.rotatekv import RotateKV, RotateKVLayer  # noqa: E402
from kvshrink.rotation import hadamard_transform  # noqa: E402
from kvshrink.storage import regroup_channels  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("KVSHRINK_FULL_GRID") == "1" and DEV == "cuda"
F16, BF16 = torch.float16, torch.bfloat16


def kv(B, H, T, D, dtype, seed=0):
    """Key-like data (an outlier channel, a per-channel offset as a k_proj bias gives) and values."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g) + 2.0 * torch.randn(1, H, 1, D, generator=g)
    k[..., 5] *= 6.0
    v = torch.randn(B, H, T, D, generator=g)
    return k.to(DEV, dtype), v.to(DEV, dtype)


def rope_tables(B, T, D, dtype, rotary=None, start=0, per_head=None):
    """Llama-style (cos, sin) over ``rotary`` (default all) channels at positions start.., as the model
    hands them to the cache: (B, T, R) in the model dtype, or per head (B, H, T, R)."""
    R = rotary or D
    inv = 1.0 / (10000.0 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    pos = torch.arange(start, start + T, dtype=torch.float32)[None].repeat(B, 1) + torch.arange(B)[:, None] * 3
    if per_head:
        pos = pos[:, None] + torch.arange(per_head)[None, :, None] * 5.0  # (B, H, T): per-head positions
    ang = pos[..., None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(DEV, dtype), ang.sin().to(DEV, dtype)


def make_layer(H, D, G, bits, prerope, reorder, center, seed=0, **kw):
    layer = make_bench_layer(H, D, G, bits, seed=seed, prerope=prerope, reorder=reorder, center=center, **kw)
    assert layer.G == G and layer.reordered == reorder
    return layer


def torch_store(layer, k, v, cos, sin):
    """The layer's own path: ``_store`` (inverse RoPE, rotation, order, centre, clipped quantization)."""
    B, _, T, _ = k.shape
    pos = torch.arange(T, dtype=torch.int32, device=k.device)[None].expand(B, T) if layer.m.prerope else None
    layer._store(k, v, pos, cos, sin, None)
    return layer.kq, layer.vq


def check_same(got, ref):
    """Same layout and dtypes; scales and zeros bit-equal; codes equal except 1 apart at rounding ties."""
    for f in ("bits", "axis", "group", "tokens", "head_dim", "dtype"):
        assert getattr(got, f) == getattr(ref, f), f
    assert (got.slots is None) == (ref.slots is None)  # keys grouped in the calibrated order say so
    assert got.slots is None or torch.equal(got.slots.cpu(), ref.slots.cpu())
    assert got.packed.shape == ref.packed.shape and got.packed.dtype == ref.packed.dtype == torch.uint8
    assert got.scale.shape == ref.scale.shape and got.scale.dtype == ref.scale.dtype
    assert torch.equal(got.scale, ref.scale), "scales differ"
    assert torch.equal(got.zero, ref.zero), "zero points differ"
    diff = (got.codes().int() - ref.codes().int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 1e-3


# ---------------------------------------------------------------- grid
# (bits, G, H, D, T, prerope, reorder, center, dtype): every value of every axis, each at least twice
GRID = [
    (2, 1, 2, 64, 1, True, True, True, F16),
    (2, 2, 4, 64, 7, True, True, True, BF16),
    (4, 4, 4, 64, 40, True, True, True, F16),
    (2, 4, 4, 128, 7, True, True, False, BF16),
    (4, 2, 2, 128, 1, True, False, True, BF16),
    (2, 1, 4, 128, 40, False, True, True, F16),
    (4, 1, 2, 64, 7, False, False, False, F16),
    (2, 2, 2, 128, 40, False, False, True, BF16),
    (4, 4, 4, 128, 1, False, True, False, F16),
    (2, 4, 4, 64, 40, True, False, False, BF16),
    (2, 2, 6, 64, 7, True, True, True, F16),  # 6 heads: padded to 8 inside the kernel
]
if FULL:
    GRID = [(bits, G, 4 if G > 1 else 2, D, T, pre, ro, ce, dt)
            for bits, G, D, T, pre, ro, ce, dt in itertools.product(
                (2, 4), (1, 2, 4), (64, 128), (1, 7, 40, 1031), (True, False), (True, False), (True, False),
                (F16, BF16))]
    GRID += [(8, 4, 8, 128, 300, True, True, True, BF16), (2, 2, 6, 128, 77, True, True, True, F16),
             (2, 4, 16, 128, 65, True, True, True, BF16),  # 2048 channels: the scratch permutation
             (2, 4, 32, 128, 9, True, True, True, F16)]


@pytest.mark.parametrize("bits,G,H,D,T,prerope,reorder,center,dtype", GRID)
def test_kernel_matches_layer_torch_path(bits, G, H, D, T, prerope, reorder, center, dtype):
    """Prefill chunk (centre taken from it) then, for T > 1, one decode token with the centre held."""
    layer = make_layer(H, D, G, bits, prerope, reorder, center, seed=T)
    twin = copy.deepcopy(layer)
    B = 2
    k, v = kv(B, H, T, D, dtype, seed=bits * 100 + T)
    cos, sin = rope_tables(B, T, D, dtype)
    assert rotatekv_pack_supported(layer, k)
    got_k = rotatekv_quantize_keys(layer, k, cos, sin)
    got_v = rotatekv_quantize_values(layer, v)
    ref_k, ref_v = torch_store(twin, k, v, cos, sin)
    if center:
        assert torch.equal(layer.k_mu, twin.k_mu)  # the centre is the layer's own (torch, first chunk)
    check_same(got_k, ref_k)
    check_same(got_v, ref_v)
    if T > 1:  # a decode step: one token, the centre of the first chunk
        k1, v1 = kv(B, H, 1, D, dtype, seed=7)
        c1, s1 = rope_tables(B, 1, D, dtype, start=T)
        got_k = rotatekv_quantize_keys(layer, k1, c1, s1)
        got_v = rotatekv_quantize_values(layer, v1)
        twin.kq = twin.vq = None
        ref_k, ref_v = torch_store(twin, k1, v1, c1, s1)
        check_same(got_k, ref_k)
        check_same(got_v, ref_v)


@pytest.mark.parametrize("scratch", [False, True])
def test_both_permutation_routes_agree_with_reference(scratch):
    """tl.gather (<= 1024 channels by default) and the scratch round trip (above) give the same codes."""
    layer = make_layer(4, 64, 4, 2, True, True, True)
    k, _ = kv(1, 4, 9, 64, F16, seed=3)
    cos, sin = rope_tables(1, 9, 64, F16)
    got = rotatekv_quantize_keys(layer, k, cos, sin, scratch=scratch, block_t=4)  # 3 token blocks, last partial
    check_same(got, rotatekv_quantize_keys_ref(layer, k, cos, sin))


def test_partial_rotary_per_head_rope_and_no_rotation():
    """RoPE on the leading half of each head only (Phi-3 style), per-head (cos, sin) (eviction policies pass
    them per head), fwht off (order and clip only), fp32 scales, 8 bits."""
    H, D, T = 4, 64, 5
    k, v = kv(2, H, T, D, BF16, seed=11)
    cos, sin = rope_tables(2, T, D, BF16, rotary=D // 2, per_head=H)
    for flags in (dict(), dict(fwht=False), dict(rotate_values=False, scale_dtype="float32")):
        layer = make_layer(H, D, 2, 8 if not flags else 2, True, True, True, **flags)
        twin = copy.deepcopy(layer)
        got_k, got_v = rotatekv_quantize_keys(layer, k, cos, sin), rotatekv_quantize_values(layer, v)
        ref_k, ref_v = torch_store(twin, k, v, cos, sin)
        check_same(got_k, ref_k)
        check_same(got_v, ref_v)


def test_group_smaller_than_head_dim_and_clip_one():
    """group=32 (4 groups per head, scales (B, H, T, 4)) at 4 bits (clip 1.0: the plain quantizer) and at 2 bits
    with an explicit clip."""
    for bits, clip in ((4, None), (2, 0.9)):
        layer = make_layer(4, 128, 2, bits, True, True, True, group=32, clip=clip)
        k, v = kv(1, 4, 6, 128, F16, seed=5)
        cos, sin = rope_tables(1, 6, 128, F16)
        twin = copy.deepcopy(layer)
        got_k, got_v = rotatekv_quantize_keys(layer, k, cos, sin), rotatekv_quantize_values(layer, v)
        ref_k, ref_v = torch_store(twin, k, v, cos, sin)
        assert got_k.scale.shape == (1, 4, 6, 4)
        check_same(got_k, ref_k)
        check_same(got_v, ref_v)


@pytest.mark.parametrize("bits,bound", [(4, 0.12), (2, 0.65)])
def test_round_trip_error_is_bounded(bits, bound):
    """Dequantize what the kernel stored: in the rotated domain each in-range element is within half a step
    (clip 1 at 4 bits); through the layer's own reader (unrotate, re-RoPE) keys and values come back within a
    relative error that shrinks with bits."""
    H, D, T = 4, 64, 24
    layer = make_layer(H, D, 4, bits, True, True, True)
    k, v = kv(1, H, T, D, F16, seed=21)
    cos, sin = rope_tables(1, T, D, F16)
    layer.lazy_initialization(k, v)
    kq, vq = rotatekv_quantize_keys(layer, k, cos, sin), rotatekv_quantize_values(layer, v)
    if bits == 4:  # clip = 1: every element is inside its group's range
        from kvshrink.rope import invert_rope

        kr = (layer.rotate_keys(invert_rope(k.float(), cos.float(), sin.float())) - layer.k_mu.float()).to(k.dtype)
        step = kq.scale.float().repeat_interleave(kq.group, -1)  # per quantization slot
        assert kq.slots is not None
        step = regroup_channels(step, kq.slots)  # channel c was quantized in slot kq.slots[c]
        assert bool(((kq.dequantize().float() - kr.float()).abs() <= 0.5 * step * 1.01 + 1e-3).all())
        vr = hadamard_transform(v.float()).to(v.dtype)
        vstep = vq.scale.float().repeat_interleave(vq.group, -1)
        assert bool(((vq.dequantize().float() - vr.float()).abs() <= 0.5 * vstep * 1.01 + 1e-3).all())
    layer.kq, layer.vq = kq, vq
    layer.pos = torch.arange(T, dtype=torch.int32, device=k.device)[None]
    layer.rope_fn = lambda pos, dtype: tuple(t.float() for t in rope_tables(1, T, D, F16))
    K, V = layer.dense()
    ek = float((K.float() - k.float()).norm() / k.float().norm())
    ev = float((V.float() - v.float()).norm() / v.float().norm())
    assert ek < bound and ev < bound, (ek, ev)


def test_writes_into_capacity_views_only():
    """``out=`` views into larger buffers (a decode step writing its token in place): the slice is written,
    the rest is untouched."""
    layer = make_layer(4, 64, 2, 2, True, True, True)
    k, v = kv(2, 4, 3, 64, F16, seed=2)
    cos, sin = rope_tables(2, 3, 64, F16)
    key_center(layer, k, cos, sin)
    packed = torch.full((2, 4, 10, 16), 0xAB, dtype=torch.uint8, device=DEV)
    scale = torch.full((2, 4, 10, 1), float("nan"), dtype=torch.float16, device=DEV)
    zero = scale.clone()
    got = rotatekv_quantize_keys(layer, k, cos, sin, out=(packed[:, :, 4:7], scale[:, :, 4:7], zero[:, :, 4:7]))
    check_same(got, rotatekv_quantize_keys_ref(layer, k, cos, sin))
    assert bool((packed[:, :, :4] == 0xAB).all()) and bool((packed[:, :, 7:] == 0xAB).all())
    assert bool(scale[:, :, :4].isnan().all()) and bool(zero[:, :, 7:].isnan().all())
    assert not bool(scale[:, :, 4:7].isnan().any())
    with pytest.raises(ValueError, match="expected"):
        rotatekv_quantize_values(layer, v, out=(packed[:, :, :2], scale[:, :, :3], zero[:, :, :3]))


def test_comparison_catches_a_wrong_order_or_missing_rope_inversion():
    """The check is sharp: a layer with another channel order, or keys given without their RoPE angles
    undone, do not pass it."""
    layer = make_layer(4, 64, 4, 2, True, True, False)
    k, _ = kv(1, 4, 8, 64, F16, seed=4)
    cos, sin = rope_tables(1, 8, 64, F16)
    ref = rotatekv_quantize_keys_ref(layer, k, cos, sin)
    other = copy.deepcopy(layer)
    other.set_perm(torch.roll(layer.perm, 1))
    with pytest.raises(AssertionError):
        check_same(rotatekv_quantize_keys(other, k, cos, sin), ref)
    with pytest.raises(AssertionError):
        check_same(rotatekv_quantize_keys(layer, k, torch.ones_like(cos), torch.zeros_like(sin)), ref)


def test_supported_says_no_where_the_kernel_cannot_follow():
    k, _ = kv(1, 4, 2, 64, F16)
    assert rotatekv_pack_supported(make_layer(4, 64, 4, 2, True, True, True), k)
    assert not rotatekv_pack_supported(make_bench_layer(4, 64, 4, 3), k)  # 3-bit runs
    assert not rotatekv_pack_supported(make_bench_layer(4, 64, 4, 2, key_axis="token"), k)
    assert not rotatekv_pack_supported(make_bench_layer(4, 64, 4, 16), k)
    layer = RotateKVLayer(RotateKV(bits=2, sinks=False, reorder=False), 0, 3, 64, 3, None)  # 192 = 12 x 16: Paley
    assert not rotatekv_pack_supported(layer, kv(1, 3, 2, 64, F16)[0])
    assert not rotatekv_pack_supported(make_bench_layer(4, 96, 4, 2), kv(1, 4, 2, 96, F16)[0])  # head_dim 96
    unperm = make_layer(4, 64, 4, 2, True, True, True)
    unperm.set_perm(None)
    assert not rotatekv_pack_supported(unperm, k)  # reorder without a calibrated order
    assert not rotatekv_pack_supported(make_layer(4, 64, 4, 2, True, True, True), k[:, :2])  # wrong head count
    with pytest.raises(ValueError, match="cos, sin"):
        rotatekv_quantize_keys(make_layer(4, 64, 4, 2, True, True, True), k)


def test_key_centre_a_few_batch_rows_at_a_time_equals_the_whole_batch(monkeypatch):
    """The first chunk's centre is computed a few rows at a time when the batch is large (memory); the median
    is per row, head and channel, so the result is the same tensor as from the whole batch at once."""
    import kvshrink.kernels.rotatekv_pack as rp

    B, H, T, D = 5, 4, 9, 64
    k, _ = kv(B, H, T, D, F16, seed=3)
    cos, sin = rope_tables(B, T, D, F16)
    whole = make_layer(H, D, 2, 2, True, True, True)
    want = whole._center_of(rp._rotated_keys_ref(whole, k, cos, sin))
    monkeypatch.setattr(rp, "CENTER_CHUNK_BYTES", 4 * k[:1].numel() * 4 * 2)  # two rows at a time
    split = make_layer(H, D, 2, 2, True, True, True)
    got = key_center(split, k, cos, sin)
    assert got.shape == (B, H, 1, D) and torch.equal(got, want)
    assert key_center(split, k[:, :, :3], cos[:, :3], sin[:, :3]) is got  # set once, then held
