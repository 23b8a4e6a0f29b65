#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite (CPU only; GPU kernels run under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRITON_INTERPRET=1
exec python -m pytest tests "$@"
