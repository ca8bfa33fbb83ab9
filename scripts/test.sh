#!/usr/bin/env bash
# Install (idempotent) and run the test suite: CPU only, no network; about 15 minutes on a quiet
# 2-core machine, longer on a busy one (docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DeepSpeed's CPU op is compiled into this checkout, not the shared ~/.cache/torch_extensions
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/runs/torch_extensions}"
exec "${PYTHON:-python3}" -m pytest -q "$@"
