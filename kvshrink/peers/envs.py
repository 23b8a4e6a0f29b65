"""Virtual environments for peers, so that a peer's pins never hold back kvshrink's dependencies.

kvpress 0.5.5 requires ``transformers<5.3`` (and reads ``cache_position`` from hook kwargs, which
newer transformers no longer pass), while kvshrink follows the current transformers. Each peer
therefore gets a virtual environment of its own under ``<kvshrink cache>/peers/<name>/venv``,
created on first use and reused afterwards. Only token ids, text and numbers cross between
environments (see :mod:`kvshrink.peers.worker`).

Install order matters: torch is installed first, pinned (``torch==2.13.0`` by default: the CPU
wheel this project uses; an unpinned torch would pull a multi-GB CUDA build), then the peer's
packages, each pinned, with torch already satisfied.
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

__all__ = ["DEFAULT_TORCH_PIN", "PEER_ENVS", "PeerEnv", "PeerEnvError", "peers_dir"]

#: torch pin installed first in every peer venv. Override with ``--torch-pin`` (e.g. on a GPU host).
DEFAULT_TORCH_PIN = "torch==2.13.0"


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

    def _wanted(self, torch_pin: str) -> dict[str, object]:
        return {"torch": torch_pin, "requirements": list(self.requirements), "python": sys.version.split()[0]}

    def ready(self, torch_pin: str = DEFAULT_TORCH_PIN) -> bool:
        """Whether the venv exists and was completely installed with exactly these pins."""
        try:
            recorded = json.loads(self._marker().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return recorded == self._wanted(torch_pin) and self.python().is_file()

    def ensure(self, torch_pin: str = DEFAULT_TORCH_PIN, log=print) -> Path:
        """Create (or reuse) the venv; return its python. Raises :class:`PeerEnvError` on failure.

        The marker ``installed.json`` is written only after every install succeeded, so an
        interrupted install is redone from scratch on the next call.
        """
        if self.ready(torch_pin):
            return self.python()
        if not torch_pin.startswith("torch=="):
            raise PeerEnvError(
                f"torch must be pinned exactly (got {torch_pin!r}): an unpinned torch pulls a multi-GB "
                "CUDA build. Pass e.g. --torch-pin torch==2.13.0"
            )
        root = self.root()
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        log(f"[peers] creating venv {root / 'venv'} for {self.name} (one-time, a few minutes)")
        venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
        py = str(self.python())
        env = {**os.environ, **self.install_env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
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
        (root / "installed.json").write_text(json.dumps(self._wanted(torch_pin), indent=1), encoding="utf-8")
        return self.python()


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
