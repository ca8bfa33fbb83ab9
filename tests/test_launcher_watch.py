"""The ranks notice that their launcher is gone (mmkd_ds.launcher_watch), and preemption
(SIGTERM, SIGINT, launcher exit) is agreed across ranks (mmkd_ds.training.preemption).

Process trees of small stand-in scripts: a "runner" that starts a "node launcher" (its command
line names deepspeed.launcher.launch, as DeepSpeed's does) that starts a "rank".
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmkd_ds.launcher_watch import DEEPSPEED_NODE_LAUNCHER, LauncherWatch, watched_launchers
from mmkd_ds.training.preemption import PreemptionFlag

REPO = Path(__file__).resolve().parents[1]

RANK = """
import sys, threading
sys.path.insert(0, {repo!r})
from mmkd_ds.launcher_watch import LauncherWatch, launchers_at_start
print("watching", " ".join(str(p.proc.pid) for p in launchers_at_start()), flush=True)
gone = threading.Event()
LauncherWatch(lambda what: (print("gone:", what, flush=True), gone.set()), interval_s=0.05).start()
sys.exit(0 if gone.wait(60) else 1)
"""
# Starts its command (argv[1:]) and waits for it; extra argv words only mark the command line.
PARENT = """
import subprocess, sys
args = sys.argv[1:]
cut = args.index("--")
sys.exit(subprocess.call(args[cut + 1:]))
"""


@pytest.fixture
def tree(tmp_path):
    rank = tmp_path / "rank.py"
    rank.write_text(RANK.format(repo=str(REPO)))
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(PARENT))

    def start(*marks: list[str]) -> subprocess.Popen:
        """Nested parents, outermost first, each marked with its words, then the rank."""
        cmd = [sys.executable, str(rank)]
        for words in reversed(marks):
            cmd = [sys.executable, str(parent), *words, "--", *cmd]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return start


def test_the_runner_above_deepspeeds_node_launcher_is_watched(tree):
    runner = tree(["deepspeed-runner"], ["-m", DEEPSPEED_NODE_LAUNCHER])
    first = runner.stdout.readline().split()
    assert first[0] == "watching" and len(first) == 3  # the node launcher, then the runner
    assert int(first[2]) == runner.pid
    runner.send_signal(signal.SIGTERM)  # the runner alone, as `kill PID` does
    out, err = runner.communicate(timeout=30)  # EOF once the node launcher and the rank are gone
    assert f"gone: deepspeed runner (pid {runner.pid})" in out, err


def test_a_plain_parent_is_watched_and_nothing_above_it(tree):
    shell = tree(["outer-shell"], ["job-parent"])
    first = shell.stdout.readline().split()
    assert first[0] == "watching" and len(first) == 2  # only the parent: it is no node launcher
    job_parent = int(first[1])
    import psutil

    psutil.Process(job_parent).kill()
    out, err = shell.communicate(timeout=30)
    assert f"gone: parent process (pid {job_parent})" in out, err


def test_no_watch_under_init_and_none_fired_while_the_launcher_lives():
    assert watched_launchers(1) == []  # init has no parent
    fired = []
    watch = LauncherWatch(fired.append, interval_s=0.01).start()
    assert watch.watched and watch.watched[0].proc.pid > 1  # pytest's parent
    import time

    time.sleep(0.1)
    watch.stop()
    assert fired == []


def test_signals_raise_the_flag_and_are_given_back():
    before = signal.getsignal(signal.SIGINT)
    flag = PreemptionFlag(watch_launcher=False)
    assert not flag.agreed(torch.device("cpu"))
    signal.raise_signal(signal.SIGINT)
    assert flag.raised and flag.reason == "SIGINT received"
    assert flag.agreed(torch.device("cpu"))
    flag.close()
    assert signal.getsignal(signal.SIGINT) is before


AGREE = """
import os, sys, signal, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from mmkd_ds.training.preemption import PreemptionFlag
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
flag = PreemptionFlag(watch_launcher=False)
first = flag.agreed(torch.device("cpu"))
if rank == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told
second = flag.agreed(torch.device("cpu"))
print(rank, first, second, flag.reason, flush=True)
dist.destroy_process_group()
"""


def test_one_rank_told_stops_both_and_rank_0_names_why(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "agree.py"
    script.write_text(AGREE.format(repo=str(REPO), port=port))
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0] == "0 False True SIGTERM received on another rank"
    assert outs[1] == "1 False True SIGTERM received"
