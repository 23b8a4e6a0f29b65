"""RotateKV's decode kernel (kvshrink/kernels/rotatekv_decode.py) and kernel layer against the torch path.

The reference is the base layer itself: :meth:`RotateKVLayer.dense` (dequantize, undo the channel order and
the grouped-head Hadamard, re-apply RoPE, write the exact sinks back) followed by plain float32 softmax
attention over the held past plus the new token. Without a GPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``) on small shapes; ``KVSHRINK_FULL_GRID=1`` on a GPU runs a larger grid.

Tolerances (relative L2 error of the attention output): float32 1e-4 -- the kernel rotates with ±1 matrix
products and the reference with FWHT butterflies (different fp32 summation orders, ~1e-6) and computes cos/sin
itself; float16 4e-3 -- the kernel feeds the matrix units fp16 operands (dequantized keys, RoPE'd keys, p,
values: ~5e-4 each), as tests/test_kernels.py allows for KIVI's kernel; bfloat16 2e-2 -- the reference rounds
K/V to bf16 (2^-8). A wrong sign, channel, position or sink gives errors of order 0.1-1, far above these.
"""
from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from kvshrink.cache import make_cache  # noqa: E402
from kvshrink.kernels import attention as kattn  # noqa: E402
from kvshrink.kernels import disable, make_kernel_cache  # noqa: E402
from kvshrink.kernels.rotatekv_decode import (attention_ref, decode_attention_rotatekv,  # noqa: E402
                                              state_dense, unsupported_reason)
from kvshrink.kernels.rotatekv_layer import KernelRotateKVLayer, RotateKVDecode  # noqa: E402
from kvshrink.methods.rotatekv import SINK_BLOCK, RotateKV, RotateKVLayer  # noqa: E402
from kvshrink.rope import RopeSource  # noqa: E402
from kvshrink.testing import tiny_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("KVSHRINK_FULL_GRID") == "1" and DEV == "cuda"
GEN = torch.Generator().manual_seed(4321)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype=torch.float32, outliers=True):
    x = torch.randn(*shape, generator=GEN)
    if outliers and shape[-1] >= 8:
        x[..., 3] *= 6
        x[..., 40] += 4  # an offset channel: what k_mu absorbs
    return x.to(dtype=dtype, device=DEV)


