"""Eviction policies composed with quantizers that keep per-token side data captured for the whole chunk
(pre-RoPE positions, sinks): rotatekv and kvquant behind snapkv / h2o / streamingllm, on tiny random models.

The policy passes the kept chunk positions per head (``append(k, v, index=...)``); the quantizer gathers its
captured RoPE angles and positions there, so kept keys are un-RoPE'd and re-RoPE'd at their true positions."""
import warnings

import pytest
import torch

from kvshrink.cache import make_cache
from kvshrink.errors import KVShrinkError
from kvshrink.testing import tiny_model

T = 64
ROT = "rotatekv:calib_tokens=32"  # quick built-in calibration of the channel order


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=2)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rotatekv's "calibrating on random tokens" notice
        yield


def ids_for(batch=1, n=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, n), generator=g)


def run(model, spec, ids, steps=3, mask=None):
    """Prefill ``ids`` then decode ``steps`` greedy tokens; returns (stacked last logits, cache)."""
    cache = make_cache(model, spec)
    n = ids.shape[1]
    # positions as generate() gives them: counted over real tokens (left padding)
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, position_ids=pos)
        logits = [out.logits[:, -1]]
        for i in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            pos = torch.tensor([[n + i]]) if mask is None else mask.sum(-1, keepdim=True) - 1
            out = model(tok, attention_mask=mask, past_key_values=cache, position_ids=pos)
            logits.append(out.logits[:, -1])
    return torch.stack(logits), cache


def kept_positions(model, ids, cache):
    """Per layer, ``(B, H, T')`` text positions of the keys a policy+none cache holds (by exact key match
    against a plain forward's keys)."""
    with torch.no_grad():
        ref = model(ids, use_cache=True).past_key_values.layers
    out = []
    for layer, r in zip(cache.layers, ref):
        k, _ = layer.dense()
        d = torch.cdist(k.double(), r.keys.double())
        val, idx = d.min(dim=-1)
        assert float(val.max()) < 1e-5
        out.append(idx)
    return out


