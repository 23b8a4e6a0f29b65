"""Graph-mode RotateKV (kvshrink/kernels/rotatekv_graph.py) against the eager kernel layer.

The static layer must decode exactly like :class:`KernelRotateKVLayer` (same stored bytes, same sinks, same
logits to float rounding: only the kernel's split grid and the dense segment's padding differ), while its step
depends on no host value that changes. On CPU the kernels run under ``TRITON_INTERPRET=1``; the CUDA-graph
capture itself is tested on a GPU only.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from kvshrink.kernels import disable, make_kernel_cache, make_static_cache  # noqa: E402
from kvshrink.kernels.rotatekv_graph import StaticRotateKVLayer  # noqa: E402
from kvshrink.testing import greedy_steps, tiny_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GEN = torch.Generator().manual_seed(99)
ALL_SINKS = "rotatekv:bits=2,sink_ratio=0,sink_topk=3"  # every token a sink: exercises the device sink store


def _model(tiny):
    return tiny("llama", head_dim=64) if DEV == "cpu" else tiny_model("llama", head_dim=64).to(DEV)


def _decode(model, cache, ids, steps, am=None, padding="every"):
    """Greedy steps with explicit positions (:func:`kvshrink.testing.greedy_steps`); logits per step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rotatekv: no calib file")
        return greedy_steps(model, cache, ids, steps, am, padding)


@pytest.mark.parametrize("spec", ["rotatekv:bits=2", ALL_SINKS, "rotatekv:bits=2,prerope=false",
                                  "rotatekv:bits=2,sinks=false", "rotatekv:bits=2,residual=4",
                                  ALL_SINKS + ",residual=3"])
def test_static_layer_decodes_like_the_eager_kernel_layer(tiny, spec):
    model = _model(tiny)
    ids = torch.randint(3, 200, (2, 19), generator=GEN).to(DEV)
    steps = 5
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rotatekv: no calib file")
            eager = make_kernel_cache(model, spec, reserve=32)
            want = _decode(model, eager, ids, steps)
            static = make_static_cache(model, 32, kind="rotatekv", spec=spec, sink_slots=8)
        assert all(isinstance(layer, StaticRotateKVLayer) for layer in static.layers)
        got = _decode(model, static, ids, steps)
    finally:
        disable(model)
    assert float((got - want).norm() / want.norm()) < 1e-4
    for i, (lay, ref) in enumerate(zip(static.layers, eager.layers)):
        # lens counts the quantized tokens; the newest `residual` are held in the ring
        assert lay.frozen and int(lay.lens[0]) + lay.m.residual == 19 + steps and lay.seen == 19 + steps
        kq, vq, pos, k_res, v_res = lay.held_state()
        assert (pos is None) == (ref.pos is None) and (pos is None or torch.equal(pos, ref.pos))
        k1, v1 = lay.dense()
        k2, v2 = ref.dense()
        if i == 0:  # the first layer's inputs are the same tensors in both runs: the same bytes, sinks and values
            for a, b in zip((*kq.tensors(), *vq.tensors()), (*ref.kq.tensors(), *ref.vq.tensors())):
                assert torch.equal(a, b)  # written through the staging row at lens[0]
            for a, b in ((k_res, ref.k_res), (v_res, ref.v_res)):  # the residual ring, in token order
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
        else:  # later layers see the first layer's attention, equal to float rounding: entries held in fp16 (sinks)
            # may round to the neighbouring fp16 value (one ulp, <= 2^-10 relative)
            assert torch.allclose(k1, k2, atol=1e-4, rtol=1e-3) and torch.allclose(v1, v2, atol=1e-4, rtol=1e-3)
        if spec.startswith(ALL_SINKS):  # every decode token became a sink, in the order it came
            new = lay.sink_idx[:, -8:]
            assert torch.equal(new[:, :steps].cpu(), torch.arange(19, 19 + steps).expand(2, steps).to(torch.int32))
            assert bool((new[:, steps:] == -1).all())


def test_static_layer_with_left_padding_decodes_like_the_eager_kernel_layer(tiny):
    model = _model(tiny)
    ids = torch.randint(3, 200, (2, 19), generator=GEN).to(DEV)
    am = torch.ones_like(ids)
    am[0, :6] = 0  # row 0: 13 tokens, positions 0..12, then its decode tokens from 13
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rotatekv: no calib file")
            want = _decode(model, make_kernel_cache(model, "rotatekv:bits=2", reserve=32), ids, 4, am)
            got = _decode(model, make_static_cache(model, 32, kind="rotatekv"), ids, 4, am, padding="once")
            plain = _decode(model, make_static_cache(model, 32, kind="rotatekv"), ids, 4)  # padding attended
    finally:
        disable(model)
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert float((plain[:, 0] - want[:, 0]).norm() / want[:, 0].norm()) > 1e-2  # the mask matters for row 0


