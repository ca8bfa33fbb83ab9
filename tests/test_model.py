"""MMKDModel: one student forward over the stacked row groups, four losses.

Real samples (the bundled corpus through the tiny teacher), the multilingual student tokenizer,
and a tiny BertForMaskedLM student without dropout, so that a forward is deterministic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from mmkd_ds.config.schema import LossConfig, RunConfig, TeacherConfig
from mmkd_ds.data.pairs import Pair
from mmkd_ds.losses import word_infonce_loss
from mmkd_ds.models.mmkd import OBJECTIVES, MMKDModel
from mmkd_ds.precompute import build_samples
from mmkd_ds.teacher import load_teacher
from mmkd_ds.training.batch import MMKDCollator
from mmkd_ds.training.data import CorpusReader
from mmkd_ds.training.loop import batchnorm_buffers, fill_online_teacher

SAMPLE = Path(__file__).resolve().parents[1] / "mmkd_ds" / "data" / "sample"
KEY = (0, 1, 0, 2)
HEADS = {"head_hidden": 16, "head_out": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def make_student(tokenizer, hidden: int = 32, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def loss_cfg(**kw) -> LossConfig:
    return LossConfig(**{**HEADS, **kw})


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(TeacherConfig(name=str(teacher_dir)))


@pytest.fixture(scope="module")
def pairs():
    out = []
    for lang in ("sw", "de", "fr", "ur"):
        lines = (SAMPLE / f"train.en-{lang}.tsv").read_text(encoding="utf-8").splitlines()
        for n in range(10, 12):
            en, xx = lines[n].split("\t")
            out.append(Pair(en, xx, lang, f"train.en-{lang}.tsv:{n + 1}"))
    return out  # 8 pairs


@pytest.fixture(scope="module")
def samples(teacher, pairs):
    return build_samples(teacher, pairs, 0, 3)


def collate(tok, samples, loss: LossConfig, max_tokens: int = 128, key=KEY) -> dict:
    return MMKDCollator(tok, loss, max_tokens, 5)(samples, key)


def test_forward_losses_finite_and_total_is_weighted_sum(student_tokenizer, samples):
    loss = loss_cfg(token_weight=0.5, word_weight=2.0, sentence_weight=1.5, structure_weight=10.0)
    model = MMKDModel(make_student(student_tokenizer), 32, loss)
    out = model(collate(student_tokenizer, samples, loss))
    assert set(out) == {*OBJECTIVES, "total"}
    for k, v in out.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    assert out["token"] > 0 and out["word"] > 0 and out["sentence"] > 0 and out["structure"] >= 0
    expected = 0.5 * out["token"] + 2.0 * out["word"] + 1.5 * out["sentence"] + 10.0 * out["structure"]
    assert torch.allclose(out["total"], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "zero, gone, rows",
    [
        (("token_weight",), {"token"}, {"tlm": 0, "word": 8, "sent": 8}),
        (("word_weight",), {"word"}, {"tlm": 8, "word": 0, "sent": 8}),
        (("sentence_weight",), {"sentence"}, {"tlm": 8, "word": 8, "sent": 8}),
        (("structure_weight",), {"structure"}, {"tlm": 8, "word": 8, "sent": 8}),
        (("sentence_weight", "structure_weight"), {"sentence", "structure"}, {"tlm": 8, "word": 8, "sent": 0}),
    ],
)
def test_zero_weight_removes_key_and_rows(student_tokenizer, samples, zero, gone, rows):
    loss = loss_cfg(**{z: 0.0 for z in zero})
    model = MMKDModel(make_student(student_tokenizer), 32, loss)
    batch = collate(student_tokenizer, samples, loss)
    assert batch["rows"] == rows
    out = model(batch)
    assert set(out) == ({*OBJECTIVES} - gone) | {"total"}
    assert torch.allclose(out["total"], sum(model.weights[k] * out[k] for k in OBJECTIVES if k in out))
    assert ("sentence" in gone) == (model.sentence_heads is None)
    assert ("structure" in gone) == (model.structure_heads is None)
    # dropping a group does not change the others' losses (same masking draws come first)
    full = MMKDModel(make_student(student_tokenizer), 32, loss_cfg())
    full_out = full(collate(student_tokenizer, samples, loss_cfg()))
    if "token" in out:
        assert torch.allclose(out["token"], full_out["token"], atol=1e-5)


def test_word_map_only_when_hidden_sizes_differ(student_tokenizer, samples):
    loss = loss_cfg()
    same = MMKDModel(make_student(student_tokenizer, hidden=32), 32, loss)
    assert same.word_map is None
    other = MMKDModel(make_student(student_tokenizer, hidden=24), 32, loss)
    assert isinstance(other.word_map, torch.nn.Linear)
    assert (other.word_map.in_features, other.word_map.out_features) == (24, 32)
    assert MMKDModel(make_student(student_tokenizer, hidden=24), 32, loss_cfg(word_weight=0.0)).word_map is None
    out = other(collate(student_tokenizer, samples, loss))
    assert torch.isfinite(out["total"])


def test_token_loss_equals_full_logits_cross_entropy(student_tokenizer, samples):
    loss = loss_cfg()
    student = make_student(student_tokenizer)
    model = MMKDModel(student, 32, loss).eval()
    batch = collate(student_tokenizer, samples, loss)
    B = batch["rows"]["tlm"]
    with torch.no_grad():
        got = model(batch)["token"]
        logits = student(
            input_ids=batch["input_ids"][:B],
            attention_mask=batch["attention_mask"][:B],
            token_type_ids=batch["token_type_ids"][:B],
        ).logits  # [B, L, V], every position
    labels = batch["tlm_labels"]
    assert logits.shape[:2] == labels.shape
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert int((labels != -100).sum()) < int(batch["attention_mask"][:B].sum())  # not every position


def loop_pool(h: torch.Tensor, word_ids: torch.Tensor, W: int, pooling: str) -> torch.Tensor:
    out = torch.zeros(h.shape[0], W, h.shape[-1])
    for b in range(h.shape[0]):
        for j in range(W):
            pos = (word_ids[b] == j).nonzero().flatten()
            if len(pos):
                out[b, j] = h[b, pos[0]] if pooling == "first" else h[b, pos].mean(0)
    return out


@pytest.mark.parametrize("pooling, hidden, sim", [("first", 32, "dot"), ("mean", 32, "dot"), ("mean", 24, "cosine")])
def test_word_loss_equals_looped_pooling(student_tokenizer, samples, pooling, hidden, sim):
    loss = loss_cfg(word_pooling=pooling, word_sim=sim, word_tau=0.1 if sim == "cosine" else 1.0)
    student = make_student(student_tokenizer, hidden=hidden)
    model = MMKDModel(student, 32, loss).eval()
    batch = collate(student_tokenizer, samples, loss)
    with torch.no_grad():
        got = model(batch)["word"]
        hidden_states = student.bert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        ).last_hidden_state
        B = batch["rows"]["tlm"]
        h = hidden_states[B : B + batch["rows"]["word"]]
        pooled = loop_pool(h, batch["word_ids"], batch["n_words"], pooling)
        if model.word_map is not None:
            pooled = model.word_map(pooled)
        expected = word_infonce_loss(
            pooled, batch["teacher_words"], batch["word_valid"], batch["word_target"], sim=sim, tau=loss.word_tau
        )
    assert expected > 0
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    if pooling == "mean" and hidden == 32:  # the pooling choice matters on these inputs
        first = word_infonce_loss(
            loop_pool(h, batch["word_ids"], batch["n_words"], "first"),
            batch["teacher_words"], batch["word_valid"], batch["word_target"],
        )
        assert not torch.allclose(got, first, rtol=1e-4)


def test_gradients_reach_student_and_trained_heads_only(student_tokenizer, samples):
    loss = loss_cfg()
    student = make_student(student_tokenizer, hidden=24)
    model = MMKDModel(student, 32, loss).train()
    model(collate(student_tokenizer, samples, loss))["total"].backward()

    def has_grad(module):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0
    assert student.cls.predictions.transform.dense.weight.grad.abs().sum() > 0  # the MLM head
    assert has_grad(model.word_map)
    assert has_grad(model.sentence_heads.g) and has_grad(model.sentence_heads.q)
    assert has_grad(model.structure_heads.g) and has_grad(model.structure_heads.q)
    for frozen in (model.sentence_heads.g_T, model.structure_heads.g_T):
        params = list(frozen.parameters())
        assert params and all(not p.requires_grad and p.grad is None for p in params)


@pytest.mark.parametrize("max_tokens", [128, 24])
def test_online_teacher_matches_precomputed(student_tokenizer, teacher, teacher_dir, pairs, samples, max_tokens):
    loss = loss_cfg()
    tok = student_tokenizer
    pre = MMKDCollator(tok, loss, max_tokens, 5)(samples, KEY)
    reader = CorpusReader(pairs)
    on = MMKDCollator(tok, loss, max_tokens, 5, teacher_tokenizer=teacher.tokenizer, teacher_max_tokens=128)(
        [reader.read(i) for i in range(len(pairs))], KEY
    )
    cfg = RunConfig()
    cfg.teacher = TeacherConfig(name=str(teacher_dir))
    fill_online_teacher(on, teacher, cfg)
    for k in ("input_ids", "attention_mask", "token_type_ids", "tlm_labels", "word_ids", "word_valid", "word_target"):
        assert torch.equal(on[k], pre[k]), k  # identical student inputs
    assert on["teacher_words"].shape == pre["teacher_words"].shape
    if max_tokens == 24:
        assert pre["n_words"] < max(len(s.words) for s in samples)  # English words were cut

    # Eval mode, one module for both runs. Why not train mode on two deep copies: train-mode
    # BatchNorm divides by the batch std of each feature, and the [CLS] vectors of this tiny
    # random teacher barely vary across sentences, so it amplifies the fp16 rounding of the
    # stored vectors (measured: sentence loss off by up to 4e-2 between the modes, i.e. a test
    # of BatchNorm's conditioning, not of the data path). Eval mode normalises with fixed
    # running statistics and updates none, so both runs see the same state (checked below)
    # and differ only by what fp16 storage itself causes. Dropout is 0 in the student.
    model = MMKDModel(make_student(tok, hidden=24), 32, loss).eval()
    buffers = [b.clone() for b in batchnorm_buffers(model)]
    assert buffers  # the heads do have BatchNorm
    with torch.no_grad():
        out_pre, out_on = model(pre), model(on)
    assert all(torch.equal(x, y) for x, y in zip(buffers, batchnorm_buffers(model)))
    assert torch.equal(out_on["token"], out_pre["token"])  # no teacher input at all
    for k in (*OBJECTIVES, "total"):
        assert torch.isfinite(out_pre[k]), k
        assert torch.allclose(out_on[k], out_pre[k], rtol=1e-2, atol=1e-2), (k, out_on[k], out_pre[k])
    # the teacher vectors agree only to fp16 rounding: the comparison is not vacuous
    assert not torch.equal(on["teacher_cls"], pre["teacher_cls"])
    assert torch.allclose(on["teacher_cls"], pre["teacher_cls"], rtol=1e-2, atol=1e-2)


def test_int8_stored_teacher_vectors_give_nearly_the_float32_losses(student_tokenizer, teacher_dir, pairs):
    """Samples written with teacher.dtype int8 and read back, as the loader reads them: the
    same student inputs, and losses within int8's rounding of the float32 teacher vectors."""
    from mmkd_ds.shards.format import decode_sample, encode_sample, split_member_name

    teacher8 = load_teacher(TeacherConfig(name=str(teacher_dir), dtype="int8"))
    raw = build_samples(teacher8, pairs, 0, 3)  # float32: what the shard writer gets
    assert str(raw[0].cls.dtype) == "float32"
    stored = [decode_sample(s.key, {split_member_name(n)[1]: b for n, b in encode_sample(s, "int8")}) for s in raw]
    loss = loss_cfg()
    b32, b8 = collate(student_tokenizer, raw, loss), collate(student_tokenizer, stored, loss)
    for k in ("input_ids", "attention_mask", "tlm_labels", "word_ids", "word_target"):
        assert torch.equal(b8[k], b32[k]), k
    assert not torch.equal(b8["teacher_words"], b32["teacher_words"])  # int8 did round
    model = MMKDModel(make_student(student_tokenizer, hidden=24), 32, loss).eval()  # as the test above
    with torch.no_grad():
        out32, out8 = model(b32), model(b8)
    for k in (*OBJECTIVES, "total"):
        # int8 keeps each vector to ~0.4% of its largest entry. Measured relative loss changes:
        # up to 6e-3 (sentence), 2e-3 (word); they vary with the session's tiny teacher, whose
        # WordPiece vocabulary the trainer does not reproduce exactly. A wrong scale or a
        # dequantisation bug moves the losses by far more than 2%.
        assert torch.allclose(out8[k], out32[k], rtol=2e-2, atol=1e-4), (k, out8[k], out32[k])
    assert any(not torch.equal(out8[k], out32[k]) for k in ("word", "sentence"))  # not vacuous


