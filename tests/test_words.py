"""Words shared by two different tokenizers, and truncation at word boundaries."""

from transformers import AutoTokenizer

from mmkd_ds.words import encode_words, split_words


def test_split_words_on_whitespace_and_punctuation():
    assert split_words("Hello, world! It's 7 o'clock.") == [
        "Hello", ",", "world", "!", "It", "'", "s", "7", "o", "'", "clock", ".",
    ]


def test_two_tokenizers_agree_on_words(teacher_dir, student_tokenizer):
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    sentence = "Grandmother's unbelievably delicious chapati disappeared before 7 o'clock!"
    words = split_words(sentence)
    t = encode_words(teacher_tok, words, max_tokens=128)
    s = encode_words(student_tokenizer, words, max_tokens=128)
    # Different vocabularies, so different subwords ...
    assert t.input_ids != s.input_ids
    # ... but every word is covered by both, in order, and only specials have no word.
    for enc in (t, s):
        assert enc.n_words == len(words)
        ids = [w for w in enc.word_ids if w >= 0]
        assert ids == sorted(ids)
        assert set(ids) == set(range(len(words)))
        assert enc.word_ids[0] == -1 and enc.word_ids[-1] == -1
    # Some word splits into several subwords in at least one vocabulary.
    assert max(t.counts) > 1 or max(s.counts) > 1


def test_truncation_cuts_only_at_word_boundaries(student_tokenizer):
    words = split_words("The extraordinarily complicated arrangements were reconsidered yesterday afternoon.")
    full = encode_words(student_tokenizer, words, max_tokens=512)
    for limit in range(4, len(full.input_ids)):
        enc = encode_words(student_tokenizer, words, max_tokens=limit)
        assert len(enc.input_ids) <= limit
        # Every kept word keeps all of its subwords.
        assert enc.counts == full.counts[: enc.n_words] or enc.n_words == 1
        # And the cut keeps as many whole words as fit.
        if enc.n_words < len(words):
            assert sum(full.counts[: enc.n_words + 1]) + 2 > limit
