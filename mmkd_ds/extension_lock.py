"""DeepSpeed's CPU communication op: a build cache per environment, and no silent wait on a lock.

On CPU, DeepSpeed compiles its shared-memory all-reduce op (``deepspeed_shm_comm``) just in time,
through ``torch.utils.cpp_extension``, into ``$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm``. The
first process creates ``lock`` there (``O_CREAT | O_EXCL``, no owner recorded) and keeps it open
while it builds; every other process polls until the file is gone. Two things go wrong:

- without ``TORCH_EXTENSIONS_DIR``, the cache is ``~/.cache/torch_extensions``, shared by every
  environment of the user: one environment's ranks wait minutes for another's build, or load an
  op built against another torch;
- a builder that died (killed, out of memory) leaves ``lock`` behind, and every later rank waits
  on it forever, printing nothing.

So: :func:`use_environment_cache` points ``TORCH_EXTENSIONS_DIR`` into the active environment
when it is unset; :func:`clear_stale_lock` removes a lock that no living process holds open
(checked twice, a second apart, since a finishing builder closes the file just before removing
it); :class:`LockWaitReport` says, after a few seconds, which process is being waited on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"


def use_environment_cache() -> Path:
    """``TORCH_EXTENSIONS_DIR``, set to ``<environment>/torch_extensions`` when unset and the
    environment (``sys.prefix``, e.g. a virtual environment) is writable; returns the directory
    the builds go to."""
    current = os.environ.get("TORCH_EXTENSIONS_DIR")
    if current:
        return Path(current)
    candidate = Path(sys.prefix) / "torch_extensions"
    if os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(candidate)
        return candidate
    try:
        from torch.utils.cpp_extension import _get_build_directory  # the shared per-user default

        return Path(_get_build_directory(SHM_OP, verbose=False)).parent
    except Exception:  # noqa: BLE001 - a private torch helper: fall back to its documented root
        return Path.home() / ".cache" / "torch_extensions"


def lock_path(name: str = SHM_OP) -> Path:
    return use_environment_cache() / name / "lock"


def lock_holders(lock: Path) -> list[int]:
    """Pids of the processes that have ``lock`` open (their ``/proc/PID/fd`` links), this user's."""
    target = os.path.realpath(lock)
    holders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
        except OSError:  # gone meanwhile, or another user's
            continue
    return holders


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.sshfs", "9p")
# On a network filesystem the holder may be a process on another node, which /proc cannot see:
# there a lock counts as stale only once it is older than any build takes.
NETWORK_STALE_AFTER_S = 600.0


def filesystem_type(path: Path) -> str:
    """The type of the mount that holds ``path`` (longest matching mount point in /proc/mounts)."""
    real, best, kind = os.path.realpath(path), "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and (real == fields[1] or real.startswith(fields[1].rstrip("/") + "/")):
                if len(fields[1]) > len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return kind


def clear_stale_lock(lock: Path, recheck_s: float = 1.0) -> bool:
    """Remove ``lock`` if no process holds it open, now and ``recheck_s`` later (and, on a
    network filesystem, it is older than ``NETWORK_STALE_AFTER_S``); True if removed."""
    for attempt in range(2):
        if not lock.exists() or lock_holders(lock):
            return False
        if filesystem_type(lock.parent) in NETWORK_FILESYSTEMS:
            try:
                if time.time() - lock.stat().st_mtime < NETWORK_STALE_AFTER_S:
                    return False
            except FileNotFoundError:
                return False
        if attempt == 0:
            time.sleep(recheck_s)
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    return True


def same_job(pid: int) -> bool:
    """``pid`` is a sibling rank (the same parent launcher as this process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1]) == os.getppid()
    except (OSError, ValueError, IndexError):
        return False


def describe_holders(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        out.append(f"pid {pid} ({cmd[:100]})")
    return ", ".join(out) or "no living process"


class LockWaitReport:
    """While the body runs, print every ``every_s`` seconds (first after ``after_s``) what is
    being waited on when ``lock`` exists; silent when the build or load is quick, and while
    this job's own ranks build (mmkd_ds.distributed announces that build)."""

    def __init__(self, lock: Path, what: str, after_s: float = 5.0, every_s: float = 30.0, stream=None):
        self.lock, self.what, self.after_s, self.every_s = lock, what, after_s, every_s
        self.stream = stream or sys.stderr
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-wait-report", daemon=True)

    def __enter__(self) -> LockWaitReport:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _run(self) -> None:
        wait = self.after_s
        while not self._done.wait(wait):
            wait = self.every_s
            if self.lock.exists():
                holders = lock_holders(self.lock)
                if os.getpid() in holders or any(same_job(pid) for pid in holders):
                    continue  # this job's own build, announced with its start and end

                print(f"{self.what}: waiting on {self.lock}, held by {describe_holders(holders)}"
                      + ("" if holders else "; no process holds it: remove the file if this does not end"),
                      file=self.stream, flush=True)
