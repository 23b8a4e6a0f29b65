"""RotateKV (kvshrink.methods.rotatekv) on tiny random models: exact where the math is exact, bounded where lossy."""
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from transformers import DynamicCache

from kvshrink import make_cache
from kvshrink.errors import KVShrinkError, SpecError
from kvshrink.methods.rotatekv import RotateKV, RotateKVLayer, quantize_clipped
from kvshrink.storage import regroup_channels
from kvshrink.registry import parse_spec
from kvshrink.storage import quantize

# Random-weight models have no massive activations: sink_ratio=0 takes the paper's plain top-k tokens.
EXACT = "rotatekv:bits=16,sink_ratio=0,sink_dtype=model"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rotatekv: no calib file")
        yield


def _ids(B=2, T=24, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


@torch.no_grad()
def _chunked(model, cache, ids, cut):
    a = model(ids[:, :cut], past_key_values=cache, use_cache=True).logits
    b = model(ids[:, cut:], past_key_values=cache, use_cache=True).logits
    return torch.cat([a, b], 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
@pytest.mark.parametrize("prerope", [True, False])
def test_16bit_round_trip_is_identity(tiny, family, prerope):
    """bits=16 stores rotated (and RoPE-inverted) keys unquantized: the rotation is orthogonal and RoPE
    is re-applied at the right positions, so logits equal the uncompressed model's to float tolerance."""
    model = tiny(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    cache = make_cache(model, f"{EXACT},prerope={str(prerope).lower()}")
    out = _chunked(model, cache, ids, 17)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    cache.close()


@pytest.mark.parametrize("head_dim, kv_heads", [(80, 2), (96, 1), (16, 3)])
def test_non_power_of_two_rotation_sizes_round_trip(tiny, head_dim, kv_heads):
    """Rotations of 160 = 20*8, 96 = 12*8 and 48 = 12*4 channels (Kronecker with a Paley matrix)."""
    model = tiny("llama", heads=2 * kv_heads, kv_heads=kv_heads, head_dim=head_dim)
    ids = _ids(T=12)
    with torch.no_grad():
        ref = model(ids).logits
    cache = make_cache(model, EXACT)
    assert cache.layers[0].G * head_dim in (160, 96, 48)
    torch.testing.assert_close(_chunked(model, cache, ids, 7), ref, rtol=0, atol=2e-5)


def test_partial_rotary_round_trip():
    """Phi-3 with partial_rotary_factor=0.5: RoPE covers the leading half of each head only."""
    from transformers import AutoModelForCausalLM

    from kvshrink.testing import tiny_config

    cfg = tiny_config("phi3")
    cfg.rope_parameters["partial_rotary_factor"] = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = _ids(T=14)
    with torch.no_grad():
        ref = model(ids).logits
        assert model.model.rotary_emb(ids.float(), torch.arange(3)[None])[0].shape[-1] == 16  # really partial
    cache = make_cache(model, EXACT)
    torch.testing.assert_close(_chunked(model, cache, ids, 9), ref, rtol=0, atol=2e-5)


def test_prerope_and_postrope_paths_agree_at_high_precision(tiny):
    model = tiny("llama")
    ids = _ids(T=40)
    outs = []
    for prerope in ("true", "false"):
        cache = make_cache(model, f"rotatekv:bits=8,sinks=false,reorder=false,prerope={prerope}")
        outs.append(_chunked(model, cache, ids, 32))
    with torch.no_grad():
        ref = model(ids).logits
    assert (outs[0] - outs[1]).abs().max() < 0.05
    assert (outs[0] - ref).abs().max() < 0.05
    # 2-bit is really lossy (the test above could not pass by storing nothing)
    cache = make_cache(model, "rotatekv:bits=2,sinks=false")
    assert (_chunked(model, cache, ids, 32) - ref).abs().max() > 1e-3


def test_rotated_storage_differs_from_raw_keys_and_unrotates(tiny):
    model = tiny("llama")
    cache = make_cache(model, EXACT + ",sinks=false")
    ids = _ids(B=1, T=10)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer = cache.layers[0]
    assert isinstance(layer, RotateKVLayer)
    k_dense, _ = layer.dense()
    assert layer.k_res.shape == k_dense.shape
    assert not torch.allclose(layer.k_res, k_dense, atol=1e-3)  # what is stored is rotated
    torch.testing.assert_close(layer.rotate_keys(layer.unrotate_keys(layer.k_res)), layer.k_res.float(),
                               rtol=0, atol=1e-5)


def test_sink_tokens_come_back_exact(tiny):
    model = tiny("llama")
    ids = _ids(B=2, T=40)
    seen = {}
    cache = make_cache(model, "rotatekv:bits=2,sink_ratio=0,sink_topk=3,sink_dtype=model")
    layer = cache.layers[1]
    orig = layer.append

    def spy(k, v):
        seen["k"], seen["v"] = k.clone(), v.clone()
        return orig(k, v)
    layer.append = spy
    with torch.no_grad():
        model(ids, past_key_values=cache)
    K, V = layer.dense()
    idx = layer.sink_idx.long()
    assert idx.shape[0] == 2 and (idx >= 0).any()
    for b in range(2):
        for t in idx[b][idx[b] >= 0].tolist():
            assert torch.equal(K[b, :, t], seen["k"][b, :, t])
            assert torch.equal(V[b, :, t], seen["v"][b, :, t])
    others = torch.ones(40, dtype=torch.bool)
    others[idx[0][idx[0] >= 0]] = False
    assert not torch.equal(K[0, :, others], seen["k"][0, :, others])  # the rest is really quantized


def test_sinks_follow_massive_activations(tiny):
    """A token whose hidden state has entries far above the median is a sink; ordinary tokens are not."""
    layer = make_cache(tiny("llama"), "rotatekv:bits=2,reorder=false,prerope=false").layers[0]
    hidden = torch.randn(1, 12, 128) * 0.1
    hidden[0, 5, 3] = 500.0
    k = torch.randn(1, 2, 12, 32)
    v = torch.randn(1, 2, 12, 32)
    layer.lazy_initialization(k, v)
    layer.pending = None
    layer._add_sinks(hidden, k, v, start=0)
    assert layer.sink_idx.tolist() == [[5]]
    layer._add_sinks(torch.randn(1, 1, 128), k[:, :, :1], v[:, :, :1], start=12)  # a plain decode step
    assert layer.sink_idx.tolist() == [[5]]


def _sinks_by_loop(hidden: torch.Tensor, topk: int, ratio: float) -> list[list[int]]:
    """Each row's sink tokens as the paper states it (plain Python): the distinct tokens owning a top-k |entry| that
    reaches ``ratio`` x the row's lower median |entry|, ascending."""
    B, _, C = hidden.shape
    a = hidden.abs().float().reshape(B, -1)
    rows = []
    for b in range(B):
        vals, flat = a[b].topk(min(topk, a.shape[1]))
        med = a[b].sort().values[(a.shape[1] - 1) // 2]
        rows.append(sorted({int(f) // C for v, f in zip(vals, flat) if v >= ratio * med}))
    return rows


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 9), topk=st.integers(1, 12), planted=st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 8), st.floats(1.0, 400.0)), max_size=8), seed=st.integers(0, 99))
def test_chunk_sinks_match_the_plain_rule(tiny, B, T, topk, planted, seed):
    """The vectorized sink search (one host sync) finds, row by row, the tokens the plain rule names, -1 padded."""
    layer = make_cache(tiny("llama"), f"rotatekv:bits=2,reorder=false,prerope=false,sink_topk={topk},"
                                      "sink_ratio=20").layers[0]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, 16, generator=g)
    for b, t, x in planted:
        if b < B and t < T:
            hidden[b, t, (b + t) % 16] = x
    want = _sinks_by_loop(hidden, topk, 20.0)
    got = layer._chunk_sinks(hidden, None, "cpu")
    if not any(want):
        assert got is None
        return
    S = max(len(r) for r in want)
    assert got.tolist() == [r + [-1] * (S - len(r)) for r in want]


@pytest.mark.parametrize("prerope", [False, True])
def test_deferred_decode_sinks_keep_what_the_synced_path_keeps(tiny, prerope):
    """Decode-step sinks decided on the device (no host sync: the GPU default) hold the same exact sinks as the
    per-step search: the cache reads back identically at every step, across a full pending block (compaction),
    and after compaction the sink tensors are the synced path's; -1 columns never exceed one block."""
    from kvshrink.methods.rotatekv import SINK_BLOCK

    model = tiny("llama")
    spec = f"rotatekv:bits=2,sink_topk=4,sink_ratio=20,prerope={str(prerope).lower()},calib_tokens=32"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rotatekv: no calib file")
        synced, deferred = make_cache(model, spec), make_cache(model, spec)
    for layer in deferred.layers:
        layer.deferred_sinks = True
    for layer in synced.layers:
        layer.deferred_sinks = False
    B, C = 2, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (B, 12), generator=g)
    # massive activations planted in the first decoder layer's input for some rows at some steps
    plant = {0: [(0, 3)], 5: [(1, 0)], 17: [(0, 0), (1, 0)], 18: [(1, 0)], 33: [(0, 0)]}
    step = {"i": -1}

    def boost(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        for b, t in plant.get(step["i"], []):
            h[b, t, 7] = 3000.0
    hk = model.model.layers[0].register_forward_pre_hook(boost, with_kwargs=True)
    try:
        with torch.no_grad():
            for cache in (synced, deferred):
                step["i"], tok = 0, ids
                pos = torch.arange(12)[None].expand(B, 12)
                model(input_ids=ids, position_ids=pos, past_key_values=cache)
            for i in range(1, 40):
                step["i"] = i
                tok = torch.randint(3, 200, (B, 1), generator=g)
                pos = torch.full((B, 1), 11 + i)
                outs = [model(input_ids=tok, position_ids=pos, past_key_values=c).logits for c in (synced, deferred)]
                assert torch.equal(outs[0], outs[1])
                a, d = synced.layers[0], deferred.layers[0]
                for x, y in zip(a.dense(), d.dense()):
                    assert torch.equal(x, y)
                assert d.sink_idx.shape[-1] <= (0 if a.sink_idx is None else a.sink_idx.shape[-1]) + SINK_BLOCK
    finally:
        hk.remove()
    a, d = synced.layers[0], deferred.layers[0]
    assert d.sink_idx.shape[-1] > a.sink_idx.shape[-1]  # a pending block is open ...
    assert deferred.nbytes() > synced.nbytes()  # ... and its free columns are held memory, so they are counted
    synced.compact()  # the synced path pads too (a column per step where some row had a sink)
    deferred.compact()  # ... and the pending block compacts to exactly the same sinks
    want = [sorted(t if i == 0 else 11 + i for i, hits in plant.items() for row, t in hits if row == b) for b in range(B)]
    assert a.sink_idx.tolist() == want  # the planted tokens, and only they (the random model has no massive ones)
    for name in ("sink_idx", "sink_k", "sink_v"):
        assert torch.equal(getattr(a, name), getattr(d, name)), name
    assert deferred.nbytes() == synced.nbytes()  # what byte reports read (they compact first)
    # a reorder (beam search) replaces the state: the old pending block is let go, the next step opens a new one
    with torch.no_grad():
        model(input_ids=tok, position_ids=torch.full((B, 1), 51), past_key_values=deferred)
        model(input_ids=tok, position_ids=torch.full((B, 1), 51), past_key_values=synced)
        assert d._sink_free > 0
        for cache in (synced, deferred):
            cache.reorder_cache(torch.tensor([1, 0]))
        assert d._sink_free == 0 and d._sink_block_of is None
        outs = [model(input_ids=tok, position_ids=torch.full((B, 1), 52), past_key_values=c).logits
                for c in (synced, deferred)]
    assert torch.equal(outs[0], outs[1])


def test_nbytes_counts_every_stored_tensor(tiny):
    model = tiny("llama")
    cache = make_cache(model, "rotatekv:bits=2,key_axis=channel,residual=4,sink_ratio=0,sink_topk=2")
    with torch.no_grad():
        model(_ids(B=1, T=21), past_key_values=cache)
    layer = cache.layers[0]
    B, H, D, T = 1, 2, 32, 21
    n_q = T - 4
    S = layer.sink_idx.shape[1]
    expected = 2 * (B * H * n_q * (D * 2 // 8) + 2 * 2 * B * H * n_q * (D // 32))  # codes + fp16 scale/zero
    expected += 2 * B * H * 4 * D * 2  # residual keys and values in 16 bits (an fp32 model: fp16)
    expected += B * T * 4  # int32 positions
    expected += 2 * B * H * S * D * 2 + B * S * 4  # fp16 sink keys/values, int32 sink indices
    expected += 2 * H * D * 8  # the layer's channel order and its inverse (int64)
    expected += B * H * D * 2  # fp16 per-channel key offset (center)
    assert layer.nbytes() == expected
    assert layer.kq.tokens == n_q and layer.k_res.shape[2] == 4


@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_two_bit_reasonable_and_smaller_than_kivi(tiny, key_axis):
    model = tiny("llama")
    ids = _ids(B=1, T=96)
    with torch.no_grad():
        ref = model(ids).logits
    rk = make_cache(model, f"rotatekv:bits=2,key_axis={key_axis}")
    out = _chunked(model, rk, ids, 64)
    kivi = make_cache(model, "kivi:bits=2,residual=0")
    _chunked(model, kivi, ids, 64)
    # tiny random models have flat logits; the bound only catches gross errors (wrong positions, lost tokens)
    assert (out.softmax(-1) - ref.softmax(-1)).abs().max() < 0.2
    # head_dim 32 = one group: 3 bits per entry like KIVI's, plus int32 positions, the channel order and
    # the fp16 key offset
    extra = 2 * (96 * 4 + 2 * 64 * 8 + 2 * 32 * 2)
    assert rk.nbytes() <= kivi.nbytes() + extra


def test_left_padded_batch_generate_matches_rows_alone(tiny):
    """Positions differ per row under left padding: each row of a padded batch generates what it
    generates alone (exact storage), and a 2-bit cache runs the same batch."""
    model = tiny("llama")
    a = _ids(B=1, T=12, seed=1)
    b = _ids(B=1, T=7, seed=2)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, past_key_values=make_cache(model, EXACT), **kw)
        ref = model.generate(input_ids=batch, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **kw)
        alone = model.generate(input_ids=b, attention_mask=torch.ones_like(b), past_key_values=make_cache(model, EXACT), **kw)
        low = model.generate(input_ids=batch, attention_mask=mask, past_key_values=make_cache(model, "rotatekv:bits=2"), **kw)
    assert torch.equal(out, ref)
    assert torch.equal(out[1, -6:], alone[0, -6:])
    assert low.shape == out.shape


def test_pre_rope_positions_are_stored_per_row_under_left_padding(tiny):
    model = tiny("llama")
    batch = torch.cat([_ids(B=1, T=6), torch.cat([torch.zeros(1, 2, dtype=torch.long), _ids(B=1, T=4)], 1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    cache = make_cache(model, EXACT)
    with torch.no_grad():
        model.generate(input_ids=batch, attention_mask=mask, past_key_values=cache, max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
    pos = cache.layers[0].pos
    assert pos[0].tolist() == list(range(7))
    assert pos[1, 2:].tolist() == list(range(5))


def test_hooks_only_serve_their_own_cache_and_are_removed(tiny):
    model = tiny("llama")
    cache = make_cache(model, EXACT)
    ids = _ids(B=1, T=8)
    with torch.no_grad():
        model(ids, past_key_values=DynamicCache(config=model.config))  # another cache: our hooks stay out
    assert all(l.pending is None for l in cache.layers)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    n = cache.layers[0].pos.shape[1]
    cache.close()
    assert not cache._handles
    other = make_cache(model, EXACT)
    with torch.no_grad():
        model(ids, past_key_values=other)
    assert cache.layers[0].pos.shape[1] == n


def test_calibration_is_needed_for_reorder_without_a_model(tiny):
    cache = make_cache(tiny("llama").config, "rotatekv:prerope=false,key_axis=channel")
    with pytest.raises(KVShrinkError, match="calibrated channel order"):
        cache.layers[0].update(torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32))
    cache = make_cache(tiny("llama").config, "rotatekv:reorder=false")
    with pytest.raises(KVShrinkError, match="make_cache\\(model"):
        cache.layers[0].update(torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32))
    cache = make_cache(tiny("llama").config, "rotatekv:reorder=false,prerope=false,sinks=false")
    K, V = cache.layers[0].update(torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32))
    assert K.shape == (1, 2, 4, 32)


def test_builtin_calibration_warns_and_orders_channels_by_mean(tiny):
    model = tiny("qwen2", layers=1)
    with pytest.warns(UserWarning, match="no calib file"):
        cache = make_cache(model, "rotatekv:calib_tokens=40,key_axis=channel")
    layer = cache.layers[0]
    assert sorted(layer.perm.tolist()) == list(range(2 * 32))
    torch.testing.assert_close(layer.perm[layer.inv_perm], torch.arange(64))
    # the order forms the key groups: slot j (group j // 32) holds rotated channel perm[j]; codes stay in place
    x = torch.randn(1, 2, 3, 32) * torch.linspace(0.1, 8, 64)[layer.inv_perm].reshape(2, 1, 32)
    q = layer.quantize_keys(x)
    assert q.slots is not None and torch.equal(q.slots, layer.inv_perm)
    plain = quantize_clipped(regroup_channels(x, layer.perm), 2, "channel", 32, layer.clip)
    assert torch.equal(q.scale, plain.scale) and torch.equal(q.zero, plain.zero)
    assert torch.equal(regroup_channels(q.codes(), layer.perm), plain.codes())
    assert torch.equal(q.dequantize(torch.float32), regroup_channels(plain.dequantize(torch.float32), layer.inv_perm))
    # ...and the order matters: these channels grow along perm, so ordered groups have the smaller error
    err = float((q.dequantize(torch.float32) - x).norm())
    unordered = quantize_clipped(x, 2, "channel", 32, layer.clip).dequantize(torch.float32)
    assert err < float((unordered - x).norm())


def test_calibration_means_are_the_rotated_keys_own_means(tiny):
    """The channel statistic is the mean of the rotated pre-RoPE keys themselves, not of keys already
    centred by ``center`` (whose means would be ~0 and give an arbitrary order)."""
    from kvshrink.methods.rotatekv import calibrate
    from kvshrink.rope import invert_rope

    model = tiny("qwen2", layers=1)  # qwen2: k_proj has a bias, so channel means are far from 0
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.normal_(0, 2.0)
    ids = _ids(B=1, T=40)
    method = RotateKV(key_axis="channel", center=True)
    got = calibrate(model, method, ids)["layer.0.mean"]
    # independent: post-RoPE keys of a plain forward, RoPE inverted, rotated by the layer's own transform
    with torch.no_grad():
        k = model(ids, use_cache=True).past_key_values.layers[0].keys.float()
        cos, sin = model.model.rotary_emb(k, torch.arange(40)[None])
        pre = invert_rope(k, cos.float(), sin.float())
    layer = make_cache(model, "rotatekv:bits=16,reorder=false,sinks=false").layers[0]
    want = layer.rotate_keys(pre).transpose(1, 2).reshape(40, -1).double().mean(0)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    assert float(want.abs().max()) > 0.5  # the bias makes this a test of centring, not of zeros


@pytest.mark.parametrize("spec, message", [
    ("rotatekv:bits=5", "bits"),
    ("rotatekv:bits=2,clip=1.5", "clip"),
    ("rotatekv:key_axis=token,group=32,residual=48", "multiple"),
    ("rotatekv:head_group=0", "head_group"),
    ("rotatekv:calib=x.safetensors,reorder=false", "reorder=false"),
    ("rotatekv:sink_dtype=int8", "sink_dtype"),
])
def test_bad_parameters_are_clear_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_head_group_adapts_to_model_and_unsupported_sizes_are_refused(tiny):
    from kvshrink import model_info

    info = model_info(tiny("llama", kv_heads=2))
    assert RotateKV().effective_head_group(info) == 2
    info3 = model_info(tiny("llama", heads=6, kv_heads=3, head_dim=16))
    assert RotateKV().effective_head_group(info3) == 3  # 48 = 12 * 4
    with pytest.raises(SpecError, match="group=24 does not divide"):
        make_cache(tiny("llama").config, "rotatekv:group=24")
    bad = model_info(tiny("llama", heads=2, kv_heads=1, head_dim=36))
    with pytest.raises(SpecError, match="powers of two"):
        RotateKV().validate(bad)


def test_clipped_quantizer_matches_storage_at_clip_one_and_saturates_below():
    x = torch.randn(1, 2, 8, 32)
    a = quantize_clipped(x, 2, "channel", 32, 1.0)
    b = quantize(x, 2, "channel", 32)
    assert torch.equal(a.packed, b.packed)
    c = quantize_clipped(x, 2, "channel", 32, 0.8)
    d = c.dequantize()
    assert d.max() <= x.max() * 0.8 + 1e-3 and d.min() >= x.min() * 0.8 - 1e-3
    assert c.nbytes() == b.nbytes()
    # 3 bits uses 2**3 - 1 = 7 steps (not 3**2 - 1 = 8, the authors' script's slip)
    q3 = quantize_clipped(torch.linspace(0, 7, 32).reshape(1, 1, 1, 32), 3, "channel", 32, 0.999)
    assert int(q3.codes().max()) == 7


def test_error_shrinks_with_bits_and_rotation_helps_outlier_channels(tiny):
    """Layer-level round trip on keys with one outlier channel: more bits, less error; and the Hadamard
    rotation beats no rotation for per-token groups (the outlier no longer sets every token's range)."""
    cfg = tiny("llama").config
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 32, generator=g)
    k[..., 5] *= 30.0  # an outlier channel, as in real keys
    v = torch.randn(1, 2, 64, 32, generator=g)

    def err(spec):
        layer = make_cache(cfg, spec + ",prerope=false,reorder=false,sinks=false").layers[0]
        K, V = layer.update(k, v)  # the chunk itself is returned exact; read what was stored
        K, V = layer.dense()
        return float((K - k).norm() / k.norm()), float((V - v).norm() / v.norm())

    e2, e3, e4, e8 = (err(f"rotatekv:bits={b}") for b in (2, 3, 4, 8))
    assert e2[0] > e3[0] > e4[0] > e8[0] and e2[1] > e3[1] > e4[1] > e8[1]
    assert e8[0] < 0.01
    rot = err("rotatekv:bits=2,key_axis=channel")[0]
    plain = err("rotatekv:bits=2,key_axis=channel,fwht=false")[0]
    assert rot < 0.7 * plain


def test_sinks_do_not_widen_token_group_ranges(tiny):
    layer = make_cache(tiny("llama").config, "rotatekv:bits=2,prerope=false,reorder=false").layers[0]
    block = torch.randn(1, 2, 32, 32)
    block[:, :, 3] = 1000.0
    layer.sink_idx = torch.tensor([[3, -1]], dtype=torch.int32)
    out = layer._neutralize_sinks(block, offset=0)
    assert out.abs().max() < 10  # the sink's slot holds the group mean of the other tokens
    others = torch.cat([block[:, :, :3], block[:, :, 4:]], 2)
    torch.testing.assert_close(out[:, :, 3], others.mean(2))
    torch.testing.assert_close(out[:, :, 4:], block[:, :, 4:])
    assert layer._neutralize_sinks(block, offset=32) is block  # sink outside this block: untouched


def test_beam_search_reorders_every_stored_tensor(tiny):
    """Beam search reorders batch rows of codes, residual, positions and sinks alike: exact at 16 bits."""
    model = tiny("llama")
    ids = _ids(B=2, T=12, seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        out = model.generate(input_ids=ids, past_key_values=make_cache(model, EXACT), **kw)
        ref = model.generate(input_ids=ids, past_key_values=DynamicCache(config=model.config), **kw)
    assert torch.equal(out, ref)


def test_key_centering_is_lossless_at_16_bits_and_absorbs_a_key_bias(tiny):
    """``center``: a per-channel offset subtracted before quantizing and added back on read. With biased keys
    (a constant per-channel offset, as Qwen2's k_proj bias gives) 2-bit per-token groups lose far less."""
    cfg = tiny("llama").config
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 32, generator=g)
    v = torch.randn(1, 2, 64, 32, generator=g)
    bias = 8.0 * torch.randn(1, 2, 1, 32, generator=g)  # the same offset on every token

    def err(spec, keys):
        layer = make_cache(cfg, spec + ",prerope=false,reorder=false,sinks=false").layers[0]
        layer.update(keys, v)
        K, _ = layer.dense()
        return float((K - keys).norm() / (keys - keys.mean(2, keepdim=True)).norm()), layer

    exact, layer = err("rotatekv:bits=16,center=true", k + bias)
    assert exact < 1e-3 and layer.k_mu is not None and layer.k_mu.shape == (1, 2, 1, 32)
    assert layer.nbytes() >= 2 * 2 * 32  # the offset is stored (fp16, per head and channel) and counted
    off = err("rotatekv:bits=2,center=false", k + bias)[0]
    on = err("rotatekv:bits=2,center=true", k + bias)[0]
    assert on < 0.5 * off
    # without a bias centering changes little either way
    assert err("rotatekv:bits=2,center=true", k)[0] < 1.2 * err("rotatekv:bits=2,center=false", k)[0]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 300), st.sampled_from(["rand", "ties", "zeros", "huge", "tiny"]),
       st.integers(0, 2**31 - 1))
def test_lower_median_by_bisection_equals_torch_median(rows, n, kind, seed):
    """The CUDA path of sink detection for long rows (bisection on float bit patterns) returns torch.median's
    value exactly, NaN included."""
    from kvshrink.methods.rotatekv import lower_median

    a = torch.rand(rows, n, generator=torch.Generator().manual_seed(seed))
    if kind == "ties":
        a = (a * 3).floor()
    elif kind == "zeros":
        a[:, : n // 2 + 1] = 0
    elif kind == "huge":
        a = a * 1e30
    elif kind == "tiny":
        a = a * 1e-40  # subnormals
    if kind == "tiny" and n > 2:
        a[0, n // 3] = float("nan")  # torch.median propagates NaN: so must the bisection
    torch.testing.assert_close(lower_median(a, bisect=True), a.median(dim=1).values, rtol=0, atol=0, equal_nan=True)
