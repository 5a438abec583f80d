"""HessianEigenvalueMonitor in real Trainer runs, read back from TensorBoard event files."""

import functools
import gc
import itertools
import re
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_landscape import (
    HessianEigenvalueMonitor,
    HessianSpectrumMonitor,
    ReducedPrecisionWarning,
)
from lightning_landscape.callbacks import base
from lightning_landscape.callbacks import hessian as hessian_module
from lightning_landscape.callbacks._logging import merge_layouts
from lightning_landscape.callbacks._loss import training_step_loss
from lightning_landscape.curvature import hessian_eigenvalues, krylov
from tests.lightning_support import (
    DigitsModel,
    DigitsStream,
    NaNPastTheHead,
    TwoOptimizers,
    assert_run_unchanged,
    digits,
    has_custom_scalars_layout,
    read_scalars,
    trainer,
)
from tests.support import CubeMisdifferentiated, CubeOnce

TAGS = [
    "lambda_max",
    "lambda_min",
    "neg_ratio",
    "saddle",
    "grad_norm",
    "stability_threshold",
    "n_hvp",
    "seconds",
]


def test_tensorboard_holds_the_tags_at_the_steps(tmp_path):
    pl.seed_everything(0)
    monitor = HessianEigenvalueMonitor(every_n_steps=4, measure_at_start=True)
    trainer(tmp_path, [monitor], max_steps=10).fit(DigitsModel())
    scalars = read_scalars(tmp_path)
    for tag in TAGS:
        assert sorted(scalars[f"landscape/hessian/{tag}"]) == [0, 4, 8, 10], tag
    assert has_custom_scalars_layout(tmp_path)
    thresholds = scalars["landscape/hessian/stability_threshold"]
    assert thresholds[4] == pytest.approx((2 + 2 * 0.9) / 0.05)
    assert all(v in (0.0, 1.0) for v in scalars["landscape/hessian/saddle"].values())


def test_logged_eigenvalues_equal_the_functional_api(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel()
    monitor = HessianEigenvalueMonitor(
        k=2, every_n_steps=5, measure_at_end=False, probe_batches=2, tol=1e-4
    )
    trainer(tmp_path, [monitor], max_steps=10).fit(model)
    logged = read_scalars(tmp_path)
    expected = hessian_eigenvalues(
        model, training_step_loss, monitor._probe_data, k=2, which="both", tol=1e-6
    )
    top, bottom = expected.eigenvalues[:2].tolist(), expected.eigenvalues[-1].item()
    assert logged["landscape/hessian/lambda_max"][10] == pytest.approx(top[0], rel=1e-4)
    assert logged["landscape/hessian/lambda_2"][10] == pytest.approx(top[1], rel=1e-4)
    assert logged["landscape/hessian/lambda_min"][10] == pytest.approx(bottom, rel=1e-4, abs=1e-5)


def test_named_monitors_measure_blocks_of_the_hessian_side_by_side(tmp_path):
    pl.seed_everything(0)
    model = DigitsModel(arch="mlp")
    blocks = {"first": [r"^net\.0\."], "last": [r"^net\.2\."]}
    monitors = [
        HessianEigenvalueMonitor(params=params, name=name, every_n_steps=4, tol=1e-5)
        for name, params in blocks.items()
    ]
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [*monitors, checkpoint], max_steps=4, enable_checkpointing=True).fit(model)
    logged = read_scalars(tmp_path)
    for monitor, (name, params) in zip(monitors, blocks.items()):
        expected = hessian_eigenvalues(
            model, training_step_loss, monitor._probe_data, params=params, tol=1e-7
        ).eigenvalues[0]
        tag = f"landscape/hessian/{name}/lambda_max"
        assert logged[tag][4] == pytest.approx(expected.item(), rel=1e-4)
    assert "landscape/hessian/lambda_max" not in logged
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert {monitor.state_key for monitor in monitors} <= set(saved)
    layout = str(merge_layouts(monitor.titled_layout() for monitor in monitors))
    assert "(first)" in layout and "landscape/hessian/last/lambda_min" in layout


