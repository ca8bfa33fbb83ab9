"""Data-parallel fine-tuning of the transfer tasks: 2 CPU ranks under `deepspeed` equal 1 process.

The global batch is split over the ranks and each rank's loss is scaled so that the averaged
gradient is that of the whole batch; with dropout off, a 2-rank run must give the single
process's epoch losses and scores. XNLI runs on ZeRO-2, XQuAD on ZeRO-3 (whose forward gathers
parameters collectively, so the evaluation's padding forwards are exercised: the ranks hold
different numbers of test windows).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import make_tiny_bert
from mmkd_ds.evaluation.classification import finetune_and_evaluate
from mmkd_ds.evaluation.finetune import FinetuneSettings, global_batches
from mmkd_ds.evaluation.qa import finetune_and_evaluate_qa
from test_classification import XX_TEXTS, nli_rows, write_jsonl
from test_distill import free_port, kill_tree, release_shm
from test_qa import MAX_LEN, SQUAD_ROWS, STRIDE, XQUAD_ROWS, row

REPO = Path(__file__).resolve().parents[1]


# -- the batch split -------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch, world", [(45, 8, 2), (45, 8, 3), (7, 4, 4), (8, 8, 1), (3, 8, 4)])
def test_ranks_cover_each_global_batch_once(n, batch, world):
    spans = global_batches(n, batch, world)
    assert all(end - start >= world for start, end in spans)  # every rank gets an item
    assert spans == [(s, min(s + batch, n)) for s in range(0, n, batch)][: len(spans)]
    assert len(spans) >= (n // batch if n >= world else 0)
    order = list(range(n))
    for start, end in spans:
        shares = [order[start:end][r::world] for r in range(world)]
        assert sorted(i for share in shares for i in share) == order[start:end]
    steps, warmup = FinetuneSettings(epochs=2, batch_size=batch).steps(n, world)
    assert steps == len(spans) and (warmup >= 1 if steps else True)


# -- 2 ranks against 1 process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, student_tokenizer) -> str:
    """A tiny BERT without dropout: the split of a batch over ranks must not change the math."""
    d = make_tiny_bert(tmp_path_factory.mktemp("ft_model"), student_tokenizer)
    config = json.loads((d / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def run_two_ranks(args: list[str], stage: int, timeout: int = 300) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(REPO / "launchers" / "evaluate.py"),
           *args, "--deepspeed_config", str(REPO / "ds_configs" / f"zero{stage}.json")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        release_shm(port)
        raise
    left = release_shm(port)
    assert proc.returncode == 0, stdout[-3000:] + "\n--- stderr ---\n" + stderr[-3000:]
    assert not left, f"ranks left their shared-memory buffers behind: {left}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_xnli_two_ranks_zero2_equal_one_process(tmp_path, model_dir):
    data = tmp_path / "xnli"
    write_jsonl(data / "en" / "train.jsonl", nli_rows(45, 0))  # 45 = 5 batches of 8 + 5: the last splits 3/2
    write_jsonl(data / "en" / "test.jsonl", nli_rows(9, 1))
    write_jsonl(data / "sw" / "test.jsonl", nli_rows(7, 2, XX_TEXTS))
    common = dict(epochs=2, lr=1e-3, batch_size=8, max_length=32, seed=7)
    single = finetune_and_evaluate("xnli", model_dir, ["en", "sw"], str(data), device="cpu", **common)

    out = tmp_path / "out"
    result = run_two_ranks(["--task", "xnli", "--model", model_dir, "--languages", "en,sw", "--data-dir", str(data),
                            "--epochs", "2", "--lr", "1e-3", "--batch-size", "8", "--seed", "7",
                            "--out", str(out)], stage=2)
    assert result.stdout.count("eval xnli") == 1  # rank 0 alone prints the summary
    dist = json.loads((out / "xnli.json").read_text())
    s = dist["settings"]
    assert (s["world_size"], s["backend"], s["total_steps"]) == (2, "deepspeed ZeRO-2", single.settings["total_steps"])
    assert s["epoch_losses"] == pytest.approx(single.settings["epoch_losses"], rel=1e-4)
    assert single.settings["epoch_losses"][1] < single.settings["epoch_losses"][0]  # it trained
    for lang in ("en", "sw"):
        assert dist["scores"][lang]["accuracy"] == pytest.approx(single.scores[lang]["accuracy"])
    assert dist["examples"] == {"en": 9, "sw": 7}


def test_xquad_two_ranks_zero3_equal_one_process(tmp_path, model_dir):
    # 13 examples give 14 training windows (one long context): 7 global batches of 2, 1 per rank.
    train = [*SQUAD_ROWS, row("s13", "The museum opens at nine.", "When does the museum open?", "at nine")]
    # 5 German test examples: rank 0 holds 3 (2 batches), rank 1 holds 2 (1 batch), so rank 1
    # must run a padding forward for ZeRO-3's collective parameter gathering.
    de = [*XQUAD_ROWS["de"], *XQUAD_ROWS["fr"]]
    data = tmp_path / "qa"
    write_jsonl(data / "squad" / "train.jsonl", train)
    write_jsonl(data / "xquad" / "de.jsonl", de)
    write_jsonl(data / "xquad" / "fr.jsonl", XQUAD_ROWS["fr"])
    single = finetune_and_evaluate_qa(model_dir, ["de", "fr"], str(data), epochs=2, lr=1e-3, batch_size=2,
                                      max_length=MAX_LEN, doc_stride=STRIDE, seed=1, device="cpu")
    assert single.settings["train_features"] == 14
    out = tmp_path / "out"
    run_two_ranks(["--task", "xquad", "--model", model_dir, "--languages", "de,fr", "--data-dir", str(data),
                   "--epochs", "2", "--lr", "1e-3", "--batch-size", "2", "--seed", "1", "--max-length", str(MAX_LEN),
                   "--doc-stride", str(STRIDE), "--out", str(out)], stage=3)
    dist = json.loads((out / "xquad.json").read_text())
    s = dist["settings"]
    assert (s["world_size"], s["backend"], s["train_steps"]) == (2, "deepspeed ZeRO-3", single.settings["train_steps"])
    assert s["epoch_losses"] == pytest.approx(single.settings["epoch_losses"], rel=1e-4)
    assert dist["examples"] == {"de": 5, "fr": 2}
    for lang in ("de", "fr"):
        for metric in ("exact_match", "f1"):
            assert dist["scores"][lang][metric] == pytest.approx(single.scores[lang][metric])


def test_uneven_final_batch_is_dropped_only_across_ranks():
    assert global_batches(17, 8, 1) == [(0, 8), (8, 16), (16, 17)]
    assert global_batches(17, 8, 2) == [(0, 8), (8, 16)]  # 1 item cannot feed 2 ranks
    assert global_batches(1, 8, 2) == []


def test_one_process_with_deepspeed_config_needs_no_launcher(tmp_path, model_dir):
    """`python launchers/evaluate.py --deepspeed_config ...` (no launcher, no MPI) runs as a world of one."""
    import sys

    data = tmp_path / "xnli"
    write_jsonl(data / "en" / "train.jsonl", nli_rows(20, 0))
    write_jsonl(data / "en" / "test.jsonl", nli_rows(5, 1))
    single = finetune_and_evaluate("xnli", model_dir, ["en"], str(data), device="cpu", epochs=1, lr=1e-3, batch_size=4,
                                   max_length=32)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launchers" / "evaluate.py"), "--task", "xnli", "--model", model_dir,
         "--languages", "en", "--data-dir", str(data), "--epochs", "1", "--lr", "1e-3", "--batch-size", "4",
         "--max-length", "32", "--deepspeed_config", str(REPO / "ds_configs" / "zero1.json"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "xnli.json").read_text())["settings"]
    assert (s["world_size"], s["backend"]) == (1, "deepspeed ZeRO-1")
    assert s["epoch_losses"] == pytest.approx(single.settings["epoch_losses"], rel=1e-4)