def test_build_model_trains_the_pretrained_student(tmp_path, student_tokenizer):
    """from_pretrained gives an eval-mode student; the trained module must be in training mode
    throughout, or the student's dropout would silently stay off during distillation."""
    from mmkd_ds.training.loop import build_model

    make_student(student_tokenizer).save_pretrained(tmp_path)
    student = BertForMaskedLM.from_pretrained(tmp_path)
    assert not student.training  # what transformers hands over
    model = build_model(RunConfig(loss=loss_cfg()), student, teacher_hidden=32)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("buckets", [2, 3, 7, 100])  # 24 rows: even split, uneven, more buckets than sizes
def test_length_buckets_give_the_same_losses_and_gradients(student_tokenizer, samples, buckets):
    """Encoding rows in length buckets, each cut to its own longest row, changes nothing but
    the padding: the losses and every parameter's gradient equal the single forward's."""
    loss = loss_cfg()
    batch = collate(student_tokenizer, samples, loss)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # there is padding to remove
    results = []
    for k in (1, buckets):
        model = MMKDModel(make_student(student_tokenizer), 32, loss, length_buckets=k)
        model.eval()  # BatchNorm in the heads: running statistics, so rows are independent
        out = model(batch)
        out["total"].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (one, g_one), (many, g_many) = results
    for k in one:
        torch.testing.assert_close(many[k], one[k], rtol=1e-5, atol=1e-6)
    assert g_one.keys() == g_many.keys() and len(g_one) > 10
    for n in g_one:
        torch.testing.assert_close(g_many[n], g_one[n], rtol=1e-4, atol=1e-6, msg=n)


