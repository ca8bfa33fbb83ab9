"""Which samples each optimizer step trained on, per rank (``train.log_sample_keys``).

``<out_dir>/sample_keys/rank<R>.jsonl`` gets one line per micro-batch that was trained on:
``{"step": S, "keys": [...]}`` with S the optimizer step it belongs to (1-based, as in
metrics.jsonl) and the shard sample keys. A resume rewinds every rank's file to the checkpoint's
step first (also the files of ranks the new layout no longer has), so that across any sequence
of interruptions and resumes the files hold each trained micro-batch once.
"""

from __future__ import annotations

import json
from pathlib import Path


class SampleKeyLog:
    """Appends this rank's trained sample keys; a no-op when not ``enabled``."""

    def __init__(self, out_dir: Path, rank: int, enabled: bool) -> None:
        self.enabled = enabled
        self.dir = Path(out_dir) / "sample_keys"
        self.path = self.dir / f"rank{rank}.jsonl"
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, keys: list[str]) -> None:
        """Record one trained micro-batch of optimizer step ``step``."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")

    def rewind(self, step: int) -> int:
        """Drop the records of steps after ``step`` from every rank's file (call on one rank,
        before any rank writes); returns how many were dropped."""
        if not self.enabled:
            return 0
        dropped = 0
        for path in sorted(self.dir.glob("rank*.jsonl")):
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            dropped += len(lines) - len(kept)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)
        return dropped


def read_sample_keys(out_dir: Path) -> dict[int, list[str]]:
    """Every rank's records merged: optimizer step -> the keys trained on in it (all ranks)."""
    steps: dict[int, list[str]] = {}
    for path in sorted((Path(out_dir) / "sample_keys").glob("rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                steps.setdefault(int(record["step"]), []).extend(record["keys"])
    return steps
