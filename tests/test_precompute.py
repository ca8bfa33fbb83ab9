"""Teacher precompute: stored values, shard format, resume byte identity, multi-rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from mmkd_ds.config import load_config
from mmkd_ds.data.synthetic import write_synthetic_tsv
from mmkd_ds.distributed import ProcessPlace
from mmkd_ds.precompute import run_precompute
from mmkd_ds.shards.manifest import ManifestError, read_manifest
from mmkd_ds.shards.writer import INDEX_DIR

REPO = Path(__file__).resolve().parents[1]


def small_corpus(tmp_path: Path) -> Path:
    """40 German and 40 Swahili pairs of the bundled sample, in a TSV per language."""
    out = tmp_path / "corpus"
    out.mkdir()
    sample = REPO / "mmkd_ds" / "data" / "sample"
    for lang in ("de", "sw"):
        lines = (sample / f"train.en-{lang}.tsv").read_text(encoding="utf-8").splitlines()[:40]
        (out / f"small.en-{lang}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def write_config(tmp_path: Path, teacher_dir: Path, corpus_glob: str, out_dir: Path, shard_size: int) -> Path:
    cfg = tmp_path / f"run-{out_dir.name}.yaml"
    cfg.write_text(
        f"data:\n  sources:\n    - path: '{corpus_glob}'\n  heldout: []\n"
        f"teacher:\n  name: '{teacher_dir}'\n"
        f"precompute:\n  out_dir: '{out_dir}'\n  shard_size: {shard_size}\n  batch_size: 16\n  progress: false\n"
    )
    return cfg


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("shard-*.tar"))}


def naive_word_vectors(model, tokenizer, words: list[str], pooling: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """One sentence, no padding, a Python loop over words: the plainest possible reference.
    Each word's first subword (the default teacher.pooling) or the mean of its subwords."""
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state[0]
    ids = enc.word_ids()
    vecs = []
    for w in range(len(words)):
        rows = [t for t, i in enumerate(ids) if i == w]
        vecs.append((hidden[rows[0]] if pooling == "first" else hidden[rows].mean(0)).numpy())
    return hidden[0].numpy(), np.stack(vecs)


