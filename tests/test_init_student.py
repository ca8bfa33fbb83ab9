"""mmkd-init-student --from: a pretrained encoder as the student (a fresh tied MLM head when it has
none) and --extend-vocab: WordPiece tokens learned on the translations, initialised from the old
pieces. The pretrained encoder is the tiny English teacher of conftest (a BertModel, no MLM head)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from mmkd_ds.cli.init_student import main as init_student
from mmkd_ds.vocab_extension import extend_tokenizer, learn_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_from_an_encoder_without_mlm_head(tmp_path, teacher_dir):
    out = tmp_path / "student"
    assert init_student(["--out", str(out), "--from", str(teacher_dir)]) == 0
    info = json.loads((out / "mmkd_init.json").read_text())
    assert info["fresh_mlm_head"] and info["added_tokens"] == []
    mlm = AutoModelForMaskedLM.from_pretrained(out)
    source = AutoModel.from_pretrained(teacher_dir)
    # The encoder is the pretrained one, unchanged; the decoder is tied to the input embeddings.
    for name, value in source.state_dict().items():
        if not name.startswith("pooler."):
            torch.testing.assert_close(mlm.bert.state_dict()[name], value, rtol=0, atol=0)
    assert mlm.get_output_embeddings().weight.data_ptr() == mlm.get_input_embeddings().weight.data_ptr()
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(teacher_dir))


def test_extend_vocab_adds_corpus_tokens_initialised_from_old_pieces(tmp_path, teacher_dir):
    out = tmp_path / "student"
    assert init_student(["--out", str(out), "--from", str(teacher_dir), "--extend-vocab", "200"]) == 0
    info = json.loads((out / "mmkd_init.json").read_text())
    added = info["added_tokens"]
    assert 0 < len(added) <= 200
    old_tok, new_tok = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(out)
    assert len(new_tok) == len(old_tok) + len(added)
    # Old ids keep their meaning; the teacher's English text encodes as before.
    english = "The doctor told me to drink plenty of water."
    assert new_tok(english)["input_ids"] == old_tok(english)["input_ids"]
    # Urdu, which this English vocabulary does not cover (one [UNK] per word), gets real pieces.
    urdu = "ڈاکٹر نے مجھے خوب پانی پینے کو کہا۔"
    assert old_tok.tokenize(urdu).count("[UNK]") == 9
    assert new_tok.tokenize(urdu).count("[UNK]") < 9
    assert any(t in added and not t.startswith("##") and len(t) > 1 for t in new_tok.tokenize(urdu))
    # Pairs still carry segment ids 0/1 (the pair rows of training need them).
    assert new_tok("a b", "c").encodings[0].type_ids == [0, 0, 0, 0, 1, 1]
    assert new_tok.model_input_names == old_tok.model_input_names
    # Every new embedding is the mean of the old tokenizer's pieces of its string.
    model = AutoModelForMaskedLM.from_pretrained(out)
    source = AutoModel.from_pretrained(teacher_dir).get_input_embeddings().weight
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(new_tok)
    torch.testing.assert_close(emb[: source.shape[0]], source, rtol=0, atol=0)
    for token in added[:20] + added[-5:]:
        text = token.removeprefix("##")
        pieces = old_tok(text, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(emb[new_tok.convert_tokens_to_ids(token)], source[pieces].mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()


def test_learned_tokens_are_new_and_most_used_first(teacher_dir):
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    texts = ["kwa kwa kwa habari habari", "kwa habari za asubuhi"] * 5
    learned = learn_tokens(tok, texts, max_new=3)
    assert learned and len(learned) <= 3
    vocab = tok.get_vocab()
    assert all(t not in vocab for t in learned)
    extension = extend_tokenizer(tok, learned)
    assert extension.first_id == max(vocab.values()) + 1
    assert [extension.tokenizer.convert_tokens_to_ids(t) for t in learned] == list(
        range(extension.first_id, extension.first_id + len(learned)))
    assert learn_tokens(tok, texts, max_new=0) == []


def test_extend_vocab_needs_from(tmp_path):
    with pytest.raises(SystemExit):
        init_student(["--out", str(tmp_path / "x"), "--extend-vocab", "10"])
