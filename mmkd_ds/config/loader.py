"""Load a RunConfig from one YAML file plus dotted command-line overrides.

    cfg = load_config("run.yaml", ["--data.max_words=96", "--data.sources[0].lang=sw"])

Unknown keys and values of the wrong type are errors naming the dotted key. Override values
are parsed as YAML scalars, so ``96`` is an int, ``true`` a bool and ``[a, b]`` a list.
"""

from __future__ import annotations

import contextlib

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mmkd_ds.config.errors import ConfigError
from mmkd_ds.config.schema import RunConfig

_INDEX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turn ``["--a.b=1", "--c.d", "x"]`` into ``[("a.b", 1), ("c.d", "x")]``."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(arg, "an override must look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(body, "override has no value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from None
        out.append((key, value))
        i += 1
    return out


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        m = _INDEX.match(part)
        if not m:
            raise ConfigError(key, f"bad key segment {part!r}")
        name, index = m.group(1), m.group(2)
        last = depth == len(parts) - 1
        if index is None:
            if last:
                node[name] = value
            else:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ConfigError(key, f"{name} is not a section")
        else:
            seq = node.get(name)
            if not isinstance(seq, list) or int(index) >= len(seq):
                raise ConfigError(key, f"{name} has no element {index}")
            if last:
                seq[int(index)] = value
            else:
                node = seq[int(index)]
                if not isinstance(node, dict):
                    raise ConfigError(key, f"{name}[{index}] is not a section")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _build(cls: type, values: Any, key: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(key or "<root>", f"expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Source paths in a YAML file are relative to that file, as a user reading it expects."""
    for src in [*cfg.data.sources, *cfg.data.heldout]:
        if src.path and not src.path.startswith("sample:") and not Path(src.path).is_absolute():
            src.path = str(base / src.path)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (or start from the defaults), apply overrides, validate, return the config."""
    tree: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(str(path), "the top level must be a mapping")
        base = path.resolve().parent
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    cfg = _build(RunConfig, tree, "")
    _resolve_paths(cfg, base)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for logging, hashing and checkpoints)."""
    return dataclasses.asdict(cfg)
