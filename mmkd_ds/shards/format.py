"""The on-disk sample format of a teacher shard (schema version 2).

A shard is a plain tar file (webdataset convention: members grouped by key, one key per pair).
For key ``000001234`` (the pair's index in the mixed corpus) it holds two members:

    000001234.json        {"en", "xx", "lang", "words", "counts", "origin"} and, for int8
                          storage, "scale": the English and translated texts, the English word
                          list from the shared pre-tokenizer (after truncation), teacher subwords
                          per word, the pair's origin (file:line)
    000001234.vec.npy     teacher vectors [1 + n_words, H]: row 0 the sentence vector ([CLS] or the
                          token mean: the manifest's teacher.sentence), rows 1..n
                          the word vectors; float16 (default), float32, or int8

int8 storage is symmetric per-row quantisation: row r holds round(v / scale[r]) clipped to
[-127, 127], with scale[r] = max|v_r| / 127 (written with 6 significant digits); the decoded
vector is ``vec[r] * scale[r]``. It halves the bytes of float16 again at a per-row error of at
most scale[r] / 2 per element (``benchmarks/precompute.py`` reports what it costs on a corpus).

Two members and not one per field: each tar member costs a 512-byte header and pads its data
to 512 bytes, which for short sentences was a third of the shard (schema version 1 had five
members per pair).

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

SCHEMA_VERSION = 2
SUFFIXES = ("json", "vec.npy")
# Storage dtypes of the vectors (the config's teacher.dtype).
STORAGE_DTYPES = ("float16", "float32", "int8")


@dataclass
class ShardSample:
    """One pair with its teacher features, as stored in a shard (vectors decoded)."""

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


def quantize_rows(vectors: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Symmetric per-row int8 quantisation: [R, H] float -> ([R, H] int8, R scales).

    A scale is max|row| / 127 rounded to 6 significant digits (so the JSON stays short and the
    decoded values are exactly reproducible); an all-zero row gets scale 1.
    """
    v = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(v).all():
        raise ValueError("non-finite teacher vectors cannot be stored as int8")
    absmax = np.abs(v).max(axis=1) if v.shape[1] else np.zeros(v.shape[0], np.float32)
    scales = [float(f"{a / 127.0:.6g}") if a > 0 else 1.0 for a in absmax.tolist()]
    q = np.clip(np.rint(v / np.asarray(scales, dtype=np.float32)[:, None]), -127, 127).astype(np.int8)
    return q, scales


def dequantize_rows(q: np.ndarray, scales: list[float]) -> np.ndarray:
    """[R, H] int8 and R scales -> [R, H] float32."""
    if len(scales) != q.shape[0]:
        raise ValueError(f"{len(scales)} scales for {q.shape[0]} rows")
    return q.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def encode_sample(sample: ShardSample, dtype: str = "float16") -> list[tuple[str, bytes]]:
    """The (member name, bytes) list of one sample, in the fixed member order; the vectors are
    stored in ``dtype`` (one of STORAGE_DTYPES)."""
    if sample.word_vectors.shape[0] != len(sample.words):
        raise ValueError(f"sample {sample.key}: {sample.word_vectors.shape[0]} word vectors for {len(sample.words)} words")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    H = sample.cls.shape[-1]
    vectors = np.concatenate([sample.cls.reshape(1, H), sample.word_vectors.reshape(-1, H)], axis=0)
    meta = {"en": sample.en, "xx": sample.xx, "lang": sample.lang, "words": sample.words,
            "counts": sample.counts, "origin": sample.origin}
    if dtype == "int8":
        try:
            vectors, meta["scale"] = quantize_rows(vectors)
        except ValueError as exc:
            raise ValueError(f"sample {sample.key}: {exc}") from None
    else:
        vectors = vectors.astype(dtype, copy=False)
    return [
        (f"{sample.key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
        (f"{sample.key}.vec.npy", _npy_bytes(vectors)),
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


def decode_vectors(meta: dict, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sample's (sentence vector [H], word vectors [n_words, H]) from its JSON and ``vec.npy`` array:
    float16/float32 as stored, int8 dequantised to float32."""
    if vectors.ndim != 2 or vectors.shape[0] != len(meta["words"]) + 1:
        raise ValueError(f"vec.npy has shape {vectors.shape}, expected [1 + {len(meta['words'])} words, H]")
    if vectors.dtype == np.int8:
        if "scale" not in meta:
            raise ValueError("int8 vectors without a 'scale' list in the JSON")
        vectors = dequantize_rows(vectors, meta["scale"])
    elif vectors.dtype not in (np.float16, np.float32):
        raise ValueError(f"vec.npy has dtype {vectors.dtype}, expected float16, float32 or int8")
    return vectors[0], vectors[1:]


def decode_sample(key: str, members: dict[str, bytes]) -> ShardSample:
    """Rebuild a sample from its members (suffix -> bytes). Raises KeyError on a missing one,
    ValueError on one that does not decode."""
    meta = json.loads(members["json"].decode("utf-8"))
    cls, words = decode_vectors(meta, np.load(io.BytesIO(members["vec.npy"]), allow_pickle=False))
    return ShardSample(
        key=key,
        en=meta["en"],
        xx=meta["xx"],
        lang=meta["lang"],
        words=meta["words"],
        counts=meta["counts"],
        origin=meta["origin"],
        cls=cls,
        word_vectors=words,
    )


def split_member_name(name: str) -> tuple[str, str]:
    """``"000000012.vec.npy"`` -> (``"000000012"``, ``"vec.npy"``)."""
    key, _, suffix = name.partition(".")
    return key, suffix
