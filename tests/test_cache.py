"""The compressed cache inside transformers: exactness, KIVI semantics, bytes, batching, errors."""
import pytest
import torch
from transformers import DynamicCache

import kvshrink
from kvshrink import SpecError, UnsupportedModelError, make_cache
from kvshrink.testing import tiny_config, tiny_model


def _ids(batch=2, length=24, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


@torch.no_grad()
def test_none_is_bit_exact_with_dynamic_cache(tiny, family):
    model = tiny(family)
    ids = _ids()
    ref_cache, our_cache = DynamicCache(config=model.config), make_cache(model, "none")
    ref = [model(ids[:, :16], past_key_values=ref_cache).logits]
    out = [model(ids[:, :16], past_key_values=our_cache).logits]
    for t in range(16, 24):  # then token by token
        ref.append(model(ids[:, t:t + 1], past_key_values=ref_cache).logits)
        out.append(model(ids[:, t:t + 1], past_key_values=our_cache).logits)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert our_cache.get_seq_length() == ref_cache.get_seq_length() == 24


@torch.no_grad()
def test_generate_every_family_none_and_kivi(tiny, family):
    model = tiny(family)
    ids = _ids(length=20)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=make_cache(model, "none"),
                         max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, got)
    cache = make_cache(model, "kivi:bits=2,group=16,residual=16")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=8,
                         do_sample=False)
    assert out.shape == ref.shape
    assert cache.get_seq_length() == 27  # the last generated token is never fed back
    full = [i for i, k in enumerate(cache.info.layer_kinds) if k == "full"]
    assert all(cache.layers[i].kq is not None for i in full), "KIVI stored nothing quantized"
    # the quantized layers hold less than the uncompressed cache of the same tokens
    plain = make_cache(model, "none")
    model(out[:, :-1], past_key_values=plain)
    assert sum(cache.nbytes_per_layer()[i] for i in full) < 0.6 * sum(plain.nbytes_per_layer()[i] for i in full)


def test_sliding_layers_stay_transformers_window_layers(tiny):
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model = tiny("gemma3")
    cache = make_cache(model, "kivi:bits=2,group=16,residual=16")
    kinds = cache.info.layer_kinds
    assert kinds == ("sliding", "full")
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer)
    with torch.no_grad():
        model(_ids(length=40), past_key_values=cache)
    window = model.config.sliding_window
    assert cache.tokens_held() == [window - 1, 40]
    assert cache.nbytes_per_layer()[0] > 0  # counted, not hidden


def _feed(cache, k, v, chunks):
    start = 0
    for n in chunks:
        cache.update(k[:, :, start:start + n], v[:, :, start:start + n], 0)
        start += n


def _ref_quant(x, bits, group, axis):
    """Independent plain min/max quantizer (fp16 scale/zero), for comparison."""
    B, H, T, D = x.shape
    g = x.reshape(B, H, T, D // group, group) if axis == "channel" else \
        x.reshape(B, H, T // group, group, D).transpose(-1, -2)
    mn = g.amin(-1, keepdim=True).half().float()
    scale = ((g.amax(-1, keepdim=True) - mn) / (2**bits - 1)).half().float()
    deq = torch.round((g - mn) / torch.where(scale > 0, scale, 1)).clamp(0, 2**bits - 1) * scale + mn
    return deq.reshape(B, H, T, D) if axis == "channel" else deq.transpose(-1, -2).reshape(B, H, T, D)


@pytest.mark.parametrize("chunks", [[100], [37, 1, 1, 61], [1] * 100, [64, 36]])
def test_kivi_matches_reference_quantizer_and_flush_rule(chunks):
    torch.manual_seed(0)
    cfg = tiny_config("llama", layers=1)
    cache = make_cache(cfg, "kivi:bits=2,group=16,residual=32")
    k, v = torch.randn(2, 2, 100, 32) * 3, torch.randn(2, 2, 100, 32)
    k, v = k.half().float(), v.half().float()  # on the fp16 grid: the 16-bit residual is then exact
    _feed(cache, k, v, chunks)
    layer = cache.layers[0]
    # keys: whole residual blocks of R=32 are flushed -> 96 quantized, 4 exact
    assert layer.kq.tokens == 96 and layer.k_res.shape[-2] == 4
    # values: exactly the newest R=32 stay exact
    assert layer.vq.tokens == 68 and layer.v_res.shape[-2] == 32
    K, V = layer.dense()
    assert torch.allclose(K[:, :, :96], _ref_quant(k[:, :, :96], 2, 16, "token"), atol=1e-5)
    assert torch.equal(K[:, :, 96:], k[:, :, 96:].half().float())  # residual held in 16 bits
    assert torch.allclose(V[:, :, :68], _ref_quant(v[:, :, :68], 2, 16, "channel"), atol=1e-5)
    assert torch.equal(V[:, :, 68:], v[:, :, 68:].half().float())
    # the bytes reported are the bytes of the tensors held
    held = sum(t.untyped_storage().nbytes() for t in layer.stored())
    assert cache.nbytes() == held
    expected = (96 * 32 * 2 // 8 + 96 // 16 * 32 * 4 + 4 * 32 * 2  # key codes + fp16 scale/zero + fp16 residual
                + 68 * 32 * 2 // 8 + 68 * 2 * 4 + 32 * 32 * 2) * 2 * 2  # value codes + scales + residual; x B x H
    assert cache.nbytes() == expected


def test_update_returns_compressed_past_plus_exact_new_chunk():
    cfg = tiny_config("llama", layers=1)
    cache = make_cache(cfg, "kivi:bits=2,group=16,residual=16")
    k, v = torch.randn(1, 2, 48, 32), torch.randn(1, 2, 48, 32)
    cache.update(k[:, :, :32], v[:, :, :32], 0)
    past_k, _ = cache.layers[0].dense()
    K, V = cache.update(k[:, :, 32:], v[:, :, 32:], 0)
    assert torch.equal(K[:, :, :32], past_k)
    assert torch.equal(K[:, :, 32:], k[:, :, 32:]) and torch.equal(V[:, :, 32:], v[:, :, 32:])  # exact this step
    assert not torch.equal(K[:, :, :32], k[:, :, :32])  # the past really is compressed


def test_simulated_mode_attends_to_its_own_compressed_chunk():
    cfg = tiny_config("llama", layers=1)
    cache = make_cache(cfg, "kivi:bits=2,group=16,residual=0", simulated=True)
    k, v = torch.randn(1, 2, 32, 32), torch.randn(1, 2, 32, 32)
    K, V = cache.update(k, v, 0)
    assert torch.equal(K, cache.layers[0].dense()[0]) and not torch.equal(K, k)


def test_4096_tokens_kivi2_bytes_within_a_quarter_of_fp16():
    cfg = tiny_config("llama", layers=1, heads=3, kv_heads=3, head_dim=64)
    cache = make_cache(cfg, "kivi:bits=2,group=32,residual=128")
    k, v = torch.randn(1, 3, 4096, 64).half(), torch.randn(1, 3, 4096, 64).half()
    cache.update(k, v, 0)
    assert cache.nbytes() / cache.fp16_nbytes() <= 0.25


@torch.no_grad()
def test_left_padding_batch(tiny):
    model = tiny("llama")
    ids = _ids(batch=2, length=20)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # row 1 is left-padded
    for spec in ("none", "kivi:bits=4,group=16,residual=16"):
        batch = model.generate(ids, attention_mask=mask, past_key_values=make_cache(model, spec),
                               max_new_tokens=6, do_sample=False)
        # the unpadded row is quantized exactly as it would be alone (groups never mix batch rows)
        alone = model.generate(ids[:1], attention_mask=mask[:1], past_key_values=make_cache(model, spec),
                               max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[0], alone[0])
        # the padded row, with none, matches the row run alone without its padding
        if spec == "none":
            solo = model.generate(ids[1:, 6:], attention_mask=mask[1:, 6:], max_new_tokens=6, do_sample=False)
            assert torch.equal(batch[1, 6:], solo[0])


@torch.no_grad()
def test_beam_search_and_sampling(tiny):
    model = tiny("qwen2")
    ids = _ids(batch=1, length=20)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, max_new_tokens=6, do_sample=False)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=make_cache(model, "none"),
                         num_beams=3, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, got)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=make_cache(model, "kivi:bits=2,group=16,residual=16"),
                         num_beams=3, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=make_cache(model, "int4"),
                         do_sample=True, top_k=10, max_new_tokens=6)
    assert out.shape == (1, 26)


