#!/usr/bin/env bash
# One task of a SLURM job: turns the SLURM environment into the launch command and runs it.
#
#   bash launchers/slurm/task.sh precompute [--section.key=value ...]   # one task per GPU
#   bash launchers/slurm/task.sh distill    [distill.py arguments ...]  # one task per node
#
# precompute.sbatch and distill.sbatch start it through `srun`; it needs no SLURM itself, only
# the variables below, so it also runs (and is tested) on a machine without SLURM. With
# MMKD_DRY_RUN=1 it prints the command (and the hostfile) instead of running it.
#
# Settings, from the environment:
#   CONFIG          run YAML (required)
#   MMKD_DRY_RUN    1: print, do not run
# precompute, one process per task; the shards need no communication between ranks:
#   RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID (default 0)
#   PYTHON          the interpreter (python3)
# distill, one deepspeed launcher per node, started with --no_ssh:
#   DS_CONFIG       DeepSpeed JSON (ds_configs/zero2.json of this repository)
#   NNODES          nodes in the job (SLURM_NNODES)
#   NODE_RANK       this node's index (SLURM_NODEID)
#   NODE_HOSTS      the job's hosts, space-separated (`scontrol show hostnames $SLURM_JOB_NODELIST`)
#   MASTER_ADDR     rendezvous host (the first of NODE_HOSTS)
#   MASTER_PORT     rendezvous port (20000 + SLURM_JOB_ID % 10000, or 29500 outside a job)
#   GPUS_PER_NODE   ranks per node (SLURM_GPUS_ON_NODE, else the count in SLURM_GPUS_PER_NODE)
#   RESUME          1: pass --resume, so that a requeued or resubmitted job continues from the
#                   latest checkpoint (a run without one starts fresh); 0: do not (1)
#   DEEPSPEED       the deepspeed launcher command (deepspeed)
#
# Signals: SLURM signals every process of a job step (--signal, preemption, scancel). The
# deepspeed runner has no handler of its own in --no_ssh mode and would die at once, ending the
# task, after which slurmstepd kills what is left of the step, checkpoint or not. So the runner
# is started with SIGTERM/SIGINT ignored and this script waits for it: its child, DeepSpeed's
# per-node launcher, passes SIGTERM to the ranks, which finish the current step, save a
# checkpoint and exit; that launcher then exits 1 (it always does after a signal) and so does
# this task. The launcher kills ranks still running 30 s after the signal.

set -euo pipefail

MMKD_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

mmkd_die() {
    echo "task.sh: error: $*" >&2
    exit 2
}

mmkd_log() {
    echo "task.sh: $*" >&2
}

mmkd_require_config() {
    [[ -n "${CONFIG:-}" ]] || mmkd_die "CONFIG is not set: export CONFIG=path/to/run.yaml (sbatch passes your environment on: CONFIG=run.yaml sbatch ...)"
    [[ -f "$CONFIG" ]] || mmkd_die "CONFIG=$CONFIG: no such file (relative paths start from $(pwd))"
}

mmkd_int() {  # mmkd_int NAME VALUE: VALUE must be a non-negative integer
    [[ "$2" =~ ^[0-9]+$ ]] || mmkd_die "$1=$2: not a non-negative integer"
}

# Wait for process PID to end and return its exit status. A trapped signal interrupts `wait`
# (which then returns >128 while the process still runs), so wait again until it is gone.
mmkd_wait_for() {
    local rc=0
    while :; do
        wait "$1" && rc=0 || rc=$?
        kill -0 "$1" 2>/dev/null || break
    done
    return "$rc"
}

# Run "$@" until it ends, whatever signals arrive; SIGTERM/SIGINT are passed to its children.
# The command itself starts with both ignored (see the header); returns its exit status.
mmkd_run_through_signals() {
    local pid rc=0
    trap '' TERM INT
    "$@" &
    pid=$!
    # shellcheck disable=SC2064  # $pid is meant to be expanded now
    trap "mmkd_log 'SIGTERM: passed to the ranks, which save a checkpoint and stop'; pkill -TERM -P $pid || true" TERM
    # shellcheck disable=SC2064
    trap "mmkd_log 'SIGINT: passed to the ranks as SIGTERM'; pkill -TERM -P $pid || true" INT
    mmkd_wait_for "$pid" || rc=$?
    trap - TERM INT
    return "$rc"
}

mmkd_precompute() {
    mmkd_require_config
    [[ -n "${SLURM_PROCID:-}" && -n "${SLURM_NTASKS:-}" ]] \
        || mmkd_die "SLURM_PROCID / SLURM_NTASKS not set: run under srun (one task per GPU), e.g. sbatch launchers/slurm/precompute.sbatch"
    mmkd_int SLURM_PROCID "$SLURM_PROCID"
    mmkd_int SLURM_NTASKS "$SLURM_NTASKS"
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=${SLURM_LOCALID:-0}
    (( RANK < WORLD_SIZE )) || mmkd_die "SLURM_PROCID=$RANK is outside SLURM_NTASKS=$WORLD_SIZE"
    local cmd=("${PYTHON:-python3}" -m mmkd_ds.cli.precompute --config "$CONFIG" "$@")
    mmkd_log "precompute task $RANK/$WORLD_SIZE (local $LOCAL_RANK) on ${HOSTNAME:-?}: ${cmd[*]}"
    if [[ "${MMKD_DRY_RUN:-0}" == 1 ]]; then
        echo "RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK ${cmd[*]}"
        return 0
    fi
    exec "${cmd[@]}"
}

