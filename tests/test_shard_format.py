"""The shard sample format: member layout, the three storage dtypes, int8 quantisation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from shard_factory import make_shards

from mmkd_ds.shards.format import (
    ShardSample,
    decode_sample,
    dequantize_rows,
    encode_sample,
    quantize_rows,
    split_member_name,
)
from mmkd_ds.shards.manifest import ManifestError, read_manifest


def make_sample(n_words: int = 3, hidden: int = 7, seed: int = 0) -> ShardSample:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(n_words)]
    return ShardSample(
        key="000000042", en=" ".join(words), xx="ein Satz é", lang="de", words=words, counts=[1] * n_words,
        origin="x.tsv:43", cls=rng.standard_normal(hidden).astype(np.float32) * 3,
        word_vectors=rng.standard_normal((n_words, hidden)).astype(np.float32),
    )


def round_trip(sample: ShardSample, dtype: str) -> tuple[ShardSample, dict[str, bytes]]:
    members = {split_member_name(name)[1]: data for name, data in encode_sample(sample, dtype)}
    return decode_sample(sample.key, members), members


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
@pytest.mark.parametrize("n_words", [0, 1, 5])
def test_round_trip(dtype, n_words):
    sample = make_sample(n_words)
    got, members = round_trip(sample, dtype)
    assert list(members) == ["json", "vec.npy"]
    for field in ("key", "en", "xx", "lang", "words", "counts", "origin"):
        assert getattr(got, field) == getattr(sample, field)
    assert got.cls.shape == (7,) and got.word_vectors.shape == (n_words, 7)
    want = np.vstack([sample.cls[None], sample.word_vectors])
    have = np.vstack([got.cls[None], got.word_vectors])
    if dtype == "float32":
        np.testing.assert_array_equal(have, want)
    elif dtype == "float16":
        assert have.dtype == np.float16
        np.testing.assert_allclose(have, want, rtol=1e-3, atol=1e-3)
    else:  # within half a quantisation step of each row
        assert have.dtype == np.float32
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(have - want) <= step / 2 * (1 + 1e-5) + 1e-7)


def test_int8_member_holds_int8_and_scales():
    sample = make_sample(4)
    _, members = round_trip(sample, "int8")
    vec = np.load(io.BytesIO(members["vec.npy"]))
    meta = json.loads(members["json"])
    assert vec.dtype == np.int8 and vec.shape == (5, 7)
    assert len(meta["scale"]) == 5
    # Every row uses the full range: its largest element maps to +-127.
    assert (np.abs(vec).max(axis=1) == 127).all()


def test_quantize_zero_row_and_extremes():
    v = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1e-8, 0.0, 1e-8]], dtype=np.float32)
    q, scales = quantize_rows(v)
    assert scales[0] == 1.0 and (q[0] == 0).all()
    err = np.abs(dequantize_rows(q, scales) - v)
    assert np.all(err <= np.abs(v).max(axis=1, keepdims=True) / 254 * (1 + 1e-5) + 1e-12)
    assert q[1, 1] == -127


def test_quantize_refuses_non_finite():
    sample = make_sample(2)
    sample.word_vectors[1, 3] = np.nan
    with pytest.raises(ValueError, match="000000042.*non-finite"):
        encode_sample(sample, "int8")


def test_bad_members_do_not_decode():
    sample = make_sample(3)
    _, members = round_trip(sample, "int8")
    meta = json.loads(members["json"])
    del meta["scale"]
    with pytest.raises(ValueError, match="scale"):
        decode_sample(sample.key, {**members, "json": json.dumps(meta).encode()})
    _, members16 = round_trip(sample, "float16")
    short = make_sample(2)  # 3 rows of vectors for 3 words -> mismatch
    with pytest.raises(ValueError, match="shape"):
        decode_sample(sample.key, {"json": round_trip(short, "float16")[1]["json"], "vec.npy": members16["vec.npy"]})
    with pytest.raises(ValueError, match="storage dtype"):
        encode_sample(sample, "bfloat16")


def test_manifest_of_another_schema_version_is_refused(tmp_path):
    make_shards(tmp_path, [3])
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version is 1, this mmkd-ds reads 2.*mmkd-precompute"):
        read_manifest(tmp_path)
