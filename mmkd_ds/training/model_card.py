"""The model card (``README.md``) of an exported student: what made it and how it scores.

Every fact is read from what the run left on disk, and a fact that is not there is said to be
unknown rather than guessed:

- the checkpoint's ``mmkd_state.json`` (written with every checkpoint): the step, the planned
  number of steps, the run's settings (teacher, initial student, corpus sources, held-out
  sources) and, where the run recorded it, the command line;
- the shard directory's ``manifest.json``: pairs per language of the training corpus (online
  mode has no shards: the sources are named without counts);
- the run directory's ``metrics.jsonl``: held-out retrieval at step 0 (before) and at the
  checkpoint's step, or the last evaluation before it (after), [CLS] and mean pooling.

:func:`card_facts` gathers them, :func:`render_card` writes the Markdown; the export calls
:func:`write_model_card` on the directory it writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "mmkd_state.json"  # as training/checkpoint.py writes it
POOLING_PREFIXES = {"cls": "eval/retrieval_", "mean": "eval/retrieval_mean_"}
_NOT_LANGUAGES = ("avg", "low_resource_avg")


@dataclass
class Retrieval:
    """Held-out retrieval of one pooling at one step: averages and per-language scores (0-1,
    mean of both directions), as the training log records them."""

    step: int
    average: float
    low_resource: float | None
    per_language: dict[str, float]


@dataclass
class CardFacts:
    """What the model card states. ``None`` (or empty) means not known; the card says so."""

    checkpoint: str
    step: int | None = None
    planned_steps: int | None = None
    zero_stage: str = "unknown"
    teacher: str | None = None
    student_init: str | None = None
    corpus_languages: dict[str, int] = field(default_factory=dict)
    corpus_pairs: int | None = None
    corpus_note: str = ""
    corpus_sources: list[str] = field(default_factory=list)
    heldout_sources: list[str] = field(default_factory=list)
    before: dict[str, Retrieval] = field(default_factory=dict)  # pooling -> step-0 retrieval
    after: dict[str, Retrieval] = field(default_factory=dict)   # pooling -> retrieval at/before the step
    training_command: str | None = None
    export_command: str | None = None
    pooling: str | None = None  # the sentence-transformers pooling, None: no such files
    mlm_head: bool = False  # the MLM head is in mlm_head.safetensors (export.py), not in model.safetensors
    exported_at: str = ""
    unknown: list[str] = field(default_factory=list)


def _source_names(sources) -> list[str]:
    names = []
    for src in sources or []:
        if isinstance(src, dict):
            names.append(f"hf:{src['hf_name']}" if src.get("format") == "hf" else str(src.get("path", "")))
    return names


def _read_corpus(settings: dict, stream: dict) -> tuple[dict[str, int], int | None, str]:
    """Pairs per language from the shard manifest, when the shards are still there and are
    the ones the checkpoint trained on (same corpus fingerprint)."""
    if settings.get("train.teacher_mode") == "online":
        return {}, None, "online teacher: no shards, pair counts not recorded"
    shard_dir = settings.get("stream.shard_dir") or settings.get("precompute.out_dir")
    if not shard_dir:
        return {}, None, "no shard directory in the checkpoint's settings"
    path = Path(shard_dir) / "manifest.json"
    try:
        corpus = json.loads(path.read_text(encoding="utf-8"))["corpus"]
    except (OSError, ValueError, KeyError):
        return {}, None, f"pair counts unknown: {path} not found or unreadable from {os.getcwd()}"
    if stream.get("fingerprint") and corpus.get("fingerprint") != stream["fingerprint"]:
        return {}, None, f"pair counts unknown: {path} now describes another corpus than the one trained on"
    note = "en: English-English identity pairs" if corpus.get("identity_pairs") else ""
    return dict(sorted(corpus.get("languages", {}).items())), corpus.get("pairs"), note


def _retrieval(record: dict, pooling: str) -> Retrieval | None:
    prefix = POOLING_PREFIXES[pooling]
    if f"{prefix}avg" not in record:
        return None
    other = POOLING_PREFIXES["mean"] if pooling == "cls" else None
    langs = {k[len(prefix):]: float(v) for k, v in record.items()
             if k.startswith(prefix) and not (other and k.startswith(other)) and k[len(prefix):] not in _NOT_LANGUAGES}
    low = record.get(f"{prefix}low_resource_avg")
    return Retrieval(int(record["step"]), float(record[f"{prefix}avg"]), None if low is None else float(low),
                     dict(sorted(langs.items())))


def _read_heldout(run_dir: Path, step: int | None) -> tuple[dict, dict]:
    from mmkd_ds.training.metrics import read_metrics

    evals = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    if not evals:
        return {}, {}
    first = next((r for r in evals if r["step"] == 0), None)
    upto = [r for r in evals if step is None or r["step"] <= step]
    last = upto[-1] if upto and upto[-1]["step"] > 0 else None
    before = {p: r for p in POOLING_PREFIXES if first and (r := _retrieval(first, p))}
    after = {p: r for p in POOLING_PREFIXES if last and (r := _retrieval(last, p))}
    return before, after


def card_facts(ckpt_dir: Path, tag: str, run_dir: Path | None = None, training_command: str | None = None,
               export_command: str | None = None) -> CardFacts:
    """The facts of checkpoint ``ckpt_dir/tag``. ``run_dir``: where ``metrics.jsonl`` is
    (default: the checkpoint directory's parent, the run's ``train.out_dir``);
    ``training_command``: the command that trained it when known here (the end-of-training
    export), else the one the checkpoint recorded, if any."""
    from mmkd_ds.training.checkpoint import zero_stage_from_files

    ckpt_dir, tag_dir = Path(ckpt_dir), Path(ckpt_dir) / tag
    facts = CardFacts(checkpoint=str(tag_dir), zero_stage=zero_stage_from_files(tag_dir), export_command=export_command,
                      exported_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    try:
        state = json.loads((tag_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
        facts.unknown.append(f"the run's settings ({STATE_FILE} missing: not written by mmkd-ds)")
    settings = state.get("settings") or state.get("config") or {}
    facts.step = state.get("step")
    facts.planned_steps = (state.get("schedule") or {}).get("steps")
    facts.teacher = settings.get("teacher.name")
    facts.student_init = settings.get("student.name")
    facts.corpus_sources = _source_names(settings.get("data.sources"))
    facts.heldout_sources = _source_names(settings.get("data.heldout"))
    if settings:
        facts.corpus_languages, facts.corpus_pairs, facts.corpus_note = _read_corpus(settings, state.get("stream", {}))
    facts.training_command = training_command or state.get("command")
    if not facts.training_command:
        facts.unknown.append("the training command (this checkpoint does not record it)")
    run_dir = Path(run_dir) if run_dir is not None else ckpt_dir.parent
    facts.before, facts.after = _read_heldout(run_dir, facts.step)
    if not facts.before and not facts.after:
        facts.unknown.append(f"held-out retrieval (no evaluation in {run_dir / 'metrics.jsonl'})")
    return facts


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _retrieval_table(facts: CardFacts) -> list[str]:
    lines = []
    for pooling in POOLING_PREFIXES:
        before, after = facts.before.get(pooling), facts.after.get(pooling)
        if before is None and after is None:
            continue
        name = "[CLS]" if pooling == "cls" else "mean"
        steps = f"step {before.step if before else '?'} -> step {after.step if after else '?'}"
        lines += ["", f"{name} pooling ({steps}; mean of both directions):", "",
                  "| language | before | after | change |", "| --- | ---: | ---: | ---: |"]
        langs = sorted({*(before.per_language if before else {}), *(after.per_language if after else {})})
        rows = [(lang, before and before.per_language.get(lang), after and after.per_language.get(lang)) for lang in langs]
        rows.append(("average", before and before.average, after and after.average))
        if (before and before.low_resource is not None) or (after and after.low_resource is not None):
            rows.append(("low-resource", before and before.low_resource, after and after.low_resource))
        for label, b, a in rows:
            change = f"{100 * (a - b):+.1f}" if a is not None and b is not None else "n/a"
            lines.append(f"| {label} | {_pct(b)} | {_pct(a)} | {change} |")
    return lines


def render_card(facts: CardFacts) -> str:
    """The model card as Markdown, with a YAML header for the Hugging Face hub."""
    languages = sorted({"en", *facts.corpus_languages})
    tags = ["mmkd-ds", "knowledge-distillation", "multilingual"]
    if facts.pooling:
        tags += ["sentence-transformers", "feature-extraction", "sentence-similarity"]
    header = ["---", "language:", *[f"- {lang}" for lang in languages], "tags:", *[f"- {t}" for t in tags]]
    if facts.pooling:
        header.append("pipeline_tag: sentence-similarity")
    header.append("---")

    def known(value) -> str:
        return "unknown" if value in (None, "", []) else str(value)

    steps = known(facts.step)
    if facts.step is not None and facts.planned_steps and facts.planned_steps != facts.step:
        steps += f" (of {facts.planned_steps} planned)"
    lines = [*header, "", "# Distilled multilingual student (MMKD)", "",
             "A student encoder distilled with mmkd-ds (multi-level multilingual knowledge distillation) "
             "from an English teacher on parallel sentences.", "",
             "| | |", "| --- | --- |",
             f"| teacher | {known(facts.teacher)} |",
             f"| initial student | {known(facts.student_init)} |",
             f"| training steps | {steps} |",
             f"| checkpoint | `{facts.checkpoint}` (ZeRO stage {facts.zero_stage}) |",
             f"| exported | {facts.exported_at} |"]
    if facts.pooling:
        lines.append(f"| sentence embedding | {'[CLS]' if facts.pooling == 'cls' else 'mean'} pooling, "
                     f"cosine similarity |")

    lines += ["", "## Training corpus", ""]
    if facts.corpus_languages:
        lines += ["| language | pairs |", "| --- | ---: |"]
        lines += [f"| {lang} | {n} |" for lang, n in facts.corpus_languages.items()]
        lines.append(f"| total | {facts.corpus_pairs if facts.corpus_pairs is not None else sum(facts.corpus_languages.values())} |")
    if facts.corpus_note:
        lines += ["", facts.corpus_note]
    if facts.corpus_sources:
        lines += ["", "Sources: " + ", ".join(f"`{s}`" for s in facts.corpus_sources)]

    lines += ["", "## Held-out retrieval, before and after distillation", "",
              "Each held-out translation's nearest neighbour (cosine) among its language's English "
              "sentences, and back; as logged by the training run (`mmkd-eval --task retrieval` computes "
              "the same)."]
    if facts.heldout_sources:
        lines += ["", "Held-out pairs: " + ", ".join(f"`{s}`" for s in facts.heldout_sources)]
    table = _retrieval_table(facts)
    lines += table if table else ["", "Not recorded (no evaluation in the run's metrics.jsonl)."]
    if table and not facts.after:
        lines += ["", f"After: no held-out evaluation after step 0 up to step {facts.step} in the run's "
                      "metrics.jsonl (see train.eval_every); `mmkd-eval --task retrieval --model THIS_DIR "
                      f"--baseline {facts.student_init or 'INITIAL_STUDENT'}` measures it."]

    lines += ["", "## Usage", ""]
    if facts.pooling:
        lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
                  'model = SentenceTransformer("path/to/this/directory")',
                  'embeddings = model.encode(["Habari ya asubuhi", "Good morning"])', "```", ""]
    lines += ["```python", "from transformers import AutoModel, AutoTokenizer", "",
              'model = AutoModel.from_pretrained("path/to/this/directory")'
              + ("" if facts.mlm_head else "  # or AutoModelForMaskedLM"),
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```"]
    if facts.mlm_head:
        lines += ["", "The masked-LM head (to continue distilling, or for fill-mask) is in "
                      "`mlm_head.safetensors`, beside the encoder; with mmkd-ds installed, "
                      '`mmkd_ds.mlm_head.load_masked_lm("path/to/this/directory")` returns '
                      "`(AutoModelForMaskedLM with that head, loading info)`, and "
                      "`student.name: path/to/this/directory` trains on from it."]

    lines += ["", "## How it was made", ""]
    lines += [f"Trained with: `{facts.training_command}`" if facts.training_command
              else "Trained with: not recorded in the checkpoint."]
    if facts.export_command:
        lines += ["", f"Exported with: `{facts.export_command}`"]
    if facts.unknown:
        lines += ["", "Not known: " + "; ".join(facts.unknown) + "."]
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: Path, facts: CardFacts) -> Path:
    path = Path(out_dir) / "README.md"
    path.write_text(render_card(facts), encoding="utf-8")
    return path


def command_line(argv: list[str] | None = None) -> str:
    """``argv`` as one shell line, the program by its name (``mmkd-export ...``, ``python
    launchers/distill.py ...``) rather than the interpreter's full path."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else ""
    if program.endswith(".py"):
        return shlex.join(["python", argv[0], *argv[1:]])
    return shlex.join([program, *argv[1:]])


