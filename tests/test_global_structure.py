"""Global-batch structure loss across 2 real ranks equals one process over the whole batch.

With rows local and columns gathered with gradient, the mean of the ranks' losses is the loss
of the concatenated batch, and each rank's gradient (which receives the other ranks' column
terms through the all-gather's backward) is W times that batch's gradient for its rows, which
data-parallel averaging then divides by W.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkd_ds.kernels.structure_kl import structure_kl

WORKER = Path(__file__).parent / "dist_scripts" / "global_structure.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend, n_local, dim, tau", [("torch", 5, 12, 1.0), ("triton", 3, 7, 0.5)])
def test_global_columns_match_one_process(tmp_path, backend, n_local, dim, tau):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), str(tmp_path), backend, str(n_local), str(dim), str(tau)]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    g = torch.Generator().manual_seed(0)
    student_all = torch.randn(2 * n_local, dim, generator=g).requires_grad_(True)
    teacher_all = torch.randn(2 * n_local, dim + 3, generator=g)
    whole = structure_kl(student_all, teacher_all, tau, backend="torch")
    (whole * 1.7).backward()

    mean_loss = (parts[0]["loss"] + parts[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, whole.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]) / 2, student_all.grad, rtol=1e-4, atol=1e-6)
    # The ranks' own losses differ (different rows): the test is not trivially symmetric.
    assert not torch.allclose(parts[0]["loss"], parts[1]["loss"])
