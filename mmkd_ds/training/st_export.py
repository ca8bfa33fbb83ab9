"""The sentence-transformers files of an export, so that ``SentenceTransformer(path)`` loads it.

Written by hand (sentence-transformers is not a dependency of training), in the layout every
sentence-transformers release reads, 2.x to 6.x (the layout of the hub's
``sentence-transformers/*`` models): ``modules.json`` (the encoder at the root, then a pooling
module), ``sentence_bert_config.json`` (``max_seq_length``), ``1_Pooling/config.json`` and
``config_sentence_transformers.json`` (cosine similarity). The Hugging Face files stay as they
are: ``AutoModel`` loads the directory as before (the encoder at its root is what the
``Transformer`` module loads, with nothing unused or missing).

The pooling and the length limit are those of ``mmkd-eval --task retrieval``
(:func:`mmkd_ds.evaluation.retrieval.embed_sentences`): [CLS] is the last layer's first
position, mean is the attention-masked mean over every real token, special tokens included,
and inputs are cut at 128 tokens. ``SentenceTransformer(path).encode(texts)`` therefore gives
the vectors that retrieval scores (no normalisation module: retrieval uses cosine similarity,
as ``similarity_fn_name`` says). Training's export and ``mmkd-export`` pool as the run trained
(``loss.sentence_pooling``: [CLS], the authors', or ``mean``, the demo's).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmkd_ds.sentence_pooling import SENTENCE_POOLINGS as POOLINGS

# embed_sentences' default max_length: what mmkd-eval and the training log's retrieval use.
MAX_SEQ_LENGTH = 128
POOLING_DIR = "1_Pooling"
FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
         f"{POOLING_DIR}/config.json")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_sentence_transformers_files(model_dir: Path, pooling: str = "cls",
                                      max_seq_length: int = MAX_SEQ_LENGTH) -> list[Path]:
    """Add the sentence-transformers files to the Hugging Face directory ``model_dir`` (its
    ``config.json`` gives the width); returns the files written.

    ``max_seq_length`` is capped at the model's ``max_position_embeddings``, as a longer input
    cannot be embedded at all.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"sentence-transformers pooling must be one of {POOLINGS}, got {pooling!r}")
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    width = int(config["hidden_size"])
    positions = config.get("max_position_embeddings")
    length = min(max_seq_length, int(positions)) if positions else max_seq_length
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    pooling_config = {
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    # No "sentence_transformers" version: none was used to write these, and a recorded version
    # newer than the reader's makes it warn.
    st_config = {"__version__": {"mmkd_ds": _version()}, "prompts": {}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"}
    contents = {
        "modules.json": modules,
        # The tokenizer keeps its own casing: sentence-transformers must not lower-case first.
        "sentence_bert_config.json": {"max_seq_length": length, "do_lower_case": False},
        "config_sentence_transformers.json": st_config,
        f"{POOLING_DIR}/config.json": pooling_config,
    }
    written = []
    for name, data in contents.items():
        _write_json(model_dir / name, data)
        written.append(model_dir / name)
    return written


def sentence_transformers_pooling(model_dir: Path) -> str | None:
    """The pooling an export's sentence-transformers files name ("cls" or "mean"), or None when
    the directory has none."""
    path = Path(model_dir) / POOLING_DIR / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    return config.get("pooling_mode")  # the layout sentence-transformers 6 writes itself


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmkd-ds")
    except PackageNotFoundError:
        return "unknown"
