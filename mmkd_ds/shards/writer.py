"""Atomic, reproducible shard writing.

A shard is written to a temporary name in the same directory, flushed to disk, and renamed to
its final name only when complete: a reader (or a resumed precompute) never sees half a shard
under a final name. Its record (sample count, byte size, sha256, languages) is written the same
way into ``_index/`` and later gathered into ``manifest.json``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import socket
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmkd_ds.shards.format import ShardSample, encode_sample, tar_member

INDEX_DIR = "_index"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class ShardRecord:
    """What the manifest says of one shard."""

    name: str
    samples: int
    bytes: int
    sha256: str
    languages: dict[str, int] = field(default_factory=dict)
    # Global corpus index of the shard's first sample (shards hold consecutive indices).
    first_index: int = 0


class DiskFullError(OSError):
    """No space left where a shard or record was being written; the temporary file is removed."""

    def __init__(self, path: Path, needed: int, detail: str = ""):
        self.path, self.needed, self.detail = path, needed, detail
        super().__init__(errno.ENOSPC, f"no space left on device in {path.parent} while writing {path.name}")

    def __str__(self) -> str:
        return self.strerror + (f"; {self.detail}" if self.detail else "")


# Temporary files are named .NAME.tmp-HOST-PID, so that a re-run can tell the leftovers of dead
# processes on this host (removed) from files that live processes are writing, also on other
# nodes sharing the directory (kept).
_HOST = socket.gethostname().replace("-", "_")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def _write_all(f, data: bytes) -> None:
    """The one place file bytes are written (the tests inject ENOSPC here)."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    On any error the temporary file is removed; a full disk raises :class:`DiskFullError`.
    """
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path, len(data)) from exc
        raise


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Remove ``.*.tmp-HOST-PID`` files (in ``out_dir`` and its ``_index/``) left by processes of
    this host that are gone; return their names."""
    removed = []
    for folder in (out_dir, out_dir / INDEX_DIR):
        for tmp in folder.glob(f".*.tmp-{_HOST}-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_shard(path: Path, samples: list[ShardSample], first_index: int, dtype: str = "float16") -> ShardRecord:
    """Write ``samples`` as one tar at ``path`` (atomically), vectors stored in ``dtype``, and
    return its record."""
    buf = io.BytesIO()
    # ustar keeps headers free of pax extras (timestamps), so equal samples give equal bytes.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for name, data in encode_sample(sample, dtype):
                tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return ShardRecord(
        name=path.name,
        samples=len(samples),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        languages=dict(sorted(Counter(s.lang for s in samples).items())),
        first_index=first_index,
    )


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / INDEX_DIR / f"{name}.json"


def write_record(out_dir: Path, record: ShardRecord) -> None:
    (out_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(record_path(out_dir, record.name), json.dumps(asdict(record), sort_keys=True).encode())


def read_record(out_dir: Path, name: str, verify: bool = False) -> ShardRecord | None:
    """The record of a complete shard, or None when the shard is missing or incomplete.

    Complete means: the record exists and the shard file under its final name has the
    recorded size (a record is written only after its shard was renamed into place) and, with
    ``verify``, the recorded sha256 (a byte changed inside the file keeps its size).
    """
    rpath = record_path(out_dir, name)
    if not rpath.is_file():
        return None
    try:
        record = ShardRecord(**json.loads(rpath.read_text()))
    except (ValueError, TypeError):
        return None
    shard = out_dir / name
    if not shard.is_file() or shard.stat().st_size != record.bytes:
        return None
    if verify and file_sha256(shard) != record.sha256:
        return None
    return record


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
