"""Fused kernels of mmkd-ds, installed as ``mmkd_ds.kernels``.

Each op has a vectorised pure-torch reference; Triton versions dispatch on CUDA tensors.
"""

from mmkd_ds.kernels.word_pool import word_pool, word_pool_reference

__all__ = ["word_pool", "word_pool_reference"]
