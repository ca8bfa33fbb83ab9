"""Worker for test_global_structure.py: run with torchrun --nproc_per_node 2.

Each rank holds its slice of a batch, computes the structure loss with its rows against the
columns gathered from all ranks (with gradient), backpropagates, and saves loss and gradient.
"""

import os
import sys

import torch
import torch.distributed as dist

from mmkd_ds.kernels.structure_kl import structure_kl
from mmkd_ds.models.mmkd import gather_columns

out, backend, n_local, dim, tau = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
student_all = torch.randn(world * n_local, dim, generator=g)
teacher_all = torch.randn(world * n_local, dim + 3, generator=g)
rows = slice(rank * n_local, (rank + 1) * n_local)
u = student_all[rows].clone().requires_grad_(True)
v = teacher_all[rows].clone()
loss = structure_kl(u, v, tau, student_cols=gather_columns(u, with_grad=True),
                    teacher_cols=gather_columns(v, with_grad=False), backend=backend)
(loss * 1.7).backward()
torch.save({"loss": loss.detach(), "grad": u.grad}, f"{out}/rank{rank}.pt")
# Both ranks are done with every collective; leave without gloo's teardown, which can abort
# ("terminate called without an active exception") when the ranks exit at different moments.
dist.barrier()
sys.stdout.flush()
os._exit(0)
