#!/usr/bin/env bash
# Set up (if needed) and run the main job: a small evaluation of none / int8 / kivi:bits=2 / rotatekv:bits=2
# on the bundled real model and text, printing the table and writing results/ (JSON, CSV, plots).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec kvshrink eval --preset demo --out results/demo "$@"
