"""Notice that the job's launcher is gone, so that a rank never outlives the command that started it.

``deepspeed script.py`` starts a runner, which starts DeepSpeed's per-node launcher
(``python -m deepspeed.launcher.launch``), which starts the ranks. A SIGTERM to the runner (what
``kill PID`` or a non-SLURM scheduler sends) ends only the runner: it forwards nothing on a single
node, so the node launcher and the ranks are re-parented to init and keep training, writing
checkpoints and holding the master port. Each rank therefore watches the processes above it
(its parent and, under DeepSpeed's node launcher, the runner above that) and calls ``on_gone``
when one of them exits; training treats that as a preemption (finish the step, save, exit).

Polling ``/proc`` once a second from a daemon thread costs nothing next to a training step, and
works where ``prctl(PR_SET_PDEATHSIG)`` cannot: the process that dies is the grandparent.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil

DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
# Seconds between two looks at the launchers (tests shorten it to stop a tiny run mid-way).
POLL_ENV = "MMKD_LAUNCHER_POLL_S"


@dataclass(frozen=True)
class Launcher:
    """A watched process and its name for messages, taken while it was alive."""

    proc: psutil.Process
    name: str


def watched_launchers(pid: int | None = None) -> list[Launcher]:
    """The processes whose exit means this job was stopped, nearest first.

    The parent of ``pid`` (default: this process), and, when that parent is DeepSpeed's node
    launcher, the runner above it. Init (pid 1) is never watched: a process whose parent is
    init has no launcher left to lose.
    """
    try:
        parent = psutil.Process(pid or os.getpid()).parent()
        if parent is None or parent.pid <= 1:
            return []
        if DEEPSPEED_NODE_LAUNCHER not in " ".join(parent.cmdline()):
            return [Launcher(parent, f"parent process (pid {parent.pid})")]
        watched = [Launcher(parent, f"deepspeed node launcher (pid {parent.pid})")]
        runner = parent.parent()
    except psutil.Error:
        return []
    if runner is not None and runner.pid > 1:
        watched.append(Launcher(runner, f"deepspeed runner (pid {runner.pid})"))
    return watched


@functools.cache
def launchers_at_start() -> tuple[Launcher, ...]:
    """:func:`watched_launchers` of this process, taken at the first call and kept.

    Call it first thing in an entry point: a launcher that dies while the rank still loads its
    model would otherwise be missed, since the node launcher is then already re-parented to init.
    """
    return tuple(watched_launchers())


class LauncherWatch:
    """A daemon thread that calls ``on_gone(description)`` once, when a watched launcher exits.

    ``psutil``'s ``is_running`` compares the process's start time too, so a recycled pid does not
    hide a launcher that is gone.
    """

    def __init__(
        self,
        on_gone: Callable[[str], None],
        watched: tuple[Launcher, ...] | None = None,
        interval_s: float | None = None,
    ):
        self.watched = launchers_at_start() if watched is None else watched
        self.on_gone = on_gone
        self.interval_s = interval_s if interval_s is not None else float(os.environ.get(POLL_ENV, "1.0"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)

    def start(self) -> LauncherWatch:
        if self.watched:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for launcher in self.watched:
                if not alive(launcher.proc):
                    self.on_gone(launcher.name)
                    return


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie: a killed launcher whose own parent has not reaped it yet is
    gone all the same."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
