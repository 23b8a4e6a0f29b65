"""Virtual environments for peers, so that a peer's pins never hold back kvshrink's dependencies.

kvpress 0.5.5 requires ``transformers<5.3`` (and reads ``cache_position`` from hook kwargs, which
newer transformers no longer pass), while kvshrink follows the current transformers. Each peer
therefore gets a virtual environment of its own under ``<kvshrink cache>/peers/<name>/venv``,
created on first use and reused afterwards. Only token ids, text and numbers cross between
environments (see :mod:`kvshrink.peers.worker`).

Install order matters: torch is installed first, pinned (``torch==2.13.0`` by default: the CPU
wheel this project uses; an unpinned torch would pull a multi-GB CUDA build), then the peer's
packages, each pinned, with torch already satisfied.

On a host without a package index (the lent GPU machine) two options work together:
``torch_pin="inherit"`` gives the venv the running interpreter's packages (its CUDA torch, Triton,
numpy, ...) through a ``.pth`` file placed after the venv's own site-packages, so the peer's pins
(installed into the venv) shadow the host's versions and nothing else is installed; ``wheelhouse``
names a folder whose ``<peer name>/`` subfolder holds every wheel the peer needs beyond what the
host has (made with ``pip download``; see docs/PEERS.md), installed with ``--no-index --no-deps``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KVShrinkError

__all__ = ["DEFAULT_TORCH_PIN", "INHERIT", "PEER_ENVS", "PeerEnv", "PeerEnvError", "peers_dir"]

#: torch pin installed first in every peer venv. Override with ``--torch-pin`` (e.g. on a GPU host).
DEFAULT_TORCH_PIN = "torch==2.13.0"
#: ``torch_pin`` value that reuses the running interpreter's packages instead of installing torch.
INHERIT = "inherit"


class PeerEnvError(KVShrinkError):
    """A peer environment could not be created; the message holds the failing command's output."""