@functools.cache
def _rotation(size: int, seed: int) -> torch.Tensor:
    rotation, _ = torch.linalg.qr(
        torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    )
    return rotation


class _TurningQuadratic(pl.LightningModule):
    """The loss ½ θᵀAθ at θ = 0, a saddle or minimum: A has the spectrum a test chooses and
    eigenvectors that turn to new random ones after every ``turn_every`` optimizer steps."""

    def __init__(self, spectrum: torch.Tensor, turn_every: int) -> None:
        super().__init__()
        self.register_buffer("spectrum", spectrum)
        self.turn_every = turn_every
        self.theta = torch.nn.Parameter(torch.zeros(spectrum.shape[0]))

    def training_step(self, batch, batch_idx):
        rotation = _rotation(self.spectrum.shape[0], self.global_step // self.turn_every)
        rotation = rotation.to(self.theta.device)
        return 0.5 * self.theta @ ((rotation * self.spectrum) @ rotation.T) @ self.theta

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_small_negative_eigenvalue_beside_a_bulk_at_zero_is_found(tmp_path, seed):
    """λ_min = −3 % of λ_max under 1,500 eigenvalues in [0, 0.01]: a saddle.

    From a start vector with little weight on it (a random one, or the last measurement's
    eigenvectors once they have turned), a residual under tol·λ_max is reached while the
    bottom Ritz value is still inside the bulk; the measurement must not stop there.
    """
    size = 1500
    spectrum = torch.cat(
        [torch.tensor([1.0]), torch.linspace(0, 0.01, size - 2), torch.tensor([-0.03])]
    )
    monitor = HessianEigenvalueMonitor(every_n_steps=2, measure_at_end=False, seed=seed)
    trainer(tmp_path, [monitor], max_steps=4).fit(_TurningQuadratic(spectrum, turn_every=2))
    logged = read_scalars(tmp_path)
    for step in (2, 4):  # cold, then warm from eigenvectors that have turned
        assert logged["landscape/hessian/lambda_min"][step] == pytest.approx(-0.03, abs=1e-2)
        assert logged["landscape/hessian/saddle"][step] == 1.0


def test_the_default_cadence_is_not_called_costly(tmp_path, recwarn, monkeypatch):
    monkeypatch.setattr(base, "_COSTLY_AFTER_SECONDS", 0.0)  # a short test run
    # measurements at steps 300 and 600 take about 2 % of the run here (the threshold: 25 %)
    trainer(tmp_path, [HessianEigenvalueMonitor()], max_steps=600).fit(DigitsModel())
    assert len(read_scalars(tmp_path)["landscape/hessian/lambda_max"]) == 2
    assert not [w for w in recwarn if "measure less often" in str(w.message)]


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_observer_effect_is_zero(tmp_path, probe):
    monitor = HessianEigenvalueMonitor(every_n_steps=3, measure_at_start=True, probe=probe)
    assert_run_unchanged(tmp_path, [monitor], max_steps=12)


def test_non_finite_probe_loss_warns_once_and_logs_nothing(tmp_path):
    def nan_loss(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1]) * float("nan")

    monitor = HessianEigenvalueMonitor(every_n_steps=2, loss_fn=nan_loss)
    with pytest.warns(UserWarning, match="skipped the measurement") as record:
        trainer(tmp_path, [monitor], max_steps=6).fit(DigitsModel())
    assert sum("skipped the measurement" in str(w.message) for w in record) == 1
    assert not any(tag.startswith("landscape/") for tag in read_scalars(tmp_path))


class _PrototypeClassifier(DigitsModel):
    """Distances to learned prototypes through ``torch.cdist``, called in ``forward``
    where no module shows it. Its kernel (taken for sets of up to 25 points, or on
    request) has no double backward."""

    def __init__(self):
        super().__init__(arch="mlp")
        self.prototypes = torch.nn.Parameter(torch.randn(10, 16))

    def forward(self, x):
        return -torch.cdist(
            self.net[0](x).tanh(), self.prototypes, compute_mode="donot_use_mm_for_euclid_dist"
        )


