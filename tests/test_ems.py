"""EMS (evict-then-merge, Global-Local score) on tiny random models: budgets, what is kept, what is merged
(against an independent reference built from the model's eager attention weights), padding, composition."""
import warnings

import pytest
import torch

from kvshrink.cache import make_cache
from kvshrink.errors import SpecError
from kvshrink.methods.ems import evict_then_merge, global_local_score
from kvshrink.policy import PolicyLayer
from kvshrink.registry import method_names, parse_spec
from kvshrink.testing import tiny_model

T = 64


def ids_for(batch=1, n=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, n), generator=g)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def llama_eager():
    return tiny_model("llama", layers=2, attn="eager")


def prefill(model, spec, ids, **kw):
    cache = make_cache(model, spec)
    with torch.no_grad():
        model(ids, past_key_values=cache, **kw)
    return cache


def kv_reference(model, ids):
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def match_rows(stored, ref):
    d = torch.cdist(stored.double(), ref.double())
    val, idx = d.min(dim=-1)
    assert float(val.max()) < 1e-4, "a stored key is not one of the model's keys"
    return idx


# -- an independent reference of the method, written from the equations in the module docstring ------------
def ems_reference(attn, K, V, cap, w, mass, threshold, keep_norm=True, groups=2):
    """EMS on one row (b = 0) from eager attention ``attn (1, Hq, T, T)`` and the model's ``K, V (1, H, T, D)``.

    Returns the expected held ``K, V (H, cap, D)`` and, per head, the members of each class."""
    _, H, n, D = K.shape
    pre = n - w
    outk, outv, classes_all = [], [], []
    for h in range(H):
        a = attn[0, h * groups:(h + 1) * groups].double()  # (G, queries, keys)
        glo = a[:, :, :pre].sum(1).mean(0)  # every query's attention, summed, averaged over the group
        loc = a[:, -w:, :pre].sum(1).mean(0)  # the observation window's
        gl = glo * (loc.mean() / glo.mean()) + loc  # Eq. (1)
        centres = sorted(gl.topk(cap - w).indices.tolist())
        rest = sorted((j for j in range(pre) if j not in centres), key=lambda j: -float(gl[j]))
        need, acc, tbm = mass * float(gl.sum()) - float(gl[centres].sum()), 0.0, []
        for j in rest:  # Eq. (2)
            if acc < need:
                tbm.append(j)
            acc += float(gl[j])
        k, v = K[0, h].double(), V[0, h].double()
        classes = {c: [c] for c in centres}
        for j in tbm:  # Eq. (3)
            sims = [max(0.0, float(torch.cosine_similarity(k[j], k[c], dim=0)))
                    * max(0.0, float(torch.cosine_similarity(v[j], v[c], dim=0))) for c in centres]
            best = max(range(len(centres)), key=lambda i: sims[i])
            if sims[best] >= threshold:
                classes[centres[best]].append(j)
        ks, vs = [], []
        for c in centres:  # Eq. (4)
            mem = classes[c]
            wt = gl[mem]
            vs.append((wt[:, None] * v[mem]).sum(0) / wt.sum())
            if keep_norm:
                norms = k[mem].norm(dim=-1)
                u = (wt[:, None] * k[mem] / norms[:, None]).sum(0)
                ks.append(u / u.norm() * (wt * norms).sum() / wt.sum())
            else:
                ks.append((wt[:, None] * k[mem]).sum(0) / wt.sum())
        outk.append(torch.cat([torch.stack(ks), k[pre:]]))
        outv.append(torch.cat([torch.stack(vs), v[pre:]]))
        classes_all.append(classes)
    return torch.stack(outk), torch.stack(outv), classes_all


# -- registry and parameters ----------------------------------------------------------------------------------
def test_registered_with_paper_defaults():
    assert "ems" in method_names()
    (m,) = parse_spec("ems")
    assert (m.budget, m.window) == (256, 32)
    policy, quant = parse_spec("ems:budget=0.25+kivi:bits=2")
    assert policy.name == "ems" and policy.budget == 0.25 and quant.name == "kivi"
    assert parse_spec(m.spec())[0] == m


