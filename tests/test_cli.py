"""The kvshrink CLI: info, generate, and clear errors."""
import json

import pytest

from kvshrink.cli import main
from kvshrink.testing import save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), "llama")


def test_tiny_tokenizer_roundtrip():
    tok = tiny_tokenizer()
    text = "Hello, KV cache!\n"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_info_json_lists_methods_and_parameters(capsys):
    assert main(["info", "--json"]) == 0
    infos = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"none", "kivi", "int8", "int4"} <= set(infos)
    assert infos["kivi"]["params"]["bits"]["default"] == 2
    assert infos["kivi"]["params"]["residual"]["default"] == 128
    assert "KIVI" in infos["kivi"]["paper"]


def test_info_text(capsys):
    assert main(["info", "kivi"]) == 0
    out = capsys.readouterr().out
    assert "kivi" in out and "group=32" in out


def test_generate_prints_text_and_bytes(model_dir, capsys):
    rc = main(["generate", "--model", model_dir, "--method", "none", "--method", "kivi:bits=2,group=16,residual=16",
               "--max-new-tokens", "20", "Once upon a time there was a cache that"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("KV bytes held") == 2
    assert "Once upon a time" in out
    ratios = [float(line.split("(")[1].split("x")[0]) for line in out.splitlines() if "KV bytes held" in line]
    assert ratios[1] < ratios[0]


def test_bad_method_is_a_clear_error_before_loading(capsys):
    rc = main(["generate", "--model", "/nonexistent", "--method", "kivi:bits=7", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "bits=7 is not supported" in err


def test_kernels_on_without_a_gpu_is_a_clear_error_before_loading(capsys):
    rc = main(["generate", "--model", "/nonexistent", "--device", "cpu", "--kernels", "on", "hi"])
    assert rc == 2 and "--kernels on needs a CUDA device" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    rc = main(["generate", "--model", "some-org/some-hub-model", "hi"])
    assert rc == 2
    assert "local" in capsys.readouterr().err
