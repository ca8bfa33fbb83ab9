"""The training and held-out corpora of a run, built from its DataConfig.

Training: read every source in order -> length filters -> (identity pairs) -> language mixing
-> seeded shuffle. Held-out: read -> length filters only, in file order, so that retrieval
results are comparable between runs whatever their mixing settings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from mmkd_ds.config.schema import DataConfig, SourceConfig
from mmkd_ds.data.filters import filter_pairs
from mmkd_ds.data.mixing import add_identity_pairs, mix_languages, shuffle_pairs
from mmkd_ds.data.pairs import Pair
from mmkd_ds.data.readers import read_source
from mmkd_ds.data.skips import SkipLog


class CorpusError(ValueError):
    """No usable pair: the message says which sources were read and why lines were dropped."""


@dataclass
class Corpus:
    """Pairs ready for precompute, with the record of what was dropped on the way."""

    pairs: list[Pair]
    log: SkipLog
    # Usable pairs per language before mixing (after filtering; identity pairs count as "en").
    lang_counts: dict[str, int]
    # Pairs per language in ``pairs``.
    mixed_counts: dict[str, int]

    def summary(self) -> str:
        """One line, e.g. ``corpus: 1200 pairs (de 300, ...); skipped 7 (no_tab 3, ...);
        repaired 2 (crlf 2)``, with ``mixed from N usable`` after the counts when mixing changed them.
        """
        langs = ", ".join(f"{lang} {n}" for lang, n in sorted(self.mixed_counts.items()))
        line = f"corpus: {len(self.pairs)} pairs ({langs})"
        if self.lang_counts != self.mixed_counts:
            line += f" mixed from {sum(self.lang_counts.values())} usable"
        line += f"; skipped {self.log.total_skipped}"
        if self.log.counts:
            line += f" ({self.log.short('skipped')})"
        line += f"; repaired {self.log.total_repaired}"
        if self.log.repairs:
            line += f" ({self.log.short('repaired')})"
        return line


def _describe(src: SourceConfig) -> str:
    if src.format == "hf":
        return f"hf:{src.hf_name}" + (f" ({src.path})" if src.path else "")
    return src.path


def _read_filtered(sources: list[SourceConfig], cfg: DataConfig, log: SkipLog) -> Iterator[Pair]:
    for src in sources:
        yield from filter_pairs(read_source(src, log, cfg.max_line_bytes), cfg, log)


def _no_pairs_error(what: str, sources: list[SourceConfig], log: SkipLog) -> CorpusError:
    read = ", ".join(_describe(s) for s in sources)
    return CorpusError(f"{what}: no usable pair in {read}\n{log.summary()}")


def _counts(pairs: list[Pair]) -> dict[str, int]:
    return dict(sorted(Counter(p.lang for p in pairs).items()))


def build_corpus(cfg: DataConfig) -> Corpus:
    """Read, filter, optionally add identity pairs, mix languages and shuffle the training pairs.

    Raises :class:`CorpusError` when no pair survives, with the skip summary in the message.
    """
    log = SkipLog(report_examples=cfg.report_examples)
    pairs = list(_read_filtered(cfg.sources, cfg, log))
    if not pairs:
        raise _no_pairs_error("training corpus", cfg.sources, log)
    if cfg.identity_pairs:
        pairs = add_identity_pairs(pairs)
    lang_counts = _counts(pairs)
    mixed = shuffle_pairs(mix_languages(pairs, cfg.alpha, cfg.mix_size, cfg.seed), cfg.seed)
    return Corpus(mixed, log, lang_counts, _counts(mixed))


def build_heldout(cfg: DataConfig) -> Corpus:
    """The held-out pairs: read and filtered like training, neither mixed nor shuffled.

    No held-out source gives an empty corpus; sources that yield no usable pair raise
    :class:`CorpusError`, since evaluation on them would silently measure nothing.
    """
    log = SkipLog(report_examples=cfg.report_examples)
    pairs = list(_read_filtered(cfg.heldout, cfg, log))
    if cfg.heldout and not pairs:
        raise _no_pairs_error("held-out corpus", cfg.heldout, log)
    counts = _counts(pairs)
    return Corpus(pairs, log, counts, dict(counts))
