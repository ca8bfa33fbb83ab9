"""Words shared by two tokenizers.

The teacher and the student have different subword vocabularies, so the word level can only
compare them through a word list that both agree on. One pre-tokenizer (BERT's: split on
whitespace and punctuation, no lower-casing) turns an English sentence into words; each fast
tokenizer then encodes that list with ``is_split_into_words=True`` and its ``word_ids()`` maps
every subword to the index of the word it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.pre_tokenizers import BertPreTokenizer

# The shared pre-tokenizer; its name is recorded in every shard manifest.
PRETOKENIZER_NAME = "bert-whitespace-punct-v1"
_PRETOKENIZER = BertPreTokenizer()


def split_words(text: str) -> list[str]:
    """Split a sentence into words with the shared pre-tokenizer."""
    return [w for w, _ in _PRETOKENIZER.pre_tokenize_str(text)]


@dataclass
class WordEncoding:
    """Subword ids of a word list and, per subword, the index of its word (-1: special token)."""

    input_ids: list[int]
    word_ids: list[int]
    n_words: int  # words kept after truncation

    @property
    def counts(self) -> list[int]:
        """Subwords per kept word (a word the tokenizer drops entirely has 0)."""
        out = [0] * self.n_words
        for w in self.word_ids:
            if w >= 0:
                out[w] += 1
        return out


def encode_words(tokenizer, words: list[str], max_tokens: int) -> WordEncoding:
    """Encode ``words`` with a fast tokenizer, cutting at a word boundary to fit ``max_tokens``.

    ``max_tokens`` counts the special tokens too. The cut never splits a word: when the whole
    list does not fit, the longest prefix of whole words that fits is kept (at least one word
    is always attempted; a single word longer than the limit keeps its first subwords, which is
    the only case a cut falls inside a word, and is counted by the caller via ``n_words``).
    """
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=True, truncation=False)
    word_ids = [-1 if w is None else w for w in enc.word_ids()]
    ids = list(enc["input_ids"])
    if len(ids) <= max_tokens:
        return WordEncoding(ids, word_ids, len(words))
    # Keep the specials around the longest prefix of whole words that fits.
    n_special = sum(1 for w in word_ids if w < 0)
    budget = max_tokens - n_special
    keep_words = 0
    used = 0
    counts: dict[int, int] = {}
    for w in word_ids:
        if w >= 0:
            counts[w] = counts.get(w, 0) + 1
    for w in range(len(words)):
        c = counts.get(w, 0)
        if used + c > budget:
            break
        used += c
        keep_words = w + 1
    if keep_words == 0:
        keep_words = 1
    enc = tokenizer(
        words[:keep_words],
        is_split_into_words=True,
        add_special_tokens=True,
        truncation=True,
        max_length=max_tokens,
    )
    word_ids = [-1 if w is None else w for w in enc.word_ids()]
    return WordEncoding(list(enc["input_ids"]), word_ids, keep_words)
