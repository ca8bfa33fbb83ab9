"""Zero-shot cross-lingual sentence-pair classification: XNLI and PAWS-X.

The model (a distilled student directory, or any Hugging Face encoder) gets a new
classification head, is fine-tuned on the English training split only, and is then evaluated
on the test split of every requested language: the gap between English and the other
languages measures cross-lingual transfer, the paper's headline evaluation.

Tasks (:data:`TASKS`):

- ``"xnli"``: hub dataset ``facebook/xnli``, one config per language code (``en``, ``de``,
  ``fr``, ``sw``, ``ur``, ...); columns ``premise``, ``hypothesis``, ``label`` in {0, 1, 2}.
- ``"pawsx"``: hub dataset ``google-research-datasets/paws-x``, configs ``en de es fr ja ko zh``
  (no ``sw``/``ur``: the low-resource average of the result is then ``None``); columns
  ``sentence1``, ``sentence2``, ``label`` in {0, 1}.

Training data: config ``en``, split ``train``; evaluation: split ``test`` of each language.

Data sources. Without ``data_dir`` the data come from the hub through
``datasets.load_dataset(hub_name, lang, split=split)``. With ``data_dir`` (offline clusters)
they come from local files in the same column schema::

    <data_dir>/
      en/train.jsonl          # or train.tsv
      en/test.jsonl
      de/test.jsonl
      sw/test.tsv
      ...

``.jsonl``: one JSON object per line (blank lines skipped), e.g.
``{"premise": "...", "hypothesis": "...", "label": 2}``. ``.tsv``: tab-separated with a header
row naming the columns (no quoting; a label is written as its integer). Extra columns are
ignored. When both ``<split>.jsonl`` and ``<split>.tsv`` exist, ``.jsonl`` is used.

Validation: a requested language without a config (hub) or directory (local) is an error naming
the language and where it looked; an empty split is an error naming task, language and split; a
malformed row (missing column, non-string text, label outside the task's labels) is an error
naming the file and line (local) or the dataset and row index (hub).

``max_train_examples`` takes a seeded random subset of the English training split (the same
seed gives the same subset); ``max_eval_examples`` takes the first N rows of each test split.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmkd_ds.evaluation.finetune import Finetuner, FinetuneSettings, start_runtime
from mmkd_ds.evaluation.report import LOW_RESOURCE, TaskResult
from mmkd_ds.model_source import check_model_source, explained_load


@dataclass(frozen=True)
class TaskSpec:
    """What identifies a sentence-pair classification task and its data schema."""

    name: str
    hub_name: str
    text_columns: tuple[str, str]
    num_labels: int
    languages: tuple[str, ...]  # hub configs
    train_language: str = "en"
    train_split: str = "train"
    test_split: str = "test"
    label_column: str = "label"

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.text_columns, self.label_column)


TASKS: dict[str, TaskSpec] = {
    "xnli": TaskSpec(
        name="xnli",
        hub_name="facebook/xnli",
        text_columns=("premise", "hypothesis"),
        num_labels=3,
        languages=("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"),
    ),
    "pawsx": TaskSpec(
        name="pawsx",
        hub_name="google-research-datasets/paws-x",
        text_columns=("sentence1", "sentence2"),
        num_labels=2,
        languages=("en", "de", "es", "fr", "ja", "ko", "zh"),
    ),
}

# One example: (first text, second text, label).
Example = tuple[str, str, int]


def get_task(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown classification task {task!r}; known: {', '.join(sorted(TASKS))}") from None


# --------------------------------------------------------------------------------------------
# Data loading and validation
# --------------------------------------------------------------------------------------------


def _check_row(spec: TaskSpec, row, where: str) -> Example:
    """Validate one row (a mapping) against the task's schema; ``where`` names it in errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with columns {list(spec.columns)}, got {type(row).__name__}")
    missing = [c for c in spec.columns if c not in row]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing} (task {spec.name} needs {list(spec.columns)})")
    a, b = (row[c] for c in spec.text_columns)
    for col, value in zip(spec.text_columns, (a, b)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: column {col!r} must be a string, got {type(value).__name__} {value!r}")
    label = row[spec.label_column]
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label.strip())
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_labels:
        raise ValueError(
            f"{where}: label {row[spec.label_column]!r} is not one of task {spec.name}'s labels "
            f"{list(range(spec.num_labels))}"
        )
    return a, b, label


def _read_jsonl(spec: TaskSpec, path: Path) -> list[Example]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            out.append(_check_row(spec, row, where))
    return out


def _read_tsv(spec: TaskSpec, path: Path) -> list[Example]:
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            return out
        missing = [c for c in spec.columns if c not in header]
        if missing:
            raise ValueError(
                f"{path}:1: header {header} lacks column(s) {missing} (task {spec.name} needs {list(spec.columns)})"
            )
        for lineno, fields in enumerate(reader, start=2):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            where = f"{path}:{lineno}"
            if len(fields) != len(header):
                raise ValueError(f"{where}: {len(fields)} tab-separated fields, header has {len(header)}")
            out.append(_check_row(spec, dict(zip(header, fields)), where))
    return out