def rope_fn_for(D: int, theta: float = 10000.0, scaling: dict | None = None):
    """The layer's ``rope_fn`` exactly as RotateKV builds it: RopeSource over the model's rotary module."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D, rope_theta=theta,
                      max_position_embeddings=4096, rope_scaling=scaling)
    module = LlamaRotaryEmbedding(cfg).to(DEV)
    src = RopeSource()
    module.register_forward_hook(src.hook, with_kwargs=True)
    cos, _ = module(torch.empty(0, device=DEV), torch.arange(3, device=DEV)[None])
    return src.recompute_fn(cos)


def build(B, H, D, G, T, bits, dtype, *, reorder=True, center=True, sinks=True, prerope=True, residual=0,
          group=None, rope=None, scale_dtype="float16"):
    """A RotateKVLayer holding ``T`` tokens, filled as decoding fills it (one chunk, then single tokens), with
    sink tokens (one per row in the first chunk, one in the last few tokens: the residual when there is one)."""
    method = RotateKV(bits=bits, head_group=G, reorder=reorder, center=center, sinks=sinks, prerope=prerope,
                      residual=residual, group=group, scale_dtype=scale_dtype)
    perm = torch.randperm(H * D, generator=GEN) if method.uses_reorder() else None
    layer = RotateKVLayer(method, 0, H, D, G, perm)
    layer.rope_fn = rope or rope_fn_for(D)
    k, v = rand(B, H, T, D, dtype=dtype), rand(B, H, T, D, dtype=dtype, outliers=False)
    layer.lazy_initialization(k, v)
    pos = (torch.arange(T, device=DEV)[None] + 3 * torch.arange(B, device=DEV)[:, None]).to(torch.int32)
    pre = max(1, T - 4)
    chunks = [(0, pre)] + [(i, i + 1) for i in range(pre, T)]
    for c, (s, e) in enumerate(chunks):
        slots = None
        if sinks and c == 0:  # row b: token 1 + b, and row 1 has a second sink
            slots = torch.full((B, 2), -1, dtype=torch.long, device=DEV)
            slots[:, 0] = (1 + torch.arange(B, device=DEV)).clamp(max=pre - 1)
            if B > 1:
                slots[1, 1] = min(pre - 1, 7)
        if sinks and e == T - 1 and e - s == 1 and c > 0:  # a late sink (in the residual if residual >= 2)
            slots = torch.zeros(B, 1, dtype=torch.long, device=DEV)
        layer._store(k[:, :, s:e], v[:, :, s:e], pos[:, s:e] if prerope else None, None, None, slots)
        layer.seen += e - s
    return layer


def reference(layer, q, k_new, v_new, mask, scale):
    K, V = layer.dense()
    return attention_ref(q, torch.cat([K, k_new], 2), torch.cat([V, v_new], 2), mask, scale)


def pad_mask(B, T):
    mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
    for b in range(B):
        mask[b, : (5 * b + 2) % T] = False
    mask[:, T // 2] = False
    mask[:, -1] = True
    return mask


# (B, Hq, H, G, D, T, bits, dtype, reorder, center, sinks, masked, prerope, residual, group, block_n, splits, lookup)
GRID = [
    (1, 8, 2, 2, 64, 45, 2, torch.float32, True, True, True, False, True, 0, None, 16, 2, "dot"),  # default layout
    (2, 8, 2, 2, 64, 70, 2, torch.float16, True, True, True, True, True, 0, None, 16, None, "gather"),  # GQA 4, pad
    (2, 4, 4, 2, 64, 37, 4, torch.bfloat16, False, False, False, True, True, 5, None, 16, 3, "dot"),  # GQA 1, res.
    (1, 4, 2, 1, 64, 50, 4, torch.float16, True, False, True, False, False, 0, None, 32, 2, "dot"),  # post-RoPE
    (2, 4, 2, 2, 128, 33, 2, torch.float32, True, True, True, True, True, 3, None, 16, 2, "dot"),  # D 128, res. sink
    (1, 4, 2, 2, 64, 30, 8, torch.float32, True, True, False, False, True, 0, 32, 16, 1, "gather"),  # 8 bits, g32
    (1, 2, 2, 2, 64, 40, 2, torch.float16, False, True, True, False, False, 2, 16, 16, 3, "dot"),  # G=2 post, g16
    (2, 32, 8, 4, 64, 61, 2, torch.float16, True, True, True, True, True, 0, None, 32, None, "dot"),  # Llama-3, G=4
]
if FULL:
    GRID = [(B, H * r, H, G, D, T, bits, dt, True, True, True, m, pre, res, None, None, None, lookup)
            for (H, r, G), D, dt, bits, pre, (B, T, res, m), lookup in itertools.product(
                ((8, 4, 4), (8, 1, 2), (4, 4, 1)), (64, 128), (torch.float16, torch.bfloat16), (2, 4), (True, False),
                ((1, 1, 0, False), (3, 301, 0, True), (2, 4133, 16, False)), ("dot", "gather"))]


@pytest.mark.parametrize("B,Hq,H,G,D,T,bits,dtype,reorder,center,sinks,masked,prerope,residual,group,block_n,splits,"
                         "lookup", GRID)
def test_kernel_matches_dense_reference(B, Hq, H, G, D, T, bits, dtype, reorder, center, sinks, masked, prerope,
                                        residual, group, block_n, splits, lookup):
    layer = build(B, H, D, G, T, bits, dtype, reorder=reorder, center=center, sinks=sinks, prerope=prerope,
                  residual=residual, group=group)
    if sinks:
        assert layer.sink_idx is not None and int((layer.sink_idx >= 0).sum()) >= B
    kl = KernelRotateKVLayer.from_layer(layer)
    k_new, v_new = rand(B, H, 1, D, dtype=dtype), rand(B, H, 1, D, dtype=dtype)
    q = rand(B, Hq, D, dtype=dtype, outliers=False)
    state = kl.decode_state(k_new, v_new)
    assert state.tokens == T + 1 and unsupported_reason(state, D, Hq) is None
    mask = pad_mask(B, T + 1) if masked else None
    out = torch.full((B, Hq, D), float("nan"), dtype=dtype, device=DEV)  # poisoned: every element written
    decode_attention_rotatekv(q, state, mask=mask, scale=0.3, out=out, block_n=block_n, num_splits=splits,
                              scale_lookup=lookup)
    assert not bool(out.isnan().any())
    # against the state's own float32 K/V: the kernel's error alone (the base layer's dense() ends in the model
    # dtype, whose bf16 rounding alone is ~1e-2 over thousands of tokens)
    K, V = state_dense(state, torch.float32)
    exact = attention_ref(q, K, V, mask, 0.3)
    err = float((out.float() - exact).norm() / exact.norm())
    ref = reference(layer, q, k_new, v_new, mask, 0.3)
    err_layer = float((out.float() - ref).norm() / ref.norm())
    if os.environ.get("KVSHRINK_PRINT_ERR"):
        print("rel err", lookup, dtype, err, err_layer)
    assert err < TOL[dtype], err
    assert err_layer < 4 * TOL[dtype], err_layer
    # the fallback's dense K/V (state_dense) is the base layer's too
    Kr, Vr = layer.dense()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(K[:, :, :T], Kr.float(), atol=tol * float(Kr.float().abs().max()), rtol=0)
    torch.testing.assert_close(V[:, :, :T], Vr.float(), atol=tol * float(Vr.float().abs().max()), rtol=0)


@pytest.mark.parametrize("D,bits", [(128, 2), (64, 4), (128, 8)])
def test_kronecker_split_matches_full_products(D, bits):
    """Pre-RoPE keys through H_D = H_{D/PPB} (x) H_PPB (per-lane products + butterfly, ``kron``) give the output of
    the full D x D products, and both the float32 reference."""
    GEN.manual_seed(5)
    layer = build(2, 4, D, 2, 41, bits, torch.float32)
    kl = KernelRotateKVLayer.from_layer(layer)
    k_new, v_new = rand(2, 4, 1, D), rand(2, 4, 1, D)
    q = rand(2, 16, D, outliers=False)
    state = kl.decode_state(k_new, v_new)
    K, V = state_dense(state, torch.float32)
    exact = attention_ref(q, K, V, None, None)
    outs = [decode_attention_rotatekv(q, state, block_n=16, num_splits=2, kron=kron) for kron in (False, True)]
    for out in outs:
        assert float((out - exact).norm() / exact.norm()) < TOL[torch.float32]
    assert float((outs[0] - outs[1]).norm() / outs[0].norm()) < 1e-5


@pytest.mark.skipif(DEV != "cuda", reason="cos/sin.approx is PTX: compiled GPUs only (the interpreter takes tl.cos)")
@pytest.mark.parametrize("offset,kron", [(0, True), (250_000, True), (250_000, False)])
def test_fast_rope_trig_matches_the_accurate_one(offset, kron):
    """RoPE's cos/sin by range reduction + the hardware approximations (the GPU default) gives the output of
    libdevice's accurate ones (Kronecker split and full products), also at positions past 250K (angles where the accurate version takes its slow path
    and a missing range reduction would be far off), and both match the float32 reference."""
    from kvshrink.kernels.rotatekv_decode import LAUNCH

    GEN.manual_seed(9)
    layer = build(2, 4, 128, 2, 300, 2, torch.float32)
    kl = KernelRotateKVLayer.from_layer(layer)
    k_new, v_new = rand(2, 4, 1, 128), rand(2, 4, 1, 128)
    q = rand(2, 16, 128, outliers=False) * 4
    state = kl.decode_state(k_new, v_new)
    state.pos = state.pos + offset
    K, V = state_dense(state, torch.float32)
    exact = attention_ref(q, K, V, None, None)
    assert LAUNCH["fast_trig"]  # the default
    outs = []
    for fast in (False, True):
        outs.append(decode_attention_rotatekv(q, state, block_n=16, num_splits=2, fast_trig=fast, kron=kron))
        assert float((outs[-1] - exact).norm() / exact.norm()) < TOL[torch.float32], fast
    assert float((outs[1] - outs[0]).norm() / outs[0].norm()) < 2e-5
    assert not torch.equal(outs[0], outs[1])  # the two trig paths really ran (fp32: they differ in the last bits)


def test_kernel_detects_wrong_state():
    """The test can fail: a state whose channel order, sinks or positions are off gives a large error."""
    GEN.manual_seed(77)  # the same data whichever tests ran before
    layer = build(1, 2, 64, 2, 40, 2, torch.float32)
    kl = KernelRotateKVLayer.from_layer(layer)
    k_new, v_new = rand(1, 2, 1, 64), rand(1, 2, 1, 64)
    q = rand(1, 4, 64, outliers=False) * 4
    # for the sinks: queries that look at the sink token (index 1), so its 2-bit copy would show
    q_sink = layer.dense()[0][:, :, 1].repeat_interleave(2, dim=1) / 2
    for spoil in ("perm", "pos", "sinks"):
        qs = q_sink if spoil == "sinks" else q
        ref = reference(layer, qs, k_new, v_new, None, None)
        st = kl.decode_state(k_new, v_new)
        if spoil == "perm":
            st.key_slots = st.key_slots.roll(1)
        elif spoil == "pos":
            st.pos = st.pos + 1
        else:
            st.sink_idx = None  # sinks read from their codes too
        err = float((decode_attention_rotatekv(qs, st, block_n=16).float() - ref).norm() / ref.norm())
        assert err > 10 * TOL[torch.float32], (spoil, err)


def test_scale_lookup_falls_back_and_slots_must_agree():
    """bf16 scales are not exact in the one-hot product's fp16: "dot" then loads them per element (still exact);
    a state whose key_slots disagree with its keys' own slots is refused, not read with the wrong scales."""
    layer = build(1, 2, 64, 2, 40, 2, torch.float32, scale_dtype="bfloat16")
    kl = KernelRotateKVLayer.from_layer(layer)
    k_new, v_new = rand(1, 2, 1, 64), rand(1, 2, 1, 64)
    q = rand(1, 4, 64, outliers=False)
    ref = reference(layer, q, k_new, v_new, None, None)
    st = kl.decode_state(k_new, v_new)
    assert st.kq.scale.dtype == torch.bfloat16 and st.key_slots is not None
    for lookup in ("dot", "gather"):
        out = decode_attention_rotatekv(q, st, scale_lookup=lookup)
        assert float((out.float() - ref).norm() / ref.norm()) < TOL[torch.float32]
    st.key_slots = None
    assert "key_slots" in unsupported_reason(st, 64, 4)
    with pytest.raises(ValueError, match="key_slots"):
        decode_attention_rotatekv(q, st)


