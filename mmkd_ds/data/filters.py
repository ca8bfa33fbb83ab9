"""Length filters on normalised pairs.

Words are counted with the shared pre-tokenizer (:func:`mmkd_ds.words.split_words`), the same
one the word-level loss uses, so ``max_words`` bounds exactly what the teacher will see.
A very unbalanced pair (one side three times longer) is usually a misalignment in a crawled
corpus, and would teach the student a wrong mapping.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mmkd_ds.config.schema import DataConfig
from mmkd_ds.data.pairs import Pair
from mmkd_ds.data.skips import SkipLog
from mmkd_ds.words import split_words


def filter_pairs(pairs: Iterable[Pair], cfg: DataConfig, log: SkipLog) -> Iterator[Pair]:
    """Yield the pairs that pass; count the others as empty_side, too_many_words, length_ratio."""
    for pair in pairs:
        if not pair.en or not pair.xx:
            log.skip("empty_side", pair.origin, "en" if not pair.en else "xx")
            continue
        n_en = len(split_words(pair.en))
        n_xx = len(split_words(pair.xx))
        if max(n_en, n_xx) > cfg.max_words:
            log.skip("too_many_words", pair.origin, f"en {n_en}, xx {n_xx} words > {cfg.max_words}")
            continue
        if max(n_en, n_xx) / max(1, min(n_en, n_xx)) > cfg.max_length_ratio:
            log.skip("length_ratio", pair.origin, f"en {n_en}, xx {n_xx} words")
            continue
        yield pair