def test_encode_in_buckets_restores_row_order(student_tokenizer):
    from mmkd_ds.models.mmkd import encode_in_buckets

    encoder = make_student(student_tokenizer).base_model.eval()
    enc = student_tokenizer(["a", "ein langer Satz mit vielen Worten hier", "kurz", "mittel lang ja"],
                            padding=True, return_tensors="pt")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = encoder(**inputs).last_hidden_state
        split = encode_in_buckets(encoder, inputs, 4)  # a row per bucket
    mask = inputs["attention_mask"].bool()
    assert split.shape == full.shape
    torch.testing.assert_close(split[mask], full[mask], rtol=1e-5, atol=1e-5)  # every real token, in order
    assert torch.all(split[~mask] == 0)  # each row alone in its bucket: cut to its own length


def test_encode_in_buckets_looks_up_token_embeddings_once(student_tokenizer):
    """The groups share one token-embedding lookup, so its dense gradient is built once."""
    from mmkd_ds.models.mmkd import encode_in_buckets

    encoder = make_student(student_tokenizer).base_model.eval()
    calls = []
    encoder.get_input_embeddings().register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    enc = student_tokenizer(["a", "ein langer Satz", "kurz", "mittel lang ja"], padding=True, return_tensors="pt")
    out = encode_in_buckets(encoder, {k: enc[k] for k in ("input_ids", "attention_mask")}, 3)
    assert calls == [(4, enc["input_ids"].shape[1], 32)]
    out.sum().backward()
    assert encoder.get_input_embeddings().weight.grad is not None