# -- exactness: the same tokens kept, keys RoPE'd at their true positions ----------------------------
@pytest.mark.parametrize("quant,tol", [
    (f"{ROT},bits=16,sink_ratio=0,sink_dtype=model", 1e-5),  # exact storage; every chunk has (per-head) sinks
    (f"{ROT},bits=8", 2e-2),                                  # near-lossless; default sink detection
])
def test_snapkv_rotatekv_matches_snapkv_none(llama, quant, tol):
    ids = ids_for()
    ref, ref_cache = run(llama, "snapkv:budget=0.5,window=8+none", ids)
    got, cache = run(llama, f"snapkv:budget=0.5,window=8+{quant}", ids)
    assert cache.tokens_held() == ref_cache.tokens_held() == [T // 2 + 3] * 2
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= tol * scale
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        k, v = layer.dense()
        rk, rv = ref_layer.dense()
        assert float((k - rk).abs().max()) <= tol * float(rk.abs().max()) * 10
        assert float((v - rv).abs().max()) <= tol * float(rv.abs().max()) * 10


def test_positions_are_stored_per_head_as_kept(llama):
    """The stored positions are the kept tokens' text positions, per head (heads keep different tokens)."""
    ids = ids_for()
    _, ref_cache = run(llama, "snapkv:budget=0.5,window=8+none", ids, steps=0)
    want = kept_positions(llama, ids, ref_cache)
    _, cache = run(llama, f"snapkv:budget=0.5,window=8+{ROT},bits=16", ids, steps=0)
    differ = False
    for layer, w in zip(cache.layers, want):
        pos = layer.inner.pos
        assert pos.shape == w.shape and torch.equal(pos.long(), w)
        differ |= not torch.equal(w[:, 0], w[:, 1])
        # per-head positions are stored tensors: counted in nbytes
        assert layer.nbytes() >= pos.numel() * 4
    assert differ, "the heads kept the same tokens: the test does not exercise per-head positions"


def test_wrong_positions_would_be_detected(llama):
    """Control for the tests above: re-RoPE'ing the kept keys one position off changes them measurably."""
    ids = ids_for()
    _, cache = run(llama, f"snapkv:budget=0.5,window=8+{ROT},bits=16", ids, steps=0)
    inner = cache.layers[1].inner.inner  # the RotateKV layer itself (inside the policy's DeferredEviction)
    k, _ = inner.dense()
    inner.pos = inner.pos + 1
    k2, _ = inner.dense()
    assert float((k - k2).abs().max()) > 1e-3 * float(k.abs().max())


# -- decode-time eviction: stored tokens dropped, positions kept consistent ------------------------
@pytest.mark.parametrize("policy", ["h2o:budget=20", "streamingllm:budget=20,sinks=2"])
def test_decode_eviction_keeps_rotatekv_positions(llama, policy):
    ids = ids_for(n=40)
    ref, ref_cache = run(llama, f"{policy}+none", ids, steps=4)
    got, cache = run(llama, f"{policy}+{ROT},bits=16,sink_ratio=0,sink_dtype=model", ids, steps=4)
    assert cache.tokens_held() == ref_cache.tokens_held() == [20, 20]
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        k, _ = layer.dense()
        rk, _ = ref_layer.dense()
        assert torch.allclose(k, rk, atol=1e-5, rtol=1e-4)


# -- 2 bits: generation, bytes, left padding ------------------------------------------------------------
def test_snapkv_rotatekv_2bit_bytes_are_the_product_of_both_ratios(llama):
    ids = ids_for(n=128)
    policy, quant = "snapkv:budget=0.25,window=8", f"{ROT},bits=2"
    sizes = {}
    for spec in ("none", policy, quant, f"{policy}+{quant}"):
        cache = make_cache(llama, spec)
        with torch.no_grad():
            llama(ids, past_key_values=cache)
        sizes[spec] = cache.nbytes()
    product = sizes[policy] / sizes["none"] * sizes[quant] / sizes["none"]
    both = sizes[f"{policy}+{quant}"] / sizes["none"]
    # the difference is metadata: per-head positions (int32 per kept head-token instead of per token)
    assert both == pytest.approx(product, rel=0.25)
    assert both < min(sizes[policy], sizes[quant]) / sizes["none"]


def test_snapkv_rotatekv_2bit_generates_with_left_padding(llama):
    ids = ids_for(batch=2, n=48, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    ids[1, :10] = 0
    spec = f"snapkv:budget=0.5,window=8+{ROT},bits=2"
    cache = make_cache(llama, spec)
    out = llama.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, min_new_tokens=4,
                         do_sample=False)
    assert out.shape == (2, 52)
    k, v = cache.layers[0].dense()
    assert k.shape[:3] == (2, 2, 24 + 3) and torch.isfinite(k).all() and torch.isfinite(v).all()
    # the padded row's kept positions are real tokens' positions (padding scored -inf, evicted first)
    with torch.no_grad():
        logits, _ = run(llama, spec, ids, steps=2, mask=mask)
    assert torch.isfinite(logits).all()
    # with a token-count budget the padded row keeps what the row alone keeps (padding is scored -inf), at the
    # same positions: compare at 16 bits, where storage is exact
    exact = f"snapkv:budget=16,window=8+{ROT},bits=16"
    _, padded = run(llama, exact, ids, steps=0, mask=mask)
    _, alone = run(llama, exact, ids[1:, 10:], steps=0)
    pk, _ = padded.layers[1].dense()
    ak, _ = alone.layers[1].dense()
    assert pk.shape[2] == ak.shape[2] == 16
    assert torch.allclose(pk[1:], ak, atol=1e-5, rtol=1e-4)
    assert torch.equal(padded.layers[1].inner.pos[1], alone.layers[1].inner.pos[0])  # real tokens' positions


# -- kvquant (pre-RoPE by default) ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["snapkv:budget=0.5,window=8", "h2o:budget=20"])
def test_eviction_with_kvquant(llama, policy):
    ids = ids_for(n=40)
    ref, ref_cache = run(llama, f"{policy}+none", ids, steps=3)
    got, cache = run(llama, f"{policy}+kvquant:bits=4,calib_tokens=32", ids, steps=3)
    assert cache.tokens_held() == ref_cache.tokens_held()
    # same kept tokens, keys at their true positions: 4-bit error only (relative to the keys' range)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        k, _ = layer.dense()
        rk, _ = ref_layer.dense()
        assert float((k - rk).abs().mean()) < 0.1 * float(rk.abs().mean())
    assert torch.isfinite(got).all()
    if policy.startswith("snapkv"):
        want = kept_positions(llama, ids, make_cache_after(llama, f"{policy}+none", ids))
        pos = cache.layers[0].inner.pos  # kvquant's first token per head is its exact sink: no position
        assert torch.equal(pos.long()[..., : want[0].shape[-1] - 1], want[0][..., 1:])


def make_cache_after(model, spec, ids):
    cache = make_cache(model, spec)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


# -- refusals stay clear -------------------------------------------------------------------------------------
def test_rotatekv_refuses_a_subset_without_index():
    """A policy that hands rotatekv fewer tokens than the chunk without saying which gets a clear error."""
    from kvshrink.methods.rotatekv import RotateKV, RotateKVLayer, _Capture

    m = RotateKV(bits=16, reorder=False, sinks=False)
    layer = RotateKVLayer(m, 0, 2, 32, 2, None)
    k = torch.randn(1, 2, 6, 32)
    layer.lazy_initialization(k, k)
    cos, sin = torch.ones(1, 8, 32), torch.zeros(1, 8, 32)
    layer.pending = _Capture(None, cos, sin, torch.arange(8)[None])
    with pytest.raises(KVShrinkError, match="index"):
        layer.append(k, k)
    layer.pending = _Capture(None, cos, sin, torch.arange(8)[None])
    idx = torch.tensor([[[0, 1, 2, 3, 4, 7], [0, 2, 3, 5, 6, 7]]])
    layer.append(k, k, index=idx)
    assert torch.equal(layer.pos.long(), idx)


# -- evicting from packed storage every step (DeferredEviction) -----------------------------------------------
@pytest.mark.parametrize("policy", ["streamingllm:budget=40", "h2o:budget=40"])
def test_decode_time_eviction_does_not_requantize_kept_tokens_every_step(llama, policy):
    """A policy that evicts at every decode step marks tokens instead of rebuilding the packed layer: between
    compactions the kept tokens' keys/values are bit-identical from step to step (no re-quantization), the
    held count is the budget exactly, and storage is compacted once COMPACT_EVERY evicted tokens pile up."""
    from kvshrink.policy import COMPACT_EVERY, DeferredEviction

    ids = ids_for(n=48)
    cache = make_cache(llama, f"{policy}+kivi:bits=2,group=16,residual=0")
    layer = cache.layers[0]
    assert isinstance(layer.inner, DeferredEviction)
    compactions, unchanged_steps = 0, 0
    with torch.no_grad():
        out = llama(ids, past_key_values=cache)
        for step in range(COMPACT_EVERY + 8):
            before_k, _ = layer.dense()
            res = layer.inner.inner.k_res
            quantized = 40 - (res.shape[-2] if res is not None else 0)  # held tokens already in 2-bit codes
            tok = out.logits[:, -1:].argmax(-1)
            stored_before = layer.inner.inner.held()
            out = llama(tok, past_key_values=cache, position_ids=torch.tensor([[48 + step]]))
            assert layer.held() == 40 and cache.tokens_held()[0] == 40
            stored = layer.inner.inner.held()
            if stored < stored_before:
                compactions += 1
                continue
            assert stored - 40 < COMPACT_EVERY
            after_k, _ = layer.dense()
            # every token that was in packed codes before the step and is still held comes back bit-identical
            # (one token per head is evicted per step; a residual flush changes only 16-bit residual tokens)
            old = before_k[:, :, :quantized]
            found = (old.unsqueeze(-2) == after_k.unsqueeze(-3)).all(-1).any(-1)  # (B, H, quantized)
            assert bool((found.sum(-1) >= quantized - 1).all())
            unchanged_steps += 1
    assert compactions >= 1 and unchanged_steps >= 10
    assert layer.nbytes() >= layer.inner.inner.nbytes()  # the live mask is counted


def test_deferred_eviction_matches_exact_selection_at_16_bits(llama):
    """With lossless storage the marked-then-compacted path gives the same logits as plain tensors."""
    ids = ids_for(n=48)
    ref, _ = run(llama, "h2o:budget=32+none", ids, steps=40)
    got, _ = run(llama, "h2o:budget=32+kivi:bits=8,group=16,residual=0", ids, steps=40)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
