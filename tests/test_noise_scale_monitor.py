"""GradientNoiseScaleMonitor in real runs, single process and DDP."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import GradientNoiseScaleMonitor
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.gradients import gradient_noise_scale
from tests.lightning_support import (
    DigitsModel,
    assert_run_unchanged,
    digits,
    read_scalars,
    trainer,
)
from tests.support import labels_count, split_sequence_first


class _LastBatch(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch = batch


def test_logs_the_smoothed_estimate_of_the_current_batch(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel(arch="mlp")
    monitor = GradientNoiseScaleMonitor(every_n_steps=3, ema_decay=0.0)
    last = _LastBatch()
    trainer(tmp_path, [monitor, last], max_steps=6).fit(model)
    logged = read_scalars(tmp_path)
    for name in ("b_simple", "grad_sq", "trace_cov", "seconds"):
        assert sorted(logged[f"landscape/noise_scale/{name}"]) == [3, 6], name
    expected = gradient_noise_scale(model, training_step_loss, last.batch, micro_batches=4)
    assert logged["landscape/noise_scale/trace_cov"][6] == pytest.approx(
        expected.trace_cov, rel=1e-4
    )
    assert monitor.b_simple == pytest.approx(expected.b_simple, rel=1e-4)


class _AtItsBatchOptimum(DigitsModel):
    """Least squares solved on its one batch, never stepped: the batch's mean gradient is
    zero, every micro-batch's is not, so the |G|² estimate is negative."""

    def __init__(self):
        super().__init__(arch="mlp", lr=0.0, momentum=0.0, batch_size=64)
        self.net = torch.nn.Linear(64, 1)

    def train_dataloader(self):
        x, y = digits()[:64]
        return DataLoader(TensorDataset(x, y.float()[:, None]), batch_size=64)

    def on_fit_start(self):
        x, y = next(iter(self.train_dataloader()))
        design = torch.cat([x, torch.ones(64, 1)], 1).double()  # some pixels are always 0
        solution = (torch.linalg.pinv(design) @ y.double()).float()
        with torch.no_grad():
            self.net.weight.copy_(solution[:64].T)
            self.net.bias.copy_(solution[64])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)


def test_a_noise_scale_beyond_the_batch_is_not_logged_and_says_why(tmp_path):
    monitor = GradientNoiseScaleMonitor(every_n_steps=1, measure_at_end=False)
    with pytest.warns(UserWarning, match="logs no b_simple while its running estimate of"):
        trainer(tmp_path, [monitor], max_steps=2).fit(_AtItsBatchOptimum())
    logged = read_scalars(tmp_path)
    assert all(v < 0 for v in logged["landscape/noise_scale/grad_sq"].values())
    assert "landscape/noise_scale/b_simple" not in logged and monitor.b_simple is None


def test_moving_average_and_resume_state(tmp_path):
    monitor = GradientNoiseScaleMonitor(every_n_steps=1, ema_decay=0.5, measure_at_end=False)
    trainer(tmp_path, [monitor], max_steps=3).fit(DigitsModel(arch="mlp"))
    logged = read_scalars(tmp_path)["landscape/noise_scale/grad_sq"]
    assert sorted(logged) == [1, 2, 3]
    state = monitor.state_dict()
    fresh = GradientNoiseScaleMonitor()
    fresh.load_state_dict(state)
    assert fresh.b_simple == monitor.b_simple


def test_observer_effect_is_zero(tmp_path):
    assert_run_unchanged(tmp_path, [GradientNoiseScaleMonitor(every_n_steps=2)], max_steps=6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"micro_batches": 1}, "`micro_batches`"),
        ({"ema_decay": 1.0}, "`ema_decay`"),
        ({"mode": "x"}, "`mode`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNoiseScaleMonitor(**kwargs)


@pytest.mark.parametrize("arg", ["split_fn", "batch_size_fn"])
def test_split_hooks_must_be_callable(arg):
    with pytest.raises(TypeError, match=f"`{arg}` must be callable"):
        GradientNoiseScaleMonitor(**{arg: "dim1"})


class _SequenceFirst(DigitsModel):
    """Reads each batch of digits as a sequence of 8 rows, time first, as an RNN would."""

    def training_step(self, batch, batch_idx):
        rows, y = batch
        return super().training_step((rows.transpose(0, 1).reshape(len(y), 64), y), batch_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x.view(len(x), 8, 8).transpose(0, 1), y  # (8 time steps, batch, 8)


def test_split_fn_splits_the_samples_of_sequence_first_batches(tmp_path):
    pl.seed_everything(0)
    model, last = _SequenceFirst(arch="mlp"), _LastBatch()
    monitor = GradientNoiseScaleMonitor(
        every_n_steps=3,
        ema_decay=0.0,
        split_fn=split_sequence_first,
        batch_size_fn=labels_count,
    )
    trainer(tmp_path, [monitor, last], max_steps=3).fit(model)
    expected = gradient_noise_scale(
        model,
        training_step_loss,
        last.batch,
        split_fn=split_sequence_first,
        batch_size_fn=labels_count,
    )
    logged = read_scalars(tmp_path)["landscape/noise_scale/grad_sq"]
    assert logged[3] == pytest.approx(expected.grad_sq, rel=1e-4)
