"""Readers of parallel-corpus sources: TSV files, JSONL files, Hugging Face datasets.

Every reader yields normalised :class:`Pair` objects and never stops on a bad line: a line it
cannot use is counted in the :class:`SkipLog` under a reason, with its ``path:line``. Only
problems that concern a whole source (no file, unknown format, no way to know the language)
raise, because no amount of skipping would make that source usable.

Files are read in binary and split on ``b"\\n"`` here rather than by Python's text layer, so
that an invalid UTF-8 byte, a CRLF ending or a BOM affects only its own line and a huge line
is skipped without ever being held in memory whole.

Language of the translation side, first that applies:

1. ``src.lang``;
2. TSV: the ``lang_column`` value; JSONL/HF: the ``lang_field`` value, or for OPUS-style
   ``translation`` rows the inner key that is not "en" when there are exactly two;
3. the file name: ``anything.en-sw.tsv`` or ``anything.sw.tsv`` give "sw". A code is 2-3
   letters, optionally followed by ``-`` or ``_`` and a 2-4 letter region or script
   (``pt-br``, ``zh-hans``). Any such segment counts, so ``train.dev.tsv`` would read as
   language "dev": set ``lang`` when a file name is not of this form.

Codes are lower-cased so that "SW" in one file and "sw" in another are one language.
"""

from __future__ import annotations

import glob as globlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmkd_ds.config.schema import SourceConfig
from mmkd_ds.data.normalize import has_control_chars, normalize_text
from mmkd_ds.data.pairs import Pair
from mmkd_ds.data.skips import SkipLog

# The bundled sample corpus ("sample:train" -> train.en-*.tsv). A module attribute so tests can
# point it elsewhere; the package is installed as plain files, so a Path is enough.
SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_PREFIX = "sample:"

