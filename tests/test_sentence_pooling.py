"""sentence_vectors: the one definition of a sentence vector (training targets, student, retrieval)."""

from __future__ import annotations

import pytest
import torch

from mmkd_ds.sentence_pooling import sentence_vectors


def test_cls_is_row_zero_and_mean_ignores_padding():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert torch.equal(sentence_vectors(hidden, mask, "cls"), hidden[:, 0])
    mean = sentence_vectors(hidden, mask, "mean")
    for i, n in enumerate((5, 2, 3)):
        assert torch.allclose(mean[i], hidden[i, :n].mean(0))
    garbage = hidden.clone()
    garbage[1, 2:] = 1e6  # whatever padding positions hold
    assert torch.allclose(sentence_vectors(garbage, mask, "mean"), mean)


def test_empty_row_gives_zeros_and_dtype_is_kept():
    hidden = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    out = sentence_vectors(hidden, torch.tensor([[0, 0, 0], [1, 1, 0]]), "mean")
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], torch.zeros(4, dtype=torch.bfloat16))


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="cls, mean|'cls', 'mean'"):
        sentence_vectors(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")
