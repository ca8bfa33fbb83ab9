"""Rank 0 announces DeepSpeed's first-time build of its CPU communication op and its end, and
DeepSpeed's per-rank "built successfully" line is dropped (mmkd_ds.distributed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmkd_ds import distributed


@pytest.fixture
def build_needed(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "shm_op_build_dir", lambda: tmp_path / "deepspeed_shm_comm")
    return tmp_path / "deepspeed_shm_comm"


def _deepspeed_init_prints():
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    print("something else DeepSpeed says")


def test_rank_0_announces_the_build_and_its_end(build_needed, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with distributed.shm_op_build_progress():
        _deepspeed_init_prints()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"building DeepSpeed's CPU communication op (first run only, about 2 min) in {build_needed}")
    assert lines[1] == "something else DeepSpeed says"
    assert lines[2].startswith("DeepSpeed's CPU communication op: done in ") and lines[2].endswith(" s")
    assert len(lines) == 3


def test_other_ranks_and_built_ops_say_nothing(build_needed, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with distributed.shm_op_build_progress():
        _deepspeed_init_prints()
    assert capsys.readouterr().out == "something else DeepSpeed says\n"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "shm_op_build_dir", lambda: None)  # already built
    with distributed.shm_op_build_progress():
        _deepspeed_init_prints()
    assert capsys.readouterr().out == "something else DeepSpeed says\n"


def test_output_is_passed_on_when_the_build_fails(build_needed, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError):
        with distributed.shm_op_build_progress():
            print("ninja: build stopped: subcommand failed.")
            raise RuntimeError("Error building extension 'deepspeed_shm_comm'")
    out = capsys.readouterr().out
    assert "ninja: build stopped" in out and "done in" not in out


def test_build_dir_is_none_once_built(monkeypatch, tmp_path):
    """With the op's .so in TORCH_EXTENSIONS_DIR there is nothing to announce; without it, the
    build directory is named (CPU only: with CUDA DeepSpeed builds no such op)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("DeepSpeed builds the shm op on CPU only")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    found = distributed.shm_op_build_dir()
    if found is None:
        pytest.skip("this DeepSpeed ships the op prebuilt or cannot build it")
    assert found == tmp_path / "deepspeed_shm_comm"
    (found / "deepspeed_shm_comm.so").write_bytes(b"")
    assert distributed.shm_op_build_dir() is None