def test_precompute_values_and_format(tmp_path, teacher_dir):
    corpus = small_corpus(tmp_path)
    out = tmp_path / "shards"
    cfg = load_config(write_config(tmp_path, teacher_dir, str(corpus / "*.tsv"), out, shard_size=25))
    summary = run_precompute(cfg, ProcessPlace(0, 1, 0))
    assert summary.pairs_written == 80 and summary.shards_written == 4
    assert "80 pairs in 4 shards" in summary.line()

    manifest = read_manifest(out)
    assert manifest.total_samples == 80
    assert [s.samples for s in manifest.shards] == [25, 25, 25, 5]
    assert manifest.corpus["languages"] == {"de": 40, "sw": 40}
    assert manifest.teacher["hidden_size"] == 32 and manifest.teacher["dtype"] == "float16"
    assert len(manifest.teacher["weights_sha256"]) == 64

    # A bare webdataset pipeline reads the shards; values equal a direct teacher forward.
    import webdataset as wds

    model = AutoModel.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    urls = [str(out / s.name) for s in manifest.shards]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        meta = sample["json"]
        cls, words = naive_word_vectors(model, tokenizer, meta["words"])
        vec = sample["vec.npy"]  # row 0 [CLS], then one row per word
        assert vec.dtype == np.float16 and vec.shape == (1 + len(meta["words"]), 32)
        np.testing.assert_allclose(vec[0].astype(np.float32), cls, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(vec[1:].astype(np.float32), words, atol=2e-3, rtol=2e-3)
        assert meta["lang"] in ("de", "sw") and meta["xx"] and meta["en"] and "scale" not in meta
        seen += 1
    assert seen == 80

    # Plain tar lists the members too: two per pair.
    with tarfile.open(out / manifest.shards[0].name) as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.json", "000000000.vec.npy", "000000001.json", "000000001.vec.npy"]
    assert len(names) == 2 * 25

    # A re-run finds everything complete and rewrites nothing.
    again = run_precompute(cfg, ProcessPlace(0, 1, 0))
    assert again.shards_written == 0 and again.shards_skipped == 4
    assert again.line().startswith("precompute: nothing to do: all 4 shards complete (checked in ")
    assert "pairs/s" not in again.line() and f"manifest {out / 'manifest.json'}" in again.line()


def test_shards_do_not_depend_on_where_the_corpus_lies(tmp_path, teacher_dir):
    """Origins are stored relative to the source's root: the same corpus in two directories
    gives byte-identical shards, and no absolute local path is in them."""
    import webdataset as wds

    outs = []
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        corpus = small_corpus(tmp_path / where)
        outs.append(tmp_path / where / "shards")
        cfg = load_config(write_config(tmp_path / where, teacher_dir, str(corpus / "*.tsv"), outs[-1], shard_size=40))
        run_precompute(cfg, ProcessPlace(0, 1, 0))
    assert shard_bytes(outs[0]) == shard_bytes(outs[1]) and len(shard_bytes(outs[0])) == 2
    urls = [str(p) for p in sorted(outs[0].glob("shard-*.tar"))]
    origins = [s["json"]["origin"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()]
    assert len(origins) == 80 and all(o.startswith("corpus/small.en-") for o in origins)
    assert "corpus/small.en-de.tsv:1" in origins and not any(str(tmp_path) in o for o in origins)


def test_int8_storage_decodes_close_to_the_teacher(tmp_path, teacher_dir):
    """teacher.dtype int8: per-row scales in the JSON, vectors within half a quantisation step
    of a plain teacher forward, read back by the training loader as float32."""
    corpus = small_corpus(tmp_path)
    out = tmp_path / "shards8"
    path = write_config(tmp_path, teacher_dir, str(corpus / "*.tsv"), out, shard_size=40)
    cfg = load_config(path, ["--teacher.dtype=int8"])
    run_precompute(cfg, ProcessPlace(0, 1, 0))
    manifest = read_manifest(out)
    assert manifest.teacher["dtype"] == "int8"

    import webdataset as wds

    model = AutoModel.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    urls = [str(out / s.name) for s in manifest.shards]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        meta, vec = sample["json"], sample["vec.npy"]
        assert vec.dtype == np.int8 and len(meta["scale"]) == vec.shape[0] == 1 + len(meta["words"])
        cls, words = naive_word_vectors(model, tokenizer, meta["words"])
        want = np.vstack([cls[None], words])
        scale = np.asarray(meta["scale"], dtype=np.float32)[:, None]
        # Half a step of rounding, plus the float noise of a batched vs a one-sentence forward.
        assert np.all(np.abs(vec * scale - want) <= scale / 2 + 1e-4 * (1 + np.abs(want)))
        seen += 1
    assert seen == 80

    # The shard reader the loader uses decodes to float32, equal to the manual decode.
    from mmkd_ds.shards.reader import ShardFile

    shard = ShardFile(out / manifest.shards[0].name, manifest.shards[0])
    got = shard.read(0)
    assert got.cls.dtype == np.float32 and got.word_vectors.dtype == np.float32
    shard.close()


def test_refuses_directory_of_another_corpus(tmp_path, teacher_dir):
    corpus = small_corpus(tmp_path)
    out = tmp_path / "shards"
    cfg = load_config(write_config(tmp_path, teacher_dir, str(corpus / "*.tsv"), out, shard_size=25))
    run_precompute(cfg, ProcessPlace(0, 1, 0))
    cfg.data.max_words = 8  # filters pairs out: another corpus
    with pytest.raises(ManifestError, match=r"corpus\.fingerprint"):
        run_precompute(cfg, ProcessPlace(0, 1, 0))


def _precompute_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "mmkd_ds.cli.precompute", "--config", str(cfg)]


def test_kill_and_resume_is_byte_identical(tmp_path, teacher_dir):
    corpus = tmp_path / "synth"
    write_synthetic_tsv(corpus, n=1500, seed=7, langs=("de", "sw"), pairs_per_file=1000)
    glob = str(corpus / "*.tsv")
    reference = tmp_path / "reference"
    resumed = tmp_path / "resumed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    subprocess.run(_precompute_cmd(write_config(tmp_path, teacher_dir, glob, reference, 10)), check=True, env=env)

    cfg = write_config(tmp_path, teacher_dir, glob, resumed, 10)
    proc = subprocess.Popen(_precompute_cmd(cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((resumed / INDEX_DIR).glob("shard-*.json"))) >= 3 if (resumed / INDEX_DIR).is_dir() else False:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "manifest.json").exists(), "the run finished before it could be killed"
    done_before = len(list((resumed / INDEX_DIR).glob("shard-*.json")))
    assert 0 < done_before < 150

    # What a kill during a write leaves: a temporary file, and a shard with no record. The kill
    # itself may have left one too (on a busy machine it can land inside a write).
    host = socket.gethostname().replace("-", "_")
    left_by_kill = [*resumed.glob(f".*.tmp-{host}-*"), *(resumed / INDEX_DIR).glob(f".*.tmp-{host}-*")]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (resumed / f".shard-000149.tar.tmp-{host}-{dead}").write_bytes(b"partial")
    (resumed / INDEX_DIR / f".shard-000149.tar.json.tmp-{host}-{dead}").write_bytes(b"{")
    (resumed / ".shard-000147.tar.tmp-other_node-1").write_bytes(b"another node may be writing it")
    (resumed / "shard-000148.tar").write_bytes(b"truncated")
    # A finished shard with one byte changed inside keeps its size: only its sha256 tells.
    flipped = bytearray((resumed / "shard-000000.tar").read_bytes())
    flipped[700] ^= 0xFF
    (resumed / "shard-000000.tar").write_bytes(bytes(flipped))

    result = subprocess.run(_precompute_cmd(cfg), env=env, capture_output=True, text=True, check=True)
    assert f"({done_before - 1} already complete, 1 rewritten after a sha256 mismatch)" in result.stdout
    assert "shard-000000.tar does not match the sha256 of its _index/ record" in result.stdout + result.stderr
    removed = 2 + len(left_by_kill)  # the two planted above, and the killed run's own
    assert f"removed {removed} temporary file(s) of processes that are gone" in result.stdout + result.stderr
    assert not list(resumed.glob(f".*.tmp-{host}-*")) and not list((resumed / INDEX_DIR).glob(".*.tmp-*"))
    assert (resumed / ".shard-000147.tar.tmp-other_node-1").is_file()  # not this host's: kept
    (resumed / ".shard-000147.tar.tmp-other_node-1").unlink()
    assert shard_bytes(resumed) == shard_bytes(reference)
    assert len(shard_bytes(reference)) == 150
    assert (resumed / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()


def test_two_ranks_under_deepspeed_write_disjoint_shards(tmp_path, teacher_dir):
    corpus = small_corpus(tmp_path)
    glob = str(corpus / "*.tsv")
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    cfg = load_config(write_config(tmp_path, teacher_dir, glob, single, shard_size=15))
    run_precompute(cfg, ProcessPlace(0, 1, 0))

    launch = [
        "deepspeed", "--num_gpus", "2", "--master_port", "29631",
        str(REPO / "launchers" / "precompute.py"),
        "--config", str(write_config(tmp_path, teacher_dir, glob, multi, shard_size=15)),
    ]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Each rank wrote its own share and said so.
    assert "[rank 0/2] precompute: 45 pairs in 3 shards" in result.stdout
    assert "[rank 1/2] precompute: 35 pairs in 3 shards" in result.stdout
    assert shard_bytes(multi) == shard_bytes(single)
    a = json.loads((multi / "manifest.json").read_text())
    b = json.loads((single / "manifest.json").read_text())
    assert a == b


def test_disk_full_is_one_line_exit_2_and_leaves_no_temporary(tmp_path, teacher_dir, monkeypatch, capsys):
    """ENOSPC in the middle of a shard (injected where the writer writes bytes): the temporary
    file is removed, the message names the directory and what the remaining shards need, exit 2;
    with space again, a re-run completes with the shards of an uninterrupted run."""
    import errno

    from mmkd_ds.cli.precompute import main
    from mmkd_ds.shards import writer

    glob = str(small_corpus(tmp_path) / "*.tsv")
    out = tmp_path / "full-disk"
    real_write, calls = writer._write_all, []

    def fill_up(f, data):
        if ".tar.tmp-" in Path(f.name).name:  # a shard, not its record or the run header
            calls.append(len(data))
        if len(calls) == 3 and ".tar.tmp-" in Path(f.name).name:  # the third shard hits the full disk
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    monkeypatch.setattr(writer, "_write_all", fill_up)
    cfg = write_config(tmp_path, teacher_dir, glob, out, 20)
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"mmkd-precompute: no space left on device in {out} while writing shard-000002.tar; ")
    assert "the 2 remaining shard(s) of this rank (40 pairs) need about" in err[0] and "MiB free" in err[0]
    assert not list(out.glob(".*.tmp-*")) and not list((out / INDEX_DIR).glob(".*.tmp-*"))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]

    monkeypatch.setattr(writer, "_write_all", real_write)
    assert main(["--config", str(cfg)]) == 0
    assert "(2 already complete)" in capsys.readouterr().out
    reference = tmp_path / "reference"
    run_precompute(load_config(write_config(tmp_path, teacher_dir, glob, reference, 20)), ProcessPlace(0, 1, 0))
    assert shard_bytes(out) == shard_bytes(reference)


