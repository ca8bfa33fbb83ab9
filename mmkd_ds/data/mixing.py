"""Language mixing by temperature sampling, identity pairs, and the seeded shuffle.

With n_l usable pairs in language l, language l gets a share p_l proportional to n_l ** alpha
of the mixed corpus: alpha = 1 keeps the corpus as it is, alpha = 0 gives every language the
same share (the public reference), values in between up-sample low-resource languages.

Randomness uses :class:`random.Random`, seeded with a string for each language's subset
(``"<seed>:<lang>"``) so that adding or removing a language does not change which pairs the
other languages keep; string seeds are hashed with SHA-512 by ``random`` and therefore do not
depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from mmkd_ds.data.pairs import Pair


def language_weights(counts: dict[str, int], alpha: float) -> dict[str, float]:
    """p_l proportional to n_l ** alpha over the languages with n_l > 0; sums to 1."""
    # 0 ** 0 == 1 in Python: an empty language would get a share at alpha 0 without this.
    raw = {lang: float(n) ** alpha for lang, n in counts.items() if n > 0}
    total = sum(raw.values())
    return {lang: w / total for lang, w in raw.items()} if total else {}


def _targets(counts: dict[str, int], alpha: float, size: int) -> dict[str, int]:
    """round(size * p_l) per language, by largest remainder so the total is exactly ``size``."""
    weights = language_weights(counts, alpha)
    exact = {lang: size * p for lang, p in weights.items()}
    targets = {lang: math.floor(x) for lang, x in exact.items()}
    short = size - sum(targets.values())
    # Largest fractional part first; ties by language code so the result is deterministic.
    order = sorted(exact, key=lambda lang: (-(exact[lang] - targets[lang]), lang))
    for lang in order[:short]:
        targets[lang] += 1
    return targets


def mix_languages(pairs: list[Pair], alpha: float, size: int, seed: int) -> list[Pair]:
    """Resample ``pairs`` to ``size`` pairs (0: ``len(pairs)``) with language shares p_l.

    A language whose target t_l is at most its n_l pairs keeps a seeded subset of t_l of them
    (no repeats); one with t_l > n_l takes every pair t_l // n_l times plus a seeded subset of
    t_l % n_l. Within a language the original order is kept; languages come out in code order
    (shuffle afterwards). With alpha = 1 and size = len(pairs) the output is the input multiset.
    """
    if not pairs:
        return []
    size = size or len(pairs)
    by_lang: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_lang[pair.lang].append(pair)
    targets = _targets({lang: len(ps) for lang, ps in by_lang.items()}, alpha, size)
    out: list[Pair] = []
    for lang in sorted(by_lang):
        group, target = by_lang[lang], targets[lang]
        n = len(group)
        rng = random.Random(f"{seed}:{lang}")
        repeats, rest = divmod(target, n)
        out.extend(group * repeats)
        out.extend(group[i] for i in sorted(rng.sample(range(n), rest)))
    return out


def add_identity_pairs(pairs: list[Pair]) -> list[Pair]:
    """``pairs`` plus one Pair(en, en, "en", origin) per distinct English sentence.

    The origin is that of the sentence's first occurrence, so the identity pair traces back too.
    """
    seen: set[str] = set()
    identity: list[Pair] = []
    for pair in pairs:
        if pair.en not in seen:
            seen.add(pair.en)
            identity.append(Pair(pair.en, pair.en, "en", pair.origin))
    return list(pairs) + identity


def shuffle_pairs(pairs: list[Pair], seed: int) -> list[Pair]:
    """A new list with ``pairs`` in a seeded random order (``random.Random(seed).shuffle``)."""
    out = list(pairs)
    random.Random(seed).shuffle(out)
    return out
