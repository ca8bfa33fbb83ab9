"""The masked-LM head kept beside an exported encoder, and the loader that puts it back.

An export (mmkd_ds/training/export.py) is a base-model save (``BertModel``: what ``AutoModel``
and ``SentenceTransformer`` load without a report) plus ``mlm_head.safetensors``: the masked-LM's
weights outside its base model (BERT: ``cls.predictions.transform.*`` and
``cls.predictions.bias``), keyed as in the masked-LM's state dict. Weights that share storage
with the base model (the decoder, tied to the input embeddings) are not stored; the header
names them (``tied``), and head keys that are one tensor under two names (BERT's
``cls.predictions.decoder.bias`` is ``cls.predictions.bias``) are stored once (``aliases``).

:func:`load_masked_lm` is ``AutoModelForMaskedLM.from_pretrained`` that restores the head from
that file when the directory has one, so a training run or ``mmkd-init-student`` started from an
export continues with the trained head. Imports only torch, safetensors and transformers (works
with transformers 4.x and 5.x).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

HEAD_FILE = "mlm_head.safetensors"


@dataclass
class MaskedLMSplit:
    """A masked-LM's state dict in two parts.

    ``encoder``: the base model's tensors keyed as the base model names them (``embeddings...``,
    no ``bert.``); ``head``: the other tensors, one name per storage; ``aliases``: head key ->
    the stored head key it shares storage with; ``tied``: head key -> the masked-LM key of the
    base-model tensor it shares storage with (the decoder and the input embeddings).
    """

    prefix: str
    encoder: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)


def _storage_key(t: torch.Tensor) -> tuple:
    # Same start, shape and strides: the same tensor under another name (tied parameters).
    return t.data_ptr(), tuple(t.shape), tuple(t.stride())


def split_masked_lm(model: torch.nn.Module) -> MaskedLMSplit | None:
    """Split ``model`` (a ``*ForMaskedLM``) at its ``base_model_prefix``; None when it has no
    separate base model (its prefix names no submodule) or nothing outside it."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, torch.nn.Module) or base is model:
        return None
    lead = prefix + "."
    state = model.state_dict()
    encoder = {k[len(lead):]: v for k, v in state.items() if k.startswith(lead)}
    rest = {k: v for k, v in state.items() if not k.startswith(lead)}
    if not encoder or not rest:
        return None
    in_base = {_storage_key(v): lead + k for k, v in encoder.items()}
    split = MaskedLMSplit(prefix, encoder, {})
    stored: dict[tuple, str] = {}
    for key, tensor in rest.items():
        where = _storage_key(tensor)
        if where in in_base:
            split.tied[key] = in_base[where]
        elif where in stored:
            split.aliases[key] = stored[where]
        else:
            stored[where] = key
            split.head[key] = tensor.detach().contiguous()
    return split


def save_mlm_head(split: MaskedLMSplit, directory: Path, masked_lm_class: str) -> Path:
    """Write ``split.head`` to ``directory/mlm_head.safetensors``; the header records the class,
    the aliases and the tied keys."""
    from safetensors.torch import save_file

    path = Path(directory) / HEAD_FILE
    metadata = {"format": "pt", "masked_lm_class": masked_lm_class, "base_model_prefix": split.prefix,
                "aliases": json.dumps(split.aliases), "tied": json.dumps(split.tied)}
    save_file(split.head, str(path), metadata=metadata)
    return path


def restore_mlm_head(model: torch.nn.Module, head_file: str | Path) -> set[str]:
    """Load the head in ``head_file`` into ``model`` (a ``*ForMaskedLM`` of the exported
    architecture); returns the keys now set (stored, aliases and tied). Raises ValueError when
    the file does not fit the model."""
    from safetensors import safe_open

    with safe_open(str(head_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    aliases = json.loads(metadata.get("aliases", "{}"))
    tied = json.loads(metadata.get("tied", "{}"))
    state = {**tensors, **{alias: tensors[target] for alias, target in aliases.items() if target in tensors}}
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    wrong += [k for k, target in tied.items() if k not in own or target not in own]
    if wrong:
        raise ValueError(f"{head_file}: does not fit {type(model).__name__} (keys {', '.join(wrong[:4])}); "
                         f"it was written for {metadata.get('masked_lm_class', 'another model')}")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():  # tied: normally already the same tensor; copy where a loader did not tie them
        for key, target in tied.items():
            if own[key].data_ptr() != own[target].data_ptr():
                own[key].copy_(own[target])
    return set(state) | set(tied)


def mlm_head_file(path: str | Path, revision: str | None = None) -> str | None:
    """``mlm_head.safetensors`` of the model directory (or cached hub name) ``path``, or None."""
    local = Path(path) / HEAD_FILE
    if local.is_file():
        return str(local)
    if Path(path).exists():
        return None
    from transformers.utils import cached_file

    try:
        return cached_file(str(path), HEAD_FILE, revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


def load_masked_lm(path: str | Path, **kwargs):
    """``(model, info)`` as ``AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True,
    **kwargs)``, with the MLM head restored from ``mlm_head.safetensors`` when ``path`` has one
    (an export of this project): its keys are then not in ``info["missing_keys"]``, and
    transformers' load report (the head "MISSING", the pooler "UNEXPECTED") is not printed. Any
    other missing key is logged as a warning by transformers' logger (silenced with it)."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    head_file = mlm_head_file(path, kwargs.get("revision"))
    if head_file is None:
        return AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **kwargs)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the report would list the head that is restored below
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    restored = restore_mlm_head(model, head_file)
    missing = info.get("missing_keys", [])
    info["missing_keys"] = type(missing)(k for k in missing if k not in restored)
    if info["missing_keys"]:
        hf_logging.get_logger(__name__).warning(
            "%s: weights missing (newly initialised) after restoring %s: %s", path, HEAD_FILE,
            ", ".join(sorted(info["missing_keys"])[:6]))
    return model, info