def test_a_kernel_without_double_backward_outside_the_modules_is_measured(tmp_path):
    """The graph of the first pass shows the kernel: every pass from then on runs its
    composite."""
    pl.seed_everything(0)
    model = _PrototypeClassifier()
    monitor = HessianEigenvalueMonitor(every_n_steps=2, measure_at_end=False, tol=1e-4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*skipped the measurement")
        trainer(tmp_path, [monitor], max_steps=6).fit(model)
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"]
    expected = hessian_eigenvalues(model, training_step_loss, monitor._probe_data, tol=1e-6)
    assert sorted(logged) == [2, 4, 6]
    assert logged[6] == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4)


def test_a_model_measured_through_composites_trains_as_without_monitors(tmp_path):
    """The first pass runs cdist's kernel, then every pass its composite."""
    monitors = [HessianEigenvalueMonitor(every_n_steps=2), HessianSpectrumMonitor()]
    assert_run_unchanged(tmp_path, monitors, _PrototypeClassifier, max_steps=6)


class _CubedHidden(DigitsModel):
    """Hidden units cubed by a custom Function: ``CubeOnce``, whose backward is
    differentiable once, or ``CubeMisdifferentiated``, whose double backward is wrong."""

    def __init__(self, cube=CubeOnce):
        super().__init__(arch="mlp")
        self.cube = cube

    def forward(self, x):
        return self.net[2](self.cube.apply(self.net[0](x).tanh()))


@pytest.mark.parametrize(
    ("cube", "cause"), [(CubeOnce, "once_differentiable"), (CubeMisdifferentiated, "not symmetric")]
)
def test_op_without_a_right_double_backward_does_not_stop_training(tmp_path, cube, cause):
    model = _CubedHidden(cube)
    with pytest.warns(UserWarning, match=f"skipped the measurement.*{cause}"):
        trainer(tmp_path, [HessianEigenvalueMonitor(every_n_steps=2)], max_steps=6).fit(model)
    assert model.trainer.global_step == 6
    assert not any(tag.startswith("landscape/") for tag in read_scalars(tmp_path))


