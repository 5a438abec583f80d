"""HessianSpectrumMonitor: trace and density in TensorBoard, equal to the functional API."""

import glob

import lightning.pytorch as pl
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import HessianEigenvalueMonitor, HessianSpectrumMonitor
from lightning_landscape.callbacks import base
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.curvature import HessianOperator, slq_with_trace
from tests.lightning_support import DigitsModel, assert_run_unchanged, read_scalars, trainer


def _tags(log_dir, kind):
    tags = set()
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path, size_guidance={"images": 0, "histograms": 0})
        events.Reload()
        tags.update(events.Tags()[kind])
    return tags


def test_trace_and_density_each_epoch(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel()
    monitor = HessianSpectrumMonitor(n_vectors=2, n_steps=20)
    trainer(tmp_path, [monitor], max_epochs=2, max_steps=-1).fit(model)  # 8 batches an epoch
    scalars = read_scalars(tmp_path)
    for tag in ("trace", "trace_stderr", "negative_mass", "n_hvp", "seconds"):
        assert sorted(scalars[f"landscape/spectrum/{tag}"]) == [8, 16], tag
    assert "landscape/spectrum/density" in _tags(tmp_path, "histograms")
    assert "landscape/spectrum/density" in _tags(tmp_path, "images")

    with HessianOperator(model, training_step_loss, monitor._probe_data, mode=None) as operator:
        expected_density, expected_trace = slq_with_trace(
            operator, n_vectors=2, n_steps=20, generator=0, block_sizes=operator.block_sizes
        )
    assert scalars["landscape/spectrum/trace"][16] == pytest.approx(expected_trace.trace, rel=1e-5)
    assert scalars["landscape/spectrum/negative_mass"][16] == pytest.approx(
        expected_density.negative_mass, abs=1e-6
    )
    assert scalars["landscape/spectrum/n_hvp"][16] == expected_density.n_hvp + expected_trace.n_hvp


def test_both_hessian_monitors_leave_the_run_unchanged(tmp_path):
    monitors = [HessianEigenvalueMonitor(every_n_steps=3), HessianSpectrumMonitor(n_steps=10)]
    assert_run_unchanged(tmp_path, monitors, max_epochs=2, max_steps=-1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"trace_tol": 0}, "`trace_tol`"),
        ({"trace_max_iter": 31}, "`trace_max_iter`"),
        ({"n_vectors": 0}, "`n_vectors`"),
        ({"n_steps": 0}, "`n_steps`"),
        ({"mode": "x"}, "`mode`"),
        ({"basis_device": "nowhere"}, "`basis_device`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianSpectrumMonitor(**kwargs)


def test_a_costly_cadence_is_pointed_out_once(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "_COSTLY_AFTER_SECONDS", 0.0)  # a short test run
    monitor = HessianSpectrumMonitor(every_n_steps=1, every_n_epochs=None)  # 108 products a step
    with pytest.warns(UserWarning, match="measure less often") as caught:
        trainer(tmp_path, [monitor], max_steps=4).fit(DigitsModel())
    assert len([w for w in caught if "measure less often" in str(w.message)]) == 1
