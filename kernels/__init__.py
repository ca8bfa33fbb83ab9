"""Fused kernels of mmkd-ds, installed as ``mmkd_ds.kernels``.

One module per op, each with a Triton forward and backward behind a torch.autograd.Function
and a vectorised pure-torch reference beside it:

- ``mmkd_ds.kernels.structure_kl``: the structure-level KL over batch similarity matrices,
  tiled with an online softmax (memory O(N·D), no N×N matrix);
- ``mmkd_ds.kernels.word_pool``: subword -> word pooling (mean or first subword).

Dispatch: Triton on CUDA tensors, the torch reference elsewhere; ``backend=`` or the
environment variable ``MMKD_KERNELS`` (auto|triton|torch) forces one. Import the functions
from their modules (``from mmkd_ds.kernels.word_pool import word_pool``): the package does
not re-export them, so that the module names stay importable as modules.
"""
