"""A synthetic parallel corpus of any size, for scale and throughput tests.

English sentences (4-30 words) are drawn from a fixed vocabulary of common words with
Zipf-like frequencies, commas, numbers and final punctuation. Each language is a made-up but
consistent "translation": a lexicon that maps every English word to one or two invented words
in that language's script, a fixed word-order rule, and (for some languages) no articles. The
mapping depends only on the language code, never on the seed, so corpora generated with
different seeds (say training and held-out) are the same language and a model can learn it.
The seed decides the sentences.

Command line (registered as ``mmkd-synth``)::

    mmkd-synth --out data/synth --pairs 100000 --seed 0 --langs de,fr,sw,ur
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
from collections.abc import Iterator, Sequence
from typing import IO
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mmkd_ds.data.pairs import Pair

DEFAULT_LANGS = ("de", "fr", "sw", "ur")

# Roughly by frequency, which the sampler turns into Zipf-like weights.
VOCABULARY: tuple[str, ...] = tuple(
    """
    the of and to a in is it you that he was for on are with as his they be at one have this
    from or had by not but what some we can out other were all there when up use your how said
    an each she which do their time if will way about many then them write would like so these
    her long make thing see him two has look more day could go come did number sound no most
    people my over know water than call first who may down side been now find any new work part
    take get place made live where after back little only round man year came show every good me
    give our under name very through just form sentence great think say help low line differ turn
    cause much mean before move right boy old too same tell does set three want air well also
    play small end put home read hand port large spell add even land here must big high such
    follow act why ask men change went light kind off need house picture try us again animal
    point mother world near build self earth father head stand own page should country found
    answer school grow study still learn plant cover food sun four between state keep eye never
    last let thought city tree cross farm hard start might story saw far sea draw left late run
    while press close night real life few north open seem together next white children begin got
    walk example ease paper group always music those both mark often letter until mile river car
    feet care second book carry took science eat room friend began idea fish mountain stop once
    base hear horse cut sure watch color face wood main enough plain girl usual young ready above
    ever red list though feel talk bird soon body dog family direct pose leave song measure door
    product black short numeral class wind question happen complete ship area half rock order fire
    south problem piece told knew pass since top whole king space heard best hour better true
    during hundred five remember step early hold west ground interest reach fast verb sing listen
    six table travel less morning ten simple several vowel toward war lay against pattern slow
    center love person money serve appear road map rain rule govern pull cold notice voice unit
    power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
    field rest correct able pound done beauty drive stood contain front teach week final gave
    green quick develop ocean warm free minute strong special mind behind clear tail produce fact
    street inch multiply nothing course stay wheel full force blue object decide surface deep moon
    island foot system busy test record boat common gold possible plane dry wonder laugh thousand
    ago ran check game shape yes hot miss brought heat snow tire bring distant fill east paint
    language among
    """.split()
)
_ARTICLES = frozenset({"the", "a", "an"})
_END_PUNCT = (".", ".", ".", ".", ".", ".", ".", ".", "?", "!")  # mostly statements

# Letters per script: (consonants, vowels). Latin languages add their own accented vowels, so
# the text exercises Unicode (all precomposed, i.e. already NFC, so reading back is lossless).
_SCRIPTS: dict[str, tuple[str, str]] = {
    "latin": ("bcdfghjklmnprstvwz", "aeiou"),
    "arabic": ("بتثجحخدذرزسشصضطظعغفقكلمنهي", "اوي"),
    "devanagari": ("कखगघचछजझटठडढतथदधनपफबभमयरलवशसह", "ािीुूेैोौ"),
    "cyrillic": ("бвгджзклмнпрстфхцчш", "аеиоуыяю"),
    "greek": ("βγδζθκλμνξπρστφχ", "αεηιουω"),
}
_SCRIPT_OF = {
    **dict.fromkeys(("ur", "ar", "fa", "ps"), "arabic"),
    **dict.fromkeys(("hi", "ne", "mr"), "devanagari"),
    **dict.fromkeys(("ru", "uk", "bg", "kk"), "cyrillic"),
    "el": "greek",
}
_LATIN_EXTRA = {"de": "äöü", "fr": "éèâ", "es": "áéñ", "tr": "ıöü", "vi": "ăơư"}
# Word-order rules a language may get; see _reorder.
_ORDERS = ("keep", "swap_pairs", "reverse_clause", "last_first")


@dataclass(frozen=True)
class _Language:
    """A made-up language: lexicon, word order, whether it has articles, its script's casing."""

    lexicon: dict[str, tuple[str, ...]]
    order: str
    drop_articles: bool


