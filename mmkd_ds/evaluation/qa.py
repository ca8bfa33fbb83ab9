"""Zero-shot cross-lingual extractive QA: fine-tune on SQuAD v1.1 (English), evaluate on XQuAD.

The model (a distilled student directory, typically a ``*ForMaskedLM``) is loaded with
``AutoModelForQuestionAnswering``, which keeps the encoder and adds a new, seeded span head. It
is fine-tuned on the English SQuAD v1.1 training split only, then scored on the XQuAD
validation split of every requested language with the SQuAD v1.1 metrics
(:mod:`mmkd_ds.evaluation.squad_metrics`; exact match and F1 in [0, 1]).

Data sources
------------
Without ``data_dir`` the Hugging Face hub is used::

    load_dataset("rajpurkar/squad", split="train")
    load_dataset("google/xquad", f"xquad.{lang}", split="validation")   # e.g. "xquad.de"

With ``data_dir`` the same rows are read from local JSON-lines files, one object a line::

    <data_dir>/squad/train.jsonl
    <data_dir>/xquad/<lang>.jsonl          # de.jsonl, ar.jsonl, ...

in the hub schema::

    {"id": "56be4db0acb8001400a502ec", "context": "...", "question": "...",
     "answers": {"text": ["Denver Broncos"], "answer_start": [177]}}

(a ``title`` field, as on the hub, is allowed and ignored). Every row is validated: the fields
must be present and of the right type, there must be at least one answer, ``text`` and
``answer_start`` must have the same length, ids must be unique, and
``context[answer_start : answer_start + len(text)]`` must equal ``text``. Errors name the file
(or hub dataset) and the line (or row); a missing language names the language and the path.
XQuAD has no Swahili or Urdu, so the low-resource average of the result is usually ``None``.

Method
------
Preprocessing (fast tokenizer): ``question, context`` pairs with ``truncation="only_second"``,
``max_length`` and ``stride=doc_stride`` (tokens shared by consecutive windows),
``return_overflowing_tokens`` and ``return_offsets_mapping``: a long context gives several
windows. Training labels: the start/end tokens of the (first) answer when it lies wholly in the
window, else the [CLS] index for both; training batches are padded to ``max_length`` (see
``finetune_and_evaluate_qa``). Post-processing: per window, the ``n_best`` highest
start and end logits are paired; a pair is valid when both tokens belong to the context,
start <= end and the span has at most ``max_answer_length`` tokens; its score is
start_logit + end_logit, the best valid span over all windows of an example wins, and its text
is the context substring given by the offsets (an example without any valid span predicts "").
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from pathlib import Path

import torch

from mmkd_ds.evaluation.finetune import Finetuner, FinetuneSettings, start_runtime
from mmkd_ds.evaluation.report import LOW_RESOURCE, TaskResult
from mmkd_ds.model_source import check_model_source, explained_load
from mmkd_ds.evaluation.squad_metrics import squad_scores

logger = logging.getLogger(__name__)

SQUAD_HUB = "rajpurkar/squad"
XQUAD_HUB = "google/xquad"
XQUAD_LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")

_WARMUP_FRACTION = 0.1
_MAX_GRAD_NORM = 1.0


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def validate_qa_rows(rows, origin: str, line_of=None) -> list[dict]:
    """Check SQuAD-schema rows and return them as plain dicts.

    ``origin`` names the source in errors (a file or a hub dataset); ``line_of(i)`` gives the
    location of row ``i`` (default ``"row {i}"``). Raises ``ValueError`` on an empty source and
    on the first malformed row.
    """
    where = line_of or (lambda i: f"row {i}")
    out: list[dict] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        loc = f"{origin}, {where(i)}"
        if not isinstance(row, dict):
            raise ValueError(f"{loc}: expected an object, got {type(row).__name__}")
        missing = [k for k in ("id", "context", "question", "answers") if k not in row]
        if missing:
            raise ValueError(f"{loc}: missing field(s) {', '.join(missing)}")
        qid, context, question, answers = row["id"], row["context"], row["question"], row["answers"]
        for name, value in (("id", qid), ("context", context), ("question", question)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{loc}: field {name!r} must be a non-empty string, got {value!r}")
        if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
            raise ValueError(f"{loc} (id {qid!r}): 'answers' must be {{'text': [...], 'answer_start': [...]}}")
        texts, starts = list(answers["text"]), list(answers["answer_start"])
        if not texts or len(texts) != len(starts):
            raise ValueError(
                f"{loc} (id {qid!r}): answers need at least one text and as many answer_start values "
                f"({len(texts)} texts, {len(starts)} starts)"
            )
        for text, start in zip(texts, starts):
            if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
                raise ValueError(f"{loc} (id {qid!r}): bad answer text/start {text!r}/{start!r}")
            found = context[start : start + len(text)]
            if start < 0 or found != text:
                raise ValueError(
                    f"{loc} (id {qid!r}): answer_start {start} does not point at the answer {text!r} "
                    f"in the context (found {found!r})"
                )
        if qid in seen:
            raise ValueError(f"{loc}: duplicate id {qid!r}")
        seen.add(qid)
        out.append(
            {
                "id": qid,
                "context": context,
                "question": question,
                "answers": {"text": texts, "answer_start": [int(s) for s in starts]},
            }
        )
    if not out:
        raise ValueError(f"{origin}: no examples (empty split)")
    return out


def _read_jsonl(path: Path) -> list[dict]:
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from exc
            lines.append(lineno)
    return validate_qa_rows(rows, str(path), line_of=lambda i: f"line {lines[i]}")


def load_squad_train(data_dir: str | Path | None = None) -> tuple[list[dict], str]:
    """SQuAD v1.1 training examples and a description of their source."""
    if data_dir is not None:
        path = Path(data_dir) / "squad" / "train.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"SQuAD training data: {path} does not exist")
        return _read_jsonl(path), str(path)
    from datasets import load_dataset

    origin = f"{SQUAD_HUB} (train)"
    return validate_qa_rows(load_dataset(SQUAD_HUB, split="train"), origin), origin


def load_xquad(lang: str, data_dir: str | Path | None = None) -> tuple[list[dict], str]:
    """XQuAD validation examples of ``lang`` and a description of their source."""
    if data_dir is not None:
        folder = Path(data_dir) / "xquad"
        path = folder / f"{lang}.jsonl"
        if not path.is_file():
            present = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
            raise FileNotFoundError(
                f"XQuAD language {lang!r}: {path} does not exist (languages present: {', '.join(present) or 'none'})"
            )
        return _read_jsonl(path), str(path)
    if lang not in XQUAD_LANGUAGES:
        raise ValueError(f"XQuAD has no language {lang!r} (available: {', '.join(XQUAD_LANGUAGES)})")
    from datasets import load_dataset

    config = f"xquad.{lang}"
    origin = f"{XQUAD_HUB}/{config} (validation)"
    return validate_qa_rows(load_dataset(XQUAD_HUB, config, split="validation"), origin), origin


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _tokenize(examples: list[dict], tokenizer, max_length: int, doc_stride: int):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("QA preprocessing needs a fast tokenizer (offset mappings)")
    if doc_stride >= max_length:
        raise ValueError(f"doc_stride ({doc_stride}) must be smaller than max_length ({max_length})")
    return tokenizer(
        [ex["question"].lstrip() for ex in examples],
        [ex["context"] for ex in examples],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def prepare_train_features(examples: list[dict], tokenizer, max_length: int = 256, doc_stride: int = 64) -> list[dict]:
    """One feature per window: ``input_ids``, ``attention_mask``, (``token_type_ids``),
    ``start_positions``, ``end_positions`` and ``example_index``.

    The labels are the first and last tokens of the first answer when the answer lies wholly in
    the window's context, else the [CLS] index for both.
    """
    enc = _tokenize(examples, tokenizer, max_length, doc_stride)
    features = []
    for i in range(len(enc["input_ids"])):
        ex_index = enc["overflow_to_sample_mapping"][i]
        ex = examples[ex_index]
        input_ids = enc["input_ids"][i]
        offsets = enc["offset_mapping"][i]
        seq_ids = enc.sequence_ids(i)
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        start_char = ex["answers"]["answer_start"][0]
        end_char = start_char + len(ex["answers"]["text"][0])
        ctx = [k for k, s in enumerate(seq_ids) if s == 1]
        start_tok = end_tok = cls_index
        if ctx and offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
            # first context token ending after the answer start; last one starting before its end
            start_tok = next(k for k in ctx if offsets[k][1] > start_char)
            end_tok = next(k for k in reversed(ctx) if offsets[k][0] < end_char)
        feature = {
            "input_ids": input_ids,
            "attention_mask": enc["attention_mask"][i],
            "start_positions": start_tok,
            "end_positions": end_tok,
            "example_index": ex_index,
        }
        if "token_type_ids" in enc:
            feature["token_type_ids"] = enc["token_type_ids"][i]
        features.append(feature)
    return features


def prepare_eval_features(examples: list[dict], tokenizer, max_length: int = 256, doc_stride: int = 64) -> list[dict]:
    """One feature per window with ``example_index`` and ``offset_mapping``, in which the
    offsets of non-context tokens (question, special tokens) are ``None``."""
    enc = _tokenize(examples, tokenizer, max_length, doc_stride)
    features = []
    for i in range(len(enc["input_ids"])):
        seq_ids = enc.sequence_ids(i)
        feature = {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "example_index": enc["overflow_to_sample_mapping"][i],
            "offset_mapping": [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)],
        }
        if "token_type_ids" in enc:
            feature["token_type_ids"] = enc["token_type_ids"][i]
        features.append(feature)
    return features


def _collate(features: list[dict], pad_id: int, keys: tuple[str, ...], width: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors of ``features`` padded to ``width`` (default: the longest feature)."""
    width = width or max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in features[0]:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
    for key in keys:
        batch[key] = torch.tensor([f[key] for f in features])
    return batch


