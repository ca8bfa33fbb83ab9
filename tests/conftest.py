"""Shared fixtures: tiny models and tokenizers built on the spot (no hub access here).

The loading code under test stays the real ``from_pretrained`` path: the fixtures write
ordinary Hugging Face directories with ``save_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton kernels run on CPU through the interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep every test offline and quiet, whatever the machine's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed compiles its CPU communication op into TORCH_EXTENSIONS_DIR (default: the shared
# ~/.cache/torch_extensions, where two environments building it wait on each other's lock).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "runs" / "torch_extensions"))

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "mmkd_ds" / "data" / "sample"


def sample_texts(side: str = "both") -> list[str]:
    """Sentences of the bundled training sample (English, translation, or both)."""
    texts = []
    for path in sorted(SAMPLE_DIR.glob("train.en-*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            en, xx = line.split("\t")
            if side in ("en", "both"):
                texts.append(en)
            if side in ("xx", "both"):
                texts.append(xx)
    return texts


def make_tiny_bert(out_dir: Path, tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny BERT encoder with ``tokenizer`` to ``out_dir``."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny English BERT teacher with its own English WordPiece vocabulary (lower-cased)."""
    from mmkd_ds.student_tokenizer import train_wordpiece

    tok = train_wordpiece(sample_texts("en"), vocab_size=600, lowercase=True)
    return make_tiny_bert(tmp_path_factory.mktemp("teacher"), tok, hidden=32, seed=1)


@pytest.fixture(scope="session")
def student_tokenizer():
    """A multilingual cased WordPiece vocabulary trained on both sides: differs from the teacher's."""
    from mmkd_ds.student_tokenizer import train_wordpiece

    return train_wordpiece(sample_texts("both"), vocab_size=900, lowercase=False)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: faster, and immune to a busy
    2-core machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
