"""Elastic resume decisions without a launch (training/elastic.py): the global batch is kept by
grad_accum when it divides, refused in one line naming the choices otherwise, or changed with
train.allow_resume_changes, the lr position then kept in samples. The real 2 -> 1 -> 2 rank run
is tests/test_elastic_resume.py."""

import pytest

from mmkd_ds.training.checkpoint import ResumeError
from mmkd_ds.training.elastic import resume_batch, schedule_step_in_samples


def test_grad_accum_keeps_the_global_batch():
    d = resume_batch(2, 4, 1, 1, 4, 1, allow_changes=False)  # 2 ranks x 4 -> 1 rank
    assert (d.grad_accum, d.global_batch) == (2, 8) and d.note == "grad_accum 1 -> 2 (the global batch kept)"
    d = resume_batch(1, 4, 2, 2, 4, 2, allow_changes=False)  # and back
    assert (d.grad_accum, d.global_batch) == (1, 8)
    d = resume_batch(2, 4, 1, 2, 2, 2, allow_changes=False)  # the user's own grad_accum keeps it
    assert (d.grad_accum, d.note) == (2, "grad_accum 1 -> 2 (the global batch kept)")


def test_a_global_batch_that_cannot_be_kept_is_refused_naming_the_choices():
    with pytest.raises(ResumeError) as err:
        resume_batch(2, 4, 1, 3, 4, 1, allow_changes=False)
    text = str(err.value)
    assert "\n" not in text and "cannot resume on 3 ranks" in text and "global batch is 8" in text
    assert "1 (grad_accum 2), 2 (grad_accum 1)" in text and "train.allow_resume_changes=true" in text
    assert "global batch of 12" in text
    with pytest.raises(ResumeError, match="train.grad_accum 3"):  # an explicit grad_accum that misses it
        resume_batch(2, 4, 1, 1, 4, 3, allow_changes=False)


def test_allow_resume_changes_takes_the_new_batch_and_counts_samples():
    d = resume_batch(2, 4, 1, 3, 4, 1, allow_changes=True)
    assert (d.grad_accum, d.global_batch, d.saved_global_batch) == (1, 12, 8)
    assert "global batch 8 -> 12" in d.note
    assert schedule_step_in_samples(30, 8, 12) == 20  # 240 samples either way
