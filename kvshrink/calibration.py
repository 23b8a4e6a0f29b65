"""Calibration files: tensors in safetensors, facts about them in JSON. Never pickle.

A calibration file ``NAME.safetensors`` holds the tensors a method calibrated (e.g. RotateKV's per-layer
channel orders) and, in its safetensors header metadata under the key ``"kvshrink"``, a JSON object:

``format``          ``"kvshrink-calibration"``, ``format_version`` (1)
``method``          the method's name (``"rotatekv"``)
``params``          the method parameters the tensors depend on (a file made with other values is refused)
``model``           :meth:`kvshrink.model_info.ModelInfo.identity` of the model it was made on
``shape``           per-tensor shapes, for a readable summary
``text_sha256``     sha256 of the calibration text (UTF-8), or of the token ids for built-in calibration
``tokens``          number of tokens used
``kvshrink_version`` and ``created`` (UTC, ISO 8601)

The same JSON is written beside it as ``NAME.safetensors.json`` for people and tools to read; the
loader reads the header, so the sidecar is informative only.

A file used on a model or with parameters other than its own raises
:class:`kvshrink.errors.CalibrationMismatchError` naming each difference and the fix.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationMismatchError, KVShrinkError

FORMAT = "kvshrink-calibration"
FORMAT_VERSION = 1
_META_KEY = "kvshrink"

#: ModelInfo.identity() keys that must agree for a file to be usable (geometry and model type).
GEOMETRY_KEYS = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def text_sha256(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def tokens_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def make_metadata(method: str, params: dict[str, Any], identity: dict[str, Any], tensors: dict[str, torch.Tensor],
                  text_sha256: str, tokens: int) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "params": params,
        "model": identity,
        "shape": {k: list(v.shape) for k, v in tensors.items()},
        "text_sha256": text_sha256,
        "tokens": int(tokens),
        "kvshrink_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_calibration(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` + ``meta`` to ``path`` (safetensors) and ``path.json``; return the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise KVShrinkError(f"calibration files are safetensors: give a path ending in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)  # a reader never sees a half-written file
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_calibration(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a calibration file: ``(tensors, meta)``. Raises KVShrinkError on a missing/foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise KVShrinkError(f"calibration file not found: {path}; make one with `kvshrink calibrate --model M "
                            f"--method rotatekv --text FILE --out {path.name}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # not a safetensors file at all
        raise KVShrinkError(f"{path} is not a readable safetensors calibration file: {exc}") from exc
    try:
        meta = json.loads(header[_META_KEY])
    except (KeyError, ValueError):
        raise KVShrinkError(f"{path} has no kvshrink calibration metadata; it was not written by `kvshrink calibrate`")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise KVShrinkError(f"{path}: unsupported calibration format {meta.get('format')!r} "
                            f"version {meta.get('format_version')!r}; recalibrate with this kvshrink")
    return tensors, meta


def _short_name(name: Any) -> str:
    return str(name or "").rstrip("/\\").replace("\\", "/").split("/")[-1]


def check_calibration(meta: dict[str, Any], path: str | os.PathLike[str], method: str, params: dict[str, Any],
                      identity: dict[str, Any]) -> None:
    """Raise CalibrationMismatchError unless the file's method, parameters and model agree with ours."""
    problems = []
    if meta.get("method") != method:
        problems.append(f"it was made for method {meta.get('method')!r}, not {method!r}")
    file_model = meta.get("model", {})
    for key in GEOMETRY_KEYS:
        if file_model.get(key) != identity.get(key):
            problems.append(f"{key}: file {file_model.get(key)!r}, this model {identity.get(key)!r}")
    # names are often local paths (cache dirs differ between machines): compare their last component
    f_name, m_name = _short_name(file_model.get("name")), _short_name(identity.get("name"))
    if f_name and m_name and f_name != m_name:
        problems.append(f"model name: file {file_model['name']!r}, this model {identity['name']!r}")
    file_params = meta.get("params", {})
    for key, value in params.items():
        if file_params.get(key) != value:
            problems.append(f"parameter {key}: file {file_params.get(key)!r}, requested {value!r}")
    if problems:
        raise CalibrationMismatchError(
            f"calibration file {path} does not fit: " + "; ".join(problems)
            + ". Recalibrate for this model and these parameters with `kvshrink calibrate`, or drop calib= "
            "to use the quick built-in calibration"
        )


__all__ = ["FORMAT", "FORMAT_VERSION", "GEOMETRY_KEYS", "text_sha256", "tokens_sha256", "make_metadata",
           "save_calibration", "load_calibration", "check_calibration"]