@torch.no_grad()
def test_mqa_and_head_dims(tiny):
    for kw in ({"kv_heads": 1}, {"head_dim": 64}, {"head_dim": 128, "heads": 2, "kv_heads": 1}):
        model = tiny("llama", **kw)
        cache = make_cache(model, "kivi:bits=2,group=32,residual=32")
        model(_ids(length=70), past_key_values=cache)
        assert cache.layers[0].kq.packed.shape[1] == kw.get("kv_heads", 2)


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown method 'nope'; valid methods: .*kivi"),
    ("kivi:bits=5", "bits=5 is not supported; choose one of 1, 2, 3, 4, 8"),
    ("kivi:bitz=2", "unknown parameter.*bitz; valid parameters: bits, group, residual"),
    ("kivi:bits=two", "bits='two' is not an integer"),
    ("kivi:group=24,residual=48", "group=24 does not divide head_dim=32"),
    ("kivi:group=16,residual=20", "residual=20 must be a non-negative multiple of group=16"),
    ("int4:group=5", "group=5 does not divide head_dim=32"),
    ("kivi+int8", "at most one quantizer"),
    ("kivi:bits", "must look like key=value"),
])
def test_bad_specs_are_clear_errors(spec, match):
    with pytest.raises(SpecError, match=match):
        make_cache(tiny_config("llama"), spec)


def test_keyword_parameters_and_spec_roundtrip():
    cfg = tiny_config("llama")
    cache = make_cache(cfg, "kivi", bits=4, group=16, residual=32)
    assert cache.spec == "kivi:bits=4,group=16,residual=32,scale_dtype=float16"
    assert make_cache(cfg, cache.spec).spec == cache.spec
    with pytest.raises(SpecError, match="unknown parameter"):
        make_cache(cfg, "kivi", bitz=4)


def test_unsupported_architecture_is_refused():
    from transformers import MambaConfig

    with pytest.raises(UnsupportedModelError, match="no attention KV cache"):
        make_cache(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64), "kivi")


def test_nan_in_cache_is_refused():
    cache = make_cache(tiny_config("llama", layers=1), "kivi")
    k = torch.randn(1, 2, 8, 32)
    k[0, 0, 3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        cache.update(k, torch.randn(1, 2, 8, 32), 0)


def test_user_config_is_not_mutated(tiny):
    model = tiny("llama")
    before = model.config.to_dict()
    make_cache(model, "kivi:bits=2")
    assert model.config.to_dict() == before


def test_methods_listed():
    assert {"none", "kivi", "int8", "int4"} <= set(kvshrink.method_names())


def test_every_method_module_imports():
    from kvshrink.registry import IMPORT_ERRORS, method_names

    method_names()
    assert IMPORT_ERRORS == {}