# ----------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------


def postprocess_predictions(
    examples: list[dict],
    features: list[dict],
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """``{example id: answer text}``: the best valid span over all windows of each example.

    ``features`` come from :func:`prepare_eval_features`; ``start_logits[i]`` / ``end_logits[i]``
    are the logits of feature ``i`` (a sequence per feature; its length may exceed the window
    because of padding). See the module docstring for what makes a span valid.
    """
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ValueError(
            f"postprocess_predictions: {len(features)} features but {len(start_logits)} start and "
            f"{len(end_logits)} end logit rows"
        )
    best: dict[int, tuple[float, str]] = {}
    for i, feat in enumerate(features):
        offsets = feat["offset_mapping"]
        context = examples[feat["example_index"]]["context"]
        n = len(offsets)
        s_logits = torch.as_tensor(start_logits[i], dtype=torch.float32)[:n]
        e_logits = torch.as_tensor(end_logits[i], dtype=torch.float32)[:n]
        k = min(n_best, n)
        starts = torch.topk(s_logits, k).indices.tolist()
        ends = torch.topk(e_logits, k).indices.tolist()
        for s in starts:
            if offsets[s] is None:
                continue
            for e in ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_logits[s] + e_logits[e])
                current = best.get(feat["example_index"])
                if current is None or score > current[0]:
                    best[feat["example_index"]] = (score, context[offsets[s][0] : offsets[e][1]])
    return {ex["id"]: best[j][1] if j in best else "" for j, ex in enumerate(examples)}