@pytest.mark.parametrize("spec,needle", [
    ("ems:budget=0", "positive"),
    ("ems:budget=-3", "positive"),
    ("ems:budget=12.5", "whole token count"),
    ("ems:budget=nan", "not a number"),
    ("ems:budget=16,window=32", "must exceed window"),
    ("ems:window=0", "window"),
    ("ems:mass=1.5", "mass"),
    ("ems:threshold=-0.5", "threshold"),
    ("ems:keep_norm=maybe", "boolean"),
])
def test_bad_parameters_are_clear(spec, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec(spec)


def test_same_budget_errors_as_snapkv():
    for bad in ("0", "-3", "12.5"):
        with pytest.raises(SpecError) as e_ems:
            parse_spec(f"ems:budget={bad}")
        with pytest.raises(SpecError) as e_snap:
            parse_spec(f"snapkv:budget={bad}")
        assert str(e_ems.value).replace("ems", "X") == str(e_snap.value).replace("snapkv", "X")


# -- budgets -------------------------------------------------------------------------------------------------
def test_chunked_prefill_keeps_the_budget(llama):
    ids = ids_for(n=96)
    cache = make_cache(llama, "ems:budget=24,window=8")
    with torch.no_grad():
        for s in range(0, 96, 32):
            llama(ids[:, s:s + 32], past_key_values=cache, position_ids=torch.arange(s, s + 32)[None])
    assert cache.tokens_held() == [24, 24] and cache.get_seq_length() == 96


# -- the Global-Local score ---------------------------------------------------------------------------------------
def test_global_local_score_aligns_means():
    glo = torch.tensor([[[30.0, 10.0, 5.0, 3.0, 2.0]]])  # early tokens favoured (causal mask)
    loc = torch.tensor([[[0.1, 0.1, 0.2, 0.6, 1.0]]])  # recent tokens favoured (positional decay)
    s = global_local_score(glo, loc, None)
    assert torch.allclose(s, glo * (0.4 / 10.0) + loc)
    # both halves weigh the same on average: neither bias dominates
    assert float((s - loc).mean()) == pytest.approx(float(loc.mean()))
    valid = torch.tensor([[[False, True, True, True, True]]])  # padding does not enter the means
    s2 = global_local_score(glo, loc, valid)
    assert torch.allclose(s2[..., 1:], glo[..., 1:] * (0.475 / 5.0) + loc[..., 1:])


def test_scores_match_eager_attention(llama, llama_eager, monkeypatch):
    """The hook's recomputed queries (model on SDPA) give the scores eager attention weights give."""
    from kvshrink.methods.ems import EMSLayer

    ids = ids_for()
    with torch.no_grad():
        attn = llama_eager(ids, output_attentions=True).attentions
    captured = {}
    orig = EMSLayer.scores

    def spy(self, K, valid, n, w, pre):
        captured[self.layer_idx] = out = orig(self, K, valid, n, w, pre)
        return out

    monkeypatch.setattr(EMSLayer, "scores", spy)
    prefill(llama, "ems:budget=24,window=8", ids)
    for i, a in enumerate(attn):
        a = a.float()
        glo = a[0, :, :, :56].sum(1).view(2, 2, 56).mean(1)
        loc = a[0, :, -8:, :56].sum(1).view(2, 2, 56).mean(1)
        want = glo * (loc.mean(-1, keepdim=True) / glo.mean(-1, keepdim=True)) + loc
        assert torch.allclose(captured[i][0], want, atol=1e-4, rtol=1e-4)


# -- what is kept, what is merged ----------------------------------------------------------------------------
def test_window_and_top_scored_tokens_kept_exactly_without_merging(llama, llama_eager):
    """threshold > 1: nothing is redundant enough, every class is its centre alone -> pure Global-Local eviction."""
    ids = ids_for()
    with torch.no_grad():
        attn = llama_eager(ids, output_attentions=True).attentions
    ref = kv_reference(llama, ids)
    cache = prefill(llama, "ems:budget=24,window=8,threshold=2", ids)
    for layer, a, (rk, rv) in zip(cache.layers, attn, ref):
        wk, wv, classes = ems_reference(a.float(), rk, rv, 24, 8, 0.9, 2.0)
        k, v = layer.dense()
        for h in range(2):
            idx = match_rows(k[0, h], rk[0, h])
            assert torch.equal(idx[-8:], torch.arange(T - 8, T))  # the observation window, as is
            assert idx[:16].tolist() == sorted(classes[h])  # the class centres: top Global-Local scores
        assert torch.allclose(k[0], wk.float(), atol=1e-5) and torch.allclose(v[0], wv.float(), atol=1e-5)


@pytest.mark.parametrize("keep_norm", [True, False])
@pytest.mark.parametrize("mass,threshold", [(0.9, 0.1), (0.6, 0.3)])
def test_merged_states_are_the_score_weighted_combination(llama, llama_eager, keep_norm, mass, threshold):
    ids = ids_for()
    with torch.no_grad():
        attn = llama_eager(ids, output_attentions=True).attentions
    ref = kv_reference(llama, ids)
    spec = f"ems:budget=24,window=8,mass={mass},threshold={threshold},keep_norm={str(keep_norm).lower()}"
    cache = prefill(llama, spec, ids)
    merged_any = evicted_any = 0
    for layer, a, (rk, rv) in zip(cache.layers, attn, ref):
        wk, wv, classes = ems_reference(a.float(), rk, rv, 24, 8, mass, threshold, keep_norm)
        k, v = layer.dense()
        assert torch.allclose(k[0], wk.float(), atol=1e-4, rtol=1e-4)
        assert torch.allclose(v[0], wv.float(), atol=1e-4, rtol=1e-4)
        for h in range(2):
            members = sum(len(m) for m in classes[h].values())
            merged_any += members - 16
            evicted_any += 56 - members
    assert merged_any > 0 and evicted_any > 0, "the test does not exercise both merging and the zero class"


def test_sparsity_and_zero_class_are_head_wise():
    """Eq. (2)-(3) on hand-made heads: a sparse head merges less than a flat one; dissimilar tokens go to the zero class."""
    g = torch.Generator().manual_seed(1)
    P, D = 12, 8
    base = torch.randn(2, D, generator=g)
    K = torch.cat([base[0] + 0.01 * torch.randn(P // 2, D, generator=g),
                   base[1] + 0.01 * torch.randn(P // 2, D, generator=g)])[None, None].repeat(1, 2, 1, 1)
    V = K.clone()
    flat = torch.linspace(1.0, 0.9, P)
    sparse = torch.tensor([1.0, 0.9] + [1e-3] * (P - 2))
    score = torch.stack([flat, sparse])[None]
    mk, mv, keep, cls = evict_then_merge(K, V, score, None, 2, mass=0.5, threshold=0.5)
    assert torch.equal(keep[0, 0], torch.tensor([0, 1])) and torch.equal(keep[0, 1], torch.tensor([0, 1]))
    merged = (cls > 0).sum(-1) - 2
    assert merged[0, 0] > merged[0, 1] >= 0  # the flat head merges more
    # both centres sit in the first cluster: the second cluster's tokens are too dissimilar -> zero class
    assert (cls[0, 0, P // 2:] == 0).all() and (cls[0, 1, P // 2:] == 0).all()
    # mass=1, threshold=0: every real candidate merges somewhere
    _, _, _, cls1 = evict_then_merge(K, V, score, None, 2, mass=1.0, threshold=0.0)
    assert (cls1 > 0).all()
    # similarities computed a few tokens at a time (long prompts) give the same result
    out5 = evict_then_merge(K, V, score, None, 2, mass=0.5, threshold=0.5, chunk=5)
    for x, y in zip(out5, (mk, mv, keep, cls)):
        assert torch.equal(x, y)


def test_padding_is_never_kept_or_merged():
    g = torch.Generator().manual_seed(2)
    K = torch.randn(1, 2, 10, 8, generator=g)
    V = torch.randn(1, 2, 10, 8, generator=g)
    valid = torch.ones(1, 2, 10, dtype=torch.bool)
    valid[..., :3] = False
    score = torch.rand(1, 2, 10, generator=g).masked_fill(~valid, 0.0)
    K[..., :3, :] = K[..., 3:6, :]  # padding identical to real tokens: still never merged
    _, _, keep, cls = evict_then_merge(K, V, score, valid, 4, mass=1.0, threshold=0.0)
    assert (keep >= 3).all() and (cls[..., :3] == 0).all() and (cls[..., 3:] > 0).all()
    # a row shorter than the budget keeps its padding (at the front), which takes no merged token
    _, _, keep, cls = evict_then_merge(K, V, score, valid, 9, mass=1.0, threshold=0.0)
    assert (keep[..., :2] < 3).all() and (cls[..., 3:] > 0).all()


# -- padding, batches, families -----------------------------------------------------------------------------
def test_left_padded_row_holds_the_lone_rows_states(llama):
    """The padded row keeps and merges exactly what it would alone (the generated tokens are compared for every
    policy, EMS included, by test_policies.test_left_padding_matches_unpadded_rows)."""
    spec = "ems:budget=24,window=8"
    ids = ids_for(batch=2, n=50, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    ids[1, :12] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = prefill(llama, spec, ids, attention_mask=mask, position_ids=pos)
    alone = prefill(llama, spec, ids[1:, 12:])
    for lp, la in zip(padded.layers, alone.layers):
        kp, vp = lp.dense()
        ka, va = la.dense()
        assert lp.npad is None  # no padding kept: the budget is below the row's length
        assert torch.allclose(kp[1:], ka, atol=1e-4) and torch.allclose(vp[1:], va, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_families_generate_batch2_left_padding(family):
    model = tiny_model(family, layers=2)
    ids = ids_for(batch=2, n=40, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    for spec in ("ems:budget=16,window=4", "ems:budget=0.25,window=4+kivi:bits=2,group=32,residual=0"):
        cache = make_cache(model, spec)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False)
        assert out.shape == (2, 44)
        assert all(isinstance(layer, PolicyLayer) for layer in cache.layers)
        k, v = cache.layers[0].dense()
        assert k.shape[2] == (16 if spec.startswith("ems:budget=16") else 10) + 3
        assert torch.isfinite(k).all() and torch.isfinite(v).all()


# -- composition with quantizers -------------------------------------------------------------------------------
@pytest.fixture()
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rotatekv's "calibrating on random tokens" notice
        yield


@pytest.mark.parametrize("quant,rel", [("kivi:bits=2,group=32,residual=0", 0.1), ("int4", 0.1),
                                       ("rotatekv:calib_tokens=32,bits=2", 0.25)])
def test_bytes_are_the_product_of_both_ratios(llama, quant, rel, _quiet):
    ids = ids_for(n=128)
    policy = "ems:budget=0.25,window=8"
    sizes = {spec: prefill(llama, spec, ids).nbytes() for spec in ("none", policy, quant, f"{policy}+{quant}")}
    assert sizes[policy] == pytest.approx(sizes["none"] * 32 / 128, rel=0.01)  # held bytes: 32 of 128 states
    product = sizes[policy] / sizes["none"] * sizes[quant] / sizes["none"]
    both = sizes[f"{policy}+{quant}"] / sizes["none"]
    assert both == pytest.approx(product, rel=rel)
    assert both < min(sizes[policy], sizes[quant]) / sizes["none"]


def test_rotatekv_stores_merged_states_at_their_centres(llama, _quiet):
    """Behind rotatekv (pre-RoPE, per-head positions) at 16 bits the held states are ems+none's: every merged
    key is stored at its centre's position and comes back exactly."""
    ids = ids_for()
    ref = prefill(llama, "ems:budget=0.5,window=8+none", ids)
    got = prefill(llama, "ems:budget=0.5,window=8+rotatekv:calib_tokens=32,bits=16,sink_ratio=0,sink_dtype=model", ids)
    assert got.tokens_held() == ref.tokens_held() == [32, 32]
    for lg, lr in zip(got.layers, ref.layers):
        k, v = lg.dense()
        rk, rv = lr.dense()
        assert torch.allclose(k, rk, atol=1e-4, rtol=1e-4) and torch.allclose(v, rv, atol=1e-4, rtol=1e-4)
    out = llama.generate(ids_for(batch=2, n=48), past_key_values=make_cache(llama, "ems:budget=0.5,window=8+rotatekv:calib_tokens=32,bits=2"),
                         max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, 51)


def test_chunked_prefill_behind_rotatekv_keeps_the_budget(llama, _quiet):
    """A chunk arriving after tokens are held, behind per-token-position storage: eviction only, budget exact."""
    ids = ids_for(n=96)
    cache = make_cache(llama, "ems:budget=24,window=8+rotatekv:calib_tokens=32,bits=16,sink_ratio=0,sink_dtype=model")
    with torch.no_grad():
        for s in range(0, 96, 32):
            out = llama(ids[:, s:s + 32], past_key_values=cache, position_ids=torch.arange(s, s + 32)[None])
    assert cache.tokens_held() == [24, 24] and torch.isfinite(out.logits).all()
    k, _ = cache.layers[1].dense()
    assert torch.isfinite(k).all()