class _ReadAtBatchEnd(pl.Callback):
    """``read()`` after each step, a measurement's included (placed after the monitor)."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read, self.values = read, []

    def on_train_batch_end(self, *args) -> None:
        self.values.append(self.read())


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 64.00 TiB"),
        (RuntimeError, "trying to differentiate twice a function marked with @once_differentiable"),
    ],
)
def test_a_failed_measurement_lets_go_of_its_tensors_at_once(tmp_path, error, message):
    refs: list[weakref.ref] = []

    def loss_keeping_its_error(module, batch):
        logits = module(batch[0])
        refs.append(weakref.ref(logits))
        try:
            raise error(message)
        except RuntimeError as caught:
            kept = caught  # a frame holding its own error: a cycle through the traceback
        raise kept

    monitor = HessianEigenvalueMonitor(every_n_steps=2, loss_fn=loss_keeping_its_error)
    alive = _ReadAtBatchEnd(lambda: [ref() is not None for ref in refs])
    gc.disable()  # what the cycle holds is freed by the monitor, not by a collection
    try:
        with pytest.warns(UserWarning, match="skipped the measurement at step 2"):
            trainer(tmp_path, [monitor, alive], max_steps=2).fit(DigitsModel())
    finally:
        gc.enable()
    assert alive.values == [[], [False]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measurements_out_of_gpu_memory_leave_nothing_that_adds_up(tmp_path):
    def loss_past_the_memory(module, batch):
        loss = F.cross_entropy(module(batch[0]), batch[1])
        torch.empty(1 << 44, device=loss.device)  # 64 TiB, with the pass's graph alive
        return loss

    allocated = {}
    for name, callbacks in (
        ("without", []),
        ("with", [HessianEigenvalueMonitor(every_n_steps=3, loss_fn=loss_past_the_memory)]),
    ):
        pl.seed_everything(0)
        memory = _ReadAtBatchEnd(torch.cuda.memory_allocated)
        fit = trainer(tmp_path / name, [*callbacks, memory], accelerator="gpu", max_steps=9)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit.fit(DigitsModel())
        assert fit.global_step == 9
        allocated[name] = memory.values
    assert any(re.search("skipped the measurement.*out of memory", str(w.message)) for w in record)
    assert not any(tag.startswith("landscape/") for tag in read_scalars(tmp_path / "with"))
    # Memory beyond the unmonitored run's, from the first failed measurement (step 3) on: a
    # failure leaves nothing behind that adds up. (On an H100, before failures collected
    # garbage, the excess grew from the probe's 27 KiB by 172.5 KiB at step 3; the later
    # steps were not seen.)
    excess = [a - b for a, b in zip(allocated["with"], allocated["without"])]
    assert excess[2:] == [excess[2]] * 7


def test_without_logger_values_reach_callback_metrics(tmp_path):
    fit = trainer(tmp_path, [HessianEigenvalueMonitor(every_n_steps=5)], max_steps=5, logger=False)
    with pytest.warns(UserWarning, match="no logger"):
        fit.fit(DigitsModel())
    assert fit.callback_metrics["landscape/hessian/lambda_max"] > 0


def test_fast_dev_run(tmp_path):
    fit = trainer(
        tmp_path,
        [HessianEigenvalueMonitor(every_n_steps=1)],
        fast_dev_run=3,
        max_steps=-1,
        logger=None,
    )
    fit.fit(DigitsModel())
    assert "landscape/hessian/lambda_max" in fit.callback_metrics


class _Manual(DigitsModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


def test_the_threshold_is_that_of_the_optimizer_stepping_the_measured_parameters(tmp_path):
    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2, loss_fn=loss_fn, params=[r"^net\.2\."]),
        HessianEigenvalueMonitor(every_n_steps=2, loss_fn=loss_fn, name="whole"),
    ]
    trainer(tmp_path, monitors, max_steps=2).fit(TwoOptimizers())  # one batch
    logged = read_scalars(tmp_path)
    assert logged["landscape/hessian/stability_threshold"] == {1: pytest.approx(3.8 / 0.01)}
    assert logged["landscape/hessian/whole/lambda_max"].keys() == {1}
    assert "landscape/hessian/whole/stability_threshold" not in logged  # two thresholds


def test_a_cadence_is_kept_when_a_batch_steps_several_optimizers(tmp_path):
    """Two optimiser steps a batch end at even steps: a measurement every 3 steps falls at
    the first batch end past each multiple (global steps 4, 6, 10, 12), not at every 6th
    step alone; it is logged at the loggers' count of batches."""

    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    monitor = HessianEigenvalueMonitor(every_n_steps=3, loss_fn=loss_fn, measure_at_end=False)
    trainer(tmp_path, [monitor], max_steps=12).fit(TwoOptimizers())
    assert sorted(read_scalars(tmp_path)["landscape/hessian/lambda_max"]) == [2, 3, 5, 6]


def test_a_value_short_of_its_tolerance_when_max_iter_runs_out_is_not_logged(tmp_path):
    """Eight products settle λ_max of the digits MLP but not λ_min (−0.37 for −0.44): the
    saddle, which the smallest Ritz value already proves, is logged; λ_min is not."""
    pl.seed_everything(0)
    monitor = HessianEigenvalueMonitor(
        max_iter=8, measure_at_start=True, every_n_steps=None, measure_at_end=False
    )
    model = DigitsModel(arch="mlp")
    with pytest.warns(UserWarning, match=r"max_iter=8 .* step 0: λ_min not logged"):
        trainer(tmp_path, [monitor], max_steps=1).fit(model)
    logged = read_scalars(tmp_path)
    pl.seed_everything(0)
    reference = hessian_eigenvalues(
        DigitsModel(arch="mlp"), training_step_loss, monitor._probe_data, which="both", tol=1e-8
    ).eigenvalues
    assert logged["landscape/hessian/lambda_max"][0] == pytest.approx(float(reference[0]), 1e-2)
    assert logged["landscape/hessian/saddle"] == {0: 1.0}
    assert "landscape/hessian/lambda_min" not in logged
    assert "landscape/hessian/neg_ratio" not in logged