def _invent_word(rng: random.Random, consonants: str, vowels: str, syllables: int) -> str:
    word = ""
    for _ in range(syllables):
        word += rng.choice(consonants) + rng.choice(vowels)
        if rng.random() < 0.25:
            word += rng.choice(consonants)
    return word


@lru_cache(maxsize=None)
def _language(lang: str) -> _Language:
    """The made-up language for ``lang``: fixed by the code alone (string seed, see module doc)."""
    rng = random.Random(f"mmkd-synth-language:{lang}")
    consonants, vowels = _SCRIPTS[_SCRIPT_OF.get(lang, "latin")]
    if lang in _LATIN_EXTRA:
        vowels += _LATIN_EXTRA[lang]
    used: set[str] = set()
    lexicon: dict[str, tuple[str, ...]] = {}
    for word in VOCABULARY:
        # Longer English words get longer inventions, so lengths vary as in real text.
        syllables = 1 + len(word) // 4
        parts = []
        # About one word in twelve becomes two words (a compound split, a particle).
        for _ in range(2 if rng.random() < 0.08 else 1):
            invented = _invent_word(rng, consonants, vowels, syllables)
            while invented in used:  # keep the lexicon one-to-one so it can be learned
                invented += rng.choice(consonants) + rng.choice(vowels)
            used.add(invented)
            parts.append(invented)
        lexicon[word] = tuple(parts)
    return _Language(lexicon, rng.choice(_ORDERS), rng.random() < 0.5)


def _reorder(words: list[str], order: str) -> list[str]:
    """Apply a language's word-order rule to one clause."""
    if order == "swap_pairs":  # every two words swap places
        out = list(words)
        for i in range(0, len(out) - 1, 2):
            out[i], out[i + 1] = out[i + 1], out[i]
        return out
    if order == "reverse_clause":
        return words[::-1]
    if order == "last_first":  # the clause's last word moves to the front (verb-first-like)
        return words[-1:] + words[:-1]
    return list(words)


def _capitalize(word: str) -> str:
    return word[:1].upper() + word[1:]


def _english_clauses(rng: random.Random, cum_weights: list[float]) -> tuple[list[list[str]], str]:
    """Lower-case clauses (word lists) of one sentence and its final punctuation."""
    n_words = int(rng.triangular(4, 31, 9))  # 4..30, most sentences short as in real corpora
    words = rng.choices(VOCABULARY, cum_weights=cum_weights, k=n_words)
    if rng.random() < 0.15:  # a number, copied unchanged into every translation
        words[rng.randrange(n_words)] = str(rng.randint(2, 2030))
    clauses = [words]
    if n_words >= 8 and rng.random() < 0.4:
        cut = rng.randint(3, n_words - 3)
        clauses = [words[:cut], words[cut:]]
    return clauses, rng.choice(_END_PUNCT)


def _translate(clauses: list[list[str]], end: str, language: _Language) -> str:
    # A sentence of nothing but articles would translate to nothing: keep them then.
    drop = language.drop_articles and any(w not in _ARTICLES for c in clauses for w in c)
    out_clauses = []
    for clause in clauses:
        words: list[str] = []
        for w in clause:
            if drop and w in _ARTICLES:
                continue
            words.extend(language.lexicon.get(w, (w,)))  # numbers are not in the lexicon
        out_clauses.append(_reorder(words, language.order))
    return _join(out_clauses, end)


def _join(clauses: list[list[str]], end: str) -> str:
    text = ", ".join(" ".join(c) for c in clauses if c)
    return _capitalize(text) + end


def synthetic_pairs(n: int, seed: int, langs: tuple[str, ...] = DEFAULT_LANGS) -> Iterator[Pair]:
    """``n`` deterministic pairs; pair i is in language ``langs[i % len(langs)]``.

    The origin of pair i is ``synthetic:<seed>:<i>``.
    """
    if not langs:
        raise ValueError("synthetic_pairs needs at least one language")
    rng = random.Random(seed)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(VOCABULARY))))
    languages = [_language(lang) for lang in langs]
    for i in range(n):
        k = i % len(langs)
        clauses, end = _english_clauses(rng, cum_weights)
        en = _join(clauses, end)
        yield Pair(en, _translate(clauses, end, languages[k]), langs[k], f"synthetic:{seed}:{i}")


