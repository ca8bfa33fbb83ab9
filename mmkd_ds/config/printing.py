"""The resolved run config as commented YAML: what ``--print-config`` prints.

Every field's documentation lives once, as the ``#`` comment lines right above its declaration
in ``mmkd_ds/config/schema.py``; :func:`field_comments` reads them from that source (``ast`` for
where each field is declared, the source lines for the comments above it), so the printed
comments never drift from the schema. :func:`config_yaml` writes a config with those comments
above each key and each section's class docstring above the section. The output parses back
(``yaml.safe_load``) to exactly ``config_to_dict(cfg)``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from typing import Any

import yaml

from mmkd_ds.config import schema

INDENT = "  "


@functools.lru_cache(maxsize=None)
def _schema_comments() -> dict[str, dict[str, list[str]]]:
    """``{class name: {field name: comment lines}}`` for every dataclass in schema.py.

    A field's comment is the block of ``#`` lines directly above it (no blank line between).
    A field without one belongs to the group documented above the previous field (e.g.
    ``en_column``, ``xx_column``, ``lang_column`` share one comment) and gets no lines here:
    the printed YAML keeps the schema's grouping.
    """
    source = inspect.getsource(schema)
    lines = source.splitlines()
    out: dict[str, dict[str, list[str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, list[str]] = {}
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            block: list[str] = []
            row = stmt.lineno - 2  # 0-based index of the line above the declaration
            while row >= 0 and lines[row].strip().startswith("#"):
                block.append(lines[row].strip()[1:].strip())
                row -= 1
            fields[stmt.target.id] = block[::-1]
        out[node.name] = fields
    return out


def field_comments(cls: type) -> dict[str, list[str]]:
    """The comment lines above each field of the schema dataclass ``cls`` (empty list: none)."""
    return _schema_comments().get(cls.__name__, {})


def _scalar(value: Any) -> str:
    """One YAML scalar (or flow list) that ``yaml.safe_load`` reads back as ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
    return text.removesuffix("\n...\n").strip()


def _comment(lines: list[str], indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in lines]


def _doc(cls: type) -> list[str]:
    doc = inspect.getdoc(cls) or ""
    return [line for line in doc.splitlines() if line.strip()]


def _dataclass_lines(obj: Any, indent: str, first_indent: str, seen: set[type]) -> list[str]:
    """The fields of dataclass ``obj`` as ``key: value`` lines, each under its comment.

    ``first_indent`` replaces ``indent`` on the first line (``- `` for a list item). Comments of a
    class are printed at its first occurrence only (``seen``): a second source repeats none.
    """
    cls = type(obj)
    comments = field_comments(cls) if cls not in seen else {}
    seen.add(cls)
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        lines = _comment(comments.get(f.name, []), indent)
        if dataclasses.is_dataclass(value):
            lines += _comment(_doc(type(value)), indent)
            lines.append(f"{indent}{f.name}:")
            lines += _dataclass_lines(value, indent + INDENT, indent + INDENT, seen)
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            lines.append(f"{indent}{f.name}:")
            for item in value:
                lines += _dataclass_lines(item, indent + INDENT * 2, indent + INDENT + "- ", seen)
        else:
            lines.append(f"{indent}{f.name}: {_scalar(value)}")
        out += lines
    if first_indent != indent:
        # A list item: the "- " marker goes on the first key line; comment lines above it line up
        # with the marker.
        for i, line in enumerate(out):
            if not line.lstrip().startswith("#"):
                out[i] = first_indent + line[len(indent):]
                break
            out[i] = first_indent[:-2] + line[len(indent):]
    return out


def config_yaml(cfg: schema.RunConfig, header: list[str] | None = None) -> str:
    """``cfg`` as YAML with every field's comment from schema.py; ``header``: leading comment lines."""
    lines = _comment(header or [], "")
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        lines.append("")
        lines += _comment(_doc(type(section)), "")
        lines.append(f"{f.name}:")
        lines += _dataclass_lines(section, INDENT, INDENT, set())
    return "\n".join(lines).lstrip("\n") + "\n"
