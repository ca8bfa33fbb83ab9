"""Preemption: finish the current step, save a checkpoint, exit 0.

Three things stop a run this way:
- SIGTERM, what cluster schedulers send before they kill a job (SLURM signals every process of
  the job step; DeepSpeed's node launcher passes its own SIGTERM on to the ranks);
- SIGINT, Ctrl-C on the terminal (the whole foreground process group gets it);
- the exit of the job's launcher (mmkd_ds.launcher_watch): ``kill <pid of deepspeed>`` ends
  only DeepSpeed's runner, and without the watch its ranks would keep training as orphans.

The handlers only set a flag; the loop checks it at each step boundary, and the ranks agree
through an all-reduce (one rank may learn of it first), so that all of them save the same step
and none waits in a collective.
"""

from __future__ import annotations

import signal

import torch

from mmkd_ds.launcher_watch import LauncherWatch


class PreemptionFlag:
    """Raised by a signal or by the launcher's exit; ``reason`` says which, for the log."""

    # What the all-reduce carries (the largest wins), so that rank 0 can name what happened
    # on another rank.
    CODES = {"SIGTERM received": 1.0, "SIGINT received": 2.0, "the job's launcher exited": 3.0}

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), watch_launcher: bool = True):
        self.raised = False
        self.reason = ""
        self.code = 0.0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        self.watch = LauncherWatch(self._launcher_gone).start() if watch_launcher else None

    def _handle(self, signum, frame) -> None:
        name = f"{signal.Signals(signum).name} received"
        self.reason = self.reason or name
        self.code = max(self.code, self.CODES.get(name, 1.0))
        self.raised = True

    def _launcher_gone(self, launcher: str) -> None:
        self.reason = self.reason or f"{launcher} exited"
        self.code = max(self.code, self.CODES["the job's launcher exited"])
        self.raised = True

    def close(self) -> None:
        """Stop watching and give the signals back to their previous handlers."""
        if self.watch is not None:
            self.watch.stop()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has been told to stop; a rank that was not told
        takes ``reason`` from the others."""
        flag = torch.tensor([self.code if self.raised else 0.0], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        code = float(flag.item())
        if code > 0 and not self.reason:
            self.reason = next(text for text, c in self.CODES.items() if c == code) + " on another rank"
        return code > 0
