"""Calibration files (kvshrink.calibration) and `kvshrink calibrate`, on tiny random models."""
import json
import warnings

import pytest
import torch

from kvshrink import __version__, make_cache, model_info
from kvshrink.calibration import (check_calibration, load_calibration, make_metadata, save_calibration,
                                  text_sha256)
from kvshrink.errors import CalibrationMismatchError, KVShrinkError
from kvshrink.methods.rotatekv import RotateKV, calibrate


def _write(tmp_path, model, method=None, name="cal.safetensors", tokens=48):
    method = method or RotateKV()
    info = model_info(model)
    ids = torch.randint(3, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    tensors = calibrate(model, method, ids)
    meta = make_metadata("rotatekv", method.calib_params(info), info.identity(), tensors, text_sha256("abc"), tokens)
    return save_calibration(tmp_path / name, tensors, meta), tensors


def test_round_trip_and_use(tmp_path, tiny):
    model = tiny("llama")
    path, tensors = _write(tmp_path, model)
    loaded, meta = load_calibration(path)
    assert set(loaded) == set(tensors)
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])
    assert meta["kvshrink_version"] == __version__
    assert meta["model"] == model_info(model).identity()
    assert meta["text_sha256"] == text_sha256("abc") and meta["tokens"] == 48
    assert meta["shape"]["layer.0.perm"] == [2 * 32]
    assert json.loads((tmp_path / "cal.safetensors.json").read_text()) == meta
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file means no built-in calibration (and no warning)
        cache = make_cache(model, f"rotatekv:key_axis=channel,calib={path}")
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.perm, tensors[f"layer.{i}.perm"])
    # the order sorts channels by their calibrated mean, as the authors' script does
    mean = tensors["layer.0.mean"]
    assert torch.all(mean[tensors["layer.0.perm"]].diff() >= 0)
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 12)), past_key_values=cache)
    assert cache.layers[0].kq is not None
    # KIVI's key layout (key_axis=token) quantizes each channel alone: the order is not used there
    assert make_cache(model, f"rotatekv:key_axis=token,calib={path}").layers[0].perm is None


def test_file_for_another_model_or_shape_is_refused(tmp_path, tiny):
    path, _ = _write(tmp_path, tiny("llama"))
    with pytest.raises(CalibrationMismatchError, match="head_dim: file 32, this model 16"):
        make_cache(tiny("llama", heads=8, kv_heads=2, head_dim=16), f"rotatekv:calib={path}")
    with pytest.raises(CalibrationMismatchError, match="model_type"):
        make_cache(tiny("qwen2"), f"rotatekv:calib={path}")
    with pytest.raises(CalibrationMismatchError, match="parameter prerope"):
        make_cache(tiny("llama"), f"rotatekv:calib={path},prerope=false")


def test_name_and_method_mismatch_messages(tmp_path, tiny):
    info = model_info(tiny("llama"))
    meta = make_metadata("rotatekv", {"head_group": 2}, {**info.identity(), "name": "other/model"}, {}, "x", 1)
    with pytest.raises(CalibrationMismatchError, match="model name.*other/model"):
        check_calibration(meta, "f", "rotatekv", {"head_group": 2}, {**info.identity(), "name": "mine"})
    # the same model under another local directory (cache dirs differ between machines) is accepted
    same = make_metadata("rotatekv", {"head_group": 2}, {**info.identity(), "name": "/home/a/models/default"}, {},
                         "x", 1)
    check_calibration(same, "f", "rotatekv", {"head_group": 2}, {**info.identity(), "name": "/root/cache/default"})
    with pytest.raises(CalibrationMismatchError, match="made for method 'rotatekv', not 'kvquant'"):
        check_calibration(meta, "f", "kvquant", {}, info.identity())


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(KVShrinkError, match="not found.*kvshrink calibrate"):
        load_calibration(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(KVShrinkError, match="not a readable safetensors"):
        load_calibration(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(KVShrinkError, match="no kvshrink calibration metadata"):
        load_calibration(foreign)
    with pytest.raises(KVShrinkError, match=".safetensors"):
        save_calibration(tmp_path / "x.pt", {}, {})


def test_cli_calibrate_writes_a_usable_file(tmp_path):
    from kvshrink.cli import main
    from kvshrink.models import load_model
    from kvshrink.testing import save_tiny

    model_dir = save_tiny(tmp_path / "m", "llama", layers=2)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    out = tmp_path / "cal.safetensors"
    assert main(["calibrate", "--model", model_dir, "--method", "rotatekv", "--text", str(text),
                 "--tokens", "64", "--out", str(out)]) == 0
    tensors, meta = load_calibration(out)
    assert meta["tokens"] == 64 and meta["text_sha256"] == text_sha256(text.read_text())
    assert meta["params"]["prerope"] is True
    model, _ = load_model(model_dir)
    cache = make_cache(model, f"rotatekv:key_axis=channel,calib={out}")
    assert torch.equal(cache.layers[1].perm, tensors["layer.1.perm"])
    # a mismatching method spec fails cleanly (exit code 2, no traceback)
    assert main(["calibrate", "--model", model_dir, "--method", "kivi", "--text", str(text), "--out", str(out)]) == 2


def test_calibrate_cli_serves_every_method_that_takes_a_file(tmp_path, capsys):
    from kvshrink.cli import main
    from kvshrink.testing import save_tiny

    model_dir = save_tiny(tmp_path / "tiny", "llama")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "kvq.safetensors"
    assert main(["calibrate", "--model", model_dir, "--method", "kvquant:bits=2", "--text", str(text),
                 "--tokens", "64", "--out", str(out)]) == 0
    loaded, meta = load_calibration(out)
    assert meta["method"] == "kvquant" and meta["params"]["bits"] == 2 and loaded
    assert main(["calibrate", "--model", model_dir, "--method", "kivi", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "methods that take a calibration file: kvquant, rotatekv" in capsys.readouterr().err