def peers_dir() -> Path:
    """``<kvshrink cache>/peers`` (``$KVSHRINK_CACHE`` or ``~/.cache/kvshrink``)."""
    try:
        from ..assets import cache_dir
    except ImportError:  # assets.py is another module's; fall back to its documented default
        base = Path(os.environ.get("KVSHRINK_CACHE", Path.home() / ".cache" / "kvshrink")).expanduser()
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = cache_dir()
    path = base / "peers"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class PeerEnv:
    """A pinned environment for one peer: its name, pinned requirements, and install-time env vars."""

    name: str
    requirements: tuple[str, ...]
    install_env: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def root(self) -> Path:
        return peers_dir() / self.name

    def python(self) -> Path:
        bindir = "Scripts" if os.name == "nt" else "bin"
        return self.root() / "venv" / bindir / ("python.exe" if os.name == "nt" else "python")

    def _marker(self) -> Path:
        return self.root() / "installed.json"

    def wheels(self, wheelhouse: Path | None) -> list[Path]:
        """The wheels ``wheelhouse/<name>/`` holds for this peer (sorted), or [] without a wheelhouse."""
        if wheelhouse is None:
            return []
        folder = Path(wheelhouse) / self.name
        found = sorted(folder.glob("*.whl"))
        if not found:
            raise PeerEnvError(f"no wheels for the {self.name} peer in {folder}: download them with "
                               f"`pip download --no-deps -d {folder} ...` (docs/PEERS.md lists them)")
        return found

    def _wanted(self, torch_pin: str, wheelhouse: Path | None = None) -> dict[str, object]:
        want: dict[str, object] = {"torch": torch_pin, "requirements": list(self.requirements),
                                   "python": sys.version.split()[0]}
        if torch_pin == INHERIT:
            want["inherits"] = _site_dirs()
        if wheelhouse is not None:
            want["wheels"] = [w.name for w in self.wheels(wheelhouse)]
        return want

    def ready(self, torch_pin: str = DEFAULT_TORCH_PIN, wheelhouse: Path | None = None) -> bool:
        """Whether the venv exists and was completely installed with exactly these pins."""
        try:
            recorded = json.loads(self._marker().read_text(encoding="utf-8"))
            wanted = self._wanted(torch_pin, wheelhouse)
        except (OSError, ValueError, PeerEnvError):  # no marker, a bad one, or no wheels for this peer
            return False
        return recorded == wanted and self.python().is_file()

    def ensure(self, torch_pin: str = DEFAULT_TORCH_PIN, log=print, wheelhouse: Path | None = None) -> Path:
        """Create (or reuse) the venv; return its python. Raises :class:`PeerEnvError` on failure.

        ``torch_pin="inherit"``: reuse this interpreter's packages (see the module docstring);
        ``wheelhouse``: install ``wheelhouse/<name>/*.whl`` offline instead of the pins from PyPI.
        The marker ``installed.json`` is written only after every install succeeded, so an
        interrupted install is redone from scratch on the next call.
        """
        if wheelhouse is not None and torch_pin != INHERIT:
            raise PeerEnvError(
                f"a wheelhouse installs only the peer's own wheels, offline: it needs --torch-pin {INHERIT} (the "
                f"venv reuses this interpreter's torch); got {torch_pin!r}")
        if self.ready(torch_pin, wheelhouse):
            return self.python()
        if torch_pin != INHERIT and not torch_pin.startswith("torch=="):
            raise PeerEnvError(
                f"torch must be pinned exactly (got {torch_pin!r}): an unpinned torch pulls a multi-GB "
                f"CUDA build. Pass e.g. --torch-pin torch==2.13.0, or --torch-pin {INHERIT} to reuse this "
                "interpreter's torch"
            )
        root = self.root()
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        log(f"[peers] creating venv {root / 'venv'} for {self.name} (one-time, a few minutes)")
        venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
        py = str(self.python())
        env = {**os.environ, **self.install_env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        if torch_pin == INHERIT:
            _inherit_site(py)
        wheels = self.wheels(wheelhouse)
        if wheels:  # offline: exactly these files, their needs met by them or by the inherited packages
            steps = [[py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, wheels)]]
        elif torch_pin == INHERIT:
            steps = [[py, "-m", "pip", "install", "-q", *self.requirements]]
        else:
            steps = [[py, "-m", "pip", "install", "-q", torch_pin],  # torch first, pinned
                     [py, "-m", "pip", "install", "-q", torch_pin, *self.requirements]]
        for cmd in steps:
            log(f"[peers]   {' '.join(cmd[1:])}")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise PeerEnvError(
                    f"Creating the {self.name} peer environment failed at `{' '.join(cmd)}`:\n"
                    f"{(proc.stderr or proc.stdout).strip()[-3000:]}"
                )
        (root / "installed.json").write_text(json.dumps(self._wanted(torch_pin, wheelhouse), indent=1),
                                             encoding="utf-8")
        return self.python()


def _site_dirs() -> list[str]:
    """This interpreter's site-packages folders (purelib and platlib, once each)."""
    import sysconfig

    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _inherit_site(venv_python: str) -> None:
    """Append this interpreter's site-packages to the venv's path with a ``.pth`` file: ``.pth`` entries
    come after the venv's own site-packages, so packages installed into the venv win. (A venv's
    ``system_site_packages`` would not do: on a host whose python is itself a venv it exposes the base
    interpreter's packages, not this one's.)"""
    out = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    Path(out.stdout.strip(), "_kvshrink_inherit.pth").write_text("\n".join(_site_dirs()) + "\n", encoding="utf-8")


#: The peer environments the comparison uses, by name.
PEER_ENVS: dict[str, PeerEnv] = {
    "kvpress": PeerEnv(
        "kvpress",
        ("transformers==5.2.0", "kvpress==0.5.5"),
        description="NVIDIA kvpress 0.5.5 (needs transformers<5.3: 5.2.0, the newest it allows)",
    ),
    "hfquant": PeerEnv(
        "hfquant",
        ("transformers==5.23.0", "optimum-quanto==0.2.7", "hqq==0.2.8.post1", "accelerate==1.15.0"),
        # hqq's setup.py tries to build CUDA kernels unless told not to; CPU runs use its torch path.
        install_env={"DISABLE_CUDA": "1"},
        description="transformers' QuantizedCache with the optimum-quanto and HQQ backends",
    ),
}
