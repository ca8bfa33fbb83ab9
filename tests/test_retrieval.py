"""Parallel-sentence retrieval: accuracy, embeddings, per-language evaluation and its report."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SAMPLE_DIR, make_tiny_bert
from mmkd_ds.data.pairs import Pair
from mmkd_ds.evaluation.retrieval import (
    RetrievalResult,
    embed_sentences,
    evaluate_retrieval,
    load_encoder,
    retrieval_accuracy,
)


def heldout_pairs(lang: str, n: int) -> list[Pair]:
    path = SAMPLE_DIR / f"heldout.en-{lang}.tsv"
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()[:n], start=1):
        en, xx = line.split("\t")
        out.append(Pair(en, xx, lang, f"{path.name}:{i}"))
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, student_tokenizer):
    """A tiny BERT with the student vocabulary, loaded through the real from_pretrained path."""
    path = make_tiny_bert(tmp_path_factory.mktemp("student"), student_tokenizer, hidden=32)
    model, tok = load_encoder(str(path))
    return model, tok


# ---------------------------------------------------------------- retrieval_accuracy


def test_accuracy_identity_is_one():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert retrieval_accuracy(x, x.clone()) == 1.0


def test_accuracy_known_permutation():
    src = torch.eye(4)
    perm = torch.tensor([0, 2, 1, 3])  # rows 0 and 3 stay, 1 and 2 swap
    assert retrieval_accuracy(src, src[perm]) == 0.5
    assert retrieval_accuracy(src, src[torch.tensor([1, 2, 3, 0])]) == 0.0


def test_accuracy_is_cosine_not_dot_product():
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tgt = torch.tensor([[1.0, 0.0], [10.0, 1.0]])  # a long vector would win a dot product for row 0
    assert retrieval_accuracy(src, tgt) == 1.0
    assert retrieval_accuracy(src * 3.0, tgt * 0.1) == 1.0  # scale-free


def test_accuracy_ties_go_to_first_index():
    # Candidates 0 and 1 are identical: both queries tie, the first index wins.
    src = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    tgt = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert retrieval_accuracy(src, tgt) == pytest.approx(2 / 3)
    # Fully duplicated pool: only the first occurrence can be retrieved.
    dup = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert retrieval_accuracy(dup, dup) == 0.5


def test_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        retrieval_accuracy(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no rows"):
        retrieval_accuracy(torch.zeros(0, 4), torch.zeros(0, 4))


# ---------------------------------------------------------------- embed_sentences


def test_embed_shape_order_and_batch_size_invariance(encoder):
    model, tok = encoder
    texts = [p.en for p in heldout_pairs("de", 5)] + [p.xx for p in heldout_pairs("sw", 4)] + ["Hi."]
    ref = embed_sentences(model, tok, texts, batch_size=64)
    assert ref.shape == (len(texts), 32) and ref.dtype == torch.float32 and ref.device.type == "cpu"
    for bs in (1, 3):
        assert torch.allclose(embed_sentences(model, tok, texts, batch_size=bs), ref, atol=1e-5)
    # Order is the input order: embedding a reversed list gives reversed rows.
    rev = embed_sentences(model, tok, texts[::-1], batch_size=4)
    assert torch.allclose(rev, ref.flip(0), atol=1e-5)
    assert not torch.allclose(ref[0], ref[1], atol=1e-3)  # different sentences, different vectors


def test_embed_cls_equals_direct_forward(encoder):
    model, tok = encoder
    text = heldout_pairs("fr", 1)[0].xx
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        direct = model(**enc).last_hidden_state
    got = embed_sentences(model, tok, [text], pooling="cls")
    assert torch.allclose(got[0], direct[0, 0], atol=1e-5)
    got_mean = embed_sentences(model, tok, [text], pooling="mean")
    assert torch.allclose(got_mean[0], direct[0].mean(0), atol=1e-5)
    assert not torch.allclose(got[0], got_mean[0], atol=1e-3)


def test_mean_pooling_ignores_padding(encoder):
    model, tok = encoder
    short, long = "Yes.", heldout_pairs("de", 1)[0].en + " " + heldout_pairs("fr", 1)[0].en
    assert len(tok(short)["input_ids"]) < len(tok(long)["input_ids"])
    alone = embed_sentences(model, tok, [short], pooling="mean")
    padded = embed_sentences(model, tok, [long, short], pooling="mean", batch_size=2)
    assert torch.allclose(padded[1], alone[0], atol=1e-5)


def test_embed_handles_masked_lm_and_restores_modes(encoder, student_tokenizer):
    from transformers import BertForMaskedLM

    model, tok = encoder
    texts = [p.en for p in heldout_pairs("ur", 3)]
    mlm = BertForMaskedLM(model.config)
    mlm.bert.load_state_dict(model.state_dict(), strict=False)
    mlm.train()
    mlm.bert.embeddings.eval()  # a mixed state must come back exactly as it was
    before = {name: m.training for name, m in mlm.named_modules()}
    a = embed_sentences(mlm, tok, texts)
    b = embed_sentences(mlm, tok, texts)
    assert a.shape == (3, 32)
    assert torch.equal(a, b)  # dropout (p=0.1 in the config) was off while embedding
    assert torch.allclose(a, embed_sentences(model, tok, texts), atol=1e-5)
    assert {name: m.training for name, m in mlm.named_modules()} == before
    assert mlm.training and not mlm.bert.embeddings.training

    model.eval()
    embed_sentences(model, tok, texts[:1])
    assert not model.training


def test_embed_rejects_unknown_pooling(encoder):
    model, tok = encoder
    with pytest.raises(ValueError, match="pooling"):
        embed_sentences(model, tok, ["a"], pooling="max")
    assert embed_sentences(model, tok, []).shape == (0, 32)


# ---------------------------------------------------------------- evaluate_retrieval


def test_evaluate_two_languages_full_table(encoder):
    model, tok = encoder
    pairs = heldout_pairs("de", 5) + heldout_pairs("sw", 4)
    res = evaluate_retrieval(model, tok, pairs, low_resource=("sw", "ur"), batch_size=4)
    assert isinstance(res, RetrievalResult)
    assert set(res.per_language) == {"de", "sw"}
    assert res.per_language["de"]["pairs"] == 5 and res.per_language["sw"]["pairs"] == 4
    for r in res.per_language.values():
        assert set(r) == {"xx2en", "en2xx", "pairs"}
        assert 0.0 <= r["xx2en"] <= 1.0 and 0.0 <= r["en2xx"] <= 1.0

    def both(lang):
        return (res.per_language[lang]["xx2en"] + res.per_language[lang]["en2xx"]) / 2

    assert res.average == pytest.approx((both("de") + both("sw")) / 2)
    assert res.low_resource_average == pytest.approx(both("sw"))  # ur absent: sw only

    # The per-direction numbers are the direct computation on the embeddings.
    de = heldout_pairs("de", 5)
    en = embed_sentences(model, tok, [p.en for p in de])
    xx = embed_sentences(model, tok, [p.xx for p in de])
    assert res.per_language["de"]["xx2en"] == retrieval_accuracy(xx, en)
    assert res.per_language["de"]["en2xx"] == retrieval_accuracy(en, xx)

    md = res.to_markdown()
    assert "| language | pairs | xx→en | en→xx |" in md
    assert "| de | 5 |" in md and "| sw | 4 |" in md
    assert "average" in md and "low-resource average (sw)" in md
    data = json.loads(res.to_json())
    assert set(data["per_language"]) == {"de", "sw"}
    assert data["per_language"]["sw"]["pairs"] == 4
    assert data["average"] == pytest.approx(res.average)


def test_low_resource_average_none_when_absent(encoder):
    model, tok = encoder
    res = evaluate_retrieval(model, tok, heldout_pairs("de", 3) + heldout_pairs("fr", 3))
    assert res.low_resource_average is None
    assert "n/a" in res.to_markdown()
    assert json.loads(res.to_json())["low_resource_average"] is None


def test_identical_translation_scores_one(encoder):
    model, tok = encoder
    pairs = [Pair(p.en, p.en, "sw", p.origin) for p in heldout_pairs("sw", 8)]
    pairs += [Pair(p.en, p.en, "ur", p.origin) for p in heldout_pairs("ur", 6)]
    res = evaluate_retrieval(model, tok, pairs, pooling="mean")
    for r in res.per_language.values():
        assert r["xx2en"] == 1.0 and r["en2xx"] == 1.0
    assert res.average == 1.0 and res.low_resource_average == 1.0


def test_evaluate_errors_name_the_language(encoder):
    model, tok = encoder
    pairs = heldout_pairs("de", 3) + heldout_pairs("ur", 1)
    with pytest.raises(ValueError, match="'ur' has 1"):
        evaluate_retrieval(model, tok, pairs)
    with pytest.raises(ValueError, match="no pairs"):
        evaluate_retrieval(model, tok, [])


def test_evaluate_restores_train_mode(encoder):
    model, tok = encoder
    model.train()
    try:
        evaluate_retrieval(model, tok, heldout_pairs("fr", 3))
        assert model.training
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_load_encoder_from_a_masked_lm_is_quiet_and_warns_on_odd_keys(tmp_path, student_tokenizer, capfd):
    """An MLM checkpoint loads as a bare encoder without transformers' load-report table (its LM
    head and the missing pooler are expected); weights that do not belong warn by name."""
    import warnings

    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from mmkd_ds.evaluation.retrieval import load_encoder

    config = BertConfig(vocab_size=len(student_tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    student_tokenizer.save_pretrained(tmp_path / "mlm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = load_encoder(str(tmp_path / "mlm"))
    assert type(model).__name__ == "BertModel" and not model.training
    assert "LOAD REPORT" not in "".join(capfd.readouterr())

    BertForSequenceClassification(config).save_pretrained(tmp_path / "cls")  # a "classifier.*" head
    student_tokenizer.save_pretrained(tmp_path / "cls")
    with pytest.warns(UserWarning, match=r"not used when loading the encoder: classifier\.bias, classifier\.weight"):
        load_encoder(str(tmp_path / "cls"))


def test_training_log_names_the_metric_once(encoder, capsys):
    """The held-out lines of the training log: ``step N: held-out retrieval (cls): avg ...``
    (the metric's name once: the issue saw "held-out retrieval retrieval (cls)"), one per pooling,
    and the scalars written under eval/retrieval_* and eval/retrieval_mean_*."""
    from types import SimpleNamespace

    from mmkd_ds.training.loop import run_heldout_eval

    model, tok = encoder
    written = []
    metrics = SimpleNamespace(write=lambda step, scalars, kind: written.append((step, kind, scalars)))
    engine = SimpleNamespace(module=SimpleNamespace(student=model))
    pairs = heldout_pairs("de", 6) + heldout_pairs("sw", 6)
    run_heldout_eval(engine, tok, pairs, torch.device("cpu"), 3, metrics, is_main=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 3:")]
    assert [line.split(": avg")[0] for line in lines] == ["step 3: held-out retrieval (cls)",
                                                            "step 3: held-out retrieval (mean)"]
    assert not any("retrieval retrieval" in line for line in lines)
    assert written[0][:2] == (3, "eval") and {"eval/retrieval_avg", "eval/retrieval_mean_sw"} <= set(written[0][2])
