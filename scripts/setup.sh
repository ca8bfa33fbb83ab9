#!/usr/bin/env bash
# Install mmkd-ds and its dependencies into the current Python, without ever letting pip
# resolve a second torch. Idempotent: a re-run only checks what is there.
#   TORCH_SPEC      torch requirement installed when no torch is importable (default torch==2.13.0,
#                   the local CPU build on these machines; on GPU nodes install your CUDA torch first)
#   DEEPSPEED_SPEC  default deepspeed==0.19.8
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# 1. torch first, so that nothing later pulls the registry's newest (CUDA) build.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
# 2. deepspeed ships as source: build it against the installed torch (no isolated build
#    environment, which would download its own torch) and without precompiled ops (JIT).
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then  # its logger writes to stdout
  echo "setup: installing ${DEEPSPEED_SPEC:-deepspeed==0.19.8} (DS_BUILD_OPS=0, no build isolation)"
  DS_BUILD_OPS=0 pip_install --no-build-isolation "${DEEPSPEED_SPEC:-deepspeed==0.19.8}"
fi
# 3. the package itself (editable) with the test and demo extras; torch and deepspeed already
#    satisfy its requirements, so pip leaves them alone.
pip_install -e ".[test,demo]"
"$PY" -c "import torch, deepspeed, mmkd_ds; print(f'setup: mmkd-ds {mmkd_ds.__version__}, torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep '^setup:'