def test_sigterm_keeps_finished_shards_and_removes_the_temporary(tmp_path, teacher_dir, monkeypatch, capsys):
    """SIGTERM (or the launcher's exit, which the watch turns into one) in the middle of a
    shard: that shard's temporary file is removed, the finished ones stay, exit 143; the same
    command then completes the run."""
    import signal

    from mmkd_ds.cli.precompute import main
    from mmkd_ds.shards import writer

    glob = str(small_corpus(tmp_path) / "*.tsv")
    out = tmp_path / "stopped"
    real_write, calls = writer._write_all, []

    def signalled(f, data):
        if ".tar.tmp-" in Path(f.name).name:
            calls.append(len(data))
            if len(calls) == 3:
                f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGTERM)
        real_write(f, data)

    monkeypatch.setattr(writer, "_write_all", signalled)
    cfg = write_config(tmp_path, teacher_dir, glob, out, 20)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--config", str(cfg)]) == 143
    assert signal.getsignal(signal.SIGTERM) is before  # handlers given back
    assert "mmkd-precompute: stopped by SIGTERM; finished shards are kept" in capsys.readouterr().err
    assert not list(out.glob(".*.tmp-*")) and not list((out / INDEX_DIR).glob(".*.tmp-*"))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    monkeypatch.setattr(writer, "_write_all", real_write)
    assert main(["--config", str(cfg)]) == 0
    assert "(2 already complete)" in capsys.readouterr().out


