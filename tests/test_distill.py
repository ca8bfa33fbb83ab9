"""Distillation end to end: real `deepspeed` launches with 2 CPU ranks (gloo).

ZeRO 2 and 3 train, log, checkpoint, resume to the same per-step losses, and export a student
that Hugging Face loads; a SIGTERM to the `deepspeed` runner alone, or Ctrl-C, saves a
checkpoint and leaves no process behind; non-finite losses are skipped, then abort; resuming
with another world size, or training against another teacher, is refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from mmkd_ds.config import load_config
from mmkd_ds.distributed import ProcessPlace
from mmkd_ds.precompute import run_precompute
from mmkd_ds.training.metrics import read_metrics
from shard_factory import TEACHER_NAME, make_shards

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "mmkd_ds" / "data" / "sample"
OBJECTIVES = ("token", "word", "sentence", "structure")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take_lines(src: Path, dst: Path, start: int, n: int) -> None:
    lines = src.read_text(encoding="utf-8").splitlines()[start : start + n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, teacher_dir, student_tokenizer):
    """Tiny teacher shards of 48 sample pairs, a tiny student, and a base run config."""
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("distill")
    (root / "corpus").mkdir()
    for lang in ("de", "sw"):
        take_lines(SAMPLE / f"train.en-{lang}.tsv", root / "corpus" / f"train.en-{lang}.tsv", 0, 24)
        take_lines(SAMPLE / f"heldout.en-{lang}.tsv", root / "corpus" / f"heldout.en-{lang}.tsv", 0, 8)
    student_dir = root / "student-init"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(student_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, pad_token_id=student_tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(student_dir)  # dropout stays on: resume must restore its RNG
    student_tokenizer.save_pretrained(student_dir)

    base = root / "run.yaml"
    base.write_text(f"""
data:
  sources: [{{path: '{root}/corpus/train.*.tsv'}}]
  heldout: [{{path: '{root}/corpus/heldout.*.tsv'}}]
