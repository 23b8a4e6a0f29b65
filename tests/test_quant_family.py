"""KVQuant, ZipCache, GEAR and MiKV: real packed storage, byte accounting, each paper's invariants."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvshrink import SpecError, make_cache
from kvshrink.quant_utils import (low_rank, mask_positions, merge_outliers, nearest_code, split_outliers,
                                  weighted_kmeans_1d)
from kvshrink.registry import create, parse_spec
from kvshrink.storage import QuantizedTensor, packed_size

METHODS = ("kvquant", "zipcache", "gear", "mikv")


def _ids(batch=2, length=40, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _full_layers(cache):
    return [l for l, kind in zip(cache.layers, cache.info.layer_kinds) if kind == "full"]


@torch.no_grad()
def _run(model, spec, ids, split=30):
    """Prefill ``ids[:, :split]`` then feed the rest one token at a time; return (logits, cache)."""
    cache = make_cache(model, spec)
    out = [model(ids[:, :split], past_key_values=cache).logits]
    for t in range(split, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    return torch.cat(out, 1), cache


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, needle", [
    ("kvquant:bits=5", "bits"), ("kvquant:outliers=0.7", "outliers"), ("kvquant:sink=-1", "sink"),
    ("kvquant:calibrate=magic", "calibrate"), ("kvquant:bits=two", "bits"),
    ("gear:bits=5", "bits"), ("gear:rank=-1", "rank"), ("gear:outliers=0.9", "outliers"), ("gear:buffer=0", "buffer"),
    ("gear:lowrank=qr", "lowrank"),
    ("zipcache:hi_bits=2,lo_bits=4", "lo_bits"), ("zipcache:salient=1.5", "salient"),
    ("zipcache:probe_recent=0", "probe_recent"), ("zipcache:stream=0", "stream"),
    ("mikv:hi_bits=2", "hi_bits"), ("mikv:recent=0.7,heavy=0.5", "recent"), ("mikv:lo_bits=16", "lo_bits"),
    ("mikv:budget=0.2", "budget"),
])
def test_bad_parameters_raise_clear_spec_errors(spec, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec(spec)


@pytest.mark.parametrize("spec, needle", [("gear:group=24", "group"), ("mikv:group=24", "group"),
                                          ("gear:rank=64", "rank")])
def test_model_dependent_parameters_checked(tiny, spec, needle):
    with pytest.raises(SpecError, match=needle):
        make_cache(tiny("llama"), spec)  # head_dim 32


@pytest.mark.parametrize("name", METHODS)
def test_spec_round_trip_and_paper_defaults(name):
    m = create(name)
    assert m.paper and "arXiv" in m.paper
    again = parse_spec(m.spec())[0]
    assert again.params() == m.params()
    defaults = {"kvquant": dict(bits=3, outliers=0.01, sink=1, prerope=True, qnorm=True),
                "gear": dict(bits=4, rank=4, outliers=0.02),
                "zipcache": dict(hi_bits=4, lo_bits=2, salient=0.6, stream=100),
                "mikv": dict(lo_bits=2, recent=0.1, heavy=0.1, balance=True)}[name]
    assert {k: m.params()[k] for k in defaults} == defaults


# ------------------------------------------------------------------------------------------------
# high-bit passthrough, every family, generate
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, tol", [
    ("gear:bits=8", 5e-3), ("gear:bits=4,rank=32,lowrank=svd,outliers=0", 5e-3),
    ("zipcache:hi_bits=8,lo_bits=8", 5e-3), ("mikv:recent=0.5,heavy=0.5", 2e-3),
    ("mikv:hi_bits=8,recent=0.5,heavy=0.5", 5e-3),
])
def test_high_precision_settings_match_the_uncompressed_model(tiny, spec, tol):
    model = tiny("llama")
    ids = _ids(length=34)
    with torch.no_grad():
        ref = model(ids).logits
    got, _ = _run(model, spec, ids)
    assert (got - ref).abs().max() < tol


def test_kvquant_error_falls_with_bits(tiny):
    model = tiny("llama")
    ids = _ids(length=34)
    with torch.no_grad():
        ref = model(ids).logits
    err = {b: (_run(model, f"kvquant:bits={b},calib_tokens=32", ids)[0] - ref).abs().mean().item() for b in (2, 3, 4)}
    assert err[4] < err[3] < err[2] < 0.1, err


@pytest.mark.parametrize("name", METHODS)
def test_every_family_prefill_and_decode(tiny, family, name):
    model = tiny(family)
    ids = _ids(length=24)
    quick = {"zipcache": "zipcache:stream=3", "gear": "gear:buffer=3", "kvquant": "kvquant:calib_tokens=32"}
    spec = quick.get(name, name)
    got, cache = _run(model, spec, ids, split=20)
    assert torch.isfinite(got).all()
    with torch.no_grad():
        ref = model(ids).logits
    assert (got - ref).abs().mean() < 0.1  # lossy but close on a random model
    assert cache.get_seq_length() == 24
    for layer in _full_layers(cache):
        k, v = layer.dense()
        assert k.shape[2] == v.shape[2] == 24 and layer.held() == 24


@pytest.mark.parametrize("spec", ["gear:bits=8", "zipcache:hi_bits=8,lo_bits=8,stream=4", "mikv:recent=0.5,heavy=0.5"])
def test_generate_matches_uncompressed_at_high_precision(tiny, spec):
    model = tiny("llama")
    ids = _ids(length=20)
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = model.generate(ids, attention_mask=mask, past_key_values=make_cache(model, spec), max_new_tokens=6,
                         do_sample=False)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("name", METHODS)
def test_generate_with_defaults(tiny, name):
    model = tiny("qwen3")
    ids = _ids(length=24)
    cache = make_cache(model, name + (":calib_tokens=32" if name == "kvquant" else ""))  # a quicker calibration
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5,
                         do_sample=False)
    assert out.shape == (2, 29)
    assert cache.get_seq_length() == 28


def test_methods_needing_queries_refuse_a_config_only_cache(tiny):
    model = tiny("llama")
    for name in ("zipcache", "mikv"):
        cache = make_cache(model.config, name)
        with pytest.raises(RuntimeError, match="make_cache\\(model"):
            with torch.no_grad():
                model(_ids(), past_key_values=cache)
    cache = make_cache(model.config, "kvquant")  # prerope needs the model's RoPE
    with pytest.raises(RuntimeError, match="prerope=false"):
        with torch.no_grad():
            model(_ids(), past_key_values=cache)
    cache = make_cache(model.config, "kvquant:prerope=false")  # calibrates lazily from the prompt
    with torch.no_grad():
        model(_ids(), past_key_values=cache)
    assert "first" in _full_layers(cache)[0].calibrated_from


# ------------------------------------------------------------------------------------------------
# bytes
# ------------------------------------------------------------------------------------------------


def _uncounted_tensors(layer):
    """Tensor-valued attributes of a layer that are not declared as state (they would escape nbytes)."""
    declared = set(layer.state_fields) | set(getattr(layer, "shared_fields", ()))
    bad = []
    for name, value in vars(layer).items():
        items = value if isinstance(value, list) else [value]
        if name not in declared and any(isinstance(x, (torch.Tensor, QuantizedTensor)) for x in items):
            bad.append(name)
    return bad


def _field_bytes(layer):
    total = 0
    for name in tuple(layer.state_fields) + tuple(getattr(layer, "shared_fields", ())):
        value = getattr(layer, name)
        for x in value if isinstance(value, list) else [value]:
            if isinstance(x, QuantizedTensor):
                total += sum(t.numel() * t.element_size() for t in (x.packed, x.scale, x.zero) if t is not None)
            elif isinstance(x, torch.Tensor):
                total += x.numel() * x.element_size()
    return total


@pytest.mark.parametrize("spec, max_ratio", [("kvquant:bits=2,calib_tokens=32", 0.27),
                                             ("kvquant:calib_tokens=32", 0.33), ("gear:bits=2", 0.45),
                                             ("zipcache", 0.38), ("mikv", 0.40)])
def test_nbytes_is_every_stored_tensor_and_less_than_fp16(tiny, spec, max_ratio):
    model = tiny("llama", head_dim=64, heads=4, kv_heads=2)
    ids = _ids(length=70)
    _, cache = _run(model, spec, ids, split=64)
    for layer in _full_layers(cache):
        assert _uncounted_tensors(layer) == []
        assert layer.nbytes() == _field_bytes(layer) > 0
    assert cache.nbytes() < max_ratio * cache.fp16_nbytes()


def test_kvquant_bytes_follow_the_layout_formula(tiny):
    model = tiny("llama")  # 2 KV heads, head_dim 32
    B, H, D, T, bits = 2, 2, 32, 40, 3
    _, cache = _run(model, f"kvquant:bits={bits},calib_tokens=32", _ids(length=T), split=30)
    k = round(0.01 * D) or 1  # one outlier per token vector
    q = T - 1  # the first token is the sink
    per_layer = (2 * B * H * q * packed_size(D, bits)      # key + value codes
                 + 2 * B * H * q * 2                       # value center + range (fp16)
                 + 2 * B * H * q * k * (2 + 1)             # outlier values (fp16) + uint8 indices
                 + B * q * 4                               # int32 positions (pre-RoPE)
                 + 2 * B * H * 1 * D * 2                   # the sink token's K and V (fp16)
                 + 4 * (2**bits) * 2                       # k/v codebooks and their Q-Norm copies
                 + 2 * H * D * 2)                          # per-channel key center + range
    assert cache.nbytes_per_layer() == [per_layer] * 2


def test_gear_bytes_follow_the_layout_formula(tiny):
    model = tiny("llama")
    B, H, D, r = 2, 2, 32, 4
    _, cache = _run(model, "gear:bits=4,buffer=4", _ids(length=35), split=30)  # prefill chunk + 1 flush + 1 buffered
    layer = _full_layers(cache)[0]
    assert [q.tokens for q in layer.kq] == [30, 4] and layer.k_buf.shape[2] == 1
    chunk = lambda T: (B * H * D * packed_size(T, 4)       # 4-bit key codes, packed along tokens (8-code runs)
                       + B * H * T * D // 2                # 4-bit value codes, packed along channels
                       + B * H * D * 2 * 2                 # key scale/zero per channel (one group per chunk)
                       + B * H * T * 2 * 2                 # value scale/zero per token (whole-head group)
                       + 2 * (B * H * T * r + B * H * r * D) * 2)  # A and B factors of K and V (fp16)
    outl = 2 * B * H * 34 * 1 * (2 + 1)
    buf = 2 * B * H * 1 * D * 2
    assert layer.nbytes() == chunk(30) + chunk(4) + outl + buf


def test_batch_selection_and_reset(tiny):
    model = tiny("llama")
    for spec in ("kvquant:calib_tokens=32", "gear:buffer=4", "zipcache:stream=4", "mikv"):
        _, cache = _run(model, spec, _ids(length=36), split=30)
        layer = _full_layers(cache)[0]
        k, v = layer.dense()
        layer.batch_select_indices(torch.tensor([1]))
        k1, v1 = layer.dense()
        assert torch.equal(k1, k[1:2]) and torch.equal(v1, v[1:2]), spec
        layer.reset()
        assert layer.nbytes() == (_field_bytes(layer) if spec.startswith("kvquant") else 0)
    assert layer.seen == 0


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(8, 40), st.integers(0, 2**31 - 1))
def test_split_outliers_reconstructs_outliers_exactly(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, generator=g) * torch.rand(3, 1, generator=g) * 10
    k = min(k, n)
    dense, vals, idx = split_outliers(x, k)
    med = x.median(-1, keepdim=True).values
    # the outliers are the k farthest from the median, and the dense part no longer contains them
    far = (x - med).abs().topk(k, -1).values[..., -1:]
    assert ((dense - med).abs() <= far + 1e-6).all()
    back = merge_outliers(dense, vals, idx)
    assert torch.equal(back.gather(-1, idx.long()), x.gather(-1, idx.long()).half().float())


def test_weighted_kmeans_follows_the_weights():
    x = torch.cat([torch.full((100,), -1.0), torch.full((100,), 0.0), torch.full((100,), 1.0)])
    c = weighted_kmeans_1d(x, 3)
    assert torch.allclose(c, torch.tensor([-1.0, 0.0, 1.0]))
    # two centroids for three point masses: the heavily weighted mass gets a centroid to itself
    w = torch.cat([torch.full((100,), 100.0), torch.ones(200)])
    c2 = weighted_kmeans_1d(x, 2, w)
    assert torch.isclose(c2[0], torch.tensor(-1.0)) and torch.isclose(c2[1], torch.tensor(0.5))
    assert torch.equal(nearest_code(torch.tensor([-0.9, 0.2, 0.9]), c2), torch.tensor([0, 1, 1], dtype=torch.uint8))


@pytest.mark.parametrize("method", ["power", "svd"])
def test_low_rank_recovers_low_rank_matrices(method):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 3, 40, 4, generator=g) @ torch.randn(2, 3, 4, 32, generator=g)
    a, b = low_rank(m, 4, method)
    assert a.shape == (2, 3, 40, 4) and b.shape == (2, 3, 4, 32)
    assert (a @ b - m).abs().max() < 1e-3


def test_mask_positions_are_sorted_per_row():
    mask = torch.tensor([[[True, False, True, False, True], [False, True, True, True, False]]])
    assert mask_positions(mask, 3).tolist() == [[[0, 2, 4], [1, 2, 3]]]


# ------------------------------------------------------------------------------------------------
# KVQuant
# ------------------------------------------------------------------------------------------------


def _kvq_layer(bits=3, outliers=0.05, sink=1):
    from kvshrink.methods.kvquant import KVQuantLayer

    layer = KVQuantLayer(bits, outliers, sink, prerope=False, qnorm=True)
    return layer


def test_kvquant_sink_and_sparse_outliers_are_exact():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 64, 32, generator=g)
    v = torch.randn(2, 2, 64, 32, generator=g)
    k[:, :, 0] *= 50  # an attention-sink-like first token
    k[0, 1, 10, 7] = 40.0
    v[1, 0, 20, 3] = -35.0  # single huge entries: must be sparse outliers
    layer = _kvq_layer()
    layer.update(k, v)
    dk, dv = layer.dense()
    assert torch.equal(dk[:, :, :1], k[:, :, :1].half().float())  # sink: unquantized (16-bit)
    assert torch.equal(dv[:, :, :1], v[:, :, :1].half().float())
    assert dk[0, 1, 10, 7] == torch.tensor(40.0) and dv[1, 0, 20, 3] == torch.tensor(-35.0)
    kidx = layer.k_oidx.long()
    assert torch.equal(dk[:, :, 1:].gather(-1, kidx), k[:, :, 1:].gather(-1, kidx).half().float())
    vidx = layer.v_oidx.long()
    assert torch.equal(dv[:, :, 1:].gather(-1, vidx), v[:, :, 1:].gather(-1, vidx).half().float())
    # dense part: bounded error, and the codes really use 2**bits codebook entries
    assert ((dk - k).abs().mean() / k[:, :, 1:].abs().mean()) < 0.25
    assert layer.k_cb.numel() == 8 and torch.all(layer.k_cb[1:] >= layer.k_cb[:-1])
    assert layer.k_codes.shape == (2, 2, 63, packed_size(32, 3)) and layer.k_codes.dtype == torch.uint8
    assert "first 63 tokens" in layer.calibrated_from


def test_kvquant_qnorm_matches_mean_and_std_of_calibration_data():
    from kvshrink.methods.kvquant import calibrate_layer, normalise_values

    g = torch.Generator().manual_seed(1)
    keys = torch.randn(256, 2, 32, generator=g) * torch.linspace(0.5, 4, 32)
    values = torch.randn(256, 2, 32, generator=g) ** 3  # heavy tails: 2-bit codes shift mean/std
    t = calibrate_layer(keys, values, bits=2, outliers=0.0, qnorm=True)
    vn = normalise_values(values, 0)[0]
    q = t["v_cbn"].float()[nearest_code(vn, t["v_cb"]).long()]
    assert torch.isclose(q.mean(), vn.mean(), atol=2e-3)
    assert torch.isclose(q.std(unbiased=False), vn.std(unbiased=False), rtol=2e-3)
    assert not torch.allclose(t["v_cbn"], t["v_cb"])  # Q-Norm really changed the decoding codebook


def test_kvquant_fisher_calibration_is_used_and_prerope_keys_come_back_at_their_positions(tiny):
    model = tiny("llama")
    ids = _ids(length=48)
    cache = make_cache(model, "kvquant:bits=4,calib_tokens=64")
    assert "Fisher-weighted" in cache.methods[0].calibration_source
    assert "pseudo-random" in cache.methods[0].calibration_source  # tiny models have no tokenizer
    layer = _full_layers(cache)[0]
    assert layer.k_center.shape == (2, 32)  # per-channel key ranges calibrated before any token
    fisher_cb = layer.k_cb.clone()
    unweighted = make_cache(model, "kvquant:bits=4,calibrate=prefill")
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :40], past_key_values=cache)
        model(ids[:, :40], past_key_values=ref)
        for t in range(40, 48):  # decoding: positions of new tokens must be followed
            model(ids[:, t:t + 1], past_key_values=cache)
            model(ids[:, t:t + 1], past_key_values=ref)
        model(ids[:, :40], past_key_values=unweighted)
    assert not torch.equal(fisher_cb, _full_layers(unweighted)[0].k_cb)
    for ours, theirs in zip(_full_layers(cache), ref.layers):
        k, _ = ours.dense()
        err = (k - theirs.keys).norm() / theirs.keys.norm()
        assert err < 0.15  # RoPE re-applied at the wrong positions gives errors near 1
        assert torch.equal(ours.pos[0], torch.arange(1, 48, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# GEAR
# ------------------------------------------------------------------------------------------------


def _gear_error(spec, k, v):
    from kvshrink.methods.gear import GEARLayer

    m = create("gear", **dict(p.split("=") for p in spec.split(",")) if spec else {})
    layer = GEARLayer(m.bits, 32, m.rank, m.outliers, m.buffer, m.lowrank, m.power_iters)
    layer.update(k, v)
    dk, dv = layer.dense()
    return layer, (dk - k).norm() / k.norm(), (dv - v).norm() / v.norm()


def test_gear_low_rank_residual_reduces_error_and_outliers_are_exact():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 40, 32, generator=g) + torch.randn(2, 2, 1, 32, generator=g) * 3
    v = torch.randn(2, 2, 40, 32, generator=g)
    _, ek0, ev0 = _gear_error("bits=2,rank=0,outliers=0.05", k, v)
    layer, ek, ev = _gear_error("bits=2,rank=4,outliers=0.05", k, v)
    assert ek < ek0 and ev < ev0
    _, eks, evs = _gear_error("bits=2,rank=32,lowrank=svd,outliers=0", k, v)
    assert eks < 2e-3 and evs < 2e-3  # full-rank residual: only fp16 rounding of the factors is left
    dk, _ = layer.dense()
    idx = layer.k_oidx.long()
    assert torch.equal(dk.gather(-1, idx), k.gather(-1, idx).half().float())


def test_gear_streaming_buffer_is_compressed_every_buffer_tokens(tiny):
    model = tiny("llama")
    ids = _ids(length=41)
    _, cache = _run(model, "gear:buffer=5", ids, split=30)
    layer = _full_layers(cache)[0]
    assert [q.tokens for q in layer.kq] == [30, 5, 5] and layer.k_buf.shape[2] == 1
    assert len(layer.k_a) == 3 and layer.k_a[1].shape == (2, 2, 5, 4)


# ------------------------------------------------------------------------------------------------
# ZipCache
# ------------------------------------------------------------------------------------------------


def _eager_attention(model, ids):
    """Attention probabilities of every layer, summed over the query heads of each KV head."""
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    return [a.reshape(a.shape[0], -1, rep, *a.shape[-2:]).sum(2) for a in out.attentions]


def test_zipcache_normalised_scores_equal_exact_attention_when_every_token_probes(tiny):
    model = tiny("llama", attn="eager")
    ids = _ids(length=32)
    cache = make_cache(model, "zipcache:probe_recent=1")
    for layer in _full_layers(cache):
        layer.keep_scores = True
    with torch.no_grad():
        model(ids, past_key_values=cache)
    att = _eager_attention(model, ids)
    counts = torch.arange(32, 0, -1).float()  # queries that can see token j
    for i, layer in enumerate(_full_layers(cache)):
        expected = att[i].sum(2) / counts
        assert torch.allclose(layer.last_score, expected, atol=1e-5)
        # the salient class is the top 60% by that score, stored at 4 bits; the rest at 2 bits
        mask = layer.salient_mask()
        assert (mask.sum(-1) == round(0.6 * 32)).all()
        top = expected.topk(round(0.6 * 32), -1).indices
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(-1, top, True))
        assert layer.k_hi[0].bits == layer.v_hi[0].bits == 4 and layer.k_lo[0].bits == layer.v_lo[0].bits == 2


def test_zipcache_probes_approximate_and_salient_tokens_are_more_precise(tiny):
    model = tiny("llama", attn="eager")
    ids = _ids(length=64)
    cache = make_cache(model, "zipcache")  # 5% recent + 5% random probes
    for layer in _full_layers(cache):
        layer.keep_scores = True
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=ref)
    att = _eager_attention(model, ids)
    for i, layer in enumerate(_full_layers(cache)):
        exact = att[i].sum(2) / torch.arange(64, 0, -1).float()
        est = layer.last_score
        # probe estimate ranks tokens like the exact normalised score (rank correlation well above 0)
        rx, re = exact.argsort(-1).argsort(-1).float(), est.argsort(-1).argsort(-1).float()
        corr = ((rx - rx.mean(-1, keepdim=True)) * (re - re.mean(-1, keepdim=True))).sum(-1) / (
            (rx - rx.mean(-1, keepdim=True)).norm(dim=-1) * (re - re.mean(-1, keepdim=True)).norm(dim=-1))
        assert corr.mean() > 0.3
        _, v = layer.dense()
        err = (v - ref.layers[i].values).abs().mean(-1)
        mask = layer.salient_mask()
        assert err[mask].mean() < err[~mask].mean()


def test_attention_probs_masks_padding_keys():
    from kvshrink.quant_utils import attention_probs

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False  # row 0: two tokens of left padding
    p = attention_probs(q, k, 0.5, torch.arange(6), key_valid=valid)
    assert torch.equal(p[0, :, :2], torch.zeros_like(p[0, :, :2]))  # padding queries see no key: zeros, not NaN
    assert (p[0, :, :, :2] == 0).all()  # padding keys receive nothing
    # the real tokens of row 0 attend exactly as the same tokens without padding do
    alone = attention_probs(q[:1, :, 2:], k[:1, :, 2:], 0.5, torch.arange(4))
    assert torch.allclose(p[:1, :, 2:, 2:], alone, atol=1e-6)
    assert torch.allclose(p[1], attention_probs(q[1:], k[1:], 0.5, torch.arange(6))[0], atol=1e-6)


@pytest.mark.parametrize("spec", ["zipcache:probe_recent=1", "mikv:recent=0.5,heavy=0.5"])
def test_attention_scored_quantizers_ignore_left_padding(tiny, spec):
    """ZipCache's saliency and MiKV's importance come from attention the cache recomputes: with a left-padded
    batch it must mask the padding as the model does (the 2-D attention mask reaches the probes), so a padded
    row scores its real tokens exactly as the same tokens alone, and its padding scores nothing."""
    model = tiny("llama", attn="eager")
    P = 8
    a, b = _ids(batch=1, length=24, seed=1), _ids(batch=1, length=24 + P, seed=2)
    ids = torch.cat([torch.cat([torch.zeros(1, P, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :P] = 0
    padded, alone = make_cache(model, spec), make_cache(model, spec)
    for layer in _full_layers(padded) + _full_layers(alone):
        layer.keep_scores = True
    with torch.no_grad():
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # as generate() numbers a left-padded row
        model(ids, attention_mask=mask, position_ids=pos, past_key_values=padded)
        model(a, past_key_values=alone)
    for lp, la in zip(_full_layers(padded), _full_layers(alone)):
        sp, sa = (lp.last_score, la.last_score) if spec.startswith("zipcache") else (lp.hi_score, la.hi_score)
        assert torch.isfinite(sp).all()
        assert (sp[0, :, :P] == 0).all()
        assert torch.allclose(sp[0, :, P:], sa[0], atol=1e-4), (sp[0, :, P:] - sa[0]).abs().max()
        if spec.startswith("mikv"):  # the key/query balancer's maxima run over real tokens only
            assert lp.balance is not None and torch.allclose(lp.balance[0], la.balance[0], rtol=2e-3)


def test_zipcache_decoding_buffer_and_cst_normalisers(tiny):
    model = tiny("llama")
    _, cache = _run(model, "zipcache:stream=4", _ids(length=39), split=30)
    layer = _full_layers(cache)[0]
    assert layer.chunk_lens == [30, 4, 4] and layer.k_buf.shape[2] == 1 and layer.buf_score.shape == (2, 2, 1)
    assert layer.v_hi_c[0].shape == (2, 2, 1, 32) and layer.v_hi_c[0].dtype == torch.float16
    assert layer.mask[0].shape == (2, 2, math.ceil(30 / 8))


# ------------------------------------------------------------------------------------------------
# MiKV
# ------------------------------------------------------------------------------------------------


def test_mikv_keeps_recent_and_heavy_hitters_at_high_precision_and_every_token(tiny):
    model = tiny("llama", attn="eager")
    ids = _ids(length=40)
    cache = make_cache(model, "mikv")
    with torch.no_grad():
        model(ids, past_key_values=cache)
    att = _eager_attention(model, ids)
    k_true = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=k_true)
    for i, layer in enumerate(_full_layers(cache)):
        mask = layer.high_precision_mask()
        assert mask.shape == (2, 2, 40) and layer.held() == 40  # no token left behind
        assert mask[..., -4:].all()  # 10% recent
        acc = att[i].sum(2)[..., :36]  # accumulated attention of the older tokens
        heavy = torch.zeros(2, 2, 36, dtype=torch.bool).scatter_(-1, acc.topk(4, -1).indices, True)
        assert torch.equal(mask[..., :36], heavy)  # 10% heavy hitters
        k, v = layer.dense()
        tk = k_true.layers[i].keys
        assert torch.equal(k[mask], tk[mask].half().float())  # high precision = 16-bit
        assert layer.lo_k.bits == 2 and layer.lo_k.tokens == 32


def test_mikv_demotes_as_the_window_moves_and_keeps_budgets(tiny):
    model = tiny("llama")
    _, cache = _run(model, "mikv", _ids(length=50), split=30)
    for layer in _full_layers(cache):
        mask = layer.high_precision_mask()
        n_hi = round(0.1 * 50) * 2
        assert (mask.sum(-1) == n_hi).all() and mask[..., -5:].all()
        assert layer.hi_score.shape == (2, 2, n_hi) and layer.lo_k.tokens == 50 - n_hi


def test_mikv_balancer_reduces_low_precision_attention_error():
    from kvshrink.methods.mikv import MiKVLayer

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 64, 32, generator=g)
    k[..., 5] *= 25  # an outlier key channel
    q = torch.randn(1, 1, 16, 32, generator=g)
    errs = []
    for bal in (False, True):
        layer = MiKVLayer(16, 2, 0.0, 0.0, 32, bal)
        if bal:
            layer.balance = (k.abs().amax(2) / q.abs().amax(2)).sqrt().unsqueeze(2).half()
        kq, _ = layer._lo_rows(k, k)
        kd = kq.dequantize() * (layer.balance.float() if bal else 1)
        errs.append(((q @ kd.transpose(-1, -2)) - (q @ k.transpose(-1, -2))).abs().mean())
    assert errs[1] < 0.7 * errs[0]


def test_kvquant_calibration_file_round_trip(tiny, tmp_path):
    from kvshrink.calibration import make_metadata, save_calibration, tokens_sha256
    from kvshrink.errors import CalibrationMismatchError
    from kvshrink.methods.kvquant import calibrate
    from kvshrink.model_info import model_info

    model = tiny("llama")
    method = create("kvquant", bits=2)
    ids = _ids(batch=1, length=48)
    tensors = calibrate(model, method, ids)
    info = model_info(model)
    meta = make_metadata("kvquant", method.calib_params(info), info.identity(), tensors, tokens_sha256(ids), 48)
    path = save_calibration(tmp_path / "kvq.safetensors", tensors, meta)
    cache = make_cache(model, f"kvquant:bits=2,calib={path}")
    layer = _full_layers(cache)[1]
    assert torch.equal(layer.v_cbn, tensors["layers.1.v_cbn"]) and "calibration file" in layer.calibrated_from
    with pytest.raises(CalibrationMismatchError, match="bits"):
        make_cache(model, f"kvquant:bits=3,calib={path}")


def test_composition_with_an_evicting_policy_fails_loudly_or_works(tiny):
    from kvshrink.registry import method_names

    if "h2o" not in method_names():
        pytest.skip("no evicting policy registered")
    model = tiny("llama")
    ids = _ids(length=60)
    for spec, ok in (("h2o:budget=0.2+gear", True), ("h2o:budget=0.2+kvquant:prerope=false,calib_tokens=32", True),
                     ("h2o:budget=0.2+zipcache", False), ("h2o:budget=0.2+mikv", False),
                     ("h2o:budget=0.2+kvquant:calib_tokens=32", True)):  # pre-RoPE keys gather per-head positions
        cache = make_cache(model, spec)
        if ok:
            with torch.no_grad():
                model(ids, past_key_values=cache)
            assert sum(cache.tokens_held()) < 2 * 60  # the policy evicted; the quantizer stored what was kept
        else:
            with pytest.raises(RuntimeError, match="policy"):
                with torch.no_grad():
                    model(ids, past_key_values=cache)