def test_successful_run_reports_skipped_and_repaired_lines(tmp_path, teacher_dir, capsys):
    """The per-reason counts with file:line examples are printed at the end of every precompute
    (not only when nothing is usable), repairs included, and written to skips.json."""
    from mmkd_ds.cli.precompute import main

    corpus = small_corpus(tmp_path)
    de = corpus / "small.en-de.tsv"
    good = de.read_bytes().splitlines()
    # line 41: no tab; line 42: a CRLF ending (repaired, kept); a BOM at the start of line 1
    de.write_bytes(b"\xef\xbb\xbf" + b"\n".join(good) + b"\nno tab on this line\n" + b"Hello there.\tHallo da.\r\n")
    out = tmp_path / "shards"
    cfg = write_config(tmp_path, teacher_dir, str(corpus / "*.tsv"), out, 40)
    assert main(["--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "precompute: input skipped 1, repaired 2" in printed
    name = "corpus/small.en-de.tsv"  # relative to the source's root (tmp_path/corpus/*.tsv)
    assert f"  skipped no_tab: 1 at {name}:41" in printed
    assert f"{name}:42" in printed and "repaired crlf: 1" in printed and "repaired bom: 1" in printed
    report = json.loads((out / "skips.json").read_text())
    assert report["skipped"]["no_tab"]["count"] == 1 and report["skipped"]["no_tab"]["examples"][0]["at"] == f"{name}:41"
    assert str(tmp_path) not in (out / "skips.json").read_text()
    assert set(report["repaired"]) == {"crlf", "bom"}
    assert read_manifest(out).total_samples == 81  # 40 + 40 + the repaired line


def test_teacher_sentence_mean_stores_the_token_mean_and_is_checked(tmp_path, teacher_dir):
    """teacher.sentence mean: row 0 of every vector is the mean of the teacher's token states
    (specials included), the manifest says so, and a run expecting [CLS] vectors is refused; a
    manifest from before the field existed reads as [CLS]."""
    from mmkd_ds.config.schema import TeacherConfig
    from mmkd_ds.shards.manifest import check_manifest

    corpus = small_corpus(tmp_path)
    out = tmp_path / "shards"
    path = write_config(tmp_path, teacher_dir, str(corpus / "small.en-de.tsv"), out, shard_size=50)
    path.write_text(path.read_text().replace(f"  name: '{teacher_dir}'\n", f"  name: '{teacher_dir}'\n  sentence: mean\n"))
    cfg = load_config(path)
    assert cfg.teacher.sentence == "mean"
    run_precompute(cfg, ProcessPlace(0, 1, 0))
    manifest = read_manifest(out)
    assert manifest.teacher["sentence"] == "mean"
    check_manifest(manifest, cfg.teacher)

    import webdataset as wds

    model = AutoModel.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    seen = 0
    for sample in wds.WebDataset([str(out / s.name) for s in manifest.shards], shardshuffle=False,
                                 empty_check=False).decode():
        enc = tokenizer(sample["json"]["words"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        np.testing.assert_allclose(sample["vec.npy"][0].astype(np.float32), hidden.mean(0).numpy(), atol=2e-3, rtol=2e-3)
        assert not np.allclose(sample["vec.npy"][0].astype(np.float32), hidden[0].numpy(), atol=1e-2)
        seen += 1
    assert seen == 40

    cls_teacher = TeacherConfig(name=str(teacher_dir))
    with pytest.raises(ManifestError, match="teacher.sentence is 'mean' but the run's config has teacher.sentence='cls'"):
        check_manifest(manifest, cls_teacher)
    del manifest.teacher["sentence"]  # as written before the field existed
    check_manifest(manifest, cls_teacher)
    with pytest.raises(ManifestError, match="teacher.sentence is 'cls'"):
        check_manifest(manifest, cfg.teacher)