teacher: {{name: '{teacher_dir}'}}
precompute: {{out_dir: '{root}/shards', shard_size: 12, batch_size: 16, progress: false}}
stream: {{batch_size: 4, num_workers: 1}}
student: {{name: '{student_dir}', max_tokens: 96}}
loss: {{head_hidden: 32, head_out: 16}}
train: {{steps: 6, warmup_steps: 2, lr: 0.001, log_every: 1, eval_every: 3, save_every: 3}}
""")
    run_precompute(load_config(base), ProcessPlace(0, 1, 0))
    return SimpleNamespace(root=root, config=base, student_dir=student_dir, teacher_dir=teacher_dir)


def release_shm(port: int) -> list[str]:
    """Remove DeepSpeed's /dev/shm all-reduce buffers of a launch on ``port`` (a killed run
    cannot); returns what was left behind."""
    import glob

    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")
    for path in left:
        os.unlink(path)
    return left


def launch(setup, out_dir: Path, *args: str, stage: int = 2, gpus: int = 2, popen: bool = False, **popen_kw):
    port = free_port()
    cmd = [
        "deepspeed", "--num_gpus", str(gpus), "--master_port", str(port),
        str(REPO / "launchers" / "distill.py"), "--config", str(setup.config),
        "--deepspeed_config", str(REPO / "ds_configs" / f"zero{stage}.json"),
        f"--train.out_dir={out_dir}", *args,
    ]
    # The ranks look for their launcher every 0.1 s (1 s by default), so that a test can stop a
    # 6-step run part-way by killing the launcher once training has begun.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MMKD_LAUNCHER_POLL_S": "0.1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)
    if popen:
        proc.port = port
        return proc
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # the ranks are grandchildren: never leave them behind
        release_shm(port)
        raise
    left = release_shm(port)
    if proc.returncode == 0:
        assert not left, f"ranks left their shared-memory buffers behind: {left}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-4000:] + "\n--- stderr ---\n" + result.stderr[-4000:]
    return result.stdout


def losses_by_step(out_dir: Path) -> dict[int, dict]:
    rows = read_metrics(out_dir / "metrics.jsonl")
    return {r["step"]: {k: r[k] for k in r if k.startswith("loss/")} for r in rows if "loss/total" in r}


@pytest.mark.parametrize("stage", [2, 3])
def test_train_resume_and_export(setup, tmp_path, stage):
    # One uninterrupted run of 6 steps.
    full = tmp_path / "full"
    out = ok(launch(setup, full, stage=stage))
    assert "distill: done at step 6" in out
    assert "step 3: held-out retrieval (cls): avg " in out and "retrieval retrieval" not in out
    losses = losses_by_step(full)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step, row in losses.items():
        assert set(row) == {f"loss/{k}" for k in (*OBJECTIVES, "total")}
        weighted = row["loss/token"] + row["loss/word"] + row["loss/sentence"] + 10 * row["loss/structure"]
        assert row["loss/total"] == pytest.approx(weighted, rel=1e-5)
    scalars = [r for r in read_metrics(full / "metrics.jsonl") if "throughput/samples_per_s" in r]
    assert len(scalars) == 6
    for r in scalars:
        assert r["throughput/samples_per_s"] > 0 and r["throughput/tokens_per_s"] > 0
        assert 0 <= r["time/data_wait_fraction"] <= 1
        assert r["train/grad_norm"] > 0 and r["memory/rss_gib"] > 0
    # Warm-up over 2 steps, then linear decay to 0 at step 6.
    assert [round(r["train/lr"] / 1e-3, 6) for r in scalars] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    evals = read_metrics(full / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0 <= r["eval/retrieval_avg"] <= 1 and "eval/retrieval_sw" in r for r in evals)
    assert all(0 <= r["eval/retrieval_mean_avg"] <= 1 and "eval/retrieval_mean_sw" in r for r in evals)

    # TensorBoard received the same scalars through the engine's monitor.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((full / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/structure", "throughput/tokens_per_s", "time/data_wait_fraction",
            "eval/retrieval_avg", "train/lr"} <= tags
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx([losses[s]["loss/total"] for s in range(1, 7)])

    # The export loads as a masked-LM and as an encoder, and holds trained weights.
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from mmkd_ds.mlm_head import load_masked_lm

    mlm, info = load_masked_lm(full / "student")  # the encoder, and the trained head beside it
    assert not info["missing_keys"], info  # (the pooler is unused by a masked-LM, and ignored silently)
    encoder = AutoModel.from_pretrained(full / "student")
    tokenizer = AutoTokenizer.from_pretrained(full / "student")
    initial = AutoModelForMaskedLM.from_pretrained(setup.student_dir)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(mlm.state_dict()[key], initial.state_dict()[key])
    assert torch.equal(encoder.state_dict()[key.removeprefix("bert.")], mlm.state_dict()[key])
    enc = tokenizer("Habari ya asubuhi", return_tensors="pt")
    assert mlm(**enc).logits.shape[-1] == len(tokenizer)
    # Every checkpoint records the command that trained it; the model card names it.
    state = json.loads((full / "checkpoints" / "step00000006" / "mmkd_state.json").read_text())
    assert "launchers/distill.py" in state["command"] and "--num_gpus 2" in state["command"], state["command"]
    assert f"Trained with: `{state['command']}`" in (full / "student" / "README.md").read_text()

    # `kill <pid of deepspeed>` once training has begun: the runner dies alone (it forwards no
    # signal), and its ranks, which watch it, save the step they are at and exit; none is left.
    split = tmp_path / "split"
    proc = launch(setup, split, stage=stage, popen=True)
    stdout = kill_runner_once_training(proc, split)
    tag = (split / "checkpoints" / "latest").read_text().strip()
    k = int(tag.removeprefix("step"))
    assert 1 <= k < 6, stdout[-3000:]
    # Every rank watches the runner; rank 0 logs, naming the runner if its own watch saw the exit
    # first, or saying another rank did (which rank notices first is a race).
    assert any(f"step {k}: {why}, checkpoint {tag} saved" in stdout for why in (
        f"deepspeed runner (pid {proc.pid}) exited", "the job's launcher exited on another rank")), stdout[-3000:]
    assert "stopped early" in stdout
    # As if the run had then crashed two steps later: those steps are in metrics.jsonl and
    # TensorBoard already, and the resumed run must not show them twice.
    crashed_steps = [s for s in (k + 1, k + 2) if s <= 6]
    with open(split / "metrics.jsonl", "a", encoding="utf-8") as f:
        for s in crashed_steps:
            f.write(json.dumps({"kind": "train", "step": s, "loss/total": 999.0}) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = next((split / "tensorboard").rglob("events.out.tfevents.*")).parent
    with SummaryWriter(log_dir=str(tb_dir)) as crashed:
        for s in crashed_steps:
            crashed.add_scalar("loss/total", 999.0, s)
    out = ok(launch(setup, split, "--resume", stage=stage))
    assert f"at step {k}; dropped {len(crashed_steps)} metrics.jsonl records of later steps" in out
    assert "resume: no setting changed since the checkpoint" in out and "schedule:" not in out.split("resumed from")[1]
    assert "distill: done at step 6" in out
    assert [r["step"] for r in read_metrics(split / "metrics.jsonl") if "loss/total" in r] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
    assert 999.0 not in [e.value for e in events.Scalars("loss/total")]
    resumed = losses_by_step(split)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    # Bitwise equal in every isolated trial here; once, with another job loading both cores,
    # ZeRO-3 differed by 2e-6 relative at one step, so fp32 summation-order noise is allowed.
    # A wrong batch, mask, dropout RNG or optimizer state moves these losses by 1e-2 or more.
    for step in range(1, 7):
        for name, value in losses[step].items():
            assert resumed[step][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, name)


def wait_for_training(proc: subprocess.Popen, out_dir: Path, step: int) -> list[psutil.Process]:
    """Wait until ``metrics.jsonl`` holds ``step`` (0: the held-out evaluation before the first
    step, by which time the ranks watch their launcher); return every process under the runner."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(r["step"] >= step for r in read_metrics(out_dir / "metrics.jsonl")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    return psutil.Process(proc.pid).children(recursive=True)