@pytest.mark.parametrize("residual", [3, 0])
def test_kernel_layer_stores_what_base_layer_stores(residual):
    """In-place capacity buffers + the quantization seam (residual 3) or the fused rotate+quantize+pack kernel
    (residual 0: every chunk stored whole) keep the base layer's bytes exactly, through regrowth, batch
    selection (state replaced wholesale) and further appends."""
    B, H, D, G = 2, 2, 64, 2
    base = build(B, H, D, G, 30, 2, torch.float16, residual=residual)
    kl = KernelRotateKVLayer(base.m, 0, H, D, G, base.perm)
    kl.rope_fn = base.rope_fn
    kl.reserve(40)
    ref = RotateKVLayer(base.m, 0, H, D, G, base.perm)
    ref.rope_fn = base.rope_fn
    k, v = rand(B, H, 300, D, dtype=torch.float16), rand(B, H, 300, D, dtype=torch.float16)
    pos = torch.arange(300, device=DEV, dtype=torch.int32)[None].expand(B, 300)
    slots = torch.tensor([[1, -1], [3, 7]], device=DEV)  # sink tokens of the first chunk (-1: none)
    for layer in (kl, ref):
        layer.lazy_initialization(k, v)
        layer._store(k[:, :, :20], v[:, :, :20], pos[:, :20], None, None, slots)
    for i in range(20, 300):
        for layer in (kl, ref):
            layer._store(k[:, :, i:i + 1], v[:, :, i:i + 1], pos[:, i:i + 1], None, None, None)
        if i == 150:
            for layer in (kl, ref):
                layer.batch_select_indices(torch.tensor([1, 0], device=DEV))
    held = 300 - residual
    assert kl.fused_store(k[:, :, :1], pos[:, :1]) == (residual == 0)
    for a, b in ((kl.kq, ref.kq), (kl.vq, ref.vq)):
        assert a.tokens == b.tokens == held
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y)
        assert (a.slots is None) == (b.slots is None) and (a.slots is None or torch.equal(a.slots, b.slots))
    assert kl.kq.slots is not None  # the default layout: keys grouped in the calibrated order
    for x, y in zip(kl.dense(), ref.dense()):  # what a prefill chunk, select() or a fallback step reads
        assert torch.equal(x, y)
    assert (kl.k_res is None and ref.k_res is None) or torch.equal(kl.k_res, ref.k_res)
    assert torch.equal(kl.pos, ref.pos) and torch.equal(kl.k_mu, ref.k_mu)
    for name in ("sink_k", "sink_v", "sink_idx"):  # exact sinks kept alike (rows swapped by the selection)
        assert getattr(ref, name) is not None and torch.equal(getattr(kl, name), getattr(ref, name))
    assert kl.kq.packed.shape[2] == held and kl._k.cap() >= held  # a view into a larger buffer


