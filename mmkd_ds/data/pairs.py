"""The unit of a parallel corpus."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    """An English sentence and its translation.

    ``origin`` says where the pair came from, as ``name:line`` for files (``name``: the file
    relative to its source's root, with the root's own name, e.g. ``corpus/train.en-de.tsv``;
    never an absolute path, see ``readers.origin_name``) or ``hf:name/config/split:row`` for
    Hugging Face datasets, so that any later problem with the pair can be traced back to its
    source.
    """

    en: str
    xx: str
    lang: str
    origin: str