def assert_none_left(procs: list[psutil.Process], proc: subprocess.Popen) -> str:
    """Within 60 s of the stop, every process the launch started is gone; returns its stdout."""
    _, alive = psutil.wait_procs(procs, timeout=60)
    left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive if p.is_running()]
    assert not left, f"processes left 60 s after the stop: {left}"
    stdout, stderr = proc.communicate(timeout=30)
    release_shm(proc.port)
    return stdout + "\n--- stderr ---\n" + stderr


def kill_runner_once_training(proc: subprocess.Popen, out_dir: Path) -> str:
    """SIGTERM to the `deepspeed` runner alone, as `kill PID` sends it; returns the run's output."""
    try:
        procs = wait_for_training(proc, out_dir, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM  # the runner dies at once, telling no one
        return assert_none_left(procs, proc)
    finally:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """Never leave a training run behind a failed test (it would eat the other tests' CPU)."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_ctrl_c_saves_checkpoint_and_exits(setup, tmp_path):
    """Ctrl-C on the terminal: SIGINT to the whole process group (runner, node launcher, ranks,
    data-loader workers). The ranks save the step they are at; none is left."""
    out_dir = tmp_path / "interrupted"
    proc = launch(setup, out_dir, "--train.steps=500", "--train.eval_every=0", "--train.save_every=0",
                  popen=True, start_new_session=True)  # its own process group, as a terminal job
    try:
        procs = wait_for_training(proc, out_dir, 2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout = assert_none_left(procs, proc)
    finally:
        kill_tree(proc)
    tag = (out_dir / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("step"))
    assert step >= 2 and f"step {step}: SIGINT received, checkpoint {tag} saved" in stdout, stdout[-3000:]
    assert "stopped early" in stdout

    # Resuming on another number of ranks keeps the global batch through grad_accum
    # (tests/test_elastic_resume.py); where no grad_accum can, it is refused in one line naming
    # the choices (corpus, shards, seed: tests/test_resume_checks.py).
    result = launch(setup, out_dir, "--resume", "--train.steps=500", "--train.eval_every=0", "--stream.batch_size=3",
                    gpus=1)
    assert result.returncode == 2 and "cannot resume on 1 ranks with stream.batch_size 3" in result.stderr, \
        result.stderr[-3000:]
    # On the same ranks it continues, here lengthened to 600 steps: the resume lists the changed
    # settings and re-plans the linear decay from the lr it had reached (no jump); train.stop_at
    # ends it with a checkpoint.
    out = ok(launch(setup, out_dir, "--resume", f"--train.stop_at={step + 1}", "--train.steps=600",
                    "--train.eval_every=0", "--train.save_every=0"))
    assert f"at step {step}" in out and f"step {step + 1}: train.stop_at reached" in out
    assert "settings changed since the checkpoint: " in out and "train.steps 500 -> 600" in out, out[-3000:]
    assert f"the linear decay re-planned from step {step}" in out and "to 0 at step 600" in out, out[-3000:]
    lr = {r["step"]: r["train/lr"] for r in read_metrics(out_dir / "metrics.jsonl") if "train/lr" in r}
    # warm-up 2, peak 1e-3: lr(step) = 1e-3 (1 - (step - 2) / 498), then a line to 0 at step 600
    assert lr[step] == pytest.approx(1e-3 * (1 - (step - 2) / 498), rel=1e-6)
    assert lr[step + 1] == pytest.approx(lr[step] * (1 - 1 / (600 - step)), rel=1e-6)


def test_non_finite_losses_are_skipped_then_abort(setup, tmp_path):
    sick = tmp_path / "sick-shards"
    make_shards(sick, [10, 10, 10, 10], hidden=8, poison={5, 17})
    common = [f"--stream.shard_dir={sick}", f"--teacher.name={TEACHER_NAME}", "--train.eval_every=0",
              "--train.save_every=0", "--train.export=false"]
    out = ok(launch(setup, tmp_path / "skip", *common))
    assert "done at step 6" in out
    skipped = int(out.split("s, ")[-1].split(" non-finite")[0].split()[-1])
    assert skipped >= 1
    assert "non-finite loss, micro-batch skipped" in out
    assert all(v == v for row in losses_by_step(tmp_path / "skip").values() for v in row.values())  # no NaN logged

    dead = tmp_path / "dead-shards"
    make_shards(dead, [8, 8], hidden=8, poison=set(range(16)))
    result = launch(setup, tmp_path / "abort", *common[1:], f"--stream.shard_dir={dead}", "--train.max_bad_steps=3",
                    gpus=1)  # one rank starts faster and aborts the same way
    assert result.returncode != 0
    assert "step 0: 3 non-finite losses in a row" in result.stderr


def test_shards_of_another_teacher_configuration_are_refused(setup, tmp_path):
    result = launch(setup, tmp_path / "run", "--teacher.pooling=mean", gpus=1)
    assert result.returncode == 2
    assert "teacher.pooling" in result.stderr


EMA = ["--loss.teacher_head=ema", "--loss.ema_decay=0.5"]


@pytest.mark.parametrize(
    "stage, extra",
    [
        ("1", ["--train.epochs=0.34", "--train.warmup_epochs=0.17", "--train.lr_scaling=linear"]),
        ("3_offload", []),
        # teacher_head=ema must really update g_T, also when ZeRO-3 partitions the heads: checked
        # in these runs rather than in launches of their own (each launch costs ~25 s of startup)
        ("2", ["--train.grad_accum=2", *EMA]),
        # also the sentence-vector options (token means, structure without heads): no shards to
        # remake in online mode
        ("2", ["--train.teacher_mode=online", "--teacher.sentence=mean", "--loss.sentence_pooling=mean",
               "--loss.structure_heads=none"]),
        ("3", ["--student.length_buckets=3", *EMA]),  # several encoder forwards per step under ZeRO-3
    ],
    ids=["zero1", "zero3-offload", "grad-accum", "online-teacher", "zero3-length-buckets"],
)
def test_other_configurations_train_and_export(setup, tmp_path, stage, extra):
    out_dir = tmp_path / "run"
    out = ok(launch(setup, out_dir, "--train.steps=2", "--train.eval_every=0", *extra, stage=stage))
    assert "distill: done at step 2" in out
    if "--train.lr_scaling=linear" in extra:  # 48 pairs / (2 ranks x 4) = 6 steps an epoch
        assert "schedule: 2 steps (0.34 epochs of 6), global batch 8, warm-up 1 (0.17 epochs)" in out
        assert "= 0.001 x 8/256" in out
    losses = losses_by_step(out_dir)
    assert sorted(losses) == [1, 2] and all(v == v and abs(v) < 1e4 for r in losses.values() for v in r.values())
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out_dir / "student").config.hidden_size == 32
    if "--loss.teacher_head=ema" in extra:
        assert_teacher_head_moved(setup, out_dir)
    if "--loss.sentence_pooling=mean" in extra:  # the export pools as it trained
        from mmkd_ds.training.st_export import sentence_transformers_pooling

        assert sentence_transformers_pooling(out_dir / "student") == "mean"
        assert set(losses[1]) == {f"loss/{k}" for k in (*OBJECTIVES, "total")}


def assert_teacher_head_moved(setup, out_dir: Path) -> None:
    """The checkpoint's g_T differs from the frozen projector it started as (pulled toward g)."""
    from mmkd_ds.losses.heads import frozen_projector
    from mmkd_ds.losses.sentence import SENTENCE_SEED_SALT
    from mmkd_ds.training.export import consolidated_state_dict

    state = consolidated_state_dict(out_dir / "checkpoints", "step00000002")
    init = frozen_projector(32, 32, 16, 0, SENTENCE_SEED_SALT).state_dict()
    trained_key = next(k for k in state if k.startswith("sentence_heads.g_T.") and k.endswith("weight") and state[k].dim() == 2)
    name = trained_key.removeprefix("sentence_heads.g_T.")
    assert state[trained_key].shape == init[name].shape
    assert not torch.allclose(state[trained_key], init[name])


@pytest.fixture(scope="module")
def one_process_run(setup, tmp_path_factory):
    """`python launchers/distill.py` with no launcher and no DeepSpeed JSON (ZeRO stage 0)."""
    out_dir = tmp_path_factory.mktemp("plain") / "run"
    cmd = [sys.executable, str(REPO / "launchers" / "distill.py"), "--config", str(setup.config),
           f"--train.out_dir={out_dir}", "--train.steps=2", "--train.eval_every=0", "--train.save_every=0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(free_port())})
    return SimpleNamespace(out_dir=out_dir, stdout=ok(result), ckpt=out_dir / "checkpoints" / "step00000002")


def test_one_process_without_deepspeed_config_trains_and_exports(setup, one_process_run):
    """Stage 0's checkpoint is one that zero_to_fp32 cannot read; the export must still hold
    the trained weights."""
    from transformers import AutoModelForMaskedLM

    from mmkd_ds.mlm_head import load_masked_lm
    from mmkd_ds.training.export import consolidated_state_dict

    run = one_process_run
    assert "distill: done at step 2" in run.stdout
    assert not list(run.ckpt.glob("zero_pp_rank_*"))  # really stage 0
    state = consolidated_state_dict(run.ckpt.parent, run.ckpt.name)
    exported, _ = load_masked_lm(run.out_dir / "student")
    for key in ("bert.encoder.layer.0.attention.self.query.weight", "cls.predictions.transform.dense.weight"):
        torch.testing.assert_close(exported.state_dict()[key], state[f"student.{key}"])
    key = "bert.encoder.layer.0.attention.self.query.weight"
    initial = AutoModelForMaskedLM.from_pretrained(setup.student_dir)
    assert not torch.equal(exported.state_dict()[key], initial.state_dict()[key])  # trained


def test_head_retrieval_script_reads_a_checkpoint(setup, one_process_run, capsys):
    """scripts/head_retrieval.py: its raw [CLS] column is mmkd-eval's x -> e retrieval of the
    exported student; the head column is an accuracy of the same pairs."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import head_retrieval
    finally:
        sys.path.pop(0)
    from mmkd_ds.data.corpus import build_heldout
    from mmkd_ds.evaluation.retrieval import evaluate_retrieval, load_encoder

    assert head_retrieval.main(["--config", str(setup.config), "--checkpoint", str(one_process_run.ckpt)]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| de") or line.startswith("| sw")]
    assert [r[0].strip() for r in rows] == ["de", "sw"]
    model, tokenizer = load_encoder(str(one_process_run.out_dir / "student"))
    want = evaluate_retrieval(model, tokenizer, build_heldout(load_config(setup.config).data).pairs).per_language
    for lang, pairs, _, head, raw in ((c.strip() for c in r) for r in rows):
        assert int(pairs) == want[lang]["pairs"]
        assert 0.0 <= float(head.rstrip("%")) <= 100.0
        assert float(raw.rstrip("%")) == pytest.approx(100 * want[lang]["xx2en"], abs=0.051)


def test_two_nodes_on_one_machine_match_one_node(setup, tmp_path):
    """Two launcher invocations (node ranks 0 and 1, one rank each, no SSH) train together and
    give the per-step losses of one node with 2 ranks; the nodes read disjoint samples."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    two = tmp_path / "two-nodes"
    common = ["--train.steps=4", "--train.eval_every=0", "--train.export=false"]
    procs = []
    for node in (0, 1):
        cmd = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, "--num_gpus", "1",
               str(REPO / "launchers" / "distill.py"), "--config", str(setup.config),
               "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json"), f"--train.out_dir={two}", *common]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    one = tmp_path / "one-node"
    ok(launch(setup, one, *common))
    a, b = losses_by_step(two), losses_by_step(one)
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        for name, value in b[step].items():
            assert a[step][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, name)

    # What each node read in the first epoch: disjoint samples covering the corpus.
    from mmkd_ds.shards.manifest import read_manifest
    from mmkd_ds.shards.plan import EpochPlan, PlanShard

    manifest = read_manifest(setup.root / "shards")
    shards = [PlanShard(s.name, s.samples, s.first_index) for s in manifest.shards]
    reads = []
    for rank in (0, 1):
        plan = EpochPlan(shards, seed=1234, epoch=0, world_size=2, rank=rank, batch_size=4)
        reads.append({i for j in range(plan.num_batches) for _, i in plan.batch(j)})
    assert not reads[0] & reads[1] and len(reads[0] | reads[1]) == manifest.total_samples