def _load_local(spec: TaskSpec, data_dir: Path, lang: str, split: str) -> tuple[list[Example], str]:
    lang_dir = data_dir / lang
    if not lang_dir.is_dir():
        raise FileNotFoundError(
            f"{spec.name}: language {lang!r} not found: no directory {lang_dir} "
            f"(expected {lang_dir}/{split}.jsonl or {split}.tsv)"
        )
    for suffix, reader in ((".jsonl", _read_jsonl), (".tsv", _read_tsv)):
        path = lang_dir / f"{split}{suffix}"
        if path.is_file():
            return reader(spec, path), str(path)
    raise FileNotFoundError(
        f"{spec.name}: language {lang!r} has no {split!r} split: looked for "
        f"{lang_dir / (split + '.jsonl')} and {lang_dir / (split + '.tsv')}"
    )


def _load_hub(spec: TaskSpec, lang: str, split: str) -> tuple[list[Example], str]:
    if lang not in spec.languages:
        raise ValueError(
            f"{spec.name}: language {lang!r} not found: the hub dataset {spec.hub_name} has no config "
            f"{lang!r} (configs: {', '.join(spec.languages)})"
        )
    import datasets

    ds = datasets.load_dataset(spec.hub_name, lang, split=split)
    name = f"{spec.hub_name}[{lang}/{split}]"
    missing = [c for c in spec.columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing} (task {spec.name} needs {list(spec.columns)})")
    cols = {c: ds[c] for c in spec.columns}  # column-wise: much faster than row dicts
    out = []
    for i in range(len(ds)):
        out.append(_check_row(spec, {c: cols[c][i] for c in spec.columns}, f"{name} row {i}"))
    return out, f"hub:{name}"


