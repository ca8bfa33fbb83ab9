"""`mmkd-export`: export the student of any training checkpoint, without a launcher.

    mmkd-export --checkpoint runs/demo/distill/checkpoints --out runs/demo/student-step100 \
        [--tag step00000100] [--format hf|sentence-transformers] [--pooling cls|mean] [--config run.yaml]

The checkpoint may be of any ZeRO stage (0-3, any number of ranks): the fp32 weights are
consolidated on the CPU with DeepSpeed's zero_to_fp32, in this one process
(:mod:`mmkd_ds.training.export`). The initial student (its config, its pooler) and the
tokenizer are the ones the checkpoint's settings name (``student.*``), unless --config or
``--student.name=...`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from mmkd_ds.cli.arguments import (
    HelpFormatter,
    add_config_arguments,
    config_epilog,
    print_config,
    require_arguments,
)
from mmkd_ds.sentence_pooling import SENTENCE_POOLINGS

FORMATS = ("sentence-transformers", "hf")
STATE_FILE = "mmkd_state.json"  # as training/checkpoint.py writes it

DESCRIPTION = """\
Export the distilled student of a training checkpoint (any step, any ZeRO stage) as a Hugging Face
directory, without a launcher: one CPU process consolidates the ZeRO shards.

Examples:
  mmkd-export --checkpoint runs/demo/distill/checkpoints --out runs/demo/student-latest
  mmkd-export --checkpoint runs/demo/distill/checkpoints --tag step00000100 --out runs/demo/student-100
  mmkd-export --checkpoint runs/demo/distill --out DIR --format hf      # the run directory works too
  mmkd-export --checkpoint ckpts --out DIR --student.name=/models/mbert  # the initial student moved

--checkpoint: the run's checkpoints/ directory (with --tag, or its latest checkpoint), one
checkpoint's directory (checkpoints/step00000100), or the run directory (train.out_dir).
The initial student (config, pooler, tokenizer) is student.name of the checkpoint's settings;
--config FILE or --student.name=DIR override it (relative paths are as the training saw them).

Outputs, in --out DIR (replaced if it is an earlier export):
  config.json, model.safetensors, tokenizer files   the encoder with its pooler: AutoModel loads it
  mlm_head.safetensors    the trained MLM head; student.name: DIR (and mmkd_ds.mlm_head.load_masked_lm)
                          load the masked-LM with it
  modules.json, sentence_bert_config.json, 1_Pooling/, config_sentence_transformers.json
                          (--format sentence-transformers) SentenceTransformer(DIR) loads it, with
                          the pooling of mmkd-eval --pooling (default: the one trained with), 128
                          tokens at most
  README.md               model card: teacher, corpus languages and pairs, steps, held-out retrieval
                          before/after (from the run's metrics.jsonl), the commands that made it
"""

EXIT_CODES = """\
Exit codes:
  0  done
  2  bad arguments or input (no such checkpoint or tag, an incomplete checkpoint, the initial
     student not found, weights that do not fit it, an --out that is not an export)
  1  any other failure (a traceback)
"""


class ExportInputError(ValueError):
    """A checkpoint, tag, student or output directory that cannot be used (one line)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkd-export", description=DESCRIPTION,
                                     epilog=EXIT_CODES + "\n" + config_epilog("mmkd-export"),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", metavar="DIR", help="checkpoints directory, one checkpoint's directory, "
                                                             "or the run directory (required)")
    parser.add_argument("--tag", help="which checkpoint, e.g. step00000100 (default: the one `latest` names, "
                                      "else the highest step)")
    parser.add_argument("--out", metavar="DIR", help="output directory (required)")
    parser.add_argument("--format", choices=FORMATS, default="sentence-transformers",
                        help="sentence-transformers: the Hugging Face directory plus the sentence-transformers "
                             "files (what training's own export writes); hf: the Hugging Face files only")
    parser.add_argument("--pooling", choices=SENTENCE_POOLINGS, default=None,
                        help="sentence-transformers pooling: the [CLS] state or the mean of the token states, as "
                             "mmkd-eval --pooling (default: the run's loss.sentence_pooling, from --config or the "
                             "checkpoint's settings; cls for checkpoints that do not record it)")
    add_config_arguments(parser, "YAML run config whose student.* name the initial student (default: the "
                                 "checkpoint's own settings)")
    return parser


def find_checkpoint(path: Path, tag: str | None) -> tuple[Path, str]:
    """``(checkpoints directory, tag)`` from what the user gave; raises ExportInputError."""
    if not path.exists():
        raise ExportInputError(f"--checkpoint {path}: not found")
    if not path.is_dir():
        raise ExportInputError(f"--checkpoint {path}: not a directory")
    if tag is None and _is_tag_dir(path):
        return path.parent, path.name
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() and not _tags(path) else path
    if tag is None:
        latest = ckpt_dir / "latest"
        tag = latest.read_text().strip() if latest.is_file() else None
        tags = _tags(ckpt_dir)
        if tag is None and not tags:
            raise ExportInputError(f"--checkpoint {path}: no checkpoint in it (no `latest` file, no step* directory)")
        tag = tag or tags[-1]
    if not (ckpt_dir / tag).is_dir():
        known = ", ".join(_tags(ckpt_dir)[-5:]) or "none"
        raise ExportInputError(f"--tag {tag}: no such checkpoint in {ckpt_dir} (last ones: {known})")
    if not _is_tag_dir(ckpt_dir / tag):
        raise ExportInputError(f"{ckpt_dir / tag}: incomplete checkpoint (no DeepSpeed model states in it)")
    return ckpt_dir, tag


def _tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())


def _is_tag_dir(path: Path) -> bool:
    return (path / "mp_rank_00_model_states.pt").is_file() or any(path.glob("zero_pp_rank_*_model_states.pt"))


