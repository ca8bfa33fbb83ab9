"""SIGTERM handling: finish the current step, save a checkpoint, exit 0.

Cluster schedulers send SIGTERM before they kill a job. The handler only sets a flag; the loop
checks it at each step boundary, and the ranks agree through an all-reduce (one rank may get
the signal first), so that all of them save the same step and none waits in a collective.
"""

from __future__ import annotations

import signal

import torch


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.raised = False
        self.signal_name = ""
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has received the signal."""
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
