"""The SLURM scripts (launchers/slurm/) run for real, without SLURM.

`srun` and `scontrol` are replaced by small stand-ins on PATH: the `srun` one starts one copy
of its command per task with SLURM_PROCID / SLURM_NODEID / SLURM_LOCALID set as srun sets
them, the `scontrol` one expands a comma-separated node list. Everything else is the real
thing: the sbatch scripts, launchers/slurm/task.sh, `mmkd-precompute`, and two `deepspeed
--no_ssh` launchers on this machine acting as two nodes of one CPU rank each (gloo).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_distill import (  # noqa: F401
    REPO,
    free_port,
    kill_tree,
    launch,
    losses_by_step,
    release_shm,
    setup,
)
from test_precompute import shard_bytes, small_corpus, write_config

from mmkd_ds.config import load_config
from mmkd_ds.distributed import ProcessPlace
from mmkd_ds.precompute import run_precompute

SLURM_DIR = REPO / "launchers" / "slurm"
TASK = SLURM_DIR / "task.sh"

STUB_SRUN = r"""#!/usr/bin/env bash
# srun stand-in: one copy of the command per task of the step, in blocks of tasks per node.
while [[ "$1" == -* ]]; do shift; done
ntasks=${SLURM_NTASKS:?} nnodes=${SLURM_NNODES:?}
per_node=$(( ntasks / nnodes ))
pids=()
for (( i = 0; i < ntasks; i++ )); do
    SLURM_PROCID=$i SLURM_NODEID=$(( i / per_node )) SLURM_LOCALID=$(( i % per_node )) "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
