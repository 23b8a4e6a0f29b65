"""The peers runner: byte accounting, the shared worker protocol, inputs, table, peer envs.

The protocol itself runs here on a tiny random Llama, in this environment, through the worker
script exactly as a peer environment would run it (a subprocess fed JSON). Peer venvs (kvpress,
optimum-quanto/HQQ) are not built in CI: tests that need them skip when they are absent.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from kvshrink.peers import compare, envs, worker
from kvshrink.testing import tiny_model

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 32


# --------------------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------------------


def test_tensors_nbytes_counts_each_storage_once_and_normalises_wide_floats():
    a = torch.zeros(3, 5, dtype=torch.float32)
    codes = torch.zeros(7, dtype=torch.uint8)
    half = torch.zeros(4, dtype=torch.float16)
    # HQQ keeps (codes, {"scale": ..., "zero": ..., "shape": ...}); a layer may hold one tensor twice
    obj = {"q": (codes, {"scale": a, "zero": half, "shape": (3, 5), "nbits": 2}), "again": [a], "empty": torch.zeros(0)}
    got = worker.tensors_nbytes(worker.plain_tensors(obj))
    assert got == (15 * 4 + 7 + 4 * 2, 15 * 2 + 7 + 4 * 2)


def test_plain_tensors_walks_layer_objects_but_not_modules():
    class Layer:
        def __init__(self):
            self.keys = torch.ones(2, 3)
            self.values = torch.ones(2, 3, dtype=torch.bfloat16)
            self.model = torch.nn.Linear(100, 100)  # must not be counted as cache storage
            self.fn = len

    got = worker.tensors_nbytes(worker.plain_tensors(Layer()))
    assert got == (6 * 4 + 6 * 2, 6 * 2 + 6 * 2)


def test_cache_bytes_of_dynamic_cache_are_exact(tiny):
    from transformers import DynamicCache

    model = tiny("llama")
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.arange(10)[None], past_key_values=cache)
    raw, b16 = worker.tensors_nbytes(worker.cache_tensors(cache))
    assert raw == 2 * LAYERS * KV_HEADS * HEAD_DIM * 10 * 4
    assert b16 == raw // 2


def test_quanto_packed_tensors_are_flattened_when_quanto_is_installed():
    quanto = pytest.importorskip("optimum.quanto")
    x = torch.randn(1, 2, 64, 32)
    scale, shift = quanto.MaxOptimizer()(x, quanto.qint2, 0, 64)
    q = quanto.quantize_weight(x, quanto.qint2, 0, scale, shift, 64)
    raw, _ = worker.tensors_nbytes(worker.plain_tensors(q))
    # 2-bit codes packed 4 per byte, plus the float scale and shift of every group of 64
    assert raw == x.numel() // 4 + (scale.numel() + shift.numel()) * 4


# --------------------------------------------------------------------------------------------------
# The protocol (in process, then through the worker script)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(path)
    return path


def _job(tiny_dir, methods, chunk=4, passkey=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (48 + 16 + 3,), generator=g).tolist()
    job = {"model_dir": str(tiny_dir), "threads": 1, "chunk": chunk, **compare.build_job_inputs(ids, 48, 16, 3),
           "methods": methods}
    if passkey:
        job["passkey"] = [{"context_ids": ids[:40], "question_ids": ids[40:44], "max_new_tokens": 5}]
    return job


def test_chunked_scoring_matches_token_by_token_for_the_reference(tiny_dir):
    jobs = [_job(tiny_dir, [], chunk=c, passkey=False) | {"decode_ids": []} for c in (1, 5)]
    by_token, chunked = (worker.run_job(j)["results"][0] for j in jobs)
    assert by_token["ppl"] == pytest.approx(chunked["ppl"], rel=1e-5)
    assert by_token["tokens_seen"] == chunked["tokens_seen"] == 48 + 16 - 1
    # without decode steps, the token-by-token scoring loop is the timed decode; chunks are not
    assert by_token["decode_steps"] == 0 and by_token["decode_ms_per_token"] > 0
    assert chunked["decode_ms_per_token"] is None


def test_worker_script_runs_ours_and_an_in_env_peer_through_one_protocol(tiny_dir, tmp_path):
    methods = [
        {"label": "none", "desc": {"engine": "kvshrink", "spec": "none"}},
        {"label": "kivi2", "desc": {"engine": "kvshrink", "spec": "kivi:bits=2,group=16,residual=16"}},
        {"label": "fp8", "desc": {"engine": "hf_quantized", "backend": "fp8"}},
        {"label": "bogus", "desc": {"engine": "kvpress", "press": "NoSuchPress"}},
    ]
    progress = tmp_path / "progress.jsonl"
    answer = compare.run_worker(sys.executable, _job(tiny_dir, methods) | {"progress_path": str(progress)},
                                timeout=300)
    assert "fatal" not in answer, answer
    res = {r["label"]: r for r in answer["results"]}
    # one progress line per run, in order: reference, the 4 methods, the repeated reference
    lines = [json.loads(ln) for ln in progress.read_text().splitlines()]
    assert [ln["label"] for ln in lines] == [r["label"] for r in answer["results"]] + ["reference (repeat)"]
    ref, none, kivi, fp8 = res["reference (DynamicCache)"], res["none"], res["kivi2"], res["fp8"]
    assert answer["versions"]["torch"] == torch.__version__
    # kvshrink's passthrough is bit-exact with DynamicCache: same distributions, bytes and answers
    assert none["ok"] and none["kl_mean"] == 0.0 and none["top1_agree"] == 1.0
    assert none["ppl"] == ref["ppl"] and none["bytes"] == ref["bytes"] == none["own_nbytes"]
    assert none["passkey_answers"] == ref["passkey_answers"] and len(ref["passkey_answers"][0]) == 5
    assert ref["bytes"] == 2 * LAYERS * KV_HEADS * HEAD_DIM * 4 * ref["tokens_seen"]
    # a 2-bit cache holds far fewer bytes, measured the same way as kvshrink's own count, and is lossy
    assert kivi["ok"] and kivi["bytes"] == kivi["own_nbytes"] and kivi["bytes"] < 0.4 * ref["bytes"]
    assert 0 < kivi["kl_mean"] < 5 and math.isfinite(kivi["ppl"])
    # transformers' fp8 QuantizedCache: 1 byte per element (+ residual and scales), a small loss
    assert fp8["ok"] and fp8["bytes"] < 0.5 * ref["bytes"] and 0 < fp8["kl_mean"] < 0.1
    # a method that cannot run is recorded with its error; the others still ran
    assert not res["bogus"]["ok"] and res["bogus"]["error"]
    assert len(answer["reference_decode_ms_per_token"]) == 2
    assert all(r["decode_steps"] == 3 and r["decode_vs_ref"] > 0 for r in res.values() if r["ok"])


def test_worker_main_answers_a_fatal_error_as_json(tmp_path, monkeypatch, capsys):
    import io

    job = {"model_dir": str(tmp_path / "missing"), "context_ids": [1], "score_ids": [1, 2]}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(job)))
    assert worker.main() == 1
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "missing" in answer["fatal"] and answer["versions"]["torch"] == torch.__version__


# --------------------------------------------------------------------------------------------------
# Inputs, summaries, table
# --------------------------------------------------------------------------------------------------


def _encode(text):
    return [ord(c) for c in text]  # a character "tokenizer": lengths and positions are easy to check


def test_passkey_trials_have_exact_length_and_the_needle_at_its_depth():
    filler = list(range(1000, 3000))
    trials = compare.build_passkey_trials(_encode, filler, 600, trials=3, seed=5)
    keys = [t["key"] for t in trials]
    assert len(set(keys)) == 3 and all(len(k) == 5 and k.isdigit() for k in keys)
    prefix = _encode(compare.PASSKEY_PREFIX)
    for t in trials:
        assert len(t["context_ids"]) == 600
        text = "".join(chr(c) for c in t["context_ids"] if c < 1000)
        assert f"The pass key is {t['key']}." in text and text.startswith(compare.PASSKEY_PREFIX)
        needle = _encode(compare.PASSKEY_NEEDLE.format(key=t["key"]))
        start = next(i for i in range(600) if t["context_ids"][i:i + len(needle)] == needle)
        n_fill = 600 - len(prefix) - len(needle)
        assert start == len(prefix) + int(n_fill * t["depth"])
        assert t["question_ids"] == _encode(compare.PASSKEY_QUESTION)
    assert [t["depth"] for t in trials] == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert compare.passkey_success(f" {keys[0]}. Remember", keys[0])
    assert not compare.passkey_success(" 12345", "54321")


def test_job_inputs_split_and_refuse_short_texts():
    parts = compare.build_job_inputs(list(range(20)), 10, 6, 2)
    assert parts["context_ids"] == list(range(10)) and parts["score_ids"] == list(range(10, 16))
    assert parts["decode_ids"] == [16, 17]
    with pytest.raises(ValueError, match="needs 19"):
        compare.build_job_inputs(list(range(18)), 10, 6, 3)


def test_summary_and_table_show_measured_and_failed_rows():
    m = compare.PeerMethod("X(0.5)", "kvpress", {}, "eviction", 0.5, note="zeroes channels")
    res = {"ok": True, "tokens_seen": 100, "ppl": 10.0, "kl_mean": 0.25, "top1_agree": 0.9, "bytes": 400_000,
           "bytes16": 200_000, "decode_ms_per_token": 12.0, "decode_vs_ref": 1.5, "passkey_answers": [[1], [2]]}
    trials = [{"key": "1"}, {"key": "9"}]
    row = compare.summarize(m, res, 4000.0, lambda ids: str(ids[0]), trials)
    assert row.bytes16_per_token == 2000 and row.x_vs_fp16 == 2.0 and row.passkey == "1/2"
    bad = compare.summarize(compare.PeerMethod("Y", "hfquant", {}, "quantization"),
                            {"ok": False, "error": "ImportError: no quanto\ntrace"}, 4000.0, None, [])
    skip = compare.summarize({"label": "zz", "library": "kvshrink", "error": "not available"}, None, 1, None, [])
    table = compare.format_table([row, bad, skip])
    assert "| X(0.5) | kvpress | eviction | 0.5 | 10.000 | 0.2500 | 0.900 | 2,000 | 2.00 |" in table
    assert "- Y (transformers): ImportError: no quanto" in table and "- zz (kvshrink): not available" in table
    assert "- X(0.5): zeroes channels" in table


def test_ours_methods_skip_specs_that_do_not_parse():
    methods, skipped = compare.ours_methods([("none", "reference", 1.0), ("nosuchmethod:bits=2", "quantization", 1.0)])
    assert [m.label for m in methods] == ["none"] and methods[0].desc == {"engine": "kvshrink", "spec": "none"}
    assert skipped[0]["label"] == "nosuchmethod:bits=2" and "not available" in skipped[0]["error"]


def test_pareto_plot_writes_a_png(tmp_path):
    rows = [compare.Row("a", "kvshrink", "quantization", 1.0, True, kl=0.1, bytes16_per_token=5000.0),
            compare.Row("b", "kvpress", "eviction", 0.5, True, kl=0.0, bytes16_per_token=12000.0)]
    compare.pareto_plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Peer environments
# --------------------------------------------------------------------------------------------------


def test_peer_env_refuses_unpinned_torch_and_reports_not_ready(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path))
    env = envs.PeerEnv("dummy", ("somepkg==1.0",))
    assert env.root() == tmp_path / "peers" / "dummy" and not env.ready()
    with pytest.raises(envs.PeerEnvError, match="pinned exactly"):
        env.ensure(torch_pin="torch", log=lambda s: None)
    assert not (tmp_path / "peers" / "dummy").exists()
    for spec in envs.PEER_ENVS.values():  # every peer requirement is pinned to one version
        assert all("==" in r for r in spec.requirements)


def test_kvpress_press_runs_through_the_protocol_when_its_env_exists(tiny_dir):
    env = envs.PEER_ENVS["kvpress"]
    if not env.ready():
        pytest.skip("kvpress peer env not built (python benchmarks/peers.py builds it)")
    methods = [{"label": "snap", "desc": {"engine": "kvpress", "press": "StreamingLLMPress",
                                          "kwargs": {"compression_ratio": 0.5}}}]
    answer = compare.run_worker(env.python(), _job(tiny_dir, methods, passkey=False), timeout=300)
    assert "fatal" not in answer, answer
    res = {r["label"]: r for r in answer["results"]}
    assert answer["versions"]["kvpress"] == "0.5.5"
    ref, snap = res["reference (DynamicCache)"], res["snap"]
    assert snap["ok"], snap.get("error")
    # half the 48-token context evicted at prefill; the 15 scored tokens are appended uncompressed
    per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    assert snap["bytes"] == per_token * (24 + 15) and ref["bytes"] == per_token * (48 + 15)
    assert snap["kl_mean"] > 0


# --------------------------------------------------------------------------------------------------
# Speed task (decode speed and memory at long context; run on the GPU by benchmarks/peers_gpu.py)
# --------------------------------------------------------------------------------------------------

TINY_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def test_speed_task_measures_every_method_per_setting_and_records_failures(monkeypatch):
    import kvshrink.kernels

    reserves = []
    real = kvshrink.kernels.make_kernel_cache
    monkeypatch.setattr(kvshrink.kernels, "make_kernel_cache",
                        lambda model, spec, reserve=None: reserves.append(reserve) or real(model, spec, reserve=reserve))
    job = {"task": "speed", "model_config": TINY_CONFIG, "dtype": "float32", "device": "cpu",
           "settings": [[1, 96], [2, 40]], "steps": 3, "warmup": 1, "seed": 0, "warm_context": 16,
           "methods": [{"label": "kivi2", "desc": {"engine": "kvshrink", "spec": "kivi:bits=2,group=16,residual=16"}},
                       {"label": "snap", "desc": {"engine": "kvshrink", "spec": "snapkv:budget=0.5"}},
                       {"label": "kivi2k", "desc": {"engine": "kvshrink", "spec": "kivi:bits=2,group=16,residual=16",
                                                    "kernels": True, "reserve": "auto"}},
                       {"label": "bogus", "desc": {"engine": "kvshrink", "spec": "nosuchmethod"}}]}
    answer = worker.run_speed_job(job)
    rows = {(r["label"], r["batch"], r["context"]): r for r in answer["results"]}
    for b, t in job["settings"]:
        ref, kivi, snap = (rows[(k, b, t)] for k in ("reference (DynamicCache)", "kivi2", "snap"))
        assert ref["ok"] and kivi["ok"] and snap["ok"]
        seen = t + 1 + 3
        # the uncompressed cache holds exactly K and V of every token seen: 2 layers x 2 heads x 16 x fp32
        assert ref["bytes"] == b * seen * 2 * 2 * 2 * 16 * 4
        assert ref["bytes_per_token"] == ref["bytes"] / (b * seen)
        assert kivi["bytes"] < ref["bytes"] / 2 and snap["bytes"] < ref["bytes"]
        assert kivi["decode_ms_per_step"] > 0 and kivi["decode_tokens_per_s"] > 0
        assert kivi["decode_speedup_vs_ref"] > 0
        # kernel layers (CPU: their torch reference path) hold the same bytes as the plain layers
        assert rows[("kivi2k", b, t)]["ok"] and rows[("kivi2k", b, t)]["bytes"] == kivi["bytes"]
        bogus = rows[("bogus", b, t)]
        assert not bogus["ok"] and "nosuchmethod" in bogus["error"]
    # reserve="auto": every run (the untimed warm-up over 16 tokens, then the timed one) sizes its own buffers
    assert reserves == [16 + 1 + 2 + 2, 96 + 1 + 3 + 2, 16 + 1 + 2 + 2, 40 + 1 + 3 + 2]
    # the repeat of the reference is folded into one row of both timings per setting
    assert sum(r["label"] == "reference decode ms (both runs)" for r in answer["results"]) == 2


def test_peer_env_inherits_this_interpreters_packages(tmp_path):
    """--torch-pin inherit: a peer venv sees this interpreter's torch (a GPU host's CUDA build) through a
    .pth placed after its own site-packages, so packages installed into the venv still win."""
    import subprocess
    import venv

    venv.EnvBuilder(with_pip=False).create(tmp_path / "v")
    py = str(tmp_path / "v" / "bin" / "python")
    envs._inherit_site(py)
    out = subprocess.run([py, "-c", "import sys, torch; print(torch.__version__); print(sys.path.index("
                          "[p for p in sys.path if p.endswith('site-packages') and 'v/lib' in p][0]))"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    version, own_index = out.stdout.split()
    assert version == torch.__version__
    inherited = subprocess.run([py, "-c", "import sys; print(sys.path)"], capture_output=True, text=True).stdout
    assert inherited.index("v/lib") < inherited.index(envs._site_dirs()[0])  # the venv's own packages first


def test_peer_env_wheelhouse_needs_the_peers_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path / "cache"))
    env = envs.PeerEnv("dummy", ("somepkg==1.0",))
    with pytest.raises(envs.PeerEnvError, match="no wheels for the dummy peer"):
        env.wheels(tmp_path)
    (tmp_path / "dummy").mkdir()
    (tmp_path / "dummy" / "b-1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "dummy" / "a-1.0-py3-none-any.whl").write_bytes(b"")
    assert [w.name for w in env.wheels(tmp_path)] == ["a-1.0-py3-none-any.whl", "b-1.0-py3-none-any.whl"]
    assert env.wheels(None) == []
    assert not env.ready(envs.INHERIT, tmp_path / "elsewhere")  # no wheel folder: not ready, no exception
    with pytest.raises(envs.PeerEnvError, match="needs --torch-pin inherit"):
        env.ensure("torch==2.13.0", log=lambda s: None, wheelhouse=tmp_path)
