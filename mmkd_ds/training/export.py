"""Export the student as a Hugging Face directory from a checkpoint of any ZeRO stage.

The fp32 weights are consolidated from the sharded optimizer state with DeepSpeed's
zero_to_fp32 (stage 3 partitions gathered), loaded into a fresh masked-LM of the student's
config, split into its encoder and its MLM head, and written with the tokenizer through a
temporary directory.

What is where, so that the usual loaders find what they expect and report nothing:

- ``config.json`` + ``model.safetensors``: the encoder with a pooler, saved as the config's
  ``AutoModel`` saves itself (``BertModel``: keys ``embeddings.*``, ``encoder.*``, ``pooler.*``;
  ``architectures: ["BertModel"]``). ``AutoModel.from_pretrained(DIR)`` and
  ``SentenceTransformer(DIR)`` load it with nothing missing or unused (a masked-LM save would
  leave its head "UNEXPECTED" in transformers 5's load report on every load: ``BertModel`` has
  no ignore list for ``cls.*``, and no config field changes that).
- ``mlm_head.safetensors``: the trained MLM head, keyed as in the masked-LM (BERT:
  ``cls.predictions.transform.*`` and ``cls.predictions.bias``, 0.7M numbers (2.8 MB) for
  bert-base-multilingual-cased); the decoder is tied to the input embeddings and not stored.
  :func:`mmkd_ds.mlm_head.load_masked_lm` (which training's ``student.name`` and
  ``mmkd-init-student --from`` use) loads ``AutoModelForMaskedLM`` and restores it; a plain
  ``AutoModelForMaskedLM.from_pretrained(DIR)`` gets a newly initialised head and says so.
  A masked-LM that does not split so (its base model, under ``base_model_prefix``, plus the
  pooler is not exactly what ``AutoModel`` builds) is written whole, as before, with a warning.

What the directory holds beyond the trained weights:

- **the pooler.** ``AutoModel`` builds BERT-like encoders with a pooler (a dense layer and tanh
  over [CLS]); transformers has no config field that says "no pooler" (``add_pooling_layer`` is
  a constructor argument), and a masked-LM has none, so every ``AutoModel`` load used to create
  a random one and say so. Distillation never trains a pooler; the export writes the *initial
  student's own* pooler, unchanged, when its checkpoint has one (``bert-base-multilingual-cased``
  does, so a classifier fine-tuned from the export starts from the same pooler as one fine-tuned
  from the initial model), and otherwise the identity pooler (dense weight I, bias 0:
  ``pooler_output = tanh(h_[CLS])``), a fixed function of the distilled [CLS] vector rather than
  random numbers. ``config.json`` says which (``mmkd_pooler``).
- **a tokenizer class every supported transformers knows.** transformers 5 writes
  ``"tokenizer_class": "TokenizersBackend"``, which 4.x cannot load. A BERT WordPiece tokenizer
  is written as ``BertTokenizerFast`` with ``do_lower_case`` / ``strip_accents`` /
  ``tokenize_chinese_chars`` read from its own normaliser (without them 4.x and 5.x lower-case
  a cased vocabulary); any other tokenizers-backed one as ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from mmkd_ds.mlm_head import HEAD_FILE, MaskedLMSplit, save_mlm_head, split_masked_lm
from mmkd_ds.model_source import resolve_model_path

log = logging.getLogger(__name__)

PREFIX = "student."
POOLER_NOTE_KEY = "mmkd_pooler"
HEAD_NOTE_KEY = "mmkd_mlm_head"
_LOAD_TIME_KEYS = ("is_local", "local_files_only")


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 state dict from checkpoint ``ckpt_dir/tag`` of any ZeRO stage."""
    tag_dir = Path(ckpt_dir) / tag
    if not any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        # Stage 0 (no zero_optimization section): no ZeRO partitions, the module state is whole
        # in the model-states file (zero_to_fp32 cannot read such a checkpoint).
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints five lines and a progress bar on every export; errors still raise.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _checkpoint_tensors(source: str, wanted: set[str], revision: str | None) -> dict[str, torch.Tensor]:
    """The tensors named in ``wanted`` that the model checkpoint of ``source`` (a directory or a
    cached hub name) holds; safetensors (single or sharded) or ``pytorch_model.bin``."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        try:
            return cached_file(source, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    found: dict[str, torch.Tensor] = {}
    index = find("model.safetensors.index.json")
    files = ([find(f) for f in {v for k, v in json.loads(Path(index).read_text())["weight_map"].items() if k in wanted}]
             if index else [find("model.safetensors")])
    files = [f for f in files if f]
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt") as f:
                found.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
        return found
    binary = find("pytorch_model.bin")  # old single-file checkpoints only
    if binary:
        state = torch.load(binary, map_location="cpu", weights_only=True)
        found.update({k: v for k, v in state.items() if k in wanted})
    return found


def pooler_for_export(config, source: str, revision: str | None = None, name: str | None = None
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, note)``: the pooler weights to add, keyed as in the base model
    (``pooler.dense.weight``), and what they are. ``source``: the initial student's directory or
    hub name; ``name``: how the config named it (for the note). Empty when the architecture's
    ``AutoModel`` has no pooler (DistilBERT) or it is not a dense layer that an identity can
    stand for."""
    with torch.device("meta"):  # names and shapes only, nothing allocated or initialised
        base = AutoModel.from_config(config)
    shapes = {k: v.shape for k, v in base.state_dict().items() if k.startswith("pooler.")}
    if not shapes:
        return {}, ""
    prefix = base.base_model_prefix
    # A masked-LM or pre-training checkpoint prefixes the encoder (bert.pooler...), a bare one does not.
    names = {k: (k, f"{prefix}.{k}") for k in shapes}
    stored = _checkpoint_tensors(source, {n for pair in names.values() for n in pair}, revision)
    own = {k: next((stored[n] for n in pair if n in stored), None) for k, pair in names.items()}
    if all(v is not None and v.shape == shapes[k] for k, v in own.items()):
        return ({k: v.float() for k, v in own.items()},
                f"the initial student's own pooler ({name or source}), unchanged: distillation does not train it")
    hidden = getattr(config, "hidden_size", None)
    if set(shapes) == {"pooler.dense.weight", "pooler.dense.bias"} and shapes["pooler.dense.weight"] == (hidden, hidden):
        return ({"pooler.dense.weight": torch.eye(hidden), "pooler.dense.bias": torch.zeros(hidden)},
                "identity (the initial student had none): pooler_output = tanh(last_hidden_state[:, 0]); not trained")
    return {}, ""


