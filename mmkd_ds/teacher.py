"""The frozen English teacher: loading, identity, and one batched forward to word vectors.

The teacher is loaded with the real ``from_pretrained`` path (hub name or local directory).
Its identity for the shard manifest is its name, revision and a hash of its weights, so shards
made by one teacher are never trained against the configuration of another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from mmkd_ds.config.schema import TeacherConfig
from mmkd_ds.kernels.word_pool import word_pool
from mmkd_ds.model_source import check_model_source, explained_load, resolve_model_path
from mmkd_ds.sentence_pooling import sentence_vectors
from mmkd_ds.words import encode_words

# The dtype the teacher's vectors are kept in between the forward and the shard writer: the
# storage dtype, except int8, which the writer quantises from float32 (mmkd_ds.shards.format).
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.float32}

def storage_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass
class Teacher:
    """A loaded teacher and what identifies it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    revision: str
    weights_sha256: str
    hidden_size: int
    cfg: TeacherConfig

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict:
        """The manifest's teacher record; training compares these fields with its config."""
        return {
            "name": self.name,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "hidden_size": self.hidden_size,
            "layer": self.cfg.layer,
            "pooling": self.cfg.pooling,
            "sentence": self.cfg.sentence,
            "dtype": self.cfg.dtype,
            "max_tokens": self.cfg.max_tokens,
        }


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the parameter and buffer names and fp32 bytes, in name order.

    Independent of the file format and of where the weights came from, so a local copy of a
    hub model hashes the same as the hub model.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> Teacher:
    """Load the teacher (eval mode, no gradients) and its fast tokenizer."""
    path = check_model_source("teacher.name", cfg.name)  # one line, not a traceback, if it cannot load
    is_local = Path(path).exists()
    kwargs = {} if is_local else {"revision": cfg.revision}
    hf_logging.disable_progress_bar()  # our own bar and summary say what happens
    with explained_load("teacher.name", cfg.name):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"teacher {cfg.name!r}: a fast tokenizer is needed for word mapping (word_ids)")
    with explained_load("teacher.name", cfg.name):
        model = AutoModel.from_pretrained(path, **kwargs)
    model.eval().requires_grad_(False)
    digest = weights_hash(model)
    model.to(device)
    revision = "local" if is_local else (getattr(model.config, "_commit_hash", None) or cfg.revision)
    return Teacher(model, tokenizer, cfg.name, revision, digest, int(model.config.hidden_size), cfg)


@dataclass
class TeacherFeatures:
    """Per-sentence teacher outputs, on CPU in the storage dtype."""

    cls: torch.Tensor  # [H] the sentence vector (teacher.sentence: [CLS] state or token mean)
    words: torch.Tensor  # [n_words, H]
    counts: list[int]  # teacher subwords per word (0: the tokenizer dropped the word)
    n_words: int  # words kept (truncation at the teacher's max_tokens cuts whole words)


@torch.inference_mode()
def teacher_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    word_ids: torch.Tensor,
    n_words: int,
    layer: int = -1,
    pooling: str = "mean",
    sentence: str = "cls",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's sentence vectors [B, H] and pooled word vectors [B, W, H], in fp32.

    Shared by the precompute and the online-teacher training mode, so both give the same
    targets. ``word_ids`` [B, L]: word index per subword, -1 for specials and padding.
    ``sentence``: "cls" (the [CLS] state) or "mean" (mean of the states under
    ``attention_mask``, specials included, as sentence-transformers' mean pooling).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=layer != -1)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    pooled, _ = word_pool(hidden.float(), word_ids, max(n_words, 1), pooling)
    return sentence_vectors(hidden.float(), attention_mask, sentence), pooled


def encode_batch(teacher: Teacher, word_lists: list[list[str]]) -> list[TeacherFeatures]:
    """One teacher forward over a batch of English word lists (the precompute's unit of work)."""
    cfg = teacher.cfg
    encs = [encode_words(teacher.tokenizer, words, cfg.max_tokens) for words in word_lists]
    B = len(encs)
    L = max(len(e.input_ids) for e in encs)
    W = max(max(e.n_words for e in encs), 1)
    pad_id = teacher.tokenizer.pad_token_id or 0
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    word_ids = torch.full((B, L), -1, dtype=torch.long)
    for i, e in enumerate(encs):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        word_ids[i, :n] = torch.tensor(e.word_ids)
    device = teacher.device
    cls, pooled = teacher_forward(
        teacher.model, input_ids.to(device), attention.to(device), word_ids.to(device), W, cfg.layer, cfg.pooling,
        cfg.sentence,
    )
    dtype = storage_dtype(cfg.dtype)
    cls = cls.to("cpu", dtype)
    pooled = pooled.to("cpu", dtype)
    return [
        TeacherFeatures(cls[i].clone(), pooled[i, : e.n_words].clone(), e.counts, e.n_words)
        for i, e in enumerate(encs)
    ]