def test_manual_optimization_needs_a_loss_fn(tmp_path):
    with pytest.raises(ValueError, match="manual optimization.*loss_fn"):
        trainer(tmp_path, [HessianEigenvalueMonitor()], max_steps=2).fit(_Manual())

    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    fit = trainer(
        tmp_path, [HessianEigenvalueMonitor(every_n_steps=2, loss_fn=loss_fn)], max_steps=2
    )
    fit.fit(_Manual())
    assert "landscape/hessian/lambda_max" in fit.callback_metrics


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2, measure_at_end=False)
    trainer(tmp_path, [monitor], max_steps=4, accumulate_grad_batches=3).fit(DigitsModel())
    assert sorted(read_scalars(tmp_path)["landscape/hessian/lambda_max"]) == [2, 4]


def test_model_checkpoint_keeps_the_flattest_weights(tmp_path):
    pl.seed_everything(0)
    flattest = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="landscape/hessian/lambda_max",
        mode="min",
        every_n_train_steps=4,
    )
    monitor = HessianEigenvalueMonitor(every_n_steps=4, measure_at_end=False)
    trainer(tmp_path, [monitor, flattest], max_steps=16, enable_checkpointing=True).fit(
        DigitsModel()
    )
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"]
    step = min(logged, key=logged.get)
    assert flattest.best_model_score.item() == pytest.approx(logged[step])
    assert f"step={step}.ckpt" in flattest.best_model_path


class _SeenAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.metrics = dict(trainer.callback_metrics)


