"""train.log_sample_keys: per-rank records of the trained samples, rewound on resume."""

from __future__ import annotations

from mmkd_ds.training.sample_log import SampleKeyLog, read_sample_keys


def test_records_merge_over_ranks_and_rewind_every_rank_file(tmp_path):
    r0, r1 = SampleKeyLog(tmp_path, 0, True), SampleKeyLog(tmp_path, 1, True)
    for step in (1, 2, 3):
        r0.write(step, [f"a{step}"])
        r1.write(step, [f"b{step}"])
    assert read_sample_keys(tmp_path) == {1: ["a1", "b1"], 2: ["a2", "b2"], 3: ["a3", "b3"]}
    # A resume from step 1 on one rank: rank 0 rewinds both files, then writes alone.
    assert SampleKeyLog(tmp_path, 0, True).rewind(1) == 4
    r0.write(2, ["a2", "b2"])
    assert read_sample_keys(tmp_path) == {1: ["a1", "b1"], 2: ["a2", "b2"]}


def test_disabled_log_writes_nothing(tmp_path):
    log = SampleKeyLog(tmp_path, 0, False)
    log.write(1, ["x"])
    assert log.rewind(0) == 0
    assert not (tmp_path / "sample_keys").exists() and read_sample_keys(tmp_path) == {}