def encoder_for_export(config, split: MaskedLMSplit, pooler: dict[str, torch.Tensor]):
    """The config's ``AutoModel`` (``BertModel``) holding the masked-LM's base-model weights and
    ``pooler``, or None when its weights are not exactly those (other names or shapes: the
    architecture's base model is not what ``AutoModel`` builds, or its pooler is not one
    :func:`pooler_for_export` can supply)."""
    weights = {**split.encoder, **pooler}
    with torch.device("meta"):  # names and shapes only
        expected = {k: v.shape for k, v in AutoModel.from_config(config).state_dict().items()}
    if expected.keys() != weights.keys() or any(expected[k] != v.shape for k, v in weights.items()):
        return None
    encoder = AutoModel.from_config(config)
    encoder.load_state_dict(weights, strict=True)
    return encoder


def portable_tokenizer_config(tokenizer_dir: Path, tokenizer) -> str | None:
    """Rewrite ``tokenizer_config.json`` in ``tokenizer_dir`` so that transformers 4.x and 5.x
    both load it (see the module docstring), without the keys that only record how this machine
    loaded it (``local_files_only``); returns the class named, or None when nothing changed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if backend is None or not path.is_file():
        return None  # a slow tokenizer: its class is one both versions know
    state = json.loads(backend.to_str())
    config = json.loads(path.read_text(encoding="utf-8"))
    # How this machine loaded it (transformers 5 saves these): not properties of the tokenizer.
    dropped = [config.pop(k) for k in _LOAD_TIME_KEYS if k in config]
    normalizer = state.get("normalizer") or {}
    bert = (state.get("model", {}).get("type") == "WordPiece" and normalizer.get("type") == "BertNormalizer"
            and (state.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer")
    if bert:
        config.update(tokenizer_class="BertTokenizerFast", do_lower_case=bool(normalizer.get("lowercase", True)),
                      strip_accents=normalizer.get("strip_accents"),
                      tokenize_chinese_chars=bool(normalizer.get("handle_chinese_chars", True)))
    elif config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif not dropped and "clean_up_tokenization_spaces" in config:
        return None
    # Stated, so that every version decodes alike (4.44 warns that its default is about to change).
    config.setdefault("clean_up_tokenization_spaces", bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return config.get("tokenizer_class")


def export_student(ckpt_dir: Path, tag: str, student_name: str, tokenizer, out_dir: Path,
                   revision: str | None = None, finish: Callable[[Path], None] | None = None) -> Path:
    """Write ``out_dir``: ``config.json`` and ``model.safetensors`` (the encoder with a pooler,
    as ``AutoModel`` saves it), ``mlm_head.safetensors`` (the MLM head; see the module
    docstring) and the tokenizer files; ``AutoModel`` loads it without a load report, and
    :func:`mmkd_ds.mlm_head.load_masked_lm` as the masked-LM with its trained head, with
    transformers 4.x and 5.x. An architecture that does not split is written as one masked-LM.

    ``student_name``: the initial student as ``student.name`` gives it (a directory, a packaged
    model or a cached hub name; ``revision`` for the latter): its config, and its pooler when its
    checkpoint has one. ``finish``: called with the directory being written, before it replaces
    ``out_dir``, to add files (the sentence-transformers files, the model card), so that
    ``out_dir`` is never seen half-written.
    """
    state = consolidated_state_dict(ckpt_dir, tag)
    student_state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not student_state:
        raise RuntimeError(f"{ckpt_dir / tag}: no student weights in the checkpoint")
    source = resolve_model_path(student_name)  # a packaged model name -> its directory
    config = AutoConfig.from_pretrained(source, revision=revision)
    model = AutoModelForMaskedLM.from_config(config)
    missing, unexpected = model.load_state_dict(student_state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    # Tied output embeddings are stored once; persistent buffers may be absent from old saves.
    missing = [k for k in missing if k not in tied and not k.endswith(("decoder.weight", "position_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"export: checkpoint does not fit the student config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    pooler, note = pooler_for_export(config, source, revision, name=student_name)
    split = split_masked_lm(model)
    encoder = encoder_for_export(config, split, pooler) if split is not None else None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if encoder is not None:
        for key, value in ((POOLER_NOTE_KEY, note), (HEAD_NOTE_KEY, f"{HEAD_FILE}: {type(model).__name__}'s "
                           f"weights outside {split.prefix}; mmkd_ds.mlm_head.load_masked_lm(DIR) restores them")):
            if value:
                setattr(encoder.config, key, value)
        encoder.save_pretrained(tmp)
        save_mlm_head(split, tmp, type(model).__name__)
    else:  # today's layout for an architecture whose masked-LM does not split into AutoModel + head
        log.warning("export: %s does not split into the AutoModel of model_type %r and a head; writing the "
                    "whole masked-LM (AutoModel will report its head as unused)", type(model).__name__,
                    config.model_type)
        weights = dict(model.state_dict())
        weights.update({f"{model.base_model_prefix}.{k}": v for k, v in pooler.items()})
        if note:
            setattr(model.config, POOLER_NOTE_KEY, note)
        model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    portable_tokenizer_config(tmp, tokenizer)
    if finish is not None:
        finish(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
