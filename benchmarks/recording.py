"""What every CPU benchmark script records beside its figures: the machine, the versions, and
atomic results files; plus the small helpers they share (seeding, summaries, timestamped log).

The scripts run as ``python benchmarks/<name>.py``, so this module is importable by name from
their directory.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def describe_machine(threads: int) -> dict[str, Any]:
    """CPU model and cores from /proc/cpuinfo, memory, load and torch threads."""
    model, cores = None, set()
    phys = core = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and model is None:
                model = value
            elif key == "physical id":
                phys = value
            elif key == "core id":
                core = value
            elif not key and phys is not None:
                cores.add((phys, core))
                phys = core = None
        if phys is not None:
            cores.add((phys, core))
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    model = model or platform.processor() or platform.machine()
    return {
        "type": "cpu",
        "name": f"{model} ({usable} usable logical cores)",
        "slug": "cpu",
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "usable_logical_cores": usable,
        "physical_cores": len(cores) or None,
        "memory_bytes": mem,
        "torch_threads": torch.get_num_threads(),
        "torch_threads_requested": threads,
        "load_average_start": list(os.getloadavg()),
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("transformers", "tokenizers", "mmkd_ds"):
        try:
            out[name] = getattr(__import__(name), "__version__", None)
        except ImportError:
            out[name] = None
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(out: str, stem: str, result: dict, md: str) -> list[str]:
    """``STEM.json`` (``result``) and ``STEM.md`` (``md``) under ``out``, each written atomically;
    ``out`` empty writes nothing. Returns the paths written."""
    if not out:
        return []
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    write_atomic(md_path, md + "\n")
    return [str(json_path), str(md_path)]


def device_slug(name: str) -> str:
    """A device name as a file-name part: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def with_gpu(machine: dict[str, Any], gpu: str) -> dict[str, Any]:
    """``describe_machine``'s record for a run on GPU ``gpu``: named and slugged after it."""
    return {**machine, "type": "cuda", "gpu": gpu, "name": f"{gpu} + {machine['name']}", "slug": device_slug(gpu)}


def log(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "n": len(values)}


def reusable_shards(shard_dir: Path) -> bool:
    """True when ``shard_dir`` holds a finished precompute this mmkd-ds reads. A directory of
    another shard schema version (an older mmkd-ds) is deleted so that the caller remakes it."""
    import shutil

    from mmkd_ds.shards.manifest import MANIFEST_NAME, ManifestError, read_manifest

    if not (shard_dir / MANIFEST_NAME).is_file():
        return False
    try:
        read_manifest(shard_dir)
    except ManifestError as exc:
        if "schema_version" not in str(exc):
            raise
        print(f"{exc}: deleting {shard_dir} to make it again", file=sys.stderr, flush=True)
        shutil.rmtree(shard_dir)
        return False
    return True