def training_command() -> str:
    """The command line that started this training run: DeepSpeed's runner's (``deepspeed
    --num_gpus 2 launchers/distill.py ...``) when this rank runs under ``deepspeed``, else this
    process's own."""
    from mmkd_ds.launcher_watch import DEEPSPEED_NODE_LAUNCHER, launchers_at_start

    import psutil

    for launcher in launchers_at_start():
        try:
            cmdline = launcher.proc.cmdline()
        except psutil.Error:
            continue
        if DEEPSPEED_NODE_LAUNCHER in " ".join(cmdline):
            continue  # the node launcher: its parent, the runner, holds what the user typed
        runner = next((i for i, part in enumerate(cmdline) if Path(part).name == "deepspeed"), None)
        if runner is not None:
            return command_line(cmdline[runner:])
    return command_line()


def export_finisher(ckpt_dir: Path, tag: str, pooling: str | None = "cls", run_dir: Path | None = None,
                    training_command: str | None = None, export_command: str | None = None):
    """The ``finish`` step of :func:`mmkd_ds.training.export.export_student`: the
    sentence-transformers files with ``pooling`` (none when ``pooling`` is None) and the model
    card, written into the export directory before it is put in place."""
    facts = card_facts(ckpt_dir, tag, run_dir, training_command, export_command)
    facts.pooling = pooling

    def finish(directory: Path) -> None:
        from mmkd_ds.mlm_head import HEAD_FILE

        facts.mlm_head = (Path(directory) / HEAD_FILE).is_file()
        if pooling is not None:
            from mmkd_ds.training.st_export import write_sentence_transformers_files

            write_sentence_transformers_files(directory, pooling)
        write_model_card(directory, facts)

    return finish
