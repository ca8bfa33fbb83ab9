#!/usr/bin/env bash
# Install (idempotent) and run the test suite: CPU only, no network, a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