def write_synthetic_tsv(
    out_dir: str | Path,
    n: int,
    seed: int,
    langs: tuple[str, ...] = DEFAULT_LANGS,
    pairs_per_file: int = 100_000,
) -> list[Path]:
    """Write ``synthetic_pairs(n, seed, langs)`` as ``synthetic-NNN.en-<lang>.tsv`` files.

    One language per file, so the TSV reader takes the language from the name; a language's
    pairs are split into files of at most ``pairs_per_file``. Files are written under a
    temporary name and renamed when complete. Returns the paths, sorted.
    """
    if pairs_per_file < 1:
        raise ValueError("pairs_per_file must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handles: dict[str, tuple[Path, IO[str]]] = {}
    file_index: dict[str, int] = dict.fromkeys(langs, 0)
    in_file: dict[str, int] = dict.fromkeys(langs, 0)
    done: list[Path] = []

    def close(lang: str) -> None:
        path, handle = handles.pop(lang)
        handle.close()
        os.replace(path.with_name(path.name + ".part"), path)
        done.append(path)

    try:
        for pair in synthetic_pairs(n, seed, langs):
            lang = pair.lang
            if lang not in handles:
                path = out / f"synthetic-{file_index[lang]:03d}.en-{lang}.tsv"
                part = path.with_name(path.name + ".part")
                handles[lang] = (path, open(part, "w", encoding="utf-8", newline="\n"))
                file_index[lang] += 1
                in_file[lang] = 0
            handles[lang][1].write(f"{pair.en}\t{pair.xx}\n")
            in_file[lang] += 1
            if in_file[lang] == pairs_per_file:
                close(lang)
        for lang in list(handles):
            close(lang)
    finally:  # on an error, leave no half-written .part files behind
        for path, handle in handles.values():
            handle.close()
            path.with_name(path.name + ".part").unlink(missing_ok=True)
    return sorted(done)


SYNTH_HELP = """\
Write a synthetic parallel corpus (made-up but consistent languages) as TSV files, for scale and
throughput tests.

Example:
  mmkd-synth --out data/synth --pairs 100000 --seed 0 --langs de,fr,sw,ur
  mmkd-precompute --data.sources='[{path: data/synth/*.tsv}]' --precompute.out_dir=runs/synth/shards

Outputs, in --out DIR: synthetic-NNN.en-<lang>.tsv, one language per file (English TAB
translation, one pair per line; the language is taken from the file name), at most
--pairs-per-file pairs each. The same seed writes the same files; another seed, other sentences
of the same languages (e.g. a held-out split).
Exit codes: 0 done, 2 bad arguments.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """``mmkd-synth``: write a synthetic TSV corpus and print a one-line summary."""
    parser = argparse.ArgumentParser(prog="mmkd-synth", description=SYNTH_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (required)")
    parser.add_argument("--pairs", type=int, default=10_000, help="number of pairs in all (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentences (default 0)")
    parser.add_argument("--langs", default=",".join(DEFAULT_LANGS),
                        help=f"comma-separated language codes (default {','.join(DEFAULT_LANGS)})")
    parser.add_argument("--pairs-per-file", type=int, default=100_000, metavar="N",
                        help="largest file, in pairs (default 100000)")
    args = parser.parse_args(argv)
    if args.pairs_per_file < 1:
        parser.error("--pairs-per-file must be >= 1")
    langs = tuple(code.strip() for code in args.langs.split(",") if code.strip())
    if not langs:
        parser.error("--langs names no language")
    if args.pairs < 0:
        parser.error("--pairs must be >= 0")
    files = write_synthetic_tsv(args.out, args.pairs, args.seed, langs, args.pairs_per_file)
    per_lang = {lang: len(range(i, args.pairs, len(langs))) for i, lang in enumerate(langs)}
    counts = ", ".join(f"{lang} {c}" for lang, c in per_lang.items())
    print(f"mmkd-synth: wrote {args.pairs} pairs ({counts}) in {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