mmkd_node_hosts() {  # the job's hosts, one per line
    if [[ -n "${NODE_HOSTS:-}" ]]; then
        tr -s ' ' '\n' <<<"$NODE_HOSTS" | sed '/^$/d'
        return
    fi
    command -v scontrol >/dev/null \
        || mmkd_die "scontrol not found: run inside a SLURM job, or set NODE_HOSTS='host1 host2 ...' (and MASTER_ADDR)"
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || mmkd_die "SLURM_JOB_NODELIST is not set: run inside a SLURM job, or set NODE_HOSTS"
    scontrol show hostnames "$SLURM_JOB_NODELIST"
}

mmkd_gpus_per_node() {
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
        echo "$GPUS_PER_NODE"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
        echo "${SLURM_GPUS_PER_NODE##*:}"  # "8" or "a100:8"
    else
        mmkd_die "cannot tell the GPUs per node: set GPUS_PER_NODE, or submit with --gpus-per-node"
    fi
}

mmkd_distill() {
    mmkd_require_config
    local ds_config=${DS_CONFIG:-$MMKD_REPO/ds_configs/zero2.json}
    [[ -f "$ds_config" ]] || mmkd_die "DS_CONFIG=$ds_config: no such file"
    local nnodes=${NNODES:-${SLURM_NNODES:-}} node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
    [[ -n "$nnodes" && -n "$node_rank" ]] \
        || mmkd_die "SLURM_NNODES / SLURM_NODEID not set: run under srun (one task per node), or set NNODES and NODE_RANK"
    mmkd_int NNODES "$nnodes"
    mmkd_int NODE_RANK "$node_rank"
    local hosts_text
    hosts_text=$(mmkd_node_hosts)
    local -a hosts
    mapfile -t hosts <<<"$hosts_text"
    (( ${#hosts[@]} == nnodes )) || mmkd_die "the job has ${#hosts[@]} hosts (${hosts[*]}) but NNODES=$nnodes"
    (( node_rank < nnodes )) || mmkd_die "NODE_RANK=$node_rank is outside NNODES=$nnodes"
    local gpus master_addr=${MASTER_ADDR:-${hosts[0]}} master_port
    gpus=$(mmkd_gpus_per_node)
    mmkd_int GPUS_PER_NODE "$gpus"
    (( gpus > 0 )) || mmkd_die "GPUS_PER_NODE=0"
    if [[ -n "${MASTER_PORT:-}" ]]; then
        master_port=$MASTER_PORT
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        master_port=$(( 20000 + SLURM_JOB_ID % 10000 ))
    else
        master_port=29500
    fi
    mmkd_int MASTER_PORT "$master_port"
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != "$(seq -s, 0 $(( gpus - 1 )))" ]]; then
        mmkd_log "warning: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES, but deepspeed gives this node's ranks GPUs 0..$(( gpus - 1 )); allocate whole nodes (--exclusive)"
    fi

    # deepspeed --no_ssh still reads the node list from a hostfile: one per node, node-local.
    local hostfile host
    hostfile=$(mktemp "${TMPDIR:-/tmp}/mmkd-hostfile.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -f '$hostfile'" EXIT
    for host in "${hosts[@]}"; do
        echo "$host slots=$gpus"
    done >"$hostfile"

    local cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --no_ssh --num_nodes "$nnodes" --node_rank "$node_rank"
               --master_addr "$master_addr" --master_port "$master_port" --num_gpus "$gpus"
               "$MMKD_REPO/launchers/distill.py" --config "$CONFIG" --deepspeed_config "$ds_config")
    if [[ "${RESUME:-1}" == 1 ]]; then
        cmd+=(--resume)
    fi
    cmd+=("$@")
    mmkd_log "distill node $node_rank/$nnodes (${HOSTNAME:-?}), $gpus ranks, master $master_addr:$master_port: ${cmd[*]}"
    if [[ "${MMKD_DRY_RUN:-0}" == 1 ]]; then
        cat "$hostfile"
        echo "${cmd[*]}"
        return 0
    fi
    command -v "${DEEPSPEED:-deepspeed}" >/dev/null || mmkd_die "${DEEPSPEED:-deepspeed}: command not found (activate the project's environment before sbatch)"
    local rc=0
    mmkd_run_through_signals "${cmd[@]}" || rc=$?
    mmkd_log "distill node $node_rank: the launcher exited with $rc"
    return "$rc"
}

# For the sbatch scripts (sourced): run srun in the background and wait through signals, so
# that a SIGTERM to the batch shell (preemption, scancel) does not end the job while the
# ranks are still saving their checkpoint.
mmkd_srun_and_wait() {
    local pid rc=0
    "$@" &
    pid=$!
    trap 'echo "$(date "+%F %T") batch shell: signal received; waiting for the job step to save and end" >&2' TERM INT
    mmkd_wait_for "$pid" || rc=$?
    trap - TERM INT
    return "$rc"
}

mmkd_main() {
    local what=${1:-}
    (( $# )) && shift
    case "$what" in
        precompute) mmkd_precompute "$@" ;;
        distill) mmkd_distill "$@" ;;
        *) mmkd_die "usage: task.sh precompute|distill [arguments...] (got '${what}')" ;;
    esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    mmkd_main "$@"
fi