def test_mean_sentence_pooling_and_headless_structure_use_the_sentence_vectors(student_tokenizer, teacher_dir, pairs):
    """loss.sentence_pooling mean + loss.structure_heads none + teacher.sentence mean: the
    sentence loss reads the student's token mean through its heads, the structure loss compares
    the similarity matrices of the two models' own sentence vectors (no structure heads)."""
    from mmkd_ds.losses import byol_loss, structure_kl_loss
    from mmkd_ds.sentence_pooling import sentence_vectors

    mean_teacher = load_teacher(TeacherConfig(name=str(teacher_dir), sentence="mean"))
    samples = build_samples(mean_teacher, pairs, 0, 3)
    loss = loss_cfg(token_weight=0.0, word_weight=0.0, sentence_pooling="mean", structure_heads="none",
                    structure_tau=0.1)
    student = make_student(student_tokenizer, hidden=24)  # teacher 32: the matrices need no common size
    model = MMKDModel(student, 32, loss).eval()
    assert model.structure_heads is None and model.sentence_heads is not None
    batch = collate(student_tokenizer, samples, loss)
    out = model(batch)
    hidden = student.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    sent = (hidden * mask).sum(1) / mask.sum(1)  # written out, not sentence_vectors
    assert torch.allclose(sent, sentence_vectors(hidden, batch["attention_mask"], "mean"))
    assert not torch.allclose(sent, hidden[:, 0], atol=1e-3)  # the choice matters here
    teacher_sent = batch["teacher_cls"]
    assert torch.allclose(out["structure"], structure_kl_loss(sent, teacher_sent, 0.1, backend="torch"), atol=1e-6)
    z, zt = model.sentence_heads(sent, teacher_sent)
    assert torch.allclose(out["sentence"], byol_loss(z, zt), atol=1e-6)
    # the teacher's targets are its token means, not its [CLS]
    cls_samples = build_samples(load_teacher(TeacherConfig(name=str(teacher_dir))), pairs, 0, 3)
    cls_batch = collate(student_tokenizer, cls_samples, loss)
    assert not torch.allclose(cls_batch["teacher_cls"], teacher_sent, atol=1e-2)
    # structure gradients reach the encoder, with no parameters of its own
    model.train()
    only_structure = MMKDModel(student, 32, loss_cfg(token_weight=0.0, word_weight=0.0, sentence_weight=0.0,
                                                     sentence_pooling="mean", structure_heads="none"))
    assert not any(p.requires_grad for p in only_structure.parameters() if p not in set(student.parameters()))
    student.zero_grad()
    only_structure(batch)["total"].backward()
    assert student.bert.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0
