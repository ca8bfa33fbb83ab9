"""`mmkd-eval` / `launchers/evaluate.py`: evaluate an encoder directory.

    mmkd-eval --task retrieval --model runs/demo/distill/student [--config run.yaml] [--out DIR]

retrieval: Tatoeba-style nearest-neighbour accuracy of each held-out translation among the
English sentences and back, per language, on `data.heldout` of the config (default: the
bundled sample's held-out split). Writes JSON and a markdown table when --out is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TASKS = ("retrieval",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkd-eval", description="Evaluate an encoder on held-out data.")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--model", required=True, help="Hugging Face model directory or hub name")
    parser.add_argument("--config", help="YAML run config (its data.heldout are the pairs)")
    parser.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    parser.add_argument("--out", help="directory for retrieval.json and retrieval.md")
    parser.add_argument("--label", default="", help="name shown in the summary line")
    args, overrides = parser.parse_known_args(argv)

    from mmkd_ds.config import ConfigError, load_config
    from mmkd_ds.data.corpus import CorpusError, build_heldout
    from mmkd_ds.evaluation.retrieval import evaluate_retrieval, load_encoder

    try:
        cfg = load_config(args.config, overrides)
        pairs = build_heldout(cfg.data).pairs
    except (ConfigError, CorpusError, FileNotFoundError, ValueError) as exc:
        print(f"mmkd-eval: {exc}", file=sys.stderr)
        return 2
    if not pairs:
        print("mmkd-eval: no held-out pairs (set data.heldout)", file=sys.stderr)
        return 2
    model, tokenizer = load_encoder(args.model)
    result = evaluate_retrieval(model, tokenizer, pairs, pooling=args.pooling)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "retrieval.json").write_text(result.to_json())
        (out / "retrieval.md").write_text(result.to_markdown())
    print(result.to_markdown())
    print(f"eval {args.label or args.model}: {result.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
