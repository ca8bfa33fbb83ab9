"""Config: YAML + dotted overrides, and errors that name the key."""

from pathlib import Path

import pytest

from mmkd_ds.config import ConfigError, RunConfig, load_config, parse_overrides


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config(None, [])
    assert isinstance(cfg, RunConfig)
    assert cfg.data.sources[0].path == "sample:train"
    assert cfg.teacher.pooling == "first"  # the authors' first subword


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "data:\n  max_words: 50\n  sources:\n    - path: corpus.en-sw.tsv\nteacher:\n  layer: -2\n")
    cfg = load_config(path, ["--data.max_words=96", "--teacher.pooling", "first", "--data.sources[0].lang=sw"])
    assert cfg.data.max_words == 96
    assert cfg.teacher.pooling == "first"
    assert cfg.teacher.layer == -2
    assert cfg.data.sources[0].lang == "sw"
    # Relative source paths resolve against the YAML file's directory.
    assert cfg.data.sources[0].path == str(tmp_path / "corpus.en-sw.tsv")


def test_override_values_are_typed():
    assert parse_overrides(["--a.b=3", "--c=true", "--d=[1, 2]", "--e=x"]) == [
        ("a.b", 3),
        ("c", True),
        ("d", [1, 2]),
        ("e", "x"),
    ]


@pytest.mark.parametrize(
    "override, key",
    [
        ("--data.max_wrods=3", "data.max_wrods"),
        ("--data.max_words=abc", "data.max_words"),
        ("--data.max_words=0", "data.max_words"),
        ("--teacher.pooling=max", "teacher.pooling"),
        ("--stream.uneven=maybe", "stream.uneven"),
        ("--precompute.shard_size=1.5", "precompute.shard_size"),
        ("--nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key
    assert key in str(err.value)


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = write(tmp_path, "teacher:\n  nmae: bert\n")
    with pytest.raises(ConfigError, match=r"teacher\.nmae"):
        load_config(path)


def test_bad_source_entry_names_its_index(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - path: a.tsv\n    - format: xml\n      path: b.xml\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.format"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_paper_preset_loads_and_is_the_authors_setting():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml", [])
    assert (cfg.teacher.name, cfg.student.name) == ("bert-base-cased", "bert-base-multilingual-cased")
    langs = {s.lang for s in cfg.data.sources}
    assert langs == {"fr", "bg", "de", "es", "ar", "zh", "hi"}
    assert cfg.data.alpha == 0.0 and cfg.data.identity_pairs
    loss, train = cfg.loss, cfg.train
    assert (loss.token_weight, loss.word_weight, loss.sentence_weight, loss.structure_weight) == (1, 1, 1, 10)
    assert (loss.head_hidden, loss.head_out, loss.head_final_bn, loss.head_bias) == (768, 128, True, False)
    assert (loss.word_anchor, loss.word_reduction, loss.word_mask_mode) == ("teacher", "sentence", "bert")
    assert cfg.teacher.pooling == loss.word_pooling == "first"
    assert (train.epochs, train.warmup_epochs, train.schedule) == (15, 2, "cosine")
    assert (train.lr, train.lr_scaling, train.weight_decay, train.weight_decay_on) == (2e-5, "linear", 0.01, "all")
    assert train.grad_clip == 0 and train.precision == "bf16"
    # the TSV source resolves against the YAML file's directory
    assert cfg.data.sources[-1].path.endswith("data/eubookshop.en-bg.tsv")


def test_train_epoch_fields_are_checked():
    with pytest.raises(ConfigError, match="train.warmup_epochs"):
        load_config(None, ["--train.epochs=2", "--train.warmup_epochs=2"])
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        load_config(None, ["--train.lr_scaling=sqrt"])
    with pytest.raises(ConfigError, match="loss.word_anchor"):
        load_config(None, ["--loss.word_anchor=both"])


def test_a_float_written_without_a_dot_is_a_number():
    """YAML 1.1 reads `1e-5` as a string; a float field takes it as the number it means."""
    from mmkd_ds.config import ConfigError, load_config

    assert load_config(None, ["--train.lr=1e-5"]).train.lr == 1e-5
    import pytest

    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["--train.lr=fast"])


def test_bundled_configs_load_and_the_demos_keep_their_own_shards():
    """Every configs/*.yaml validates; the two demos, whose teacher vectors differ (token means
    vs [CLS]), write shards to different directories, and scripts/demo.sh checks the directory
    the config names (else one demo would remake the other's shards on every run)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    loaded = {p.stem: load_config(p, []) for p in sorted(configs.glob("*.yaml"))}
    assert {"demo", "demo-scratch", "paper"} <= set(loaded)
    demo, scratch = loaded["demo"], loaded["demo-scratch"]
    assert (demo.teacher.sentence, scratch.teacher.sentence) == ("mean", "cls")
    assert demo.loss.sentence_pooling == "mean"
    for name, cfg in (("demo", demo), ("demo-scratch", scratch)):
        assert cfg.precompute.out_dir == f"runs/{name}/shards"
        assert cfg.student.name == f"runs/{name}/student-init"
    script = (configs.parent / "scripts" / "demo.sh").read_text()
    assert "SHARDS=$RUN/shards" in script and "runs/demo/shards" not in script
