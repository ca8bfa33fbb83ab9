"""Config: YAML + dotted overrides, and errors that name the key."""

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
    assert cfg.teacher.pooling == "mean"


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
