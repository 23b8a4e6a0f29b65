"""The ``kvshrink`` command line. Each sub-command lives in ``kvshrink/commands/<name>.py`` and defines
``add_parser(subparsers)`` (returning its parser) and ``run(args) -> int``; new commands are picked up
without touching this file."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from .errors import KVShrinkError


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, commands

    parser = argparse.ArgumentParser(prog="kvshrink", description="Shrink the KV cache of Hugging Face decoder LLMs.")
    parser.add_argument("--version", action="version", version=f"kvshrink {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{mod.name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # kvshrink never reaches a model hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KVShrinkError as exc:
        print(f"kvshrink: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