_EXTENSIONS = {".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = re.compile(r"[*?\[]")
_CODE = r"[a-z]{2,3}(?:[-_][a-z]{2,4})?"
# Tried in this order: "x.en-sw.tsv" must give "sw", not "en-sw" (which the second would take).
_NAME_PATTERNS = (
    re.compile(rf"\.en[-_]({_CODE})\.[a-z]+$"),
    re.compile(rf"\.({_CODE})\.[a-z]+$"),
)
# How much of a bad line to show in a skip example.
_SNIPPET = 40


def lang_from_filename(path: str | Path) -> str | None:
    """The language code in a file name (``x.en-sw.tsv`` or ``x.sw.tsv`` -> "sw"), else None."""
    name = Path(path).name.lower()
    for pattern in _NAME_PATTERNS:
        m = pattern.search(name)
        if m:
            return m.group(1).replace("_", "-")
    return None


def resolve_files(src: SourceConfig) -> list[Path]:
    """The files a source names: one path, a glob (sorted), or the bundled sample split."""
    pattern = src.path
    if pattern.startswith(SAMPLE_PREFIX):
        split = pattern[len(SAMPLE_PREFIX):]
        pattern = str(SAMPLE_DIR / f"{split}.en-*.tsv")
    if _GLOB_CHARS.search(pattern):
        files = sorted(Path(p) for p in globlib.glob(pattern) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no file matches {src.path!r} (pattern {pattern})")
        return files
    path = Path(pattern)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {src.path}")
    return [path]


def source_root(src: SourceConfig) -> tuple[Path, str]:
    """``(directory, label)``: the fixed directory of a file source (its path up to the first
    component with a glob character; a single file's directory), and how origins name it: the
    directory's own name and a slash, or ``sample:`` for the bundled sample."""
    if src.path.startswith(SAMPLE_PREFIX):
        return SAMPLE_DIR, SAMPLE_PREFIX
    parts = Path(src.path).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    name = root.resolve().name
    return root, f"{name}/" if name else ""


def origin_name(path: Path, src: SourceConfig) -> str:
    """How origins (``name:line``) name a file of ``src``: relative to the source's root,
    prefixed with the root's own name, e.g. ``corpus/train.en-de.tsv`` for a source
    ``/data/corpus/train.*.tsv`` and ``sample:train.en-de.tsv`` for ``sample:train``.

    Not the absolute path: shards record origins, and the same corpus read from another
    directory or machine must give the same shard bytes (and leak no local paths).
    """
    root, label = source_root(src)
    try:
        relative = Path(path).relative_to(root).as_posix()
    except ValueError:  # not under the root as spelled (cannot happen for paths the glob returned)
        relative = Path(path).name
    return label + relative


def file_format(src: SourceConfig, path: Path) -> str:
    """``src.format``, or for "auto" the format its extension implies."""
    if src.format != "auto":
        return src.format
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"use .tsv/.txt or .jsonl/.json, or set the source's format to tsv or jsonl"
        )
    return fmt


def read_source(src: SourceConfig, log: SkipLog, max_line_bytes: int) -> Iterator[Pair]:
    """Yield the normalised pairs of one source, counting what is skipped or repaired in ``log``.

    No length filter is applied here (see :mod:`mmkd_ds.data.filters`).
    """
    if src.format == "hf":
        yield from read_hf(src, log)
        return
    for path in resolve_files(src):
        fmt = file_format(src, path)
        name = origin_name(path, src)
        if fmt == "tsv":
            yield from read_tsv(path, src, log, max_line_bytes, name)
        elif fmt == "jsonl":
            yield from read_jsonl(path, src, log, max_line_bytes, name)
        else:  # "hf" for a single file is handled above; validate() rejects the rest
            raise ValueError(f"{path}: unsupported format {fmt!r}")


def _raw_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line bytes without b"\\n"), or None for a line over the limit.

    ``readline(limit)`` on a binary file splits on b"\\n" only, and the limit bounds memory: an
    over-long line is drained in chunks and never held whole.
    """
    with open(path, "rb") as f:
        lineno = 0
        while True:
            chunk = f.readline(max_line_bytes + 1)
            if not chunk:
                return
            lineno += 1
            if chunk.endswith(b"\n"):
                yield lineno, chunk[:-1]
            elif len(chunk) <= max_line_bytes:  # last line, no final newline
                yield lineno, chunk
            else:
                while chunk and not chunk.endswith(b"\n"):
                    chunk = f.readline(1 << 16)
                yield lineno, None


def _snippet(text: str | bytes) -> str:
    return repr(text[:_SNIPPET]) + ("..." if len(text) > _SNIPPET else "")


def _decoded_lines(path: Path, log: SkipLog, max_line_bytes: int, name: str | None = None
                   ) -> Iterator[tuple[str, str]]:
    """(origin, text) of every line that is short enough and valid UTF-8, repaired of CRLF/BOM.
    The origin is ``name:line`` (``name``: see :func:`origin_name`; default the path as given).

    Blank lines are skipped here too (after the checks that can name a worse problem).
    Control characters are *not* checked: TSV checks the line, JSONL the decoded values.
    """
    name = str(path) if name is None else name
    for lineno, raw in _raw_lines(path, max_line_bytes):
        origin = f"{name}:{lineno}"
        if raw is None:
            log.skip("line_too_long", origin, f"over {max_line_bytes} bytes")
            continue
        if raw.endswith(b"\r"):
            raw = raw[:-1]
            log.repair("crlf", origin)
        if raw.startswith(_BOM):
            raw = raw[len(_BOM):]
            log.repair("bom", origin)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.skip("invalid_utf8", origin, f"byte {exc.start}: {_snippet(raw[exc.start:])}")
            continue
        yield origin, text


def read_tsv(path: Path, src: SourceConfig, log: SkipLog, max_line_bytes: int,
             name: str | None = None) -> Iterator[Pair]:
    """Pairs of one TSV file: columns ``src.en_column`` / ``xx_column`` / ``lang_column``;
    origins ``name:line``."""
    file_lang = src.lang.lower() or lang_from_filename(path)
    if not file_lang and src.lang_column < 0:
        raise ValueError(
            f"{path}: cannot tell the language of the translations; set the source's `lang`, "
            f"add a language column (`lang_column`), or name the file like name.en-sw.tsv"
        )
    needed = max(src.en_column, src.xx_column, src.lang_column) + 1
    for origin, text in _decoded_lines(path, log, max_line_bytes, name):
        if has_control_chars(text):
            log.skip("control_chars", origin, _snippet(text))
            continue
        if not text.strip():
            log.skip("blank_line", origin)
            continue
        if "\t" not in text:
            log.skip("no_tab", origin, _snippet(text))
            continue
        cols = text.split("\t")
        if len(cols) < needed:
            log.skip("missing_column", origin, f"{len(cols)} columns, need {needed}")
            continue
        lang = src.lang.lower()
        if not lang and src.lang_column >= 0:
            lang = normalize_text(cols[src.lang_column]).lower()
        lang = lang or file_lang
        if not lang:
            log.skip("missing_lang", origin, f"empty language column {src.lang_column}")
            continue
        en, xx = normalize_text(cols[src.en_column]), normalize_text(cols[src.xx_column])
        yield Pair(en, xx, lang, origin)


def _pair_from_row(
    row: Any, src: SourceConfig, origin: str, log: SkipLog, default_lang: str | None
) -> Pair | None:
    """The pair of one JSON object / dataset row, or None (counted in ``log``).

    A null value counts as a missing field: Hugging Face fills absent keys with None when it
    unifies the columns of a JSON file, so both cases are the same problem.
    """
    lang: Any = src.lang.lower() or None
    if src.translation_field:
        inner = row.get(src.translation_field) if isinstance(row, dict) else None
        if not isinstance(inner, dict):
            log.skip("missing_field", origin, f"no object under {src.translation_field!r}")
            return None
        if lang is None:
            # The one key besides "en". Keys holding null do not count when there are more:
            # HF gives every row the union of all rows' keys, with null for the absent ones.
            others = [k for k in inner if k != "en"]
            present = [k for k in others if inner[k] is not None]
            if len(others) == 1:
                lang = others[0]
            elif len(present) == 1:
                lang = present[0]
            else:
                lang = default_lang
        if lang is None:
            detail = f"cannot tell the language among keys {sorted(inner)}; set lang"
            log.skip("missing_field", origin, detail)
            return None
        values = {"en": inner.get("en"), "xx": inner.get(lang)}
        keys = {"en": "en", "xx": lang}
    else:
        if not isinstance(row, dict):
            log.skip("missing_field", origin, f"not an object: {type(row).__name__}")
            return None
        values = {"en": row.get(src.en_field), "xx": row.get(src.xx_field)}
        keys = {"en": src.en_field, "xx": src.xx_field}
        if lang is None:
            lang = row.get(src.lang_field)
            if lang is None:
                lang = default_lang
            if lang is None:
                detail = f"no {src.lang_field!r} and no language in the file name"
                log.skip("missing_field", origin, detail)
                return None
            if not isinstance(lang, str):
                log.skip("bad_field", origin, f"{src.lang_field!r} is {type(lang).__name__}")
                return None
    for side in ("en", "xx"):
        value = values[side]
        if value is None:
            log.skip("missing_field", origin, f"no {keys[side]!r}")
            return None
        if not isinstance(value, str):
            log.skip("bad_field", origin, f"{keys[side]!r} is {type(value).__name__}")
            return None
        if has_control_chars(value):
            log.skip("control_chars", origin, f"in {keys[side]!r}: {_snippet(value)}")
            return None
    lang = normalize_text(lang).lower()
    if not lang:
        log.skip("missing_field", origin, "empty language")
        return None
    return Pair(normalize_text(values["en"]), normalize_text(values["xx"]), lang, origin)


def read_jsonl(path: Path, src: SourceConfig, log: SkipLog, max_line_bytes: int,
               name: str | None = None) -> Iterator[Pair]:
    """Pairs of one JSON-lines file: flat ``en_field``/``xx_field``/``lang_field`` or OPUS rows;
    origins ``name:line``."""
    file_lang = lang_from_filename(path)
    for origin, text in _decoded_lines(path, log, max_line_bytes, name):
        if not text.strip():
            log.skip("blank_line", origin)
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            # A raw control character makes the line invalid JSON; name the more useful reason.
            reason = "control_chars" if has_control_chars(text) else "bad_json"
            log.skip(reason, origin, f"{exc.msg} at column {exc.colno}")
            continue
        pair = _pair_from_row(row, src, origin, log, file_lang)
        if pair is not None:
            yield pair


def read_hf(src: SourceConfig, log: SkipLog) -> Iterator[Pair]:
    """Pairs of a Hugging Face dataset split, with the same field logic as JSONL.

    ``hf_name`` is a hub name, a local dataset directory, or a builder such as "json"/"csv";
    when ``src.path`` is set it is passed as ``data_files`` (``hf_name: json, path: x.jsonl``).
    Rows are numbered from 0, as ``dataset[row]`` indexes them.
    """
    import datasets  # heavy import, only when a source needs it

    ds = datasets.load_dataset(
        src.hf_name,
        src.hf_config or None,
        split=src.hf_split,
        data_files=src.path or None,
    )
    prefix = f"hf:{src.hf_name}/{src.hf_config or 'default'}/{src.hf_split}"
    for i, row in enumerate(ds):
        pair = _pair_from_row(row, src, f"{prefix}:{i}", log, None)
        if pair is not None:
            yield pair