def recorded_settings(ckpt_dir: Path, tag: str) -> dict:
    """The checkpoint's recorded run settings (flattened keys); {} when it has none or no state file."""
    try:
        return json.loads((ckpt_dir / tag / STATE_FILE).read_text(encoding="utf-8")).get("settings") or {}
    except (OSError, ValueError):
        return {}


def student_settings(ckpt_dir: Path, tag: str, config: str | None, overrides: list[str]) -> tuple[str, str, str, str]:
    """``(student.name, student.revision, student.tokenizer, where from)``: --config and
    ``--student.*`` overrides when given, else the checkpoint's recorded settings."""
    if config or overrides:
        from mmkd_ds.config import load_config

        cfg = load_config(config, overrides)
        return cfg.student.name, cfg.student.revision, cfg.student.tokenizer, "--config/overrides"
    settings = recorded_settings(ckpt_dir, tag)
    if not settings.get("student.name"):
        raise ExportInputError(f"{ckpt_dir / tag / STATE_FILE}: missing or without student.name; pass --config (the run's YAML) "
                               "or --student.name=DIR")
    return (settings["student.name"], settings.get("student.revision", "main"), settings.get("student.tokenizer", ""),
            "the checkpoint's settings")


def trained_pooling(ckpt_dir: Path, tag: str, config: str | None) -> str:
    """The sentence pooling the student was trained with: loss.sentence_pooling of --config, else
    of the checkpoint's recorded settings, else "cls" (checkpoints from before the setting)."""
    if config:
        from mmkd_ds.config import load_config

        return load_config(config).loss.sentence_pooling
    return recorded_settings(ckpt_dir, tag).get("loss.sentence_pooling", "cls")


def check_out_dir(out: Path) -> None:
    """Refuse to replace a directory that is not an earlier export (the export replaces --out whole)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ExportInputError(f"--out {out}: exists and is not an earlier export (no config.json); the export "
                               "replaces --out whole, so give a new or empty directory")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if args.print_config:
        return print_config("mmkd-export", args.config, overrides)
    require_arguments(parser, args, "--checkpoint", "--out")
    unknown = [o for o in overrides if not o.startswith("--student.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --student.* settings apply here)")

    from mmkd_ds.config import ConfigError
    from mmkd_ds.model_source import ModelSourceError
    from mmkd_ds.training.model_card import command_line

    out = Path(args.out)
    try:
        ckpt_dir, tag = find_checkpoint(Path(args.checkpoint), args.tag)
        check_out_dir(out)
        name, revision, tokenizer_name, origin = student_settings(ckpt_dir, tag, args.config, overrides)
        print(f"mmkd-export: checkpoint {ckpt_dir / tag}; initial student {name} (from {origin})", flush=True)
        command = command_line(["mmkd-export", *(sys.argv[1:] if argv is None else argv)])
        pooling = args.pooling or trained_pooling(ckpt_dir, tag, args.config)
        result = export(ckpt_dir, tag, name, revision, tokenizer_name, out, args.format, pooling,
                        origin == "the checkpoint's settings", command)
    except (ExportInputError, ConfigError, ModelSourceError, FileNotFoundError) as exc:
        print(f"mmkd-export: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a traceback for what is not an input problem
        print(f"mmkd-export: failed:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    print(result, flush=True)
    return 0


def export(ckpt_dir: Path, tag: str, name: str, revision: str, tokenizer_name: str, out: Path, fmt: str,
           pooling: str, from_checkpoint: bool, command: str) -> str:
    """Export and return the summary line; input problems raise ExportInputError. ``command``:
    this export's command line, for the model card."""
    import pickle

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mmkd_ds.model_source import check_model_source, explained_load
    from mmkd_ds.training.export import export_student
    from mmkd_ds.training.model_card import export_finisher

    hf_logging.disable_progress_bar()
    import os

    import torch

    if not torch.cuda.is_available():  # consolidation runs on the CPU; DeepSpeed would say so in a warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hint = " (a relative path is as the training saw it: run from its directory, or pass --student.name=DIR)"
    try:
        path = check_model_source("student.name", name)
        tok_key, tok_name = ("student.tokenizer", tokenizer_name) if tokenizer_name else ("student.name", name)
        tok_path = check_model_source(tok_key, tok_name)
    except Exception as exc:
        raise ExportInputError(f"{exc}{hint if from_checkpoint else ''}") from None
    kwargs = {} if Path(path).exists() else {"revision": revision}
    with explained_load(tok_key, tok_name):
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **kwargs)
    finish = export_finisher(ckpt_dir, tag, pooling if fmt == "sentence-transformers" else None,
                             export_command=command)
    try:
        export_student(ckpt_dir, tag, name, tokenizer, out, kwargs.get("revision"), finish=finish)
    except RuntimeError as exc:
        if "does not fit the student config" in str(exc) or "no student weights" in str(exc):
            raise ExportInputError(str(exc)) from None
        if "PytorchStreamReader" in str(exc) or "zip archive" in str(exc):  # a truncated or corrupt file
            raise ExportInputError(f"{ckpt_dir / tag}: cannot read this checkpoint: {_first_line(exc)}") from None
        raise
    except (EOFError, ValueError, KeyError, FileNotFoundError, pickle.UnpicklingError) as exc:
        # What zero_to_fp32 and torch.load raise on missing or damaged shards.
        raise ExportInputError(f"{ckpt_dir / tag}: cannot read this checkpoint: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from None
    what = f"Hugging Face + sentence-transformers ({pooling} pooling)" if fmt == "sentence-transformers" \
        else "Hugging Face"
    return f"mmkd-export: wrote {out} ({what}; model card README.md)"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


if __name__ == "__main__":
    sys.exit(main())