def test_sink_overflow_is_reported_not_silent(tiny):
    model = _model(tiny)
    ids = torch.randint(3, 200, (2, 19), generator=GEN).to(DEV)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rotatekv: no calib file")
            static = make_static_cache(model, 32, kind="rotatekv", spec=ALL_SINKS, sink_slots=2)
        _decode(model, static, ids, 4)
    finally:
        disable(model)
    # every token is a sink: 4 steps x 2 rows, 2 free slots per row -> 2 x 2 tokens kept quantized only
    with pytest.warns(UserWarning, match=r"4 sink token\(s\) found no free sink slot"):
        assert static.layers[0].settle() == 23


def test_static_rotatekv_refuses_what_it_cannot_do(tiny):
    model = _model(tiny)
    try:
        with pytest.raises(ValueError, match="key_axis=channel"):
            make_static_cache(model, 32, kind="rotatekv", spec="rotatekv:bits=2,key_axis=token")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rotatekv: no calib file")
            short = make_static_cache(model, 32, kind="rotatekv", spec="rotatekv:bits=2,residual=8")
        with pytest.raises(ValueError, match="more than residual=8"):  # a 6-token prompt stays all in the residual
            _decode(model, short, torch.randint(3, 200, (1, 6), generator=GEN).to(DEV), 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rotatekv: no calib file")
            static = make_static_cache(model, 32, kind="rotatekv")
        ids = torch.randint(3, 200, (1, 6), generator=GEN).to(DEV)
        _decode(model, static, ids, 1)
        with torch.no_grad(), pytest.raises(NotImplementedError, match="one prefill chunk"):
            model(input_ids=ids, past_key_values=static, use_cache=True)
    finally:
        disable(model)
    with pytest.raises(ValueError, match="kind must be"):
        make_static_cache(model, 32, kind="rotatekvv")


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("spec", ["rotatekv:bits=2", "rotatekv:bits=2,residual=8"])
def test_graph_decoder_replays_the_static_step_exactly(spec):
    """Captured and replayed greedy steps give exactly the tokens of the same static layers stepped eagerly
    (the replay runs the same kernels on the same buffers), and every replayed token is stored."""
    from kvshrink.kernels.graph import GraphDecoder

    model = tiny_model("llama", head_dim=64, dtype=torch.float16).to(DEV)
    ids = torch.randint(3, 200, (2, 40), generator=GEN).to(DEV)
    steps = 8
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rotatekv: no calib file")
            eager = make_static_cache(model, 64, kind="rotatekv", spec=spec)
            want = _decode(model, eager, ids, steps + 2).argmax(-1).T  # (B, steps + 2): tokens 1 .. steps + 2
            static = make_static_cache(model, 64, kind="rotatekv", spec=spec)
        with torch.no_grad():
            first = model(input_ids=ids, past_key_values=static, use_cache=True).logits[:, -1].argmax(-1)
        dec = GraphDecoder(model, static, first, position=40)  # 2 eager warm-up steps, then the capture
        got = list(dec.warmup_tokens)  # tokens 1 and 2, from the eager warm-up steps
        for _ in range(steps):
            got.append(dec.step().clone())
        got = torch.cat(got, 1)
    finally:
        disable(model)
    assert torch.equal(got, want)
    # capturing records a step, it does not run it; lens counts the quantized tokens, the ring the newest
    assert int(static.layers[0].lens[0]) + static.layers[0].m.residual == 40 + 2 + steps


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["rotatekv", "kivi", "dense"])
def test_graph_decoder_with_left_padding_replays_the_static_step_exactly(kind):
    """With a left-padded batch (GraphDecoder(attention_mask=...)): replayed steps give the tokens of the same
    static layers stepped eagerly with the prompt's mask and per-row positions."""
    from kvshrink.kernels.graph import GraphDecoder

    model = tiny_model("llama", head_dim=64, dtype=torch.float16).to(DEV)
    ids = torch.randint(3, 200, (2, 40), generator=GEN).to(DEV)
    am = torch.ones_like(ids)
    am[1, :9] = 0
    kw = {"group": 16, "residual": 16} if kind == "kivi" else {}
    steps = 6
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rotatekv: no calib file")
            want = _decode(model, make_static_cache(model, 64, kind=kind, **kw), ids, steps + 2, am,
                           padding="once").argmax(-1).T
            static = make_static_cache(model, 64, kind=kind, **kw)
        with torch.no_grad():
            first = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                          past_key_values=static, use_cache=True).logits[:, -1].argmax(-1)
        dec = GraphDecoder(model, static, first, position=40, attention_mask=am)
        got = torch.cat(list(dec.warmup_tokens) + [dec.step().clone() for _ in range(steps)], 1)
    finally:
        disable(model)
    assert torch.equal(got, want)