def test_resume_continues_cadence_and_warm_start(tmp_path, monkeypatch):
    pl.seed_everything(0)
    first = HessianEigenvalueMonitor(every_n_steps=3)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "a", [first, checkpoint], max_steps=6, enable_checkpointing=True).fit(
        DigitsModel()
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("HessianEigenvalueMonitor")]
    # the start vectors are kept in bfloat16: half the checkpoint bytes, digits to spare
    assert state["warm_start"].dtype == torch.bfloat16 and state["last_step"] == 6
    assert torch.allclose(state["warm_start"].float(), first._warm, rtol=1e-2, atol=1e-4)

    starts = []
    original = hessian_module.lanczos

    def spy(operator, k, which, tol, max_iter, init, *args, **kwargs):
        starts.append(init)
        return original(operator, k, which, tol, max_iter, init, *args, **kwargs)

    monkeypatch.setattr(hessian_module, "lanczos", spy)
    resumed, seen = HessianEigenvalueMonitor(every_n_steps=3), _SeenAtStart()
    fit = trainer(tmp_path / "b", [resumed, seen], max_steps=9, enable_checkpointing=True)
    fit.fit(DigitsModel(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed._probe_indices == first._probe_indices
    assert sorted(read_scalars(tmp_path / "b")["landscape/hessian/lambda_max"]) == [9]
    assert len(starts) == 1 and torch.equal(starts[0], state["warm_start"])  # from the checkpoint
    # the last values stand until the next measurement, e.g. for a ModelCheckpoint on λ_max
    before = {
        tag: steps[6] for tag, steps in read_scalars(tmp_path / "a").items() if "hessian" in tag
    }
    assert state["last_values"] == pytest.approx(before)
    assert {tag: seen.metrics[tag].item() for tag in before} == pytest.approx(before)


def test_warm_start_vectors_can_stay_out_of_checkpoints(tmp_path):
    first = HessianEigenvalueMonitor(every_n_steps=3, checkpoint_warm_start=False)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "a", [first, checkpoint], max_steps=3, enable_checkpointing=True).fit(
        DigitsModel()
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("HessianEigenvalueMonitor")]
    assert state["warm_start"] is None and state["warm_start_preconditioned"] is None
    assert first._warm is not None  # kept for the run's own next measurement

    resumed = HessianEigenvalueMonitor(every_n_steps=3)
    fit = trainer(tmp_path / "b", [resumed], max_steps=6, enable_checkpointing=True)
    fit.fit(DigitsModel(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert sorted(read_scalars(tmp_path / "b")["landscape/hessian/lambda_max"]) == [6]


class _Augmented(torch.utils.data.Dataset):
    """Digits with fresh random noise at every read, as a random augmentation gives."""

    def __init__(self) -> None:
        self.digits = digits()

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index):
        x, y = self.digits[index]
        return x + 0.1 * torch.randn_like(x), y


class _AugmentedDigits(DigitsModel):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Augmented(), batch_size=32, shuffle=True)


def test_the_probe_of_augmented_data_depends_on_the_monitor_seed_alone(tmp_path):
    # e.g. a resumed run, whose global RNG differs, gets back the probe it checkpointed
    probes = []
    for global_seed in (0, 1):
        pl.seed_everything(global_seed)
        monitor = HessianEigenvalueMonitor(every_n_steps=None, measure_at_end=False)
        trainer(tmp_path / str(global_seed), [monitor], max_steps=1).fit(_AugmentedDigits())
        probes.append(monitor._probe_data)
    ((x0, y0),), ((x1, y1),) = probes
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


@pytest.mark.parametrize(
    "drawn, reason",
    [
        ([[[0, 2, 4]], [[1, 3, 5]]], "holds 2 shards for 1 processes"),
        ([[[0, 9999]]], "indexes sample 9999"),
    ],
)
def test_a_checkpointed_probe_that_does_not_fit_the_run_is_drawn_again(tmp_path, drawn, reason):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = HessianEigenvalueMonitor(every_n_steps=2)
    trainer(tmp_path / "a", [first, checkpoint], max_steps=2, enable_checkpointing=True).fit(
        DigitsModel()
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("HessianEigenvalueMonitor")]
    saved["callbacks"][key]["probe_indices_by_rank"] = drawn  # another world or train set
    torch.save(saved, path)

    monitor = HessianEigenvalueMonitor(every_n_steps=2)
    with pytest.warns(UserWarning, match=f"checkpointed probe {reason}"):
        trainer(tmp_path / "b", [monitor], max_steps=4).fit(DigitsModel(), ckpt_path=path)
    assert monitor._probe_indices == first._probe_indices  # drawn again, as at first
    assert 4 in read_scalars(tmp_path / "b")["landscape/hessian/lambda_max"]


class _SmallerTrainSet(DigitsModel):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(digits(40), batch_size=32, shuffle=True)


def test_one_monitor_serves_a_second_fit_on_another_train_set(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2)
    trainer(tmp_path / "a", [monitor], max_steps=4).fit(DigitsModel())
    trainer(tmp_path / "b", [monitor], max_steps=4).fit(_SmallerTrainSet())
    assert max(i for row in monitor._probe_indices[0] for i in row) < 40
    assert sorted(read_scalars(tmp_path / "b")["landscape/hessian/lambda_max"]) == [2, 4]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "`k`"),
        ({"which": "top"}, ValueError, "`which`"),
        ({"tol": 0.0}, ValueError, "`tol`"),
        ({"mode": "inference"}, ValueError, "`mode`"),
        ({"saddle_tol": -1.0}, ValueError, "`saddle_tol`"),
        ({"every_n_steps": 0}, ValueError, "`every_n_steps`"),
        ({"every_n_epochs": 1.5}, TypeError, "`every_n_epochs`"),
        ({"probe": "random"}, ValueError, "`probe`"),
        ({"probe_batches": 0}, ValueError, "`probe_batches`"),
        ({"loss_fn": "mse"}, TypeError, "`loss_fn`"),
        ({"basis_device": "gpu0"}, ValueError, "`basis_device`"),
        ({"name": "first layer"}, ValueError, "`name`"),
        ({"params": 3}, TypeError, "`params`"),
        ({"measure_at_end": "false"}, TypeError, "`measure_at_end`"),
        ({"warm_start": 1}, TypeError, "`warm_start`"),
        ({"checkpoint_warm_start": "no"}, TypeError, "`checkpoint_warm_start`"),
        ({"params": ["net", "[unclosed"]}, ValueError, "`params`"),
        ({"name": ""}, ValueError, "`name`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        HessianEigenvalueMonitor(**kwargs)


def test_params_that_name_no_parameter_fail_when_training_starts(tmp_path):
    monitor = HessianEigenvalueMonitor(params=[r"^encoder\."], name="encoder")
    with pytest.raises(ValueError, match=r"HessianEigenvalueMonitor\(encoder\): `params`"):
        trainer(tmp_path, [monitor], max_steps=2).fit(DigitsModel())


class _FrozenFirstLayer(DigitsModel):
    """Progressive fine-tuning: the first layer starts frozen (a callback unfreezes it later)."""

    def __init__(self) -> None:
        super().__init__(arch="mlp")
        self.net[0].requires_grad_(False)


def test_params_on_a_frozen_block_wait_for_it(tmp_path):
    monitor = HessianEigenvalueMonitor(params=[r"^net\.0\."], every_n_steps=2)
    fit = trainer(tmp_path, [monitor], max_steps=2)
    with pytest.warns(UserWarning, match="matches no trainable parameter"):
        fit.fit(_FrozenFirstLayer())
    assert fit.global_step == 2


def test_the_lanczos_basis_goes_where_asked(tmp_path, monkeypatch):
    devices = []
    original = krylov.KrylovBasis.__init__

    def spy(self, operator, capacity, basis_device=None):
        devices.append(basis_device)
        original(self, operator, capacity, basis_device)

    monkeypatch.setattr(krylov.KrylovBasis, "__init__", spy)
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=None, basis_device="cpu"),
        HessianSpectrumMonitor(every_n_epochs=None, n_steps=4, basis_device="cpu"),
    ]
    trainer(tmp_path, monitors, max_steps=2).fit(DigitsModel())
    assert devices == ["cpu", "cpu"]  # one Lanczos run, one SLQ vector