def _generate(model, cache, ids, am, steps):
    return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=steps, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, past_key_values=cache)


@pytest.mark.parametrize("spec,deferred", [("rotatekv:bits=2", None), ("rotatekv:bits=4,sink_ratio=0,sink_topk=3,residual=2", None),
                                           ("rotatekv:bits=2,sink_ratio=0,sink_topk=3", True)])
def test_generate_with_kernel_matches_plain_rotatekv(tiny, monkeypatch, spec, deferred):
    """Greedy generation with transformers' attention interface: the RotateKV kernel serves every decode step
    of every layer, and gives the tokens (and logits, within fp32 rounding) of the plain rotatekv cache.
    ``deferred``: decode-step sinks kept in a pending block (-1 columns the kernel must skip), as on the GPU."""
    model = tiny("llama", head_dim=64) if DEV == "cpu" else tiny_model("llama", head_dim=64).to(DEV)
    ids = torch.randint(3, 200, (2, 20), generator=GEN).to(DEV)
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding: positions differ per row
    calls = []
    real = kattn.decode_attention_rotatekv
    monkeypatch.setattr(kattn, "decode_attention_rotatekv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rotatekv: no calib file")
        ref = _generate(model, make_cache(model, spec), ids, am, 6)
        try:
            cache = make_kernel_cache(model, spec, reserve=26)
            assert all(isinstance(layer, KernelRotateKVLayer) for layer in cache.layers)
            for layer in cache.layers:
                layer.deferred_sinks = deferred
            got = _generate(model, cache, ids, am, 6)
        finally:
            disable(model)
    assert len(calls) == 5 * 2  # 5 decode steps x 2 layers
    if "sink_ratio=0" in spec:
        assert cache.layers[0].sink_idx is not None
    if deferred:  # every decode token is a sink here: its column of the pending block holds it
        assert (cache.layers[0].sink_idx[:, -SINK_BLOCK:] >= 0).sum() == 2 * 5
    assert torch.equal(got.sequences, ref.sequences)
    s_ref, s_got = torch.stack(ref.scores), torch.stack(got.scores)
    assert float((s_got - s_ref).norm() / s_ref.norm()) < 1e-4


