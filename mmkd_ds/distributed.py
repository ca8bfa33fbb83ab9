"""Where this process sits in a multi-process job, read from the launcher's environment.

torchrun, `deepspeed` and SLURM (through the launch scripts) all export RANK, WORLD_SIZE and
LOCAL_RANK; a plain `python` run is rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessPlace:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_place() -> ProcessPlace:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return ProcessPlace(rank, world, local)


def init_distributed():
    """Join the job's process group (NCCL on GPUs, gloo on CPU); ``(place, device)`` of this rank.

    Works for a single plain ``python`` process too (a world of one). Returns a
    ``torch.device``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    import deepspeed
    import torch

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # A plain `python` run, no launcher: a world of one on a free local port (without these,
        # DeepSpeed falls back to MPI discovery and fails where mpi4py is missing).
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with _shm_op_build_watch(), shm_op_build_progress():
        deepspeed.init_distributed(dist_backend=backend)
    place = process_place()
    if torch.cuda.is_available():
        torch.cuda.set_device(place.local_rank)
        return place, torch.device("cuda", place.local_rank)
    return place, torch.device("cpu")


def _shm_op_build_watch():
    """On CPU, DeepSpeed builds its communication op here (mmkd_ds.extension_lock): a build
    cache per environment, a lock left by a dead builder removed, and a wait that says on what."""
    import torch

    if torch.cuda.is_available():
        return contextlib.nullcontext()
    from mmkd_ds.extension_lock import LockWaitReport, clear_stale_lock, lock_path

    lock = lock_path()  # also points TORCH_EXTENSIONS_DIR into this environment when unset
    if process_place().local_rank == 0 and clear_stale_lock(lock):
        print(f"removed {lock}: a build lock of DeepSpeed's CPU op that no living process holds", flush=True)
    return LockWaitReport(lock, f"rank {os.environ.get('RANK', '0')}: DeepSpeed's CPU communication op")


def shm_op_build_dir() -> Path | None:
    """Where DeepSpeed is about to compile its CPU communication op (``deepspeed_shm_comm``) in
    ``deepspeed.init_distributed``, as a ``Path``; None when it will not (CUDA, a prebuilt op, or
    one already built in ``$TORCH_EXTENSIONS_DIR``), or when that cannot be told."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return None
        if installed_ops.get(builder.NAME, False):
            return None
        build_dir = Path(_get_build_directory(builder.name, verbose=False))
        built = (build_dir / f"{builder.name}.so").exists()
    except Exception:  # noqa: BLE001 - private DeepSpeed/torch helpers: no announcement rather than a failure
        return None
    return None if built else build_dir


@contextlib.contextmanager
def shm_op_build_progress():
    """Around ``deepspeed.init_distributed``: rank 0 prints a line before DeepSpeed's first-time
    build of its CPU communication op (minutes, silent otherwise) and one with its duration after.
    DeepSpeed's own "... built successfully" line, printed by every rank on every run (also when
    the op was built before), is dropped; anything else it prints is passed on."""
    build_dir = shm_op_build_dir()
    announce = build_dir is not None and process_place().rank == 0
    if announce:
        print(f"building DeepSpeed's CPU communication op (first run only, about 2 min) in {build_dir}", flush=True)
    started = time.perf_counter()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        for line in captured.getvalue().splitlines():
            if not line.endswith("built successfully"):
                print(line, flush=True)
    if announce:
        print(f"DeepSpeed's CPU communication op: done in {time.perf_counter() - started:.0f} s", flush=True)


def shutdown() -> None:
    """Leave the process group together: a barrier, then destroy it, then free the shm buffer.

    A rank that exits while another still writes its outputs can die in teardown (gloo's
    threads see the peer go: "terminate called without an active exception", exit 250), so
    every rank waits for the others before tearing down. A no-op without a process group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release_shm_buffers()


def release_shm_buffers(place: ProcessPlace | None = None) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    DeepSpeed's shared-memory all-reduce (CPU ranks on one node) creates a ~66 MB file per rank
    named after the master address and port and never removes it; /dev/shm is RAM, so every
    run would leak memory until the machine's OOM killer steps in. Call at exit, after the last
    collective: an open mapping survives the unlink, and each rank removes only its own file.
    """
    import glob

    place = place or process_place()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{place.local_rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass


def abort(message: str, code: int) -> None:
    """Print and leave at once, skipping interpreter and process-group teardown.

    The other ranks may be blocked in a collective this rank will never join; a prompt exit
    lets the launcher see the failure and stop the whole job instead of hanging.
    """
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    release_shm_buffers()
    os._exit(code)