class _WithValidation(DigitsModel):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def val_dataloader(self):
        return self.train_dataloader()


def test_bf16_mixed_precision_is_measured_in_float32_alongside_validation(tmp_path, recwarn):
    pl.seed_everything(0)
    model = _WithValidation()
    monitor = HessianEigenvalueMonitor(every_n_steps=4, measure_at_end=False, tol=1e-6)
    fit = trainer(tmp_path, [monitor], max_steps=8, precision="bf16-mixed", val_check_interval=4)
    fit.fit(model)
    logged = read_scalars(tmp_path)
    assert "val_loss" in logged
    assert not [w for w in recwarn if w.category is ReducedPrecisionWarning]
    expected = hessian_eigenvalues(
        model, training_step_loss, monitor._probe_data, which="both", tol=1e-6
    )
    assert logged["landscape/hessian/lambda_max"][8] == pytest.approx(
        expected.eigenvalues[0].item(), rel=1e-4
    )


class _AutocastInStep(DigitsModel):
    def training_step(self, batch, batch_idx):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return super().training_step(batch, batch_idx)


def test_an_autocast_inside_training_step_is_reported_and_the_run_measured(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2, measure_at_end=False)
    fit = trainer(tmp_path, [monitor], max_steps=4)
    with pytest.warns(ReducedPrecisionWarning, match=r"^the loss ran `net.1` \(Conv2d\)"):
        fit.fit(_AutocastInStep())
    assert sorted(read_scalars(tmp_path)["landscape/hessian/lambda_max"]) == [2, 4]


