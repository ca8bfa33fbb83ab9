"""check_resume: a resume that would change what is trained is refused, naming the field."""

import pytest

from mmkd_ds.training.checkpoint import ResumeError, check_resume

STREAM = {"batch_size": 4, "fingerprint": "abc", "shards": ["a.tar", "b.tar"], "seed": 1234}
SAVED = {"world_size": 2, "stream": dict(STREAM)}


def test_same_run_resumes():
    check_resume(SAVED, 2, dict(STREAM), allow_changes=False)


@pytest.mark.parametrize("world, change, message", [
    (1, {}, "world_size was 2 at the checkpoint and is 1 now"),
    (2, {"batch_size": 2}, "stream.batch_size was 4 at the checkpoint and is 2 now"),
    (2, {"fingerprint": "xyz"}, "corpus fingerprint was 'abc'"),
    (2, {"shards": ["a.tar"]}, "shard set was 'one list' at the checkpoint and is 'another' now"),
    (2, {"seed": 7}, "stream.seed was 1234"),
])
def test_changed_field_is_refused_by_name(world, change, message):
    with pytest.raises(ResumeError, match="cannot resume") as err:
        check_resume(SAVED, world, {**STREAM, **change}, allow_changes=False)
    assert message in str(err.value) and "train.allow_resume_changes=true" in str(err.value)
    check_resume(SAVED, world, {**STREAM, **change}, allow_changes=True)  # the documented escape