# ----------------------------------------------------------------------------------------------
# Fine-tuning and evaluation
# ----------------------------------------------------------------------------------------------


def predict_answers(
    finetuner: Finetuner, tokenizer, examples: list[dict], *, max_length: int = 256, doc_stride: int = 64,
    batch_size: int = 16, n_best: int = 20, max_answer_length: int = 30, filler: dict | None = None,
) -> dict[str, str]:
    """``{example id: predicted answer}`` for ``examples`` (this rank's share), eval mode, no grad.

    ``filler`` is any valid example, used for the padding forwards that keep the ranks in step
    (needed when this rank's share is empty; defaults to the first example).
    """
    features = prepare_eval_features(examples, tokenizer, max_length, doc_stride)
    pad_id = tokenizer.pad_token_id
    batches = [_collate(features[b : b + batch_size], pad_id, ()) for b in range(0, len(features), batch_size)]
    filler = filler if filler is not None else examples[0]
    filler_batch = _collate(prepare_eval_features([filler], tokenizer, max_length, doc_stride)[:1], pad_id, ())
    outputs = finetuner.run_forwards(batches, filler_batch,
                                     lambda out: (out.start_logits.float().cpu(), out.end_logits.float().cpu()))
    starts = [row for s, _ in outputs for row in s]
    ends = [row for _, e in outputs for row in e]
    return postprocess_predictions(examples, features, starts, ends, n_best, max_answer_length)