"""

STUB_SCONTROL = r"""#!/usr/bin/env bash
# scontrol stand-in: `scontrol show hostnames a,b,c` prints one host per line.
[[ "$1 $2" == "show hostnames" ]] || { echo "stub scontrol: unsupported: $*" >&2; exit 1; }
tr ',' '\n' <<<"$3"
"""

# Settings of the scripts and of launchers that a developer's shell (or a SLURM job running
# these tests) may hold; every test starts without them.
OWN_VARS = {"CONFIG", "DS_CONFIG", "NNODES", "NODE_RANK", "NODE_HOSTS", "MASTER_ADDR", "MASTER_PORT",
            "GPUS_PER_NODE", "RESUME", "DEEPSPEED", "PYTHON", "MMKD_DRY_RUN", "MMKD_REPO",
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES"}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    bin_dir = tmp_path_factory.mktemp("stub-bin")
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(stubs: Path | None, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OWN_VARS and not k.startswith("SLURM_")}
    if stubs is not None:
        env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    env.update(PYTHONUNBUFFERED="1", SLURM_SUBMIT_DIR=str(REPO), **values)
    return env


def run_bash(script: Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = ["bash", str(script), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc)  # the tasks are grandchildren (under the srun stand-in): none may outlive a timeout
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


# -- the scripts themselves ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["precompute.sbatch", "distill.sbatch", "task.sh"])
def test_scripts_parse_and_sbatch_reads_every_directive(name):
    path = SLURM_DIR / name
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, check=False).returncode == 0
    if not name.endswith(".sbatch"):
        return
    # sbatch stops reading #SBATCH lines at the first line that is neither blank nor a comment.
    lines = path.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives)
    options = {d.split()[1].split("=")[0] for d in directives}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--output",
            "--requeue"} <= options
    if name == "distill.sbatch":
        assert "--signal" in options
        assert re.search(r"^#SBATCH --ntasks-per-node=1$", path.read_text(), re.MULTILINE)


def test_distill_command_from_slurm_variables(stubs, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    base = {"CONFIG": str(config), "SLURM_JOB_ID": "123456", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
            "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_GPUS_ON_NODE": "4", "MMKD_DRY_RUN": "1"}
    result = run_bash(TASK, "distill", "--train.steps=10", env=slurm_env(stubs, **base))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["gpu-a slots=4", "gpu-b slots=4"]  # the hostfile deepspeed --no_ssh reads
    cmd = lines[2].split()
    assert cmd[0] == "deepspeed" and cmd[cmd.index("--hostfile") + 1].startswith(os.environ.get("TMPDIR", "/tmp"))
    flags = " ".join(cmd[3:])
    assert ("--no_ssh --num_nodes 2 --node_rank 1 --master_addr gpu-a --master_port 23456 --num_gpus 4 "
            f"{REPO}/launchers/distill.py --config {config} --deepspeed_config {REPO}/ds_configs/zero2.json "
            "--resume --train.steps=10") == flags
    assert not Path(cmd[cmd.index("--hostfile") + 1]).exists()  # removed when the task ends

    # Each setting can be overridden from the environment; GPUs also come from SLURM_GPUS_PER_NODE.
    over = {**base, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:8", "MASTER_PORT": "31000",
            "MASTER_ADDR": "10.0.0.7", "RESUME": "0", "DS_CONFIG": str(REPO / "ds_configs" / "zero3.json")}
    result = run_bash(TASK, "distill", env=slurm_env(stubs, **over))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gpu-a slots=8" in out and "--master_addr 10.0.0.7 --master_port 31000 --num_gpus 8" in out
    assert "zero3.json" in out and "--resume" not in out
    result = run_bash(TASK, "distill", env=slurm_env(stubs, **{**base, "GPUS_PER_NODE": "2", "NODE_HOSTS": "x y"}))
    assert "x slots=2\ny slots=2" in result.stdout and "--master_addr x " in result.stdout


def test_precompute_place_from_slurm_variables(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    env = slurm_env(None, CONFIG=str(config), SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1",
                    MMKD_DRY_RUN="1", PYTHON="python3")
    result = run_bash(TASK, "precompute", "--precompute.batch_size=8", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"RANK=5 WORLD_SIZE=16 LOCAL_RANK=1 python3 -m mmkd_ds.cli.precompute "
                                     f"--config {config} --precompute.batch_size=8")


def test_missing_config_or_scontrol_is_a_clear_error(stubs, tmp_path):
    for script, args in ((TASK, ["distill"]), (TASK, ["precompute"]), (SLURM_DIR / "distill.sbatch", []),
                         (SLURM_DIR / "precompute.sbatch", [])):
        result = run_bash(script, *args, env=slurm_env(stubs, SLURM_NNODES="1", SLURM_NODEID="0"))
        assert result.returncode == 2 and "CONFIG is not set" in result.stderr, (script, result.stderr)
        assert "Traceback" not in result.stderr
    result = run_bash(TASK, "distill", env=slurm_env(stubs, CONFIG=str(tmp_path / "nope.yaml")))
    assert result.returncode == 2 and "nope.yaml: no such file" in result.stderr

    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    no_slurm = "/usr/bin:/bin"
    if shutil.which("scontrol", path=no_slurm):
        pytest.skip("this machine has a real scontrol")
    env = slurm_env(None, CONFIG=str(config), SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="a,b",
                    GPUS_PER_NODE="1", MMKD_DRY_RUN="1")
    env["PATH"] = no_slurm
    result = run_bash(TASK, "distill", env=env)
    assert result.returncode == 2 and "scontrol not found" in result.stderr and "NODE_HOSTS" in result.stderr
    result = run_bash(TASK, "distill", env={**env, "NODE_HOSTS": "a"})
    assert result.returncode == 2 and "1 hosts (a) but NNODES=2" in result.stderr
    result = run_bash(TASK, "precompute", env=slurm_env(None, CONFIG=str(config)))
    assert result.returncode == 2 and "SLURM_PROCID / SLURM_NTASKS not set" in result.stderr


# -- real runs -------------------------------------------------------------------------------


def test_precompute_sbatch_on_two_nodes_writes_the_shards_of_one_process(stubs, tmp_path, teacher_dir):
    corpus = small_corpus(tmp_path)
    glob = str(corpus / "*.tsv")
    single = tmp_path / "single"
    run_precompute(load_config(write_config(tmp_path, teacher_dir, glob, single, shard_size=15)), ProcessPlace(0, 1, 0))

    multi = tmp_path / "multi"
    config = write_config(tmp_path, teacher_dir, glob, multi, shard_size=15)
    env = slurm_env(stubs, CONFIG=str(config), SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_NTASKS="2",
                    SLURM_JOB_NODELIST="node-a,node-b", PYTHON=sys.executable)
    result = run_bash(SLURM_DIR / "precompute.sbatch", env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "precompute task 0/2" in result.stderr and "precompute task 1/2" in result.stderr
    assert "[rank 0/2] precompute: 45 pairs in 3 shards" in result.stdout
    assert "[rank 1/2] precompute: 35 pairs in 3 shards" in result.stdout
    assert shard_bytes(multi) == shard_bytes(single) and len(shard_bytes(multi)) == 6
    assert json.loads((multi / "manifest.json").read_text()) == json.loads((single / "manifest.json").read_text())


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_job_step(batch: subprocess.Popen) -> int:
    """What slurmstepd does for `--signal=TERM@120`: SIGTERM to every process of the job step
    (the tasks and all their descendants), not to srun or the batch shell. Returns how many."""
    srun = next(p for p in descendants(batch.pid) if p.ppid() == batch.pid and "srun" in " ".join(p.cmdline()))
    sent = 0
    for proc in descendants(srun.pid):
        try:
            proc.send_signal(signal.SIGTERM)
            sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


def logged_steps(out_dir: Path) -> int:
    try:
        return len(losses_by_step(out_dir))
    except ValueError:  # a line being written
        return 0


def test_distill_sbatch_on_two_nodes_matches_one_node_and_saves_on_sigterm(stubs, setup, tmp_path):  # noqa: F811
    """Two emulated nodes (one CPU rank each) train together through distill.sbatch until
    SIGTERM reaches the job step, as at the time limit: they save a checkpoint and stop, and
    their per-step losses equal those of a plain one-node, two-rank `deepspeed` launch."""
    out = tmp_path / "slurm-run"
    common = ["--train.steps=500", "--train.eval_every=0", "--train.save_every=0", "--train.export=false"]
    port = free_port()
    env = slurm_env(stubs, CONFIG=str(setup.config), SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_NTASKS="2",
                    SLURM_JOB_NODELIST="node-a,node-b", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                    GPUS_PER_NODE="1")
    batch = subprocess.Popen(["bash", str(SLURM_DIR / "distill.sbatch"), f"--train.out_dir={out}", *common],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and batch.poll() is None and logged_steps(out) < 2:
            time.sleep(0.2)
        assert batch.poll() is None, batch.communicate()
        assert signal_job_step(batch) >= 6  # 2 x (task.sh, deepspeed runner, node launcher, rank)
        stdout, stderr = batch.communicate(timeout=200)
    finally:
        kill_tree(batch)
        release_shm(port)
    log = stdout + stderr
    # Both nodes started, with --resume (a first job starts fresh), and passed the signal on.
    assert "distill node 0/2" in stderr and "distill node 1/2" in stderr and "--resume: no checkpoint" in log
    assert "SIGTERM: passed to the ranks" in stderr
    tag = (out / "checkpoints" / "latest").read_text().strip()
    saved = int(tag.removeprefix("step"))
    assert f"step {saved}: SIGTERM received" in stdout and f"checkpoint saved at step {saved}" in stdout, log[-4000:]
    assert saved >= 2
    assert batch.returncode == 1, log[-3000:]  # DeepSpeed's launcher exits 1 after a signal

    # The same steps launched the plain way, one node with two ranks.
    plain = tmp_path / "plain"
    result = launch(setup, plain, *common, f"--train.stop_at={saved}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = losses_by_step(out), losses_by_step(plain)
    assert sorted(a) == sorted(b) == list(range(1, saved + 1))
    for step in b:
        for name, value in b[step].items():
            assert a[step][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, name)
