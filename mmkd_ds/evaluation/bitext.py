"""MTEB bitext-mining data (Tatoeba, BUCC) read from disk, as pairs for held-out retrieval.

The ``mteb`` package loads its bitext tasks with ``datasets.load_dataset`` from the hub
(``mteb/tatoeba-bitext-mining``: 112 languages x up to 1,000 pairs with English;
``mteb/bucc-bitext-mining``, BUCC.v2: de/fr/ru/zh-en gold pairs; ``mteb/BUCC``, the original),
so once a machine has run them, the files sit in the Hugging Face caches:

- the hub cache, ``~/.cache/huggingface/hub/datasets--mteb--tatoeba-bitext-mining/snapshots/REV/``
  (parquet or JSON lines, possibly gzipped);
- the datasets cache, ``~/.cache/huggingface/datasets/mteb___tatoeba-bitext-mining/...`` (Arrow
  files, ``tatoeba-bitext-mining-test.arrow``), or a ``save_to_disk`` copy.

:func:`read_bitext` takes any directory above such files, offline. Every row has
``sentence1`` and ``sentence2``; the language pair comes from the row's ``lang`` column (the
``default`` config, e.g. ``deu-eng``) or else from the file's path (a config directory or file
name such as ``deu-eng`` or ``de-en``). ``sentence1`` is in the pair's first language and
``sentence2`` in its second, as the tasks' ``eval_langs`` list them; English is whichever side
is ``eng``/``en``, and the language code kept is the other one, as MTEB spells it (``deu``,
``swh``, ``de``). Pairs without an English side are skipped (retrieval here is xx<->en).
Original BUCC rows (whole lists of sentences per row and ``gold`` 1-based index pairs) give
their gold pairs, as BUCC.v2 does.

Only the ``test`` split is read (the evaluation split of both tasks): a file whose path names
another split (train, validation, dev) is skipped. The same pairs found twice (both caches, or
a language config and the ``default`` config) count once. Texts are taken as they are: no
normalisation and no length filter, so that the pairs are the benchmark's.

``mmkd-eval --task retrieval --bitext DIR`` scores them; its xx->en column is the accuracy MTEB
reports for Tatoeba (nearest English neighbour by cosine among the language's pairs).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmkd_ds.data.pairs import Pair

ENGLISH = {"eng", "en", "eng_latn", "eng-latn"}
SPLITS = {"train", "validation", "valid", "dev", "test"}
_CODE = r"[a-z]{2,3}(?:_[A-Za-z]{4})?"
_PAIR = re.compile(rf"(?<![A-Za-z])({_CODE})-({_CODE})(?![A-Za-z])")
_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".jsonl.gz", ".json", ".json.gz")


@dataclass
class Bitext:
    """Pairs read from a directory, with what was read and skipped."""

    pairs: list[Pair]
    files: list[Path]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files or rows
    duplicates: int = 0  # files' language lists that repeated one already read

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.pairs:
            out[p.lang] = out.get(p.lang, 0) + 1
        return dict(sorted(out.items()))


def language_pair(text: str) -> tuple[str, str] | None:
    """``("deu", "eng")`` from ``"deu-eng"`` or a path component holding it, else None."""
    for m in _PAIR.finditer(text):
        if m.group(1).lower() in ENGLISH or m.group(2).lower() in ENGLISH:
            return m.group(1), m.group(2)
    return None


def _split_tokens(relative: Path) -> set[str]:
    return {t.lower() for t in re.split(r"[/\\._-]+", relative.as_posix())} & SPLITS


def data_files(root: Path, split: str = "test") -> tuple[list[Path], int]:
    """The data files under ``root`` whose path names ``split`` or no split, sorted; and how
    many were left out for naming another split."""
    files, other = [], 0
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        if not path.name.endswith(_SUFFIXES) or path.name in ("dataset_info.json", "state.json"):
            continue
        if path.name.startswith(".") or "dataset_dict.json" == path.name:
            continue
        named = _split_tokens(path.relative_to(root))
        if named and split not in named:
            other += 1
            continue
        files.append(path)
    return files, other


def _rows(path: Path) -> Iterator[dict]:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    elif name.endswith(".arrow"):
        import pyarrow as pa

        try:  # datasets' cache files and save_to_disk copies are Arrow streams
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
        yield from table.to_pylist()
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):  # one JSON array
            yield from json.loads(text)
            return
        for line in text.splitlines():
            if line.strip():
                yield json.loads(line)


def _gold_rows(row: dict) -> Iterator[tuple[str, str]]:
    """Original BUCC: one row holds both sentence lists and the gold (1-based) alignments."""
    s1, s2 = row["sentence1"], row["sentence2"]
    for i, j in row.get("gold") or []:
        if 1 <= i <= len(s1) and 1 <= j <= len(s2):
            yield s1[i - 1], s2[j - 1]


def _file_pairs(path: Path, root: Path, skipped: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """``{lang: [(en, xx), ...]}`` of one file, in file order."""
    from_path = language_pair(path.relative_to(root).as_posix())
    out: dict[str, list[tuple[str, str]]] = {}
    for row in _rows(path):
        if not isinstance(row, dict) or "sentence1" not in row or "sentence2" not in row:
            skipped["files without sentence1/sentence2"] = skipped.get("files without sentence1/sentence2", 0) + 1
            return {}
        pair = language_pair(str(row["lang"])) if row.get("lang") else from_path
        if pair is None:
            skipped["rows without an English side or a language pair"] = \
                skipped.get("rows without an English side or a language pair", 0) + 1
            continue
        english_first = pair[0].lower() in ENGLISH
        lang = pair[1] if english_first else pair[0]
        texts = _gold_rows(row) if isinstance(row["sentence1"], list) else [(row["sentence1"], row["sentence2"])]
        for s1, s2 in texts:
            if not (isinstance(s1, str) and isinstance(s2, str) and s1.strip() and s2.strip()):
                skipped["rows with an empty or missing sentence"] = skipped.get("rows with an empty or missing sentence", 0) + 1
                continue
            en, xx = (s1, s2) if english_first else (s2, s1)
            out.setdefault(lang, []).append((en, xx))
    return out


def read_bitext(root: str | Path, languages: list[str] | None = None, split: str = "test") -> Bitext:
    """The xx<->en pairs of the MTEB bitext files under ``root`` (see the module docstring),
    languages in sorted order, each language's pairs in file order. ``languages``: keep only
    these codes (as MTEB spells them). Raises FileNotFoundError when ``root`` is missing or
    holds no data file, ValueError when nothing usable (or nothing of ``languages``) is in them."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--bitext {root}: not a directory")
    files, other_split = data_files(root, split)
    if not files:
        raise FileNotFoundError(f"--bitext {root}: no parquet, arrow or JSON-lines file of the {split} split in it")
    skipped: dict[str, int] = {}
    if other_split:
        skipped[f"files of another split than {split}"] = other_split
    by_lang: dict[str, list[tuple[str, str]]] = {}
    seen: dict[str, list[tuple]] = {}
    used, duplicates = [], 0
    for path in files:
        found = _file_pairs(path, root, skipped)
        if found:
            used.append(path)
        for lang, rows in found.items():
            key = tuple(rows)
            if key in seen.setdefault(lang, []):
                duplicates += 1  # the same pairs in another cache or config
                continue
            seen[lang].append(key)
            by_lang.setdefault(lang, []).extend(rows)
    wanted = [lang.strip() for lang in languages or [] if lang.strip()]
    if wanted:
        missing = [lang for lang in wanted if lang not in by_lang]
        if missing:
            raise ValueError(f"--bitext {root}: no pairs for {', '.join(missing)} (found: {', '.join(sorted(by_lang)) or 'none'})")
        by_lang = {lang: by_lang[lang] for lang in wanted}
    if not by_lang:
        detail = "; ".join(f"{why}: {n}" for why, n in skipped.items()) or "no rows"
        raise ValueError(f"--bitext {root}: no usable xx-en pair in {len(files)} files ({detail})")
    pairs = [Pair(en, xx, lang, f"bitext:{lang}:{i + 1}") for lang in sorted(by_lang)
             for i, (en, xx) in enumerate(by_lang[lang])]
    return Bitext(pairs, used, skipped, duplicates)
