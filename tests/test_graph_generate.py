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
from kvshrink.kernels.graph_generate import _stop_tokens, generate_graph, graph_kind  # noqa: E402
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
    with pytest.raises(ValueError, match="residual .* multiple of its group"):
        graph_kind("kivi:bits=2,group=32,residual=0")


def test_stop_tokens_follow_generate(tiny):
    """eos and pad as ``generate`` takes them: the arguments, else the generation config (an int or a list, in
    order); pad falls back to the first eos."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[9, 3, 9]))  # the shared tiny model stays
    assert _stop_tokens(model, None, None) == ([9, 3], 9)
    assert _stop_tokens(model, 5, None) == ([5], 5)
    assert _stop_tokens(model, (), 4) == ([], 4)
    model.generation_config.pad_token_id = 1
    assert _stop_tokens(model, None, None) == ([9, 3], 1)
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        generate_graph(tiny("llama"), torch.ones(1, 4, dtype=torch.long), check_every=0)


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
        got, cache = generate_graph(model, ids, am, spec=spec, max_new_tokens=12, pad_token_id=0)  # config eos
        assert model.config._attn_implementation == before
        want = _generate(model, ids, am, spec, max_new_tokens=12, eos_token_id=None)
        assert torch.equal(got, want)
        assert sum(layer.nbytes() for layer in cache.layers) > 0
        # eos: each row's third new token ends it (whatever it is); generate stops once both rows have ended and
        # pads a row that ended first. generate_graph checks every `check_every` steps, so it may run on (padding).
        eos = [int(want[0, 40 + 2]), int(want[1, 40 + 2])]
        want_eos = _generate(model, ids, am, spec, max_new_tokens=30, eos_token_id=eos)
        assert want_eos.shape[1] <= 40 + 3
        got_eos, _ = generate_graph(model, ids, am, spec=spec, max_new_tokens=30, eos_token_id=eos, pad_token_id=0,
                                    check_every=4)
    n = want_eos.shape[1]
    assert 40 + 3 <= got_eos.shape[1] <= 40 + 4, "all rows ended by step 3: the loop stops at the next check"
    assert torch.equal(got_eos[:, :n], want_eos)
    assert bool((got_eos[:, n:] == 0).all())
    first = [int(torch.isin(got_eos[r, 40:], torch.tensor(eos, device=DEV)).nonzero()[0]) for r in range(2)]
    assert all(bool((got_eos[r, 40 + first[r] + 1:] == 0).all()) for r in range(2))  # padded after eos, every row


def _generate(model, ids, am, spec, max_new_tokens, eos_token_id):
    """model.generate's greedy tokens over a kernel cache of ``spec`` (eos None: the generation config's)."""
    try:
        return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
                              past_key_values=make_kernel_cache(model, spec), pad_token_id=0,
                              **({} if eos_token_id is None else {"eos_token_id": eos_token_id}))
    finally:
        disable(model)
