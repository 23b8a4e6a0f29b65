"""generate_graph (greedy decoding with the step captured in a CUDA graph) and ``kvshrink generate --graph``.

The capture needs a GPU: those tests run on the lent GPU; on CPU the argument checks and the spec mapping run.
"""
import os
import warnings

if __import__("torch").cuda.is_available() is False:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

from kvshrink.kernels import disable, make_kernel_cache  # noqa: E402
from kvshrink.kernels.graph_generate import generate_graph, graph_kind  # noqa: E402
from kvshrink.testing import tiny_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GEN = torch.Generator().manual_seed(7)


def test_graph_kind_maps_specs_to_static_layers():
    assert graph_kind("kivi:bits=4,group=64,residual=128") == ("kivi", {
        "bits": 4, "group": 64, "residual": 128, "scale_dtype": torch.float16})
    assert graph_kind("rotatekv:bits=2") == ("rotatekv", {"spec": "rotatekv:bits=2"})
    assert graph_kind("none") == ("dense", {})
    with pytest.raises(ValueError, match="graph mode serves one of"):
        graph_kind("kvquant:bits=2")
    with pytest.raises(ValueError, match="no policy"):
        graph_kind("snapkv+kivi:bits=2")


def test_generate_graph_refuses_what_it_cannot_capture(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match="CUDA device"):
        generate_graph(model, torch.ones(1, 4, dtype=torch.long))
    if DEV == "cuda":
        gemma = tiny_model("gemma2").to(DEV)
        with pytest.raises(ValueError, match="sliding windows"):
            generate_graph(gemma, torch.ones(1, 4, dtype=torch.long, device=DEV))


def test_cli_graph_needs_cuda(capsys):
    from kvshrink.cli import main

    if DEV == "cuda":
        pytest.skip("the CUDA run is test_generate_graph_matches_eager_generate")
    with pytest.raises(SystemExit, match="--graph needs a CUDA device"):
        main(["generate", "hello", "--graph", "--method", "kivi:bits=2"])


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("spec", ["kivi:bits=2,group=32,residual=32", "rotatekv:bits=2", "none"])
def test_generate_graph_matches_eager_generate(spec):
    """The replayed steps give model.generate's greedy tokens over the kernel cache (left-padded batch), and
    rows are padded after their eos as generate pads them; the model's attention is restored. float32: the two
    paths sum attention in different orders (host vs device split plans), and fp32 keeps that far below a flip."""
    model = tiny_model("llama", head_dim=64).to(DEV)
    ids = torch.randint(3, 200, (2, 40), generator=GEN).to(DEV)
    am = torch.ones_like(ids)
    am[1, :7] = 0
    before = model.config._attn_implementation
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rotatekv: no calib file")
        got, cache = generate_graph(model, ids, am, spec=spec, max_new_tokens=12)
        assert model.config._attn_implementation == before
        try:
            ref_cache = make_kernel_cache(model, spec)
            want = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                                  past_key_values=ref_cache, pad_token_id=0)
        finally:
            disable(model)
    assert torch.equal(got, want)
    assert sum(layer.nbytes() for layer in cache.layers) > 0
    eos = int(want[0, 40 + 3])  # a token row 0 produced: an eos from there on
    got_eos, _ = generate_graph(model, ids, am, spec=spec, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    first = int((want[0, 40:] == eos).nonzero()[0])
    assert torch.equal(got_eos[0, :40 + first + 1], want[0, :40 + first + 1])
    assert bool((got_eos[0, 40 + first + 1:] == 0).all())