def finetune_and_evaluate_qa(
    model_path,
    languages,
    data_dir=None,
    *,
    epochs: int = 2,
    lr: float = 3e-5,
    batch_size: int = 16,
    max_length: int = 256,
    doc_stride: int = 64,
    seed: int = 42,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    device=None,
    deepspeed_config: str | None = None,
    low_resource=LOW_RESOURCE,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> TaskResult:
    """Fine-tune ``model_path`` on SQuAD v1.1 and score it on XQuAD in each of ``languages``.

    Training (:mod:`mmkd_ds.evaluation.finetune`): AdamW (weight decay 0.01, none on biases and
    LayerNorm), linear warm-up over the first 10% of the steps then linear decay to 0, gradient
    clipping at 1.0, global batches of ``batch_size`` windows shuffled from a generator seeded
    with ``seed`` (the new QA head is initialised under the same seed); one process (bf16
    autocast on CUDA) or data-parallel ranks through DeepSpeed when launched by ``deepspeed`` or
    given ``deepspeed_config``. ``max_train_examples`` keeps a seeded random subset of SQuAD;
    ``max_eval_examples`` keeps the first examples of each language. All data is loaded and
    validated before training starts. Returns a ``TaskResult`` (task ``"xquad"``, main metric
    ``"f1"``, scores ``{lang: {"exact_match", "f1"}}`` in [0, 1]); every rank returns the same.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    languages = list(dict.fromkeys(languages))
    if not languages:
        raise ValueError("finetune_and_evaluate_qa: no languages")
    settings = FinetuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=0.01,
                                warmup_ratio=_WARMUP_FRACTION, grad_clip=_MAX_GRAD_NORM, seed=seed)
    settings.validate("finetune_and_evaluate_qa")

    train, train_source = load_squad_train(data_dir)
    evals = {lang: load_xquad(lang, data_dir) for lang in languages}
    if max_train_examples is not None and max_train_examples < len(train):
        keep = sorted(random.Random(seed).sample(range(len(train)), max_train_examples))
        train = [train[i] for i in keep]
    if max_eval_examples is not None:
        evals = {lang: (rows[:max_eval_examples], src) for lang, (rows, src) in evals.items()}

    path = check_model_source("--model", str(model_path))  # packaged names -> their directory
    runtime = start_runtime(deepspeed_config, device)
    torch.manual_seed(seed)  # the new span head: the same on every rank
    with explained_load("--model", str(model_path)):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForQuestionAnswering.from_pretrained(path)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings {limit}")

    features = prepare_train_features(train, tokenizer, max_length, doc_stride)
    steps_per_epoch, warmup = settings.steps(len(features), runtime.world_size)
    total = steps_per_epoch * epochs
    if total == 0:
        raise ValueError(f"finetune_and_evaluate_qa: {len(features)} training windows make no batch "
                         f"for {runtime.world_size} ranks")
    finetuner = Finetuner(model, runtime, settings, total, warmup)
    generator = torch.Generator().manual_seed(seed)
    pad_id = tokenizer.pad_token_id
    epoch_losses: list[float] = []
    with tqdm(total=total, desc="squad fine-tune", disable=None if runtime.is_main else True) as bar:
        for _ in range(epochs):
            loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
            n = 0
            for indices, n_global in finetuner.epoch_batches(len(features), generator):
                # Padded to max_length, not to the batch's longest window: the span head's softmax
                # runs over every position, padding included, so a batch-dependent width would make
                # an example's loss depend on its batch mates (and on how ranks split the batch).
                batch = _collate([features[i] for i in indices], pad_id, ("start_positions", "end_positions"),
                                 width=max_length)
                batch = {k: v.to(runtime.device) for k, v in batch.items()}
                loss = finetuner.train_step(batch, len(indices), n_global)
                loss_sum += loss * len(indices)
                n += len(indices)
                bar.update(1)
            epoch_losses.append(finetuner.reduce_mean(loss_sum, n))
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")

    scores, counts, sources = {}, {}, {}
    for lang, (rows, source) in evals.items():
        local = predict_answers(
            finetuner, tokenizer, finetuner.shard(rows), max_length=max_length, doc_stride=doc_stride,
            batch_size=batch_size, n_best=n_best, max_answer_length=max_answer_length, filler=rows[0],
        )
        preds = {k: v for part in finetuner.gather(local) for k, v in part.items()}
        scores[lang] = squad_scores(preds, {ex["id"]: ex["answers"]["text"] for ex in rows})
        counts[lang] = len(rows)
        sources[lang] = source

    result = TaskResult(
        task="xquad",
        model=str(model_path),
        main_metric="f1",
        scores=scores,
        examples=counts,
        low_resource=tuple(low_resource),
        settings={
            **asdict(settings),
            "max_length": max_length,
            "doc_stride": doc_stride,
            "n_best": n_best,
            "max_answer_length": max_answer_length,
            "max_train_examples": max_train_examples,
            "max_eval_examples": max_eval_examples,
            "train_examples": len(train),
            "train_features": len(features),
            "warmup_steps": warmup,
            "train_steps": total,
            "epoch_losses": epoch_losses,
            **runtime.describe(),
            "train_data": train_source,
            "eval_data": sources,
            "metric_scale": "[0, 1] (official SQuAD script: x100)",
        },
    )
    langs = ", ".join(f"{lang} {100 * s['f1']:.1f}" for lang, s in scores.items())
    if runtime.is_main:
        logger.info("xquad: avg F1 %.1f (%s)", 100 * result.average, langs)
    return result
