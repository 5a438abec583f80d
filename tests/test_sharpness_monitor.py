"""SharpnessMonitor in a real Trainer run, against the functional measures."""

import lightning.pytorch as pl
import pytest

from lightning_landscape import SharpnessMonitor
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.sharpness import (
    adaptive_sharpness,
    average_sharpness,
    sam_sharpness,
    worst_case_sharpness,
)
from tests.lightning_support import DigitsModel, assert_run_unchanged, read_scalars, trainer

ALL = ["sam", "adaptive", "worst_case", "average"]


def test_every_measure_logged_and_equal_to_the_functions(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel()
    monitor = SharpnessMonitor(measures=ALL, every_n_steps=4, samples=4)
    trainer(tmp_path, [monitor], max_steps=8).fit(model)
    logged = read_scalars(tmp_path)
    for name in [*ALL, "average_stderr", "n_evaluations", "seconds"]:
        assert sorted(logged[f"landscape/sharpness/{name}"]) == [4, 8], name
    probe = monitor._probe_data
    expected = {
        "sam": sam_sharpness(model, training_step_loss, probe).value,
        "adaptive": adaptive_sharpness(model, training_step_loss, probe).value,
        "worst_case": worst_case_sharpness(model, training_step_loss, probe).value,
        "average": average_sharpness(
            model, training_step_loss, probe, samples=4, generator=0
        ).value,
    }
    for name, value in expected.items():
        assert logged[f"landscape/sharpness/{name}"][8] == pytest.approx(
            value, rel=1e-4, abs=1e-7
        ), name


def test_observer_effect_is_zero(tmp_path):
    monitor = SharpnessMonitor(measures=ALL, every_n_steps=3, samples=2)
    assert_run_unchanged(tmp_path, [monitor], max_steps=9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"measures": []}, "`measures`"),
        ({"measures": "sam"}, "`measures`"),
        ({"measures": ["sam", "flatness"]}, "`measures`"),
        ({"rho": 0.0}, "`rho`"),
        ({"adaptive_rho": -1.0}, "`adaptive_rho`"),
        ({"epsilon": 0.0}, "`epsilon`"),
        ({"worst_case_steps": 0}, "`worst_case_steps`"),
        ({"sigma": 0.0}, "`sigma`"),
        ({"samples": 1}, "`samples`"),
        ({"mode": "predict"}, "`mode`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessMonitor(**kwargs)