def load_split(
    task: str | TaskSpec, lang: str, split: str, data_dir: str | Path | None = None
) -> tuple[list[Example], str]:
    """``(examples, source)`` of one language's split, validated; raises on an empty split."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if data_dir is not None:
        examples, source = _load_local(spec, Path(data_dir), lang, split)
    else:
        examples, source = _load_hub(spec, lang, split)
    if not examples:
        raise ValueError(f"{spec.name}: the {split!r} split of language {lang!r} is empty ({source})")
    return examples, source


# --------------------------------------------------------------------------------------------
# Fine-tuning and evaluation
# --------------------------------------------------------------------------------------------


def _load_classifier(model_path: str, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = check_model_source("--model", str(model_path))  # packaged names -> their directory
    with explained_load("--model", str(model_path)):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer


def _encode(tokenizer, batch: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [e[0] for e in batch],
        [e[1] for e in batch],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return dict(enc)


def count_correct(
    finetuner: Finetuner, tokenizer, examples: list[Example], batch_size: int, max_length: int, filler: Example
) -> int:
    """Correct predictions over ``examples`` (this rank's share), in eval mode without grad."""
    batches = [_encode(tokenizer, examples[s : s + batch_size], max_length) for s in range(0, len(examples), batch_size)]
    preds = finetuner.run_forwards(batches, _encode(tokenizer, [filler], max_length),
                                   lambda out: out.logits.float().argmax(dim=-1).cpu())
    labels = torch.tensor([e[2] for e in examples], dtype=torch.long)
    return int((torch.cat(preds) == labels).sum()) if preds else 0


def finetune_and_evaluate(
    task: str,
    model_path: str,
    languages: list[str],
    data_dir: str | None = None,
    *,
    epochs: int = 2,
    lr: float = 2e-5,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 42,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    device: torch.device | str | None = None,
    deepspeed_config: str | None = None,
    low_resource: tuple[str, ...] | list[str] = LOW_RESOURCE,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    grad_clip: float = 1.0,
) -> TaskResult:
    """Fine-tune ``model_path`` on the task's English training split, test on every language.

    The model loads through ``AutoModelForSequenceClassification.from_pretrained(model_path,
    num_labels=...)`` (a masked-LM student gets a new, seeded classification head). Training
    (:mod:`mmkd_ds.evaluation.finetune`): AdamW (no decay on biases and LayerNorm), linear
    warm-up over ``warmup_ratio`` of the steps then linear decay to 0, gradient clipping at
    ``grad_clip``, global batches of ``batch_size`` shuffled by a ``torch.Generator`` seeded with
    ``seed``; one process (bf16 autocast on CUDA, fp32 on CPU) or data-parallel ranks through
    DeepSpeed when launched by ``deepspeed`` or given ``deepspeed_config``. Every language's
    test split (English too, when listed) is loaded and validated before training starts, so a
    missing language fails fast. Every rank returns the same result.
    """
    spec = get_task(task)
    languages = list(dict.fromkeys(languages))
    if not languages:
        raise ValueError(f"{spec.name}: no languages to evaluate")
    settings = FinetuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                                warmup_ratio=warmup_ratio, grad_clip=grad_clip, seed=seed)
    settings.validate(spec.name)
    if max_length < 1:
        raise ValueError(f"{spec.name}: max_length must be >= 1, got {max_length}")
    for name, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
        if value is not None and value < 1:
            raise ValueError(f"{spec.name}: {name} must be >= 1 or None, got {value}")

    # Data first: bad input fails before any training time is spent.
    train, train_source = load_split(spec, spec.train_language, spec.train_split, data_dir)
    if max_train_examples is not None and len(train) > max_train_examples:
        keep = sorted(random.Random(seed).sample(range(len(train)), max_train_examples))
        train = [train[i] for i in keep]
    tests: dict[str, list[Example]] = {}
    test_sources: dict[str, str] = {}
    for lang in languages:
        examples, source = load_split(spec, lang, spec.test_split, data_dir)
        tests[lang] = examples[:max_eval_examples] if max_eval_examples is not None else examples
        test_sources[lang] = source

    runtime = start_runtime(deepspeed_config, device)
    torch.manual_seed(seed)  # the new head: the same on every rank
    model, tokenizer = _load_classifier(model_path, spec.num_labels)
    steps_per_epoch, warmup_steps = settings.steps(len(train), runtime.world_size)
    total_steps = steps_per_epoch * epochs
    if total_steps == 0:
        raise ValueError(f"{spec.name}: {len(train)} training examples make no batch for {runtime.world_size} ranks")
    finetuner = Finetuner(model, runtime, settings, total_steps, warmup_steps)
    generator = torch.Generator().manual_seed(seed)

    epoch_losses: list[float] = []
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        total = torch.zeros((), dtype=torch.float64, device=runtime.device)
        n = 0
        for indices, n_global in finetuner.epoch_batches(len(train), generator):
            batch = [train[i] for i in indices]
            inputs = {k: v.to(runtime.device) for k, v in _encode(tokenizer, batch, max_length).items()}
            inputs["labels"] = torch.tensor([e[2] for e in batch], device=runtime.device)
            loss = finetuner.train_step(inputs, len(batch), n_global)
            total += loss * len(batch)  # stays on the device: no sync per step
            n += len(batch)
        epoch_losses.append(finetuner.reduce_mean(total, n))
        if runtime.is_main:
            print(
                f"{spec.name} epoch {epoch}/{epochs}: train loss {epoch_losses[-1]:.4f} "
                f"({steps_per_epoch} steps, {time.time() - t0:.1f}s)",
                flush=True,
            )

    scores: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for lang in languages:
        correct = count_correct(finetuner, tokenizer, finetuner.shard(tests[lang]), batch_size, max_length,
                                filler=tests[lang][0])
        correct_all, = finetuner.sum([correct])
        scores[lang] = {"accuracy": correct_all / len(tests[lang])}
        counts[lang] = len(tests[lang])

    import transformers

    record = {
        "task": spec.name,
        "hub_name": spec.hub_name,
        "num_labels": spec.num_labels,
        "data_source": str(data_dir) if data_dir is not None else f"hub:{spec.hub_name}",
        "train_source": train_source,
        "test_sources": test_sources,
        "train_language": spec.train_language,
        "train_split": spec.train_split,
        "test_split": spec.test_split,
        "train_examples": len(train),
        **asdict(settings),
        "max_length": max_length,
        "max_train_examples": max_train_examples,
        "max_eval_examples": max_eval_examples,
        "warmup_steps": warmup_steps,
        "total_steps": total_steps,
        "optimizer": "AdamW",
        "schedule": "linear warm-up then linear decay",
        **runtime.describe(),
        "epoch_losses": epoch_losses,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    result = TaskResult(
        task=spec.name,
        model=str(model_path),
        main_metric="accuracy",
        scores=scores,
        examples=counts,
        low_resource=tuple(low_resource),
        settings=record,
    )
    if runtime.is_main:
        print(summary_line(result), flush=True)
    return result


def summary_line(result: TaskResult) -> str:
    """One line, e.g. ``xnli (student): accuracy avg 71.2% (en 80.1, de 70.3, sw 63.2); low-resource 63.2%``."""
    langs = ", ".join(f"{lang} {100 * s[result.main_metric]:.1f}" for lang, s in result.scores.items())
    line = f"{result.task} ({result.model}): {result.main_metric} avg {100 * result.average:.1f}% ({langs})"
    low = result.low_resource_average
    line += f"; low-resource {100 * low:.1f}%" if low is not None else "; low-resource n/a"
    return line
