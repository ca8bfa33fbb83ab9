"""``manifest.json``: what a shard directory holds and which teacher made it.

Training refuses shards whose manifest does not match its configuration and names the field,
because vectors from another teacher (or another layer, pooling or pre-tokenizer) would train
the student on silently wrong targets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmkd_ds.config.schema import TeacherConfig
from mmkd_ds.shards.format import SCHEMA_VERSION
from mmkd_ds.shards.writer import ShardRecord, atomic_write_bytes
from mmkd_ds.words import PRETOKENIZER_NAME

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or does not match the run's configuration."""


@dataclass
class Manifest:
    schema_version: int
    teacher: dict
    pretokenizer: str
    corpus: dict  # fingerprint, pairs, languages, and the data settings that made it
    shard_size: int
    shards: list[ShardRecord] = field(default_factory=list)
    created_by: str = ""

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        data["shards"] = [ShardRecord(**s) for s in data.get("shards", [])]
        return cls(**data)


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode("utf-8"))
    return path


def read_manifest(shard_dir: str | Path) -> Manifest:
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (run mmkd-precompute, or let it finish)")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: field schema_version is {manifest.schema_version}, this mmkd-ds reads {SCHEMA_VERSION} "
            "(the shard format changed: run mmkd-precompute again into a new precompute.out_dir)"
        )
    return manifest


# Teacher fields that must agree between a manifest and the run's TeacherConfig.
_CHECKED_TEACHER_FIELDS = ("name", "layer", "pooling", "sentence", "dtype", "max_tokens")
# Fields added after the first manifests: what a manifest without them was made with.
_TEACHER_FIELD_DEFAULTS = {"sentence": "cls"}


def check_manifest(manifest: Manifest, teacher: TeacherConfig, where: str = "") -> None:
    """Raise ManifestError naming the first field where ``manifest`` and ``teacher`` differ."""
    prefix = f"{where}: " if where else ""
    if manifest.pretokenizer != PRETOKENIZER_NAME:
        raise ManifestError(
            f"{prefix}manifest field pretokenizer is {manifest.pretokenizer!r}, this run uses {PRETOKENIZER_NAME!r}"
        )
    for name in _CHECKED_TEACHER_FIELDS:
        have, want = manifest.teacher.get(name, _TEACHER_FIELD_DEFAULTS.get(name)), getattr(teacher, name)
        if have != want:
            raise ManifestError(
                f"{prefix}manifest field teacher.{name} is {have!r} but the run's config has teacher.{name}={want!r}"
            )
    # A hub revision is only comparable when the shards came from the hub.
    rev = manifest.teacher.get("revision")
    if rev not in ("local", None) and teacher.revision not in (rev, "main"):
        raise ManifestError(
            f"{prefix}manifest field teacher.revision is {rev!r} but the run's config has teacher.revision={teacher.revision!r}"
        )
