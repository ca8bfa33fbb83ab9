"""Extending a pretrained WordPiece vocabulary with tokens learned on the corpus's translations.

An English pretrained encoder used as the student covers Latin-script languages with short
pieces and splits other scripts into single characters (Urdu in the bundled sample). Adding
WordPiece tokens learned on the translations gives those languages real tokens:

1. normalise the translations with the old tokenizer's own normaliser, train a WordPiece model on
   them with its pre-tokenizer and continuation prefix;
2. rank the learned tokens that the old vocabulary lacks by how often the new model uses them on
   the translations, and keep the ``max_new`` most used;
3. append them to the old WordPiece vocabulary (new ids after the old ones), so the greedy
   longest-match tokenizer picks them wherever they fit;
4. initialise each new token's input embedding (and, with an MLM head, its output bias) as the
   mean over the old tokenizer's pieces of the same string.

Only WordPiece tokenizers (BERT family) are supported; the old ids are kept unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, trainers
from transformers import PreTrainedTokenizerFast


@dataclass
class VocabExtension:
    """The extended tokenizer and what was added."""

    tokenizer: PreTrainedTokenizerFast
    new_tokens: list[str]  # in id order, starting at ``first_id``
    first_id: int


def _state(tokenizer) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("vocabulary extension needs a fast (tokenizers-backed) tokenizer")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "WordPiece":
        raise ValueError(
            f"vocabulary extension supports WordPiece tokenizers only, this one is {state['model']['type']}"
        )
    return state


def learn_tokens(tokenizer, texts: Iterable[str], max_new: int, min_frequency: int = 2) -> list[str]:
    """Up to ``max_new`` WordPiece tokens learned on ``texts`` that ``tokenizer`` lacks, most used first."""
    state = _state(tokenizer)
    backend = tokenizer.backend_tokenizer
    prefix = state["model"].get("continuing_subword_prefix", "##")
    unk = state["model"]["unk_token"]
    normalized = [backend.normalizer.normalize_str(t) if backend.normalizer else t for t in texts]
    normalized = [t for t in normalized if t.strip()]
    if not normalized or max_new <= 0:
        return []
    learner = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix=prefix))
    learner.pre_tokenizer = backend.pre_tokenizer
    # Room for the alphabet plus enough merges that max_new of them are new to the old vocabulary.
    alphabet = {c for t in normalized for c in t if not c.isspace()}
    trainer = trainers.WordPieceTrainer(
        vocab_size=2 * len(alphabet) + 4 * max_new + 100, min_frequency=min_frequency,
        special_tokens=[unk], continuing_subword_prefix=prefix, show_progress=False,
    )
    learner.train_from_iterator(normalized, trainer=trainer)
    uses = Counter(tok for enc in learner.encode_batch(normalized) for tok in enc.tokens)
    old = state["model"]["vocab"]
    # Most used first; ties by the token itself so the choice is deterministic.
    ranked = sorted((t for t in uses if t not in old and t != unk and t != prefix), key=lambda t: (-uses[t], t))
    return ranked[:max_new]


def extend_tokenizer(tokenizer, new_tokens: list[str]) -> VocabExtension:
    """A copy of ``tokenizer`` whose WordPiece vocabulary also holds ``new_tokens``."""
    state = _state(tokenizer)
    vocab: dict[str, int] = state["model"]["vocab"]
    taken = [*vocab.values(), *(a["id"] for a in state.get("added_tokens", []))]
    first = max(taken) + 1
    fresh = [t for t in dict.fromkeys(new_tokens) if t not in vocab]
    for i, token in enumerate(fresh):
        vocab[token] = first + i
    backend = Tokenizer.from_str(json.dumps(state))
    specials = {name: getattr(tokenizer, name) for name in
                ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")
                if getattr(tokenizer, name, None) is not None}
    extended = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
                                       model_input_names=list(tokenizer.model_input_names), **specials)
    return VocabExtension(extended, fresh, first)


@torch.no_grad()
def init_new_embeddings(model: torch.nn.Module, old_tokenizer, extension: VocabExtension) -> None:
    """Resize ``model``'s token embeddings to the extended vocabulary and give every new token
    the mean of the old tokenizer's pieces of its string (its input embedding, and the MLM
    output bias when the model has one). The old rows are left untouched."""
    new_size = extension.first_id + len(extension.new_tokens)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bias = getattr(out, "bias", None) if out is not None else None
    prefix = "##"
    unk = old_tokenizer.unk_token_id
    for i, token in enumerate(extension.new_tokens):
        text = token[len(prefix):] if token.startswith(prefix) else token
        pieces = old_tokenizer(text, add_special_tokens=False)["input_ids"] or [unk]
        row = extension.first_id + i
        emb[row] = emb[pieces].mean(dim=0)
        if bias is not None and bias.shape[0] == new_size:
            bias[row] = bias[pieces].mean()
