"""Random access to the samples of a shard, and shard verification against the manifest.

A shard is indexed once per process by walking its tar headers (the data is skipped with a
seek), then samples are read by offset. Anything that does not match the manifest (missing
file, other size, other sha256, missing members) is a ShardError that names the shard.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict
from pathlib import Path

from mmkd_ds.shards.format import SUFFIXES, ShardSample, decode_sample, sample_key, split_member_name
from mmkd_ds.shards.writer import ShardRecord, file_sha256


class ShardError(RuntimeError):
    """A shard that is missing, truncated, altered or unreadable."""


def check_shard(path: Path, record: ShardRecord, mode: str = "sha256") -> str | None:
    """The problem with a shard (missing, wrong size, wrong sha256) or None if it matches."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.bytes:
        return f"truncated or altered: {size} bytes, manifest says {record.bytes}"
    if mode == "sha256" and file_sha256(path) != record.sha256:
        return "altered: sha256 differs from the manifest"
    return None


class ShardFile:
    """One open shard: key -> {suffix: (offset, size)}, read by seeking."""

    def __init__(self, path: Path, record: ShardRecord):
        self.path = path
        self.record = record
        self._file = open(path, "rb")
        self.index = self._build_index()

    def _build_index(self) -> dict[str, dict[str, tuple[int, int]]]:
        index: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(fileobj=self._file, mode="r:") as tar:
                for member in tar:
                    key, suffix = split_member_name(member.name)
                    index.setdefault(key, {})[suffix] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ShardError(f"{self.path}: unreadable tar ({exc})") from None
        expected = {sample_key(self.record.first_index + j) for j in range(self.record.samples)}
        if set(index) != expected:
            raise ShardError(
                f"{self.path}: holds {len(index)} samples, manifest says {self.record.samples} "
                f"(keys {self.record.first_index}..{self.record.first_index + self.record.samples - 1})"
            )
        for key, members in index.items():
            missing = [s for s in SUFFIXES if s not in members]
            if missing:
                raise ShardError(f"{self.path}: sample {key} lacks {', '.join(missing)}")
            for offset, size in members.values():
                if offset + size > self.record.bytes:
                    raise ShardError(f"{self.path}: sample {key} runs past the end of the file (truncated)")
        return index

    def read(self, index: int) -> ShardSample:
        key = sample_key(index)
        members = {}
        for suffix, (offset, size) in self.index[key].items():
            self._file.seek(offset)
            data = self._file.read(size)
            if len(data) != size:
                raise ShardError(f"{self.path}: sample {key} is truncated")
            members[suffix] = data
        try:
            return decode_sample(key, members)
        except (ValueError, KeyError) as exc:
            raise ShardError(f"{self.path}: sample {key} does not decode ({exc})") from None

    def close(self) -> None:
        self._file.close()


class ShardCache:
    """Keeps the few most recently used shards open (a rank reads one or two at a time)."""

    def __init__(self, shard_dir: Path, records: dict[str, ShardRecord], capacity: int = 4):
        self.shard_dir = shard_dir
        self.records = records
        self.capacity = capacity
        self._open: OrderedDict[str, ShardFile] = OrderedDict()

    def get(self, name: str) -> ShardFile:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        shard = ShardFile(self.shard_dir / name, self.records[name])
        self._open[name] = shard
        if len(self._open) > self.capacity:
            _, old = self._open.popitem(last=False)
            old.close()
        return shard

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()
