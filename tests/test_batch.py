"""The collator: shard samples -> one student batch of stacked row groups (tlm, word, sent).

Samples are real: the bundled sample corpus run through the tiny teacher by the precompute's
``build_samples``; the student side uses the multilingual ``student_tokenizer`` fixture.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd_ds.config.schema import LossConfig, RunConfig, TeacherConfig
from mmkd_ds.data.pairs import Pair
from mmkd_ds.precompute import build_samples
from mmkd_ds.teacher import load_teacher
from mmkd_ds.training.batch import MMKDCollator
from mmkd_ds.training.data import CorpusReader
from mmkd_ds.training.loop import fill_online_teacher
from mmkd_ds.words import split_words

SAMPLE = Path(__file__).resolve().parents[1] / "mmkd_ds" / "data" / "sample"
KEY = (0, 3, 1, 5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def sample_pairs(per_lang: int, start: int = 0) -> list[Pair]:
    pairs = []
    for lang in ("sw", "de", "fr", "ur"):
        lines = (SAMPLE / f"train.en-{lang}.tsv").read_text(encoding="utf-8").splitlines()
        for n in range(start, start + per_lang):
            en, xx = lines[n].split("\t")
            pairs.append(Pair(en, xx, lang, f"train.en-{lang}.tsv:{n + 1}"))
    return pairs


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(TeacherConfig(name=str(teacher_dir)))


@pytest.fixture(scope="module")
def pairs():
    return sample_pairs(3)  # 12 pairs, 4 languages


@pytest.fixture(scope="module")
def samples(teacher, pairs):
    return build_samples(teacher, pairs, 0, 5)


def collate(tok, samples, key=KEY, max_tokens=128, seed=7, **loss):
    return MMKDCollator(tok, LossConfig(**loss), max_tokens, seed)(samples, key)


def specials(tok) -> set[int]:
    return {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}


def group(batch: dict, name: str) -> slice:
    order = [g for g in ("tlm", "word", "sent") if batch["rows"][g]]
    start = sum(batch["rows"][g] for g in order[: order.index(name)])
    return slice(start, start + batch["rows"][name])


def row(batch: dict, r: int) -> list[int]:
    n = int(batch["attention_mask"][r].sum())
    return batch["input_ids"][r, :n].tolist()


def pair_ids(tok, e_words, x_words) -> list[int]:
    return list(tok(e_words, x_words, is_split_into_words=True)["input_ids"])


def word_ids_alone(tok, word: str) -> list[int]:
    return list(tok(word, add_special_tokens=False)["input_ids"])


# -- row groups ---------------------------------------------------------------------------------


def test_all_groups_stack_three_batches(student_tokenizer, samples):
    b = collate(student_tokenizer, samples)
    B = len(samples)
    assert b["rows"] == {"tlm": B, "word": B, "sent": B}
    assert b["input_ids"].shape[0] == 3 * B
    assert b["attention_mask"].shape == b["input_ids"].shape == b["token_type_ids"].shape
    assert b["tlm_labels"].shape == (B, b["input_ids"].shape[1])
    assert b["word_ids"].shape == (B, b["input_ids"].shape[1])
    assert b["n_tokens"] == int(b["attention_mask"].sum())
    assert b["keys"] == [s.key for s in samples] and b["langs"] == [s.lang for s in samples]


@pytest.mark.parametrize(
    "weights, rows, absent",
    [
        ({"token_weight": 0.0}, {"tlm": 0, "word": 1, "sent": 1}, {"tlm_labels"}),
        ({"word_weight": 0.0}, {"tlm": 1, "word": 0, "sent": 1}, {"word_ids", "word_valid", "word_target", "n_words"}),
        ({"sentence_weight": 0.0, "structure_weight": 0.0}, {"tlm": 1, "word": 1, "sent": 0}, set()),
        ({"sentence_weight": 0.0}, {"tlm": 1, "word": 1, "sent": 1}, set()),
        ({"structure_weight": 0.0}, {"tlm": 1, "word": 1, "sent": 1}, set()),
        ({"token_weight": 0.0, "word_weight": 0.0}, {"tlm": 0, "word": 0, "sent": 1}, {"tlm_labels", "word_ids"}),
    ],
)
def test_zero_weights_drop_row_groups(student_tokenizer, samples, weights, rows, absent):
    B = len(samples)
    b = collate(student_tokenizer, samples, **weights)
    assert b["rows"] == {k: v * B for k, v in rows.items()}
    assert b["input_ids"].shape[0] == sum(rows.values()) * B
    assert not absent & set(b)
    full = collate(student_tokenizer, samples)
    if rows["sent"] and not rows["tlm"] and not rows["word"]:
        # only sent rows: they are the sent rows of the full batch (up to padding)
        for i in range(B):
            assert row(b, i) == row(full, 2 * B + i)


# -- token level (TLM) ----------------------------------------------------------------------------


def test_tlm_labels_only_at_selected_non_special_positions(student_tokenizer, samples):
    tok = student_tokenizer
    b = collate(tok, samples)
    ids, labels = b["input_ids"][group(b, "tlm")], b["tlm_labels"]
    for i, s in enumerate(samples):
        n = int(b["attention_mask"][i].sum())
        original = pair_ids(tok, s.words, split_words(s.xx))
        assert n == len(original)
        sel = labels[i] != -100
        assert sel.sum() >= 1
        assert not sel[n:].any()  # never on padding
        for t in range(n):
            if original[t] in specials(tok):
                assert not sel[t] and ids[i, t] == original[t]
            if sel[t]:
                assert labels[i, t] == original[t]  # the label is the original id
            else:
                assert ids[i, t] == original[t]  # unselected tokens are untouched


def test_tlm_selection_rate_and_80_10_10(student_tokenizer, samples):
    tok = student_tokenizer
    candidates = selected = masked = kept = 0
    for k in range(16):
        b = collate(tok, samples, key=(k, 11))
        ids, labels = b["input_ids"][group(b, "tlm")], b["tlm_labels"]
        real = b["attention_mask"][group(b, "tlm")].bool()
        special = torch.zeros_like(real)
        for sid in tok.all_special_ids:
            special |= (ids == sid) & (labels == -100)
        candidates += int((real & ~special).sum())
        sel = labels != -100
        selected += int(sel.sum())
        masked += int((ids[sel] == tok.mask_token_id).sum())
        kept += int((ids[sel] == labels[sel]).sum())
    assert candidates > 4000
    assert abs(selected / candidates - 0.15) < 0.05
    assert 0.7 < masked / selected < 0.9
    assert 0.03 < kept / selected < 0.2
    assert 0.03 < (selected - masked - kept) / selected < 0.2  # random replacements


def test_tlm_mask_prob_is_honoured(student_tokenizer, samples):
    b = collate(student_tokenizer, samples, tlm_mask_prob=0.5)
    real = int(b["attention_mask"][group(b, "tlm")].sum()) - 3 * len(samples)  # minus specials
    rate = int((b["tlm_labels"] != -100).sum()) / real
    assert 0.4 < rate < 0.6


# -- word level ----------------------------------------------------------------------------------


def expected_k(n: int, prob=0.15, cap=0.25) -> int:
    return min(max(1, round(prob * n)), max(1, int(cap * n)))


@pytest.mark.parametrize("targets", ["masked", "all"])
def test_whole_word_masking_all_mask(student_tokenizer, samples, targets):
    tok = student_tokenizer
    b = collate(tok, samples, word_targets=targets, word_mask_mode="mask")
    rows = b["input_ids"][group(b, "word")]
    for i, s in enumerate(samples):
        n = int(b["attention_mask"][group(b, "word")][i].sum())
        original = pair_ids(tok, s.words, split_words(s.xx))
        wid = b["word_ids"][i]
        valid = b["word_valid"][i]
        n_valid = int(valid.sum())
        assert n_valid == len(s.words)  # all teacher counts > 0 here, nothing truncated
        masked_words = sorted({int(wid[t]) for t in range(n) if rows[i, t] == tok.mask_token_id})
        assert len(masked_words) == expected_k(n_valid)
        for t in range(n):
            if wid[t] >= 0 and wid[t] in masked_words:
                assert rows[i, t] == tok.mask_token_id  # every subword of a masked word
            else:
                assert rows[i, t] == original[t]  # everything else untouched (translation too)
        target = b["word_target"][i]
        if targets == "masked":
            assert torch.nonzero(target).flatten().tolist() == masked_words
        else:
            assert torch.equal(target, valid)


def test_whole_word_masking_80_10_10(student_tokenizer, samples):
    """The default (the authors' whole_word_random_mask): the chosen words' subwords each
    become [MASK] (80%), a random non-special token (10%) or stay (10%); nothing else moves."""
    tok = student_tokenizer
    special = set(tok.all_special_ids)
    chosen = masked = kept = randomised = 0
    for k in range(64):
        b = collate(tok, samples, key=(k, 3))
        rows = b["input_ids"][group(b, "word")]
        for i, s in enumerate(samples):
            n = int(b["attention_mask"][group(b, "word")][i].sum())
            original = pair_ids(tok, s.words, split_words(s.xx))
            wid, target = b["word_ids"][i], b["word_target"][i]
            assert int(target.sum()) == expected_k(int(b["word_valid"][i].sum()))
            for t in range(n):
                now = int(rows[i, t])
                if wid[t] >= 0 and target[wid[t]]:
                    chosen += 1
                    if now == tok.mask_token_id:
                        masked += 1
                    elif now == original[t]:
                        kept += 1
                    else:
                        assert now not in special
                        randomised += 1
                else:
                    assert now == original[t]  # other words and the translation untouched
    assert chosen > 1500
    assert 0.75 < masked / chosen < 0.85
    assert 0.06 < kept / chosen < 0.14 and 0.06 < randomised / chosen < 0.14


def test_word_mask_count_clamp(student_tokenizer, samples):
    # word_mask_prob 0.5 with max 0.25: the cap decides; prob 1 / max 1 masks every word
    tok = student_tokenizer
    b = collate(tok, samples, word_mask_prob=0.5, word_mask_max=0.6)
    for i in range(len(samples)):
        n = int(b["word_valid"][i].sum())
        assert int(b["word_target"][i].sum()) == expected_k(n, 0.5, 0.6)
    b = collate(tok, samples, word_mask_prob=0.2, word_mask_max=0.2)
    for i in range(len(samples)):
        n = int(b["word_valid"][i].sum())
        assert int(b["word_target"][i].sum()) == expected_k(n, 0.2, 0.2)
    assert expected_k(3) == 1 and expected_k(10) == 2 and expected_k(20) == 3 and expected_k(7, 0.5, 0.25) == 1


def test_word_ids_map_subwords_and_segments(student_tokenizer, samples):
    tok = student_tokenizer
    b = collate(tok, samples)
    g = group(b, "word")
    for i, s in enumerate(samples):
        n = int(b["attention_mask"][g][i].sum())
        original = pair_ids(tok, s.words, split_words(s.xx))
        wid = b["word_ids"][i].tolist()
        types = b["token_type_ids"][g][i].tolist()
        sep = original.index(tok.sep_token_id)
        # English: [CLS] e [SEP] has segment 0, the translation and its [SEP] segment 1, padding 0
        assert types[: sep + 1] == [0] * (sep + 1)
        assert types[sep + 1 : n] == [1] * (n - sep - 1)
        assert all(t == 0 for t in types[n:])
        assert wid[0] == -1 and wid[sep] == -1
        assert all(w == -1 for w in wid[sep:])  # translation, its [SEP], padding
        pos = 1
        for j, word in enumerate(s.words):
            alone = word_ids_alone(tok, word)
            assert wid[pos : pos + len(alone)] == [j] * len(alone)
            assert original[pos : pos + len(alone)] == alone
            pos += len(alone)
        assert pos == sep
    # tlm rows share the segments of the word rows
    assert torch.equal(b["token_type_ids"][group(b, "tlm")], b["token_type_ids"][g])


def test_sent_rows_are_the_translation_alone(student_tokenizer, samples):
    tok = student_tokenizer
    b = collate(tok, samples)
    g = group(b, "sent")
    for i, s in enumerate(samples):
        r = g.start + i
        expected = list(tok(split_words(s.xx), is_split_into_words=True)["input_ids"])
        assert row(b, r) == expected
        assert expected[0] == tok.cls_token_id and expected[-1] == tok.sep_token_id
        assert expected.count(tok.sep_token_id) == 1
        assert not b["token_type_ids"][r].any()


# -- determinism ---------------------------------------------------------------------------------


def test_same_key_same_batch_other_key_other_masking(student_tokenizer, samples):
    tok = student_tokenizer
    a = collate(tok, samples, key=(1, 2, 3))
    b = MMKDCollator(tok, LossConfig(), 128, 7)(list(samples), (1, 2, 3))  # a fresh collator
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
        else:
            assert v == b[k], k
    c = collate(tok, samples, key=(1, 2, 4))
    assert not torch.equal(a["tlm_labels"], c["tlm_labels"])
    assert not torch.equal(a["word_target"], c["word_target"])
    d = collate(tok, samples, key=(1, 2, 3), seed=8)  # the seed is part of the key
    assert not torch.equal(a["input_ids"], d["input_ids"])


# -- truncation ----------------------------------------------------------------------------------


def counts(tok, words: list[str]) -> list[int]:
    return [len(word_ids_alone(tok, w)) for w in words]


@pytest.mark.parametrize("max_tokens", [12, 20, 28])
def test_truncation_drops_translation_words_first(student_tokenizer, samples, max_tokens):
    tok = student_tokenizer
    b = collate(tok, samples, max_tokens=max_tokens)
    B = len(samples)
    lengths = b["attention_mask"].sum(1)
    assert int(lengths.max()) <= max_tokens
    g = group(b, "word")
    n_e_all, english_cut, x_cut = [], 0, 0
    for i, s in enumerate(samples):
        ids = row(b, g.start + i)
        sep = ids.index(tok.sep_token_id)
        ec, x_words = counts(tok, s.words), split_words(s.xx)
        xc = counts(tok, x_words)
        # English: a whole-word prefix (word ids say how many words)
        wid = b["word_ids"][i].tolist()
        n_e = max(wid) + 1
        assert sep == 1 + sum(ec[:n_e])
        n_e_all.append(n_e)
        # translation: a whole-word prefix, or the "." placeholder when nothing fits
        x_ids = ids[sep + 1 : -1]
        n_x = next(k for k in range(len(x_words) + 1) if sum(xc[:k]) == len(x_ids) or k == len(x_words))
        if sum(xc[:n_x]) == len(x_ids) and n_x:
            assert x_ids == pair_ids(tok, s.words[:n_e], x_words[:n_x])[sep + 1 : -1]
        else:
            n_x = 0
            assert x_ids == word_ids_alone(tok, ".")
        # maximality, translation first: an English word is dropped only if it did not fit even
        # with a one-token translation (what is left after it may still hold a translation
        # word or two); a translation word only if it did not fit after the English
        if n_e < len(s.words):
            english_cut += 1
            assert 3 + sum(ec[: n_e + 1]) + 1 > max_tokens
        if n_x < len(x_words):
            x_cut += 1
            assert 3 + sum(ec[:n_e]) + sum(xc[: n_x + 1]) > max_tokens
        # sent rows: the translation alone, cut the same way
        sent = row(b, group(b, "sent").start + i)
        assert len(sent) <= max_tokens
        n_xs = next((k for k in range(len(x_words)) if 2 + sum(xc[: k + 1]) > max_tokens), len(x_words))
        assert sent == list(tok(x_words[:n_xs] or ["."], is_split_into_words=True)["input_ids"])
    assert x_cut > 0
    if max_tokens == 12:
        assert english_cut > 0
    if max_tokens == 28:
        assert english_cut == 0  # only the translations lose words
    W = max(n_e_all)
    assert b["n_words"] == W
    assert b["teacher_words"].shape == (B, W, samples[0].cls.shape[-1])
    assert b["word_valid"].shape == b["word_target"].shape == (B, W)
    for i, n_e in enumerate(n_e_all):
        assert b["word_valid"][i, :n_e].all() and not b["word_valid"][i, n_e:].any()
        assert not b["word_target"][i, n_e:].any()
        assert torch.equal(
            b["teacher_words"][i, :n_e], torch.from_numpy(samples[i].word_vectors[:n_e].astype(np.float32))
        )


# -- teacher side --------------------------------------------------------------------------------


def test_teacher_vectors_from_samples(student_tokenizer, samples):
    b = collate(student_tokenizer, samples)
    B, H = len(samples), samples[0].cls.shape[-1]
    assert samples[0].cls.dtype == np.float16
    assert b["teacher_cls"].dtype == torch.float32 and b["teacher_words"].dtype == torch.float32
    assert torch.equal(b["teacher_cls"], torch.from_numpy(np.stack([s.cls for s in samples]).astype(np.float32)))
    W = max(len(s.words) for s in samples)
    assert b["teacher_words"].shape == (B, W, H)
    for i, s in enumerate(samples):
        n = len(s.words)
        assert torch.equal(b["teacher_words"][i, :n], torch.from_numpy(s.word_vectors.astype(np.float32)))
        assert not b["teacher_words"][i, n:].any()
        assert b["word_valid"][i, :n].all() and not b["word_valid"][i, n:].any()
    assert len({len(s.words) for s in samples}) > 1  # the zero padding was exercised


def test_word_valid_false_where_teacher_count_is_zero(student_tokenizer, samples):
    edited = [dataclasses.replace(s, counts=list(s.counts)) for s in samples]
    edited[0].counts[1] = 0
    edited[2].counts[0] = 0
    edited[2].counts[-1] = 0
    b = collate(student_tokenizer, edited)
    assert not b["word_valid"][0, 1] and b["word_valid"][0, 0] and b["word_valid"][0, 2]
    assert not b["word_valid"][2, 0] and not b["word_valid"][2, len(edited[2].words) - 1]
    assert int(b["word_valid"][2].sum()) == len(edited[2].words) - 2
    assert not (b["word_target"] & ~b["word_valid"]).any()  # never a target without a teacher
    g = group(b, "word")
    assert not (b["input_ids"][g][0][b["word_ids"][0] == 1] == student_tokenizer.mask_token_id).any()


# -- online mode ---------------------------------------------------------------------------------


def online_samples(pairs):
    reader = CorpusReader(pairs)
    out = [reader.read(i) for i in range(len(pairs))]
    assert out[0].words == [] and out[0].cls is None
    return out


@pytest.mark.parametrize("max_tokens", [128, 20])
def test_online_mode_carries_teacher_inputs(student_tokenizer, teacher, pairs, samples, teacher_dir, max_tokens):
    tok, ttok = student_tokenizer, teacher.tokenizer
    on = MMKDCollator(tok, LossConfig(), max_tokens, 7, teacher_tokenizer=ttok, teacher_max_tokens=128)
    b = on(online_samples(pairs), KEY)
    for k in ("teacher_cls", "teacher_words"):
        assert k not in b
    B = len(pairs)
    ids, att, wid = b["teacher_input_ids"], b["teacher_attention_mask"], b["teacher_word_ids"]
    assert ids.shape == att.shape == wid.shape and ids.shape[0] == B
    for i, p in enumerate(pairs):
        enc = ttok(split_words(p.en), is_split_into_words=True)
        n = len(enc["input_ids"])
        assert ids[i, :n].tolist() == list(enc["input_ids"])  # the whole English, teacher vocabulary
        assert att[i, :n].all() and not att[i, n:].any()
        expected = [-1 if w is None or w >= b["n_words"] else w for w in enc.word_ids()]
        assert wid[i, :n].tolist() == expected and (wid[i, n:] == -1).all()
    # the student side is exactly the precomputed mode's
    pre = MMKDCollator(tok, LossConfig(), max_tokens, 7)(samples, KEY)
    for k in ("input_ids", "attention_mask", "token_type_ids", "tlm_labels", "word_ids", "word_valid", "word_target"):
        assert torch.equal(b[k], pre[k]), k
    assert b["n_words"] == pre["n_words"]
    # and the teacher fills in vectors of the precomputed shapes (with truncation: regression
    # for word ids >= n_words, which made word_pool raise)
    cfg = RunConfig()
    cfg.teacher = TeacherConfig(name=str(teacher_dir))
    fill_online_teacher(b, teacher, cfg)
    assert b["teacher_cls"].shape == pre["teacher_cls"].shape
    assert b["teacher_words"].shape == pre["teacher_words"].shape
    assert torch.allclose(b["teacher_cls"], pre["teacher_cls"], atol=1e-2, rtol=1e-2)
    valid = pre["word_valid"]
    assert torch.allclose(b["teacher_words"][valid], pre["teacher_words"][valid], atol=1e-2, rtol=1e-2)
