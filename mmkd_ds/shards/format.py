"""The on-disk sample format of a teacher shard.

A shard is a plain tar file (webdataset convention: members grouped by key, one key per pair).
For key ``000001234`` (the pair's index in the mixed corpus) it holds:

    000001234.en.txt      English text (UTF-8)
    000001234.xx.txt      translation (UTF-8)
    000001234.json        {"lang", "words", "counts", "origin"}: the English word list from the
                          shared pre-tokenizer (after truncation), teacher subwords per word
    000001234.cls.npy     teacher [CLS] vector, [H], float16 (or float32)
    000001234.words.npy   teacher word vectors, [n_words, H], same dtype

Members are written with fixed metadata (mtime 0, uid/gid 0, mode 0644, ustar format), so a
shard's bytes depend only on its samples: a killed-and-resumed precompute reproduces them.
``tar -tf`` lists them and a bare ``webdataset.WebDataset`` decodes them.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1
SUFFIXES = ("en.txt", "xx.txt", "json", "cls.npy", "words.npy")


@dataclass
class ShardSample:
    """One pair with its teacher features, as stored in a shard."""

    key: str
    en: str
    xx: str
    lang: str
    words: list[str]
    counts: list[int]
    origin: str
    cls: np.ndarray  # [H]
    word_vectors: np.ndarray  # [n_words, H]


def sample_key(index: int) -> str:
    return f"{index:09d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: ShardSample) -> list[tuple[str, bytes]]:
    """The (member name, bytes) list of one sample, in the fixed member order."""
    meta = {"lang": sample.lang, "words": sample.words, "counts": sample.counts, "origin": sample.origin}
    if sample.word_vectors.shape[0] != len(sample.words):
        raise ValueError(f"sample {sample.key}: {sample.word_vectors.shape[0]} word vectors for {len(sample.words)} words")
    return [
        (f"{sample.key}.en.txt", sample.en.encode("utf-8")),
        (f"{sample.key}.xx.txt", sample.xx.encode("utf-8")),
        (f"{sample.key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
        (f"{sample.key}.cls.npy", _npy_bytes(sample.cls)),
        (f"{sample.key}.words.npy", _npy_bytes(sample.word_vectors)),
    ]


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A TarInfo with fixed metadata, so archives are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def decode_sample(key: str, members: dict[str, bytes]) -> ShardSample:
    """Rebuild a sample from its members (suffix -> bytes). Raises KeyError on a missing one."""
    meta = json.loads(members["json"].decode("utf-8"))
    return ShardSample(
        key=key,
        en=members["en.txt"].decode("utf-8"),
        xx=members["xx.txt"].decode("utf-8"),
        lang=meta["lang"],
        words=meta["words"],
        counts=meta["counts"],
        origin=meta["origin"],
        cls=np.load(io.BytesIO(members["cls.npy"]), allow_pickle=False),
        word_vectors=np.load(io.BytesIO(members["words.npy"]), allow_pickle=False),
    )


def split_member_name(name: str) -> tuple[str, str]:
    """``"000000012.cls.npy"`` -> (``"000000012"``, ``"cls.npy"``)."""
    key, _, suffix = name.partition(".")
    return key, suffix
