"""Bit packing and uniform quantizers: property tests over every width and odd shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.storage import SUPPORTED_BITS, check_bits, pack, packed_size, quantize, unpack

bits_st = st.sampled_from(SUPPORTED_BITS)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, n=st.integers(1, 70), lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_pack_roundtrip_any_shape(bits, n, lead, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_size_is_dense(bits):
    # n codes take exactly n*bits/8 bytes when n is a multiple of 8: 3-bit is not padded to 4.
    assert packed_size(64, bits) == 64 * bits // 8
    assert pack(torch.zeros(64, dtype=torch.uint8), bits).numel() == 64 * bits // 8


@pytest.mark.parametrize("bits,n,size", [(1, 5, 1), (2, 5, 2), (4, 5, 3), (3, 5, 3), (3, 9, 6), (8, 5, 5), (4, 20, 10)])
def test_padding_only_to_whole_bytes(bits, n, size):
    assert packed_size(n, bits) == size


def test_three_bit_layout_is_little_endian():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]


@pytest.mark.parametrize("bad", [0, 5, 6, 7, 16])
def test_unsupported_bits_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unsupported bit width"):
        check_bits(bad)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), axis=st.sampled_from(["token", "channel"]),
       symmetric=st.booleans(), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0))
def test_quantize_error_bound(bits, axis, symmetric, seed, scale):
    """|x - deq(q(x))| <= step/2 per group (+ fp16 rounding of scale and zero)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 16, generator=g) * scale
    group = 8
    q = quantize(x, bits, axis, group, symmetric=symmetric)
    err = (q.dequantize() - x).abs()
    if axis == "channel":
        grouped = x.reshape(2, 3, 32, 16 // group, group)
    else:
        grouped = x.reshape(2, 3, 32 // group, group, 16).transpose(-1, -2)
    if symmetric:
        step = grouped.abs().amax(-1) / (2 ** (bits - 1) - 1)
    else:
        step = (grouped.amax(-1) - grouped.amin(-1)) / (2**bits - 1)
    bound = step / 2 + 2e-3 * grouped.abs().amax(-1) + 1e-6  # fp16 scale/zero rounding
    if axis == "channel":
        bound = bound.repeat_interleave(group, -1)
    else:
        bound = bound.repeat_interleave(group, 2)
    assert (err <= bound).all()


def test_quantize_exact_on_grid_values():
    # Values already on the 2-bit grid of their group come back exactly.
    levels = torch.tensor([0.0, 1.0, 2.0, 3.0])
    x = levels[torch.randint(0, 4, (1, 2, 8, 32))]
    x[..., 0] = 0.0
    x[..., 1] = 3.0  # every per-token group spans the full range
    q = quantize(x, 2, "channel", 32)
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("axis,group", [("channel", 32), ("token", 16)])
def test_nbytes_matches_storage_and_formula(axis, group):
    x = torch.randn(2, 4, 64, 64)
    q = quantize(x, 2, axis, group)
    storage = sum(t.untyped_storage().nbytes() for t in q.tensors())
    assert q.nbytes() == storage
    groups = x.numel() // group
    assert q.nbytes() == x.numel() * 2 // 8 + groups * 2 * 2  # 2-bit codes + fp16 scale and zero


def test_group_must_divide_axis():
    with pytest.raises(ValueError, match="group size 24 does not divide head_dim"):
        quantize(torch.randn(1, 1, 8, 64), 2, "channel", 24)
    with pytest.raises(ValueError, match="does not divide the number of tokens"):
        quantize(torch.randn(1, 1, 10, 64), 2, "token", 4)


def test_cat_appends_tokens():
    x = torch.randn(1, 2, 64, 32)
    a, b = quantize(x[:, :, :32], 4, "token", 16), quantize(x[:, :, 32:], 4, "token", 16)
    whole = quantize(x, 4, "token", 16)
    assert torch.equal(a.cat(b).dequantize(), whole.dequantize())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), heads=st.integers(1, 3), group=st.sampled_from([4, 8, 16]),
       symmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_slotted_groups_are_the_permuted_quantization_with_codes_in_place(bits, heads, group, symmetric, seed):
    """Groups formed in another channel order (``slots``): same codes and scales as quantizing the permuted
    tensor, each code at its own channel, and dequantize() undoes it exactly."""
    from dataclasses import replace

    from kvshrink.storage import regroup_channels

    g = torch.Generator().manual_seed(seed)
    D, T = 16, 3
    x = torch.randn(2, heads, T, D, generator=g) * (1 + 9 * (torch.rand(heads * D, generator=g) > 0.8).float()
                                                     ).reshape(heads, 1, D)
    order = torch.randperm(heads * D, generator=g)
    slots = order.argsort()
    stored = quantize(regroup_channels(x, order), bits, "channel", group, symmetric)
    codes = regroup_channels(stored.codes(), slots)  # every code back at its own channel
    q = replace(stored, packed=pack(codes, bits), slots=slots)
    assert torch.equal(q.codes(), codes)
    assert torch.equal(q.dequantize(torch.float32), regroup_channels(stored.dequantize(torch.float32), slots))
    assert torch.equal(q.cat(q).dequantize(torch.float32)[:, :, T:], q.dequantize(torch.float32))
    other = replace(q, slots=torch.roll(slots, 1))
    with pytest.raises(ValueError, match="different layouts"):
        q.cat(other)
    if heads * D > group and not torch.equal(order, torch.arange(heads * D)):  # reading with the wrong slots fails
        assert not torch.equal(other.dequantize(torch.float32), q.dequantize(torch.float32))
