"""Tests of the evaluation harness (kvshrink.eval) and `kvshrink eval`, on tiny random models."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.errors import KVShrinkError
from kvshrink.eval import passkey as pk
from kvshrink.eval.fidelity import Accumulator, kl_divergence, token_nll, top1_agreement
from kvshrink.eval.memory import verify
from kvshrink.eval.ppl import chunk_bounds, first_scored_position, run_window, split_windows
from kvshrink.eval.report import REQUIRED_FIELDS, markdown_table
from kvshrink.eval.runner import EvalConfig, eval_ppl

LOSSY = "kivi:bits=2,group=8,residual=8"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two busy-waiting
    threads run these tests several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _byte_tokenizer():
    """A byte-level tokenizer whose 256 ids fit the tiny models' vocabulary (no merges, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[2])


def _prose(n: int = 60) -> str:
    rng = random.Random(1)
    words = ["river", "paper", "library", "archive", "reader", "scholar", "index", "volume", "copy", "text"]
    return " ".join(f"The {rng.choice(words)} number {i} was {rng.choice(words)}s and {rng.choice(words)}s."
                    for i in range(n))


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (1, n), generator=g)


def _collect(model, ids, spec, **kw):
    """All scored logits of one window, concatenated, plus the window result."""
    got = []

    def on_logits(pos, logits):
        got.append((pos, logits.clone()))

    res = run_window(model, ids, spec, on_logits, **kw)
    positions = [p + i for p, l in got for i in range(l.shape[0])]
    return torch.cat([l for _, l in got]), positions, res


# -- metrics -------------------------------------------------------------------------------------

def test_kl_of_identical_is_zero_and_top1_is_one():
    logits = torch.randn(7, 50)
    logp = torch.log_softmax(logits, -1)
    assert torch.all(kl_divergence(logp, logp) == 0)
    assert top1_agreement(logits, logits).all()