class _FreshNoise(DigitsModel):
    """Input noise from a generator created in every ``training_step``: as from fresh
    entropy, new draws each time, but the same in every run of the test."""

    def __init__(self) -> None:
        super().__init__()
        self.seeds = itertools.count()

    def training_step(self, batch, batch_idx):
        x, y = batch
        noise = torch.as_tensor(np.random.default_rng(next(self.seeds)).normal(size=x.shape))
        return super().training_step((x + 0.05 * noise.to(x), y), batch_idx)


def test_a_loss_random_at_every_pass_is_skipped_with_its_cause(tmp_path):
    # one probe batch: one retained graph serves every product, so there is one draw
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2, measure_at_end=False),
        HessianEigenvalueMonitor(every_n_steps=2, probe_batches=2, name="two"),
    ]
    with pytest.warns(UserWarning, match="step 2: the loss of probe batch 0 changed between"):
        trainer(tmp_path, monitors, max_steps=4).fit(_FreshNoise())
    logged = read_scalars(tmp_path)
    assert sorted(logged["landscape/hessian/lambda_max"]) == [2, 4]
    assert "landscape/hessian/two/lambda_max" not in logged


def test_a_train_set_smaller_than_the_probe_still_gets_measured(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2, probe_batches=20)  # 20 x 32 > 256 samples
    fit = trainer(tmp_path, [monitor], max_steps=2)
    fit.fit(DigitsModel())
    assert len(monitor._probe_data) == 8 and "landscape/hessian/lambda_max" in fit.callback_metrics


class _StreamingModel(DigitsModel):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(DigitsStream(), batch_size=32)


def test_iterable_data_probes_the_first_live_batches(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=3, probe_batches=2, measure_at_end=False)
    trainer(tmp_path, [monitor], max_steps=6).fit(_StreamingModel())
    x, _ = digits().tensors
    assert monitor._probe_indices is None
    assert torch.equal(monitor._probe_data[1][0].cpu(), x[32:64])  # the second batch, kept
    assert sorted(read_scalars(tmp_path)["landscape/hessian/lambda_max"]) == [3, 6]


class _ReversedStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(zip(*(t.flip(0) for t in digits().tensors)))


class _ReversedStreamingModel(DigitsModel):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_ReversedStream(), batch_size=32)


def test_a_second_fit_on_live_batches_probes_its_own(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=3, measure_at_end=False)
    trainer(tmp_path / "a", [monitor], max_steps=3).fit(_StreamingModel())
    trainer(tmp_path / "b", [monitor], max_steps=3).fit(_ReversedStreamingModel())
    x, _ = digits().tensors
    ((probe, _),) = monitor._probe_data
    assert torch.equal(probe.cpu(), x.flip(0)[:32])


def test_sharded_strategies_are_refused_by_name():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    fake_trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="FSDPStrategy"):
        HessianEigenvalueMonitor().setup(fake_trainer, DigitsModel(), "fit")


def test_gradient_clipping_leaves_the_run_unchanged(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2)
    assert_run_unchanged(tmp_path, [monitor], max_steps=8, gradient_clip_val=0.05)


class _InOrder(NaNPastTheHead):
    shuffle = False


@pytest.mark.parametrize(
    ("model_class", "cut_short"),
    [(NaNPastTheHead, {"overfit_batches": 2}), (_InOrder, {"limit_train_batches": 2})],
)
def test_the_probe_of_a_run_that_trains_on_its_first_batches_comes_from_them(
    tmp_path, model_class, cut_short
):
    # Drawn from the whole train set, the probe would hold NaN samples and every
    # measurement would be skipped.
    monitor = HessianEigenvalueMonitor(every_n_steps=2, measure_at_start=True, tol=1e-8)
    fit = trainer(tmp_path, [monitor], max_steps=4, **cut_short)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*skipped the measurement")
        fit.fit(model_class(arch="mlp"))
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"]
    assert set(logged) == {0, 2, 4}
    assert all(np.isfinite(value) for value in logged.values())
