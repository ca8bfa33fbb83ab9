"""A build lock of DeepSpeed's CPU op whose owner is gone is removed; a held one is kept and
the wait names the holder; the build cache is per environment unless TORCH_EXTENSIONS_DIR is set."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

from mmkd_ds import extension_lock
from mmkd_ds.extension_lock import LockWaitReport, clear_stale_lock, lock_holders

HOLD = "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(60)"


def hold(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_nobody_holds_is_removed_and_a_held_one_kept(tmp_path):
    stale = tmp_path / "stale" / "lock"
    stale.parent.mkdir()
    stale.touch()  # as a builder that was killed leaves it
    assert lock_holders(stale) == []
    assert clear_stale_lock(stale, recheck_s=0.01) and not stale.exists()
    assert not clear_stale_lock(stale, recheck_s=0.01)  # nothing there: nothing to do

    held = tmp_path / "held" / "lock"
    held.parent.mkdir()
    builder = hold(held)
    try:
        assert lock_holders(held) == [builder.pid]
        assert not clear_stale_lock(held, recheck_s=0.01) and held.exists()
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_lock(held, recheck_s=0.01)  # its builder died: now it is stale


def test_the_wait_names_what_holds_the_lock(tmp_path):
    lock = tmp_path / "lock"
    builder = hold(lock)
    out = io.StringIO()
    try:
        with LockWaitReport(lock, "distill: DeepSpeed's CPU op", after_s=0.05, every_s=10, stream=out):
            deadline = time.time() + 30
            while not out.getvalue() and time.time() < deadline:
                time.sleep(0.05)
    finally:
        builder.kill()
        builder.wait()
    assert f"distill: DeepSpeed's CPU op: waiting on {lock}, held by pid {builder.pid} (" in out.getvalue()


def test_a_quick_load_reports_nothing(tmp_path):
    out = io.StringIO()
    with LockWaitReport(tmp_path / "lock", "x", after_s=0.05, stream=out):
        time.sleep(0.2)  # no lock file: nothing is waited on
    assert out.getvalue() == ""


def test_the_cache_is_per_environment_unless_set(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert extension_lock.use_environment_cache() == tmp_path / "mine"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    (tmp_path / "venv").mkdir()
    assert extension_lock.use_environment_cache() == tmp_path / "venv" / "torch_extensions"
    import os

    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")


def test_on_a_network_filesystem_only_an_old_lock_is_stale(tmp_path, monkeypatch):
    import os

    lock = tmp_path / "lock"
    lock.touch()
    monkeypatch.setattr(extension_lock, "filesystem_type", lambda path: "nfs")
    assert not clear_stale_lock(lock, recheck_s=0.01) and lock.exists()  # may be another node's build
    old = time.time() - extension_lock.NETWORK_STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    assert clear_stale_lock(lock, recheck_s=0.01) and not lock.exists()


def test_filesystem_type_of_a_local_directory(tmp_path):
    assert extension_lock.filesystem_type(tmp_path) not in ("", *extension_lock.NETWORK_FILESYSTEMS)


def test_a_sibling_rank_is_the_same_job_and_a_child_is_not(tmp_path):
    builder = hold(tmp_path / "lock")  # our child: another job's process as far as it can tell
    try:
        assert not extension_lock.same_job(builder.pid)
    finally:
        builder.kill()
        builder.wait()
    import os

    assert extension_lock.same_job(os.getpid())  # shares our parent, as a sibling rank does