def test_kl_matches_hand_computation_and_top1_counts_disagreements():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]])
    q = torch.tensor([[0.4, 0.3, 0.3], [0.1, 0.8, 0.1]])
    kl = kl_divergence(p.log(), q.log())
    want0 = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.3)  # the zero-probability token adds nothing
    want1 = 0.9 * math.log(9) + 0.05 * math.log(0.05 / 0.8) + 0.05 * math.log(0.5)
    assert kl.tolist() == pytest.approx([want0, want1], rel=1e-5)
    assert top1_agreement(p, q).tolist() == [True, False]  # argmax ties resolve to the first index


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(0, 10_000))
def test_kl_is_nonnegative_and_zero_only_for_equal(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.log_softmax(torch.randn(3, vocab, generator=g), -1)
    b = torch.log_softmax(torch.randn(3, vocab, generator=g), -1)
    kl = kl_divergence(a, b)
    assert torch.all(kl > 0)
    assert torch.all(kl_divergence(a, a) == 0)


def test_accumulator_perplexity_and_token_nll():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    nll = token_nll(logp, torch.tensor([0, 2]))
    acc = Accumulator()
    acc.add(nll, torch.tensor([0.1, 0.3]), torch.tensor([True, False]))
    assert acc.ppl == pytest.approx(math.exp((math.log(2) - math.log(0.8)) / 2))
    assert acc.kl == pytest.approx(0.2) and acc.kl_max == pytest.approx(0.3) and acc.top1 == 0.5


def test_windows_and_chunk_bounds():
    ids = _ids(100)
    ws = split_windows(ids, 32, 100)
    assert [w.shape[1] for w in ws] == [32, 32, 32] and torch.equal(ws[1], ids[:, 32:64])
    assert split_windows(ids, 200, 50)[0].shape[1] == 50
    assert chunk_bounds(10, 4, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(5, 0, 2) == [(0, 2), (2, 4), (4, 5)]
    assert first_scored_position(0) == 0 and first_scored_position(16) == 15


# -- perplexity with the cache in the loop ---------------------------------------------------------

@pytest.mark.parametrize("mode,chunk", [("chunked", 8), ("decode", 1), ("simulated", 1)])
def test_none_perplexity_equals_model_loss(tiny, mode, chunk):
    model = tiny("llama")
    ids = _ids(48)
    prompt = 16
    cfg = EvalConfig(methods=["none"], window=48, max_tokens=48, prompt_tokens=prompt, chunk_size=chunk, mode=mode,
                     progress=False)
    res = eval_ppl(model, ids, ["none"], cfg)["none"]
    with torch.no_grad():
        logits = model(ids).logits[0]
    # the model's own loss on the same targets: tokens prompt..47 predicted from positions prompt-1..46
    loss = torch.nn.functional.cross_entropy(logits[prompt - 1:-1], ids[0, prompt:])
    assert res["ppl_tokens"] == 48 - prompt
    assert res["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


@pytest.mark.parametrize("spec", ["none", LOSSY])
def test_chunked_equals_decode_at_chunk_size_one(tiny, spec):
    model = tiny("llama")
    ids = _ids(40, seed=3)
    dec, dpos, dres = _collect(model, ids, spec, mode="decode", prompt_tokens=8)
    chk, cpos, cres = _collect(model, ids, spec, mode="chunked", chunk_size=1, prompt_tokens=8)
    assert dpos == cpos == list(range(7, 39))
    torch.testing.assert_close(chk, dec, rtol=1e-5, atol=1e-5)
    assert dres.nbytes == cres.nbytes and dres.seq_length == cres.seq_length == 39


def test_lossy_method_changes_logits_and_chunk_size_matters(tiny):
    """The harness really puts the compressed past in the loop: kivi's logits differ from none's, and
    larger chunks (more of the context attended in full precision) move them closer to none's."""
    model = tiny("llama")
    ids = _ids(40, seed=4)
    ref, _, _ = _collect(model, ids, "none", mode="decode", prompt_tokens=8)
    lossy1, _, _ = _collect(model, ids, LOSSY, mode="decode", prompt_tokens=8)
    lossy16, _, _ = _collect(model, ids, LOSSY, mode="chunked", chunk_size=16, prompt_tokens=8)
    sim, _, _ = _collect(model, ids, LOSSY, mode="simulated", prompt_tokens=8)
    none16, _, _ = _collect(model, ids, "none", mode="chunked", chunk_size=16, prompt_tokens=8)
    torch.testing.assert_close(none16, ref, rtol=1e-4, atol=1e-4)
    err1, err16 = (lossy1 - ref).abs().max(), (lossy16 - ref).abs().max()
    assert err1 > 1e-3 and (sim - ref).abs().max() > 1e-3
    assert not torch.allclose(lossy16, lossy1)
    assert (lossy16 - ref).abs().mean() < (lossy1 - ref).abs().mean()


def test_eval_ppl_reports_kl_top1_and_bytes(tiny):
    model = tiny("llama")
    ids = _ids(96, seed=5)
    cfg = EvalConfig(window=48, max_tokens=96, prompt_tokens=8, chunk_size=8, progress=False)
    res = eval_ppl(model, ids, ["none", "int8", LOSSY], cfg)
    assert res["none"]["kl"] == 0 and res["none"]["top1"] == 1
    assert 0 < res["int8"]["kl"] < res[LOSSY]["kl"]
    assert res[LOSSY]["top1"] <= 1 and res["int8"]["ppl_tokens"] == 2 * 40
    assert res["int8"]["ppl_bytes_per_token"] < res["none"]["ppl_bytes_per_token"]


def test_verify_fails_loudly():
    verify("int8", seen=10, fed=10, nbytes=5, ref_nbytes=10, tokens_held=[10], where="t")
    verify("none", seen=10, fed=10, nbytes=10, ref_nbytes=10, tokens_held=[10], where="t")
    with pytest.raises(KVShrinkError, match="compression did not apply"):
        verify("int8", seen=10, fed=10, nbytes=10, ref_nbytes=10, tokens_held=[10], where="t")
    with pytest.raises(KVShrinkError, match="did not run through the compressed cache"):
        verify("int8", seen=0, fed=10, nbytes=0, ref_nbytes=10, tokens_held=[0], where="t")
    with pytest.raises(KVShrinkError, match="more tokens"):
        verify("int8", seen=10, fed=10, nbytes=1, ref_nbytes=10, tokens_held=[11], where="t")


# -- passkey / needle ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", pk.KINDS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_is_placed_where_the_sample_says(kind, depth):
    tok = _byte_tokenizer()
    hay = pk.Haystack(tok, _prose())
    s = pk.make_sample(tok, hay, kind, 600, depth, random.Random(7))
    assert s.length == len(s.input_ids) == 600
    needle = tok.decode(s.input_ids[s.needle_start:s.needle_start + s.needle_len])
    if kind == "passkey":
        assert needle == pk.TEMPLATES[kind].needle.format(key=s.key)
    else:
        assert needle.startswith(" One of the special magic numbers for ") and needle.endswith(f" is: {s.key}.")
    assert len(s.key) == pk.TEMPLATES[kind].digits
    # the key occurs in the whole prompt exactly where the needle is
    text = tok.decode(s.input_ids)
    before = tok.decode(s.input_ids[:s.needle_start])
    assert text.find(s.key) == len(before) + needle.find(s.key)
    # at a sentence boundary, and near the requested depth (within one sentence of this prose)
    hay_len = s.hay_end - s.hay_start - s.needle_len
    assert s.actual_depth == (s.needle_start - s.hay_start) / hay_len
    assert abs(s.actual_depth - depth) <= 70 / hay_len
    if 0 < s.actual_depth < 1:
        assert before.rstrip().endswith(".")


def test_samples_are_deterministic_for_a_seed_and_scored_by_first_number():
    tok = _byte_tokenizer()
    hay = pk.Haystack(tok, _prose())
    a = pk.build_grid(tok, hay, "passkey", [400, 500], [0.0, 1.0], 2, seed=3)
    b = pk.build_grid(tok, hay, "passkey", [400, 500], [0.0, 1.0], 2, seed=3)
    c = pk.build_grid(tok, hay, "passkey", [400, 500], [0.0, 1.0], 2, seed=4)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.key for s in a] != [s.key for s in c]
    answers = [f" {s.key}. It is" if i % 2 == 0 else " 1234" for i, s in enumerate(a)]
    sc = pk.score(a, answers)
    assert sc["acc"] == 0.5 and sc["grid"] == {"400": {"0": 0.5, "1": 0.5}, "500": {"0": 0.5, "1": 0.5}}
    assert pk.first_number("is 0123.") == "0123" and pk.first_number("none") is None


# -- report and CLI --------------------------------------------------------------------------------

def test_markdown_table_drops_tasks_not_run():
    rows = [{"method": "none", "ppl": 10.0, "delta_ppl": 0.0, "kl": None},
            {"method": "int8", "ppl": 10.5, "delta_ppl": 0.5, "kl": None}]
    table = markdown_table(rows)
    assert "| `int8` | 10.500 | +0.500 |" in table and "KL" not in table


def test_cli_flags_override_preset_and_methods_file(tmp_path):
    from kvshrink.cli import build_parser
    from kvshrink.commands.eval import build_config

    parser = build_parser()
    cfg, name = build_config(parser.parse_args(["eval", "--chunk-size", "4"]))
    assert name == "demo" and cfg.chunk_size == 4 and "kivi:bits=2" in cfg.methods
    assert parser.parse_args(["eval"]).out.name == "results" and parser.parse_args(["eval", "--no-out"]).out is None
    f = tmp_path / "specs.txt"
    f.write_text("# ablations\nkivi:bits=2,group=16\n\nint4  # baseline\n")
    cfg, name = build_config(parser.parse_args(["eval", "--methods", "int8", "--methods-file", str(f), "--tasks", "ppl"]))
    assert name is None and cfg.methods == ["int8", "kivi:bits=2,group=16", "int4"] and cfg.tasks == ["ppl"]
    assert cfg.ordered_methods() == ["none", "int8", "kivi:bits=2,group=16", "int4"]
    with pytest.raises(KVShrinkError, match="unknown task"):
        EvalConfig(tasks=["ppl", "bleu"]).check()
    assert build_config(parser.parse_args(["eval", "--kernels", "off"]))[0].kernels == "off"
    with pytest.raises(KVShrinkError, match="unknown --kernels"):
        EvalConfig(kernels="maybe").check()


def test_kernels_resolve_per_device():
    """auto: the GPU kernels on CUDA only; on: an error that says what is missing where they cannot run; off: never."""
    from kvshrink.eval.runner import use_kernels

    cpu = torch.device("cpu")
    assert use_kernels(EvalConfig(kernels="auto"), cpu) is False
    assert use_kernels(EvalConfig(kernels="off"), cpu) is False
    with pytest.raises(KVShrinkError, match="--kernels on needs a CUDA device"):
        use_kernels(EvalConfig(kernels="on"), cpu)


def test_cli_smoke_on_tiny_model(tmp_path, capsys):
    from kvshrink.cli import main
    from kvshrink.testing import tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    _byte_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "prose.txt"
    text.write_text(_prose(80))
    out = tmp_path / "out"
    torch.set_num_threads(3)  # restored to 1 by the module fixture
    rc = main(["eval", "--model", str(model_dir), "--text", str(text), "--haystack", str(text),
               "--methods", "int8", "kivi:bits=2,group=32,residual=32", "--tasks", "ppl,kl,passkey,memory,speed",
               "--max-tokens", "160", "--window", "80", "--prompt-tokens", "16", "--chunk-size", "16",
               "--passkey-lengths", "260", "--passkey-depths", "0,1", "--speed-tokens", "64", "--decode-tokens", "3",
               "--prefill-chunk", "64", "--threads", "1", "--out", str(out), "--no-progress"])
    assert rc == 0 and torch.get_num_threads() == 3  # --threads applies to the run only
    torch.set_num_threads(1)
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["none", "int8", "kivi:bits=2,group=32,residual=32"]
    for r in rows:
        assert set(REQUIRED_FIELDS) <= set(r)
        for k in REQUIRED_FIELDS[1:]:
            assert isinstance(r[k], (int, float)), (r["method"], k)
        assert r["passkey_grid"] == {"260": {"0": r["passkey_grid"]["260"]["0"], "1": r["passkey_grid"]["260"]["1"]}}
        assert r["ppl_tokens"] == 2 * (80 - 16) and r["mode"] == "decode" and r["seed"] == 0
        assert r["kernels"] == "auto" and r["kernels_used"] is torch.cuda.is_available()  # auto: kernels on CUDA
    none, int8, kivi = rows
    assert none["delta_ppl"] == 0 and none["kl"] == 0 and none["decode_tok_s_ratio"] == 1
    assert int8["bytes_per_token"] < none["bytes_per_token"] and kivi["kl"] > 0
    assert none["fp16_bytes_per_token"] == int8["fp16_bytes_per_token"]
    # fp32 model: the uncompressed cache holds twice a 16-bit cache's bytes
    assert none["bytes_per_token"] == 2 * none["fp16_bytes_per_token"]
    assert (out / "results.csv").read_text().splitlines()[0].startswith("method,")
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "passkey_int8.png").is_file()
    assert "| `int8` |" in capsys.readouterr().out


def test_cli_rejects_bad_spec_before_loading(capsys):
    from kvshrink.cli import main

    assert main(["eval", "--model", "/nonexistent", "--methods", "kivi:bits=5"]) == 2
    assert "kivi" in capsys.readouterr().err
