"""LossLandscapeMonitor: images and raw slices at the end of a real run."""

import copy
import glob

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import LossLandscapeMonitor
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.curvature import HessianOperator
from tests.lightning_support import DigitsModel, assert_run_unchanged, read_scalars, trainer


def _images(log_dir):
    tags = set()
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path, size_guidance={"images": 0})
        events.Reload()
        tags.update(events.Tags()["images"])
    return tags


def test_slices_at_the_end_of_training(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel()
    initial = copy.deepcopy(model)
    monitor = LossLandscapeMonitor(resolution=5, line_points=7, from_init=True)
    trainer(tmp_path, [monitor], max_steps=6).fit(model)

    assert {
        "landscape/slices/line",
        "landscape/slices/surface",
        "landscape/slices/from_init",
    } <= _images(tmp_path)
    (raw_path,) = glob.glob(f"{tmp_path}/**/landscape/slices_step6.pt", recursive=True)
    raw = torch.load(raw_path)
    assert (
        raw["line"].shape == (7,)
        and raw["surface"].shape == (5, 5)
        and raw["from_init"].shape == (7,)
    )

    center = read_scalars(tmp_path)["landscape/slices/center_loss"][6]
    probe = monitor._probe_data
    expected_center = float(HessianOperator(model, training_step_loss, probe).loss)
    assert center == pytest.approx(expected_center, rel=1e-5)
    assert float(raw["line"][3]) == pytest.approx(expected_center, rel=1e-5)  # α = 0
    assert float(raw["surface"][2, 2]) == pytest.approx(expected_center, rel=1e-5)
    at_init = float(HessianOperator(initial.to(model.device), training_step_loss, probe).loss)
    steps = raw["from_init_steps"].tolist()
    assert float(raw["from_init"][steps.index(-1.0)]) == pytest.approx(at_init, rel=1e-4)


def test_named_monitors_keep_their_figures_and_files_apart(tmp_path):
    monitors = [
        LossLandscapeMonitor(resolution=3, line_points=3, params=[pattern], name=name)
        for name, pattern in (("conv", r"^net\.1\."), ("head", r"^net\.6\."))
    ]
    trainer(tmp_path, monitors, max_steps=2).fit(DigitsModel())
    assert {"landscape/slices/conv/line", "landscape/slices/head/surface"} <= _images(tmp_path)
    for name in ("conv", "head"):
        assert glob.glob(f"{tmp_path}/**/landscape/{name}/slices_step2.pt", recursive=True)


def test_observer_effect_is_zero(tmp_path):
    monitor = LossLandscapeMonitor(resolution=3, line_points=3, from_init=True, every_n_steps=2)
    assert_run_unchanged(tmp_path, [monitor], max_steps=6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 1}, "`resolution`"),
        ({"line_points": -1}, "`line_points`"),
        ({"span": 0.0}, "`span`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossLandscapeMonitor(**kwargs)


def test_flags_must_be_booleans():
    with pytest.raises(TypeError, match="`from_init` must be True or False"):
        LossLandscapeMonitor(from_init="false")


def test_a_figure_that_cannot_be_written_leaves_the_run_going(tmp_path):
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    blocked = tmp_path / "tb" / "version_0" / "landscape"  # a file where the folder goes
    blocked.parent.mkdir(parents=True)
    blocked.write_text("")
    monitor = LossLandscapeMonitor(resolution=3, line_points=3)
    fit = trainer(tmp_path, [monitor], max_steps=2, logger=logger)
    with pytest.warns(UserWarning, match="could not write its figures at step 2"):
        fit.fit(DigitsModel())
    assert fit.global_step == 2
    assert 2 in read_scalars(tmp_path)["landscape/slices/center_loss"]
