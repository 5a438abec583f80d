"""Batch-size schedules and learning-rate coupling, without Lightning."""

import math

import pytest

from lightning_landscape.batch_size import (
    Milestones,
    NoiseScaleSchedule,
    Ramp,
    ScheduleState,
    lr_scale,
    round_to_multiple,
)

STATE = ScheduleState(batch_size=16, initial_batch_size=16)


def test_milestones_hold_until_the_next_one():
    schedule = Milestones({2: 32, 4: 128})
    assert [schedule(e, STATE) for e in range(6)] == [16, 16, 32, 32, 128, 128]


@pytest.mark.parametrize(
    "growth, expected",
    [("geometric", [16, 16, 32, 64, 128, 128]), ("linear", [16, 16, 53, 91, 128, 128])],
)
def test_ramp_between_start_and_end_epochs(growth, expected):
    schedule = Ramp(end_size=128, start_epoch=1, end_epoch=4, growth=growth)
    assert [schedule(e, STATE) for e in range(6)] == expected
    assert (
        Ramp(end_size=128, start_epoch=1, end_epoch=4, growth=growth, multiple=8)(2, STATE) % 8 == 0
    )


def test_noise_schedule_follows_b_simple_per_device_clipped_and_not_too_often():
    schedule = NoiseScaleSchedule(min_size=8, max_size=100, every_n_epochs=2, multiple=4)
    state = ScheduleState(16, 16, replicas=2, last_change_epoch=0, noise_scale=90.0)
    assert schedule(1, state) == 16  # changed at epoch 0: too soon
    assert schedule(2, state) == 44  # 90 samples over 2 replicas, to a multiple of 4
    assert schedule(2, ScheduleState(16, 16, 2, 0, noise_scale=1e4)) == 100
    assert schedule(2, ScheduleState(16, 16, 2, 0, noise_scale=1.0)) == 8
    assert schedule(2, ScheduleState(16, 16, 2, 0, noise_scale=None)) == 16


def test_lr_scale_and_rounding():
    assert lr_scale(256, 64, "linear") == 4.0
    assert lr_scale(256, 64, "sqrt") == 2.0
    assert lr_scale(256, 64, "none") == 1.0
    assert lr_scale(32, 64, "sqrt") == pytest.approx(1 / math.sqrt(2))
    assert round_to_multiple(3, 8) == 8 and round_to_multiple(13, 8) == 16


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: Milestones({3: 32, 1: 64}), ValueError, "strictly increasing"),
        (lambda: Milestones({-1: 32}), ValueError, "milestones epoch"),
        (lambda: Milestones({1: 0}), ValueError, r"milestones\[1\]"),
        (lambda: Milestones({}), TypeError, "non-empty"),
        (lambda: Ramp(end_size=64, start_epoch=3, end_epoch=3), ValueError, "`end_epoch`"),
        (lambda: Ramp(end_size=64, growth="cubic"), ValueError, "`growth`"),
        (lambda: NoiseScaleSchedule(min_size=16, max_size=8), ValueError, "`max_size`"),
    ],
)
def test_bad_schedules(build, error, match):
    with pytest.raises(error, match=match):
        build()
