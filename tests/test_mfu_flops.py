"""benchmarks/mfu.py's FLOP formula against torch's FlopCounterMode on a real BERT step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mfu import model_flops  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_model_flops_equal_the_counted_matmuls(attn):
    """Rows of different lengths, each encoded without padding, the MLM head at the scored
    positions, forward and backward: the formula gives exactly what FlopCounterMode counts."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=40, max_position_embeddings=64, attn_implementation=attn)
    model = BertForMaskedLM(config)
    lengths = [5, 9, 13]
    R, L = len(lengths), max(lengths)
    ids = torch.randint(5, 97, (R, L))
    attention = torch.zeros(R, L, dtype=torch.long)
    labels = torch.full((R, L), -100)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
        labels[i, 1:n:3] = ids[i, 1:n:3]  # a third of each row scored
    with FlopCounterMode(display=False) as counter:
        scored = []
        for i, n in enumerate(lengths):
            h = model.bert(input_ids=ids[i:i + 1, :n]).last_hidden_state[0]  # no padding
            scored.append(h[labels[i, :n] != -100])
        logits = model.cls(torch.cat(scored))
        torch.nn.functional.cross_entropy(logits, labels[labels != -100]).backward()
    counted = counter.get_total_flops()
    formula = model_flops({"attention_mask": attention, "tlm_labels": labels}, 24, 40, 2, 97)
    assert formula == pytest.approx(counted, rel=1e-9), (formula, counted)


def test_word_map_and_padding():
    """Padding positions cost nothing in the formula; the word map adds 3 x 2 B W H H_T."""
    batch = {"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), "word_valid": torch.ones(2, 3, dtype=torch.bool)}
    base = model_flops(batch, 8, 16, 1, 50)
    per_row = [3 * (2 * n * (4 * 64 + 2 * 8 * 16) + 4 * 8 * n * n) for n in (2, 4)]
    assert base == sum(per_row)
    assert model_flops(batch, 8, 16, 1, 50, teacher_hidden=12) - base == 3 * 2 * 6 * 8 * 12
