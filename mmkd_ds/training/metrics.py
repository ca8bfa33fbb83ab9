"""Scalars of a run: to every DeepSpeed monitor (TensorBoard, CSV, W&B as its config enables),
and to ``metrics.jsonl`` in the run directory (one line per record, for scripts and tests)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def memory_scalars(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory since the last call, or the process's resident memory on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/peak_allocated_gib": peak}
    import psutil

    return {"memory/rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}


class MetricsLogger:
    def __init__(self, engine, out_dir: Path, is_main: bool):
        self.engine = engine
        self.is_main = is_main
        self.path = out_dir / "metrics.jsonl"
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.is_main:
            return
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            monitor.write_events([(name, float(value), step) for name, value in scalars.items()])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step, **scalars}, sort_keys=True) + "\n")


    def rewind(self, step: int) -> int:
        """After a resume from the checkpoint of ``step``: forget what the interrupted run logged
        for later steps, which the resumed run logs again. metrics.jsonl is rewritten without
        those records; TensorBoard gets a purge marker (what ``SummaryWriter(purge_step=...)``
        writes), so it drops the earlier events of steps > ``step``. Returns the records dropped.
        """
        if not self.is_main:
            return 0
        tb = getattr(getattr(self.engine, "monitor", None), "tb_monitor", None)
        writer = getattr(tb, "summary_writer", None)
        if writer is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            writer._get_file_writer().add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
            writer.flush()
        if not self.path.is_file():
            return 0
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(keep) == len(lines):
            return 0
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.path.parent, delete=False) as f:
            f.write("".join(line + "\n" for line in keep))
        os.replace(f.name, self.path)
        return len(lines) - len(keep)


def read_metrics(path: Path, kind: str = "train") -> list[dict]:
    """The records of one kind from a metrics.jsonl, in order."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]