def test_unsupported_calls_fall_back_to_dense():
    """A call the kernel does not serve (here: a sliding window) goes to dequantize + SDPA via the handle's
    dense K/V, and still matches the reference; unsupported layouts are refused with a reason."""
    layer = build(1, 2, 64, 2, 30, 2, torch.float32, residual=2)
    kl = KernelRotateKVLayer.from_layer(layer)
    k_new, v_new = rand(1, 2, 1, 64), rand(1, 2, 1, 64)
    handle = RotateKVDecode(kl.decode_state(k_new, v_new), kl)
    q = rand(1, 4, 1, 64, outliers=False)

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    fast, _ = kattn.kvshrink_attention(Module(), q, handle, handle, None, scaling=0.125)
    dense, _ = kattn.kvshrink_attention(Module(), q, handle, handle, None, scaling=0.125, sliding_window=4096)
    ref = reference(layer, q[:, :, 0], k_new, v_new, None, 0.125)
    torch.testing.assert_close(fast[:, 0].float(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dense[:, 0].float(), ref, atol=1e-5, rtol=1e-4)
    assert "head_dim" in unsupported_reason(handle.state, 96, 4)
    tok = KernelRotateKVLayer(RotateKV(key_axis="token", reorder=False), 0, 2, 64, 2, None)
    assert tok.kernel_refusal(k_new) == "key_axis=token"
    assert KernelRotateKVLayer(RotateKV(bits=3, reorder=False), 0, 2, 64, 2, None).kernel_refusal(k_new) == "bits=3"


def test_device_guard_makes_the_tensors_device_current_only_on_cuda():
    """Triton launches on the current CUDA device: kernel calls run under the tensors' own device (a model split
    over GPUs), and under nothing off CUDA."""
    import contextlib

    from kvshrink.kernels._triton import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard("cpu"), contextlib.nullcontext)
