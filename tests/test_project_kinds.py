"""The monitors dropped into kinds of Lightning projects the plain digits CNN does not
cover: bare-tensor batches (Lightning's own ``BoringModel``, one sample per batch), true
half and double precision, batch hooks, a compiled network, a frozen BatchNorm, metrics
and outputs collected in ``training_step``, a network reachable under two names, an EMA
teacher updated in ``training_step``, Lightning's pruning, sparse embeddings, activation
checkpointing, several train loaders zipped into one batch, a gradient penalty, spectral
normalisation, complex (Fourier) weights, weight averaging."""

import copy
import dataclasses
import gc
import os
import threading
import weakref
from collections import OrderedDict, defaultdict, deque

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateFinder,
    LearningRateMonitor,
    ModelPruning,
    StochasticWeightAveraging,
)
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from lightning_landscape import (
    BatchSizeScheduler,
    GradientNoiseScaleMonitor,
    GradientNormMonitor,
    HessianEigenvalueMonitor,
    HessianSpectrumMonitor,
    LossLandscapeMonitor,
    SharpnessMonitor,
)
from lightning_landscape._batches import copy_batch, holds_opaque, tensors_in
from lightning_landscape._context import _no_cudnn_for_recurrent
from lightning_landscape.callbacks._loss import (
    COPY_BUDGET,
    LOOKED_INTO,
    attributes_kept,
    training_step_loss,
)
from lightning_landscape.callbacks._probe import CurrentBatch
from lightning_landscape.callbacks.base import measurement_dtype
from lightning_landscape.curvature import hessian_eigenvalues
from lightning_landscape.gradients import gradient_noise_scale
from lightning_landscape.report import read_runs
from tests.lightning_support import (
    PRECISION,
    CustomBatches,
    DigitsModel,
    DigitsStream,
    FourierDigits,
    FourierDigitsTwin,
    Graphs,
    TwoOptimizers,
    assert_run_unchanged,
    digits,
    graphs_count,
    read_scalars,
    trainer,
)
from tests.support import dense_hessian, input_gradient_penalty


def _every_probe_monitor(every_n_steps):
    return [
        HessianEigenvalueMonitor(every_n_steps=every_n_steps),
        HessianSpectrumMonitor(every_n_epochs=None),
        SharpnessMonitor(every_n_steps=every_n_steps),
        GradientNoiseScaleMonitor(every_n_steps=every_n_steps),
        LossLandscapeMonitor(),
    ]


def test_every_probe_monitor_measures_bare_tensor_batches(tmp_path):
    pl.seed_everything(0)
    monitors = [  # one-sample batches cannot be split into micro-batches (next test)
        m for m in _every_probe_monitor(4) if not isinstance(m, GradientNoiseScaleMonitor)
    ]
    eigen = monitors[0]
    trainer(tmp_path, monitors, max_steps=8).fit(BoringModel())
    logged = read_scalars(tmp_path)
    (x,) = eigen._probe_data  # one batch: a (1, 32) tensor
    # mean squared error of a 32 -> 2 linear layer on one sample: each output's block of
    # the Hessian is z zᵀ with z = [x, 1], so the eigenvalues are |x|² + 1 (twice) and 0
    curvature = float(x.pow(2).sum()) + 1
    assert logged["landscape/hessian/lambda_max"][8] == pytest.approx(curvature, rel=1e-4)
    assert logged["landscape/hessian/lambda_min"][8] == pytest.approx(0, abs=1e-3 * curvature)
    assert logged["landscape/hessian/saddle"][8] == 0.0
    assert logged["landscape/spectrum/trace"][8] == pytest.approx(2 * curvature, rel=1e-4)
    assert set(logged["landscape/sharpness/sam"]) == {4, 8}
    assert set(logged["landscape/slices/center_loss"]) == {8}


class _LastBatchWatched(pl.Callback):
    def __init__(self) -> None:
        self.alive = lambda: True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.alive = weakref.ref(batch[0])  # a weak reference answers whether it lives


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_after_fit_the_monitors_hold_no_batch_on_the_accelerator(tmp_path, probe):
    """An unmonitored run lets go of its last batch when fit ends, and so must a monitored
    one. A fixed probe stays, for the functional API, on the CPU with the module."""
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2, probe=probe),
        HessianSpectrumMonitor(every_n_epochs=None, probe=probe),
        SharpnessMonitor(every_n_steps=2, probe=probe),
        GradientNoiseScaleMonitor(every_n_steps=2, probe=probe),
        LossLandscapeMonitor(probe=probe, resolution=3),
    ]
    watched = _LastBatchWatched()
    trainer(tmp_path, [*monitors, watched], max_steps=4).fit(DigitsModel())
    gc.collect()
    assert watched.alive() is None
    probes = [t for m in monitors for t in tensors_in(m._probe_data)]
    assert bool(probes) == (probe == "fixed")
    assert all(t.device.type == "cpu" for t in probes)


@dataclasses.dataclass
class _DigitsBatch:
    images: torch.Tensor
    labels: torch.Tensor


def _collate_dataclass(rows):
    return _DigitsBatch(*torch.utils.data.default_collate(rows))


class _DataclassBatches(DigitsModel):
    """Batches as a dataclass, which Lightning moves field by field."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            digits(),
            batch_size=self.hparams.batch_size,
            shuffle=True,
            collate_fn=_collate_dataclass,
        )

    def training_step(self, batch, batch_idx):
        return super().training_step((batch.images, batch.labels), batch_idx)


def test_dataclass_batches_are_measured_as_their_tuple_twins(tmp_path):
    # the noise scale splits the batch into micro-batches, which needs its tensors
    logged = []
    for name, model_class in (("dataclass", _DataclassBatches), ("tuple", DigitsModel)):
        pl.seed_everything(0)
        trainer(tmp_path / name, _every_probe_monitor(4), max_steps=4).fit(model_class())
        logged.append(read_scalars(tmp_path / name))
    measured = {tag for tag in logged[1] if tag.startswith("landscape/") and "seconds" not in tag}
    assert "landscape/noise_scale/b_simple" in measured
    for tag in measured:
        assert logged[0][tag] == pytest.approx(logged[1][tag], rel=1e-5), tag


def test_several_probe_batches_of_a_custom_type_are_weighted_by_batch_size_fn(tmp_path, recwarn):
    pl.seed_everything(0)
    model = CustomBatches()
    monitor = HessianEigenvalueMonitor(
        every_n_steps=3, probe_batches=2, tol=1e-4, batch_size_fn=graphs_count
    )
    trainer(tmp_path, [monitor], max_steps=3).fit(model)
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    probe = [(batch.x, batch.y) for batch in monitor._probe_data]
    expected = hessian_eigenvalues(
        model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), probe, tol=1e-6
    )
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"][3]
    assert logged == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4)


class _TwoLoaders(DigitsModel):
    """Two datasets trained on together: Lightning zips their batches, of different sizes,
    into one dict."""

    def training_step(self, batch, batch_idx):
        (xa, ya), (xb, yb) = batch["a"], batch["b"]
        loss = F.cross_entropy(self(xa), ya) + 0.5 * F.cross_entropy(self(xb), yb)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        return {
            "a": torch.utils.data.DataLoader(digits(), batch_size=32, shuffle=True),
            "b": torch.utils.data.DataLoader(digits(128), batch_size=16, shuffle=True),
        }


def test_every_probe_monitor_measures_the_batches_of_several_loaders(tmp_path, recwarn):
    # The noise scale's micro-batches cut the shorter loader's batch empty: a NaN loss.
    trainer(tmp_path, _every_probe_monitor(3), max_steps=3).fit(_TwoLoaders())
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    logged = read_scalars(tmp_path)
    for tag in ("hessian/lambda_max", "noise_scale/b_simple", "sharpness/sam", "spectrum/trace"):
        assert np.isfinite(logged[f"landscape/{tag}"][3])


class _GradientPenalty(DigitsModel):
    """An input-gradient penalty in ``training_step`` (R1, Jacobian regularisation)."""

    def training_step(self, batch, batch_idx):
        loss = input_gradient_penalty(self, batch)
        self.log("train_loss", loss)
        return loss


def test_every_probe_monitor_measures_a_loss_that_differentiates_inside(tmp_path, recwarn):
    # The loss-only passes of sharpness and slices ran with autograd off: the penalty raised.
    trainer(tmp_path, _every_probe_monitor(3), max_steps=3).fit(_GradientPenalty())
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    logged = read_scalars(tmp_path)
    assert np.isfinite(logged["landscape/sharpness/sam"][3])
    assert [tag for tag in logged if tag.startswith("landscape/slices")]


def test_a_batch_too_small_to_split_warns_once_and_training_goes_on(tmp_path):
    monitor = GradientNoiseScaleMonitor(every_n_steps=2)
    fit = trainer(tmp_path, [monitor], max_steps=8)
    with pytest.warns(
        UserWarning, match="skipped the measurement at step 2: a batch of 1"
    ) as caught:
        fit.fit(BoringModel())
    assert len([w for w in caught if "GradientNoiseScaleMonitor" in str(w.message)]) == 1
    assert fit.global_step == 8
    assert not [tag for tag in read_scalars(tmp_path) if "noise_scale" in tag]


@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "16-true"])
def test_every_probe_monitor_measures_under_true_precisions(tmp_path, precision, recwarn):
    pl.seed_everything(0)
    trainer(tmp_path, _every_probe_monitor(2), max_steps=4, precision=precision).fit(DigitsModel())
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    logged = read_scalars(tmp_path)
    for tag in ("hessian/lambda_max", "spectrum/trace", "sharpness/sam", "noise_scale/b_simple"):
        assert 4 in logged[f"landscape/{tag}"], tag
    assert 4 in logged["landscape/slices/center_loss"]


@pytest.mark.parametrize(
    ("weights", "measured"),
    [
        (torch.complex128, None),
        (torch.complex64, None),
        (torch.complex32, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_measurements_run_at_the_precision_of_the_weights_or_float32(weights, measured):
    """A complex weight's precision is that of its real coordinates."""
    assert measurement_dtype(torch.nn.Linear(2, 2, dtype=weights)) == measured


class _ScaledInHook(DigitsModel):
    """Raw pixel values (0-16) from the loader, scaled in ``on_before_batch_transfer``."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        raw = torch.utils.data.TensorDataset(
            loader.dataset.tensors[0] * 16, loader.dataset.tensors[1]
        )
        return torch.utils.data.DataLoader(raw, batch_size=loader.batch_size, shuffle=True)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x / 16, y


def test_the_fixed_probe_goes_through_the_batch_hooks_training_batches_go_through(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2)
    trainer(tmp_path, [monitor], max_steps=2).fit(_ScaledInHook())
    ((x, _),) = monitor._probe_data
    assert 0.9 < float(x.max()) <= 1.0


class _CompiledNet(DigitsModel):
    """The network wrapped in ``torch.compile``, as users do in ``__init__``."""

    def __init__(self) -> None:
        super().__init__()
        # aot_eager compiles fast and, like inductor, has no double backward
        self.net = torch.compile(self.net, backend="aot_eager")


def _fit_measured(tmp_path, model, recwarn) -> tuple[float, list]:
    """λ_max the eigenvalue monitor logs at the last of 10 steps, and its probe; no
    measurement may have been skipped."""
    monitor = HessianEigenvalueMonitor(every_n_steps=5, measure_at_end=False, tol=1e-4)
    trainer(tmp_path, [monitor], max_steps=10).fit(model)
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    return read_scalars(tmp_path)["landscape/hessian/lambda_max"][10], monitor._probe_data


def _assert_measured_as_the_functional_api(tmp_path, model, recwarn) -> None:
    """The monitor's λ_max (no measurement skipped) is the functional API's on its probe."""
    logged, probe = _fit_measured(tmp_path, model, recwarn)
    assert logged == pytest.approx(_top_eigenvalue(model, probe), rel=1e-4)


def _top_eigenvalue(model, probe, mode="train") -> float:
    """The functional API's λ_max of the training-step loss, to compare with the monitor's."""
    result = hessian_eigenvalues(model, training_step_loss, probe, tol=1e-6, mode=mode)
    return result.eigenvalues[0].item()


def test_a_compiled_network_is_measured_eagerly(tmp_path, recwarn):
    pl.seed_everything(0)
    model = _CompiledNet()
    logged, probe = _fit_measured(tmp_path, model, recwarn)
    model.net = model.net._orig_mod
    assert logged == pytest.approx(_top_eigenvalue(model, probe), rel=1e-4)


def test_a_compiled_network_trains_as_without_monitors(tmp_path):
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), _CompiledNet, max_steps=9)


class _SpectrallyNormalised(DigitsModel):
    """A GAN discriminator's normalisation: the convolution by a parametrization, the head
    by the older hook; each training step takes a step of their power iterations."""

    def __init__(self) -> None:
        super().__init__()
        torch.nn.utils.parametrizations.spectral_norm(self.net[1])
        torch.nn.utils.spectral_norm(self.net[6])


def test_a_spectrally_normalised_network_is_measured(tmp_path, recwarn):
    pl.seed_everything(0)
    _assert_measured_as_the_functional_api(tmp_path, _SpectrallyNormalised(), recwarn)


def test_a_spectrally_normalised_network_trains_as_without_monitors(tmp_path):
    """Measured by exact singular values, it leaves the power iterations' vectors where
    training put them."""
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), _SpectrallyNormalised, max_steps=9)


_COMPLEX_TRAINING = pytest.mark.skipif(
    PRECISION == "16-mixed",
    reason="torch's GradScaler cannot unscale complex gradients, with or without monitors "
    "(_amp_foreach_non_finite_check_and_unscale_ is not implemented for ComplexFloat)",
)


@_COMPLEX_TRAINING
def test_a_fourier_network_is_measured_as_its_real_twin(tmp_path, recwarn):
    """Every monitor logs the values of the twin's run, Adam's preconditioned sharpness
    (which scales each real coordinate by its own second moment) among them, and slices
    the same landscape (from the initial weights too)."""
    runs, slices = [], []
    for model_class in (FourierDigits, FourierDigitsTwin):
        pl.seed_everything(0)
        log_dir = tmp_path / model_class.__name__
        monitors = [
            *_every_probe_monitor(3)[:-1],
            LossLandscapeMonitor(from_init=True),
            GradientNormMonitor(),
        ]
        trainer(log_dir, monitors, max_steps=6).fit(model_class())
        runs.append(read_scalars(log_dir))
        (saved,) = log_dir.glob("**/landscape/slices_step6.pt")
        slices.append(torch.load(saved))
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    measured, twin = runs
    assert measured.keys() == twin.keys()
    assert 6 in measured["landscape/hessian/preconditioned_lambda_max"]
    for tag, values in twin.items():
        if not tag.endswith("/seconds"):
            assert measured[tag] == pytest.approx(values, rel=1e-5), tag
    assert slices[0].keys() >= {"line", "surface", "from_init"}
    torch.testing.assert_close(*slices, rtol=1e-5, atol=0)


@_COMPLEX_TRAINING
def test_a_fourier_network_trains_as_without_monitors(tmp_path):
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), FourierDigits, max_steps=9)


class _FrozenBatchNorm(DigitsModel):
    """Fine-tuning style: the BatchNorm layer trains in eval mode (frozen statistics)."""

    def on_fit_start(self) -> None:
        self.net[2].eval()


@pytest.mark.filterwarnings("ignore:Found 1 module.s. in eval mode")  # Lightning's, wanted here
def test_train_mode_measures_each_submodule_in_the_mode_it_trains_in(tmp_path, recwarn):
    pl.seed_everything(0)
    model = _FrozenBatchNorm()
    logged, probe = _fit_measured(tmp_path, model, recwarn)
    assert not model.net[2].training and model.net[5].training  # the run's modes, kept
    assert logged == pytest.approx(_top_eigenvalue(model, probe, mode=None), rel=1e-4)
    # forcing train mode would measure the BatchNorm on batch statistics
    assert logged != pytest.approx(_top_eigenvalue(model, probe, mode="train"), rel=1e-2)


class _WithMetrics(DigitsModel):
    """torchmetrics updated in training_step: a tensor state and a list state."""

    def __init__(self) -> None:
        super().__init__()
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(10)
        self.train_auroc = torchmetrics.classification.MulticlassAUROC(10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.train_auroc.update(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)

    def on_train_epoch_end(self) -> None:
        self.log("train_auroc", self.train_auroc.compute())
        self.train_auroc.reset()


class _AliasedBackbone(DigitsModel):
    """The network also reachable as ``backbone``, as projects name it for Lightning's
    ``BackboneFinetuning``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = self.net


def test_a_network_reachable_under_two_names_trains_as_without_monitors(tmp_path):
    # torch's functional_call swapped its tensors twice and left the measurement's
    # copies in the module: the optimizer then stepped parameters the network no longer used
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), _AliasedBackbone, max_steps=9)


def test_a_network_reachable_under_two_names_is_selected_by_either(tmp_path, recwarn):
    pl.seed_everything(0)
    model = _AliasedBackbone()
    monitor = HessianEigenvalueMonitor(
        params=r"^backbone\.", every_n_steps=5, measure_at_end=False, tol=1e-4
    )
    trainer(tmp_path, [monitor], max_steps=5).fit(model)
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"][5]
    expected = hessian_eigenvalues(
        model, training_step_loss, monitor._probe_data, params=r"^net\.", tol=1e-6
    )
    assert logged == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4)


class _EMATeacher(DigitsModel):
    """Self-distillation from a teacher that ``training_step`` moves in place towards the
    student, as hand-written BYOL or DINO projects do."""

    momentum = 0.9

    def __init__(self) -> None:
        super().__init__(arch="mlp")
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.net.parameters()):
                self.move(t, s)
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y) + F.mse_loss(logits, self.teacher(x))

    def move(self, teacher: torch.Tensor, student: torch.Tensor) -> None:
        teacher.lerp_(student, 1 - self.momentum)


class _EMATeacherThroughData(_EMATeacher):
    """The teacher moved through ``.data``, as DINO's code does, which leaves the version
    counters alone: no training step shows the write."""

    def move(self, teacher: torch.Tensor, student: torch.Tensor) -> None:
        teacher.data.mul_(self.momentum).add_(student.data, alpha=1 - self.momentum)


def _distillation_loss(module, batch):
    """The loss of ``_EMATeacher.training_step``, its teacher update applied to a copy."""
    moved = {
        name: t.lerp(s.detach(), 1 - module.momentum)
        for (name, t), s in zip(module.teacher.named_parameters(), module.net.parameters())
    }
    x, y = batch
    logits = module(x)
    return F.cross_entropy(logits, y) + F.mse_loss(
        logits, functional_call(module.teacher, moved, x)
    )


class _NormalizedPrototypes(DigitsModel):
    """A trained layer whose rows ``training_step`` normalises in place, as SwAV does with
    its prototypes: a write to a parameter the measurements differentiate."""

    def __init__(self) -> None:
        super().__init__(arch="mlp")

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            prototypes = self.net[2].weight
            prototypes.copy_(F.normalize(prototypes, dim=1))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("model_class", [_EMATeacher, _NormalizedPrototypes])
def test_parameters_written_in_training_step_train_as_without_monitors(tmp_path, model_class):
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), model_class, max_steps=9)


def test_every_forward_pass_of_a_measurement_sees_the_teacher_one_update_ahead(tmp_path, recwarn):
    pl.seed_everything(0)
    model = _EMATeacher()
    # two probe batches: every product re-runs training_step, so a teacher moved by each
    # pass would drift from product to product
    monitor = HessianEigenvalueMonitor(
        every_n_steps=5, measure_at_end=False, tol=1e-4, probe_batches=2
    )
    trainer(tmp_path, [monitor], max_steps=10).fit(model)
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"][10]
    expected = hessian_eigenvalues(model, _distillation_loss, monitor._probe_data, tol=1e-6)
    assert logged == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4)


# At the start no training step has shown the update yet; one through .data never shows.
@pytest.mark.parametrize("model_class", [_EMATeacher, _EMATeacherThroughData])
def test_a_measurement_that_moves_the_teacher_unseen_is_skipped_and_later_ones_keep_it(
    tmp_path, model_class
):
    pl.seed_everything(0)
    monitor = HessianEigenvalueMonitor(
        every_n_steps=4, measure_at_start=True, measure_at_end=False, tol=1e-4, probe_batches=2
    )
    with pytest.warns(
        UserWarning, match=r"step 0: its loss function wrote the parameters \['teacher"
    ):
        trainer(tmp_path, [monitor], max_steps=8).fit(model := model_class())
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"]
    assert sorted(logged) == [4, 8]
    # the teacher stood still through the last measurement's products
    expected = hessian_eigenvalues(model, _distillation_loss, monitor._probe_data, tol=1e-6)
    assert logged[8] == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4)


class _StepCounter(DigitsModel):
    """Counts its training steps in an integer parameter (moved by ``.to()``, checkpointed),
    in place in ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.steps_seen = torch.nn.Parameter(torch.zeros((), dtype=torch.long), requires_grad=False)

    def training_step(self, batch, batch_idx):
        self.steps_seen += 1
        return super().training_step(batch, batch_idx)


class _OwnGenerators(DigitsModel):
    """Input noise drawn in ``training_step`` from generators the module holds."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = torch.Generator().manual_seed(0)
        self.scale = np.random.default_rng(0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        noise = torch.randn(x.shape, generator=self.noise) * float(self.scale.uniform())
        return super().training_step((x + 0.05 * noise.to(x.device), y), batch_idx)


def test_generators_the_module_holds_train_as_without_monitors(tmp_path):
    # each forward pass of a measurement drew from them, moving the run's noise
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), _OwnGenerators, max_steps=9)


_SCRIPT_RNG = np.random.default_rng(0)  # a training script's own generator


class _ScriptGenerator(DigitsModel):
    """Input noise drawn in ``training_step`` from a generator the script holds globally."""

    def __init__(self) -> None:
        super().__init__()
        _SCRIPT_RNG.bit_generator.state = np.random.default_rng(
            0
        ).bit_generator.state  # a new script

    def training_step(self, batch, batch_idx):
        x, y = batch
        noise = torch.as_tensor(_SCRIPT_RNG.normal(size=tuple(x.shape))).to(x)
        return super().training_step((x + 0.05 * noise, y), batch_idx)


def test_a_generator_the_script_holds_trains_as_without_monitors(tmp_path):
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), _ScriptGenerator, max_steps=9)


def test_an_integer_parameter_counted_in_training_step_trains_as_without_monitors(tmp_path):
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), _StepCounter, max_steps=9)


def test_attributes_come_back_in_place_and_added_ones_go():
    module = torch.nn.Linear(2, 2)
    module.outputs, module.totals, module.seen = [1], {"a": 1}, {1}
    module.recent, module.ordered = deque([1], maxlen=2), OrderedDict(a=1)
    module.counts, module.steps = defaultdict(int, a=1), 3
    containers = ("outputs", "totals", "seen", "recent", "ordered", "counts")
    held = {name: getattr(module, name) for name in containers}
    with attributes_kept(module):
        module.outputs.append(2)
        module.totals["b"] = 2
        module.seen.add(2)
        module.recent.append(2)
        module.ordered["b"] = 2
        module.counts["b"] += 1
        module.steps += 1
        module.cache = torch.ones(1)
    assert all(getattr(module, name) is held[name] for name in containers)  # the user's own
    assert (module.outputs, module.totals, module.seen) == ([1], {"a": 1}, {1})
    assert list(module.recent) == [1] and module.recent.maxlen == 2
    assert list(module.ordered.items()) == [("a", 1)] and dict(module.counts) == {"a": 1}
    assert module.steps == 3 and not hasattr(module, "cache")


def test_tensors_and_nested_containers_of_attributes_come_back():
    module = torch.nn.Linear(2, 2)
    module.loss_sum, module.history = torch.zeros(()), {"train": [1], "hits": torch.zeros(3)}
    module.pair = (torch.zeros(2), [1])
    with attributes_kept(module):
        module.loss_sum += 1.5
        module.history["train"].append(2)
        module.history["hits"][1] += 1
        module.pair[0].add_(1)
        module.pair[1].append(2)
    assert module.loss_sum.item() == 0 and module.history["train"] == [1]
    assert not module.history["hits"].any() and not module.pair[0].any()
    assert module.pair[1] == [1]


def test_tensors_held_as_attributes_are_copied_before_those_deeper_in_containers():
    module = torch.nn.Linear(2, 2)
    module.samples = [torch.zeros(COPY_BUDGET // 4) for _ in range(5)]
    module.count = torch.zeros(())  # assigned after a list that exceeds the budget
    module.data = list(range(LOOKED_INTO + 1))  # too long to look into
    with attributes_kept(module):
        module.count += 1
        module.samples[0] += 1
        module.data.append(-1)
    assert module.count.item() == 0 and not module.samples[0].any()
    assert module.data == list(range(LOOKED_INTO + 1))


def test_a_large_tensor_attribute_written_in_place_is_reported():
    module = torch.nn.Linear(2, 2)
    module.queue = torch.zeros(COPY_BUDGET + 1)
    written = r"wrote into \['queue'\] in place.*register_buffer"
    with pytest.warns(UserWarning, match=written), attributes_kept(module):
        module.queue[0] = 1.0


class _RunningSum(DigitsModel):
    """Sums its losses into a tensor attribute in place (not a buffer, so it stays on the
    CPU when the module moves to a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_sum = torch.zeros((), dtype=torch.float64)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.loss_sum += loss.detach().cpu()
        return loss


def test_a_running_sum_kept_in_a_tensor_attribute_sums_the_training_losses_alone(tmp_path):
    sums = []
    for name, callbacks in (("without", []), ("with", _every_probe_monitor(3))):
        pl.seed_everything(0)
        model = _RunningSum()
        trainer(tmp_path / name, callbacks, max_steps=6).fit(model)
        sums.append(model.loss_sum.item())
    assert sums[0] == sums[1]


class _EpochOutputs(DigitsModel):
    """Lightning's recipe for epoch-level values: ``training_step`` appends its loss to a
    list that ``on_train_epoch_end`` reduces and clears, keeps the last few in a deque and
    counts the samples seen."""

    def __init__(self) -> None:
        super().__init__()
        self.step_losses: list[torch.Tensor] = []
        self.recent_losses: deque[torch.Tensor] = deque(maxlen=3)
        self.samples_seen = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append(loss.detach())
        self.recent_losses.append(loss.detach())
        self.samples_seen += len(batch[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("epoch_loss", torch.stack(self.step_losses).mean())
        self.log("recent_loss", torch.stack(list(self.recent_losses)).mean())
        self.log("samples_seen", float(self.samples_seen))
        self.step_losses.clear()


@pytest.mark.filterwarnings("ignore:.*has no logger")
@pytest.mark.parametrize(
    ("model_class", "keys"),
    [
        (_WithMetrics, ("train_acc", "train_auroc")),
        (_EpochOutputs, ("epoch_loss", "recent_loss", "samples_seen")),
    ],
)
def test_what_training_step_collects_logs_as_without_monitors(tmp_path, model_class, keys):
    logged = []
    for callbacks in ([], _every_probe_monitor(3)):
        pl.seed_everything(0)
        fit = trainer(tmp_path, callbacks, max_steps=16, logger=False)  # two epochs
        fit.fit(model_class())
        logged.append({k: fit.callback_metrics[k].item() for k in keys})
    assert logged[0] == logged[1]


class _LogsThroughTheExperiment(DigitsModel):
    """Writes to the logger itself in ``training_step``, at the first batch of each epoch
    (where projects log sample images)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 0:
            self.logger.experiment.add_scalar("first_batch_loss", loss, self.global_step)
            self.logger.log_metrics({"first_batch_size": float(len(batch[0]))}, self.global_step)
        return loss


class _SavesUnderTheLogDir(DigitsModel):
    """Saves a sample under the logger's folder in ``training_step``."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            folder = os.path.join(self.logger.log_dir, f"{self.logger.name}_samples")
            os.makedirs(folder, exist_ok=True)
            torch.save(batch[0][:4], os.path.join(folder, f"step{self.global_step}.pt"))
        return super().training_step(batch, batch_idx)


def test_training_step_still_reads_where_the_logger_writes(tmp_path, recwarn):
    trainer(tmp_path, _every_probe_monitor(3), max_steps=3).fit(_SavesUnderTheLogDir())
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    assert 3 in read_scalars(tmp_path)["landscape/hessian/lambda_max"]


class _ScalesItsBatch(DigitsModel):
    """Scales its batch in place, as ``images /= 255`` does on a float batch."""

    def training_step(self, batch, batch_idx):
        batch[0] /= 2.0
        return super().training_step(batch, batch_idx)


def test_a_training_step_that_writes_into_its_batch_is_measured_on_the_probe_as_drawn(
    tmp_path,
):
    # two probe batches: every product re-runs training_step, which scaled the kept probe
    # again each time
    pl.seed_everything(0)
    model = _ScalesItsBatch()
    monitor = HessianEigenvalueMonitor(every_n_steps=5, tol=1e-4, probe_batches=2)
    trainer(tmp_path, [monitor], max_steps=5).fit(model)
    assert max(x.max().item() for x, _ in monitor._probe_data) == 1.0  # pixels as drawn
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"][5]
    halved = [(x / 2, y) for x, y in monitor._probe_data]
    expected = hessian_eigenvalues(
        model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), halved, tol=1e-6
    )
    assert logged == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4)


class _KeepsBatchesAsDrawn(pl.Callback):
    """Copies of the training batches as the loader gave them."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(copy.deepcopy(batch))


def test_a_training_step_that_writes_into_its_batch_is_measured_on_the_current_batch_as_drawn(
    tmp_path,
):
    # the noise-scale monitor measures the current batch by default
    pl.seed_everything(0)
    model, drawn = _ScalesItsBatch(), _KeepsBatchesAsDrawn()
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=5, tol=1e-4, probe="current"),
        GradientNoiseScaleMonitor(every_n_steps=5),
    ]
    trainer(tmp_path, [drawn, *monitors], max_steps=5).fit(model)
    x, y = drawn.batches[-1]
    halved = (x / 2, y)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    logged = read_scalars(tmp_path)
    expected = hessian_eigenvalues(model, loss, halved, tol=1e-6)
    assert logged["landscape/hessian/lambda_max"][5] == pytest.approx(
        expected.eigenvalues[0].item(), rel=1e-4
    )
    noise = gradient_noise_scale(model, loss, halved)
    assert logged["landscape/noise_scale/grad_sq"][5] == pytest.approx(noise.grad_sq, rel=1e-5)


class _ScalesItsBatchFromTheSecond(DigitsModel):
    def training_step(self, batch, batch_idx):
        if self.global_step > 0:
            batch[0] /= 2.0
        return super().training_step(batch, batch_idx)


def test_a_batch_written_by_a_step_unlike_the_first_is_not_measured_and_later_ones_are(
    tmp_path,
):
    pl.seed_everything(0)
    model, drawn = _ScalesItsBatchFromTheSecond(), _KeepsBatchesAsDrawn()
    monitor = HessianEigenvalueMonitor(
        every_n_steps=2, tol=1e-4, probe="current", measure_at_end=False
    )
    with pytest.warns(UserWarning, match="step 2: training_step wrote into its batch"):
        trainer(tmp_path, [drawn, monitor], max_steps=4).fit(model)
    logged = read_scalars(tmp_path)["landscape/hessian/lambda_max"]
    assert sorted(logged) == [4]
    x, y = drawn.batches[-1]
    expected = hessian_eigenvalues(
        model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x / 2, y), tol=1e-6
    )
    assert logged[4] == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4)


def test_a_dict_entry_a_step_replaces_comes_back_as_drawn():
    current = CurrentBatch()
    batch = {"x": torch.ones(3), "y": torch.zeros(3)}
    current.before_step(batch)
    batch["x"] = batch["x"] / 2
    current.after_step(batch)
    assert torch.equal(current.batch["x"], torch.ones(3)) and current.batch is not batch


class _HalvesItsGraphs(CustomBatches):
    """Replaces a field of its custom-type batch (PyG's ``batch.x = batch.x / 2``)."""

    def training_step(self, batch, batch_idx):
        batch.x = batch.x / 2.0
        return super().training_step(batch, batch_idx)


def test_a_custom_batch_a_step_writes_into_is_measured_as_drawn(tmp_path):
    # Neither the kept probe nor the current batch can be looked into: both are copied
    # whole, so no product sees a batch halved twice.
    pl.seed_everything(0)
    model, drawn = _HalvesItsGraphs(), _KeepsBatchesAsDrawn()
    monitors = [
        HessianEigenvalueMonitor(
            every_n_steps=5, tol=1e-4, probe_batches=2, batch_size_fn=graphs_count
        ),
        HessianEigenvalueMonitor(every_n_steps=5, tol=1e-4, probe="current", name="current"),
    ]
    trainer(tmp_path, [drawn, *monitors], max_steps=5).fit(model)
    assert max(batch.x.max().item() for batch in monitors[0]._probe_data) == 1.0
    logged = read_scalars(tmp_path)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    for tag, batches in (
        ("landscape/hessian/lambda_max", monitors[0]._probe_data),
        ("landscape/hessian/current/lambda_max", [drawn.batches[-1]]),
    ):
        halved = [(batch.x / 2, batch.y) for batch in batches]
        expected = hessian_eigenvalues(model, loss, halved, tol=1e-6)
        assert logged[tag][5] == pytest.approx(expected.eigenvalues[0].item(), rel=1e-4), tag


def test_a_batch_copy_reaches_into_objects_and_keeps_what_cannot_be_copied():
    graphs, lock = Graphs(torch.ones(2), torch.zeros(2)), threading.Lock()
    batch = {"graphs": graphs, "pixels": np.ones(2), "lock": lock, "name": "a"}
    copied = copy_batch(batch)
    copied["graphs"].x /= 2
    copied["pixels"] /= 2
    assert torch.equal(graphs.x, torch.ones(2)) and (batch["pixels"] == 1).all()
    assert copied["lock"] is lock and copied["name"] == "a"
    assert holds_opaque(batch) and not holds_opaque({"x": torch.ones(1), "kind": torch.long})


class _ScalesItsStreamedBatch(_ScalesItsBatch):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(DigitsStream(), batch_size=32)


def test_live_probe_batches_are_kept_as_drawn(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=3, probe_batches=2)
    trainer(tmp_path, [monitor], max_steps=3).fit(_ScalesItsStreamedBatch())
    x, _ = digits().tensors
    assert torch.equal(monitor._probe_data[1][0].cpu(), x[32:64])


class _StopsAtATargetLoss(DigitsModel):
    """Asks the Trainer to stop once a batch's loss is below a target."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if loss < 1.8:
            self.trainer.should_stop = True
        return loss


@pytest.mark.filterwarnings("ignore:.*has no logger")
def test_a_stop_training_step_asks_for_on_the_probe_is_not_the_run_s(tmp_path):
    stopped = []
    for callbacks in ([], _every_probe_monitor(3)):
        pl.seed_everything(0)
        fit = trainer(tmp_path, callbacks, max_steps=40, logger=False)
        fit.fit(_StopsAtATargetLoss())
        stopped.append(fit.global_step)
    assert stopped[0] == stopped[1]


class _StepsItsScheduler(DigitsModel):
    """Steps a per-batch schedule by hand in ``training_step`` (Lightning does not step a
    scheduler that ``configure_optimizers`` does not return)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=100)
        return optimizer

    def training_step(self, batch, batch_idx):
        self.schedule.step()
        return super().training_step(batch, batch_idx)


def test_a_schedule_stepped_in_training_step_trains_as_without_monitors(tmp_path):
    assert_run_unchanged(tmp_path, _every_probe_monitor(3), _StepsItsScheduler, max_steps=9)


class _Prints(DigitsModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.print(f"step {self.global_step}: loss {loss.item():.3f}")
        return loss


def test_what_training_step_prints_is_printed_once_a_step(tmp_path, capsys):
    trainer(tmp_path, _every_probe_monitor(3), max_steps=4).fit(_Prints())
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line.split(":")[0] for line in printed] == [f"step {i}" for i in range(4)]


def test_what_training_step_writes_to_the_logger_is_written_as_without_monitors(tmp_path):
    written = []
    for name, callbacks in (("without", []), ("with", _every_probe_monitor(3))):
        pl.seed_everything(0)
        trainer(tmp_path / name, callbacks, max_steps=16).fit(_LogsThroughTheExperiment())
        logged = read_scalars(tmp_path / name)
        written.append({tag: logged[tag] for tag in ("first_batch_loss", "first_batch_size")})
    assert sorted(written[0]["first_batch_loss"]) == [0, 8]  # the two epochs' first batches
    assert written[0] == written[1]


class _Validated(DigitsModel):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(digits(64), batch_size=32)


LIGHTNING_CALLBACKS = {
    "StochasticWeightAveraging": lambda: [
        StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    ],
    "EMAWeightAveraging": lambda: [EMAWeightAveraging(decay=0.9)],
    "BatchSizeFinder": lambda: [BatchSizeFinder(max_trials=2)],
    "LearningRateFinder": lambda: [LearningRateFinder(num_training_steps=10)],
    "EarlyStopping": lambda: [EarlyStopping("val_loss", patience=1)],
}


@pytest.mark.parametrize("name", sorted(LIGHTNING_CALLBACKS))
def test_lightnings_own_callbacks_run_as_without_monitors(tmp_path, name):
    if name == "StochasticWeightAveraging" and PRECISION == "16-mixed":
        pytest.skip(
            "Lightning's SWA stops a 16-mixed run without monitors too (GradScaler: "
            "'No inf checks were recorded for this optimizer')"
        )
    assert_run_unchanged(
        tmp_path,
        _every_probe_monitor(3),
        _Validated,
        project_callbacks=LIGHTNING_CALLBACKS[name],
        max_epochs=3,
        max_steps=-1,
    )


class _TrainedWeights(pl.Callback):
    """The weights as training left them, before later callbacks' ``on_train_end``."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = copy.deepcopy(pl_module.state_dict())


def test_the_end_measurement_is_of_the_averaged_weights_once_averaging_copied_them_in(tmp_path):
    """Lightning runs the callbacks' ``on_train_end`` in list order, and the averaging
    callback's copies its averaged weights into the module."""
    values, references = [], []
    for monitor_first in (True, False):
        pl.seed_everything(0)
        monitor, trained = HessianEigenvalueMonitor(every_n_steps=None, tol=1e-6), _TrainedWeights()
        averaging = EMAWeightAveraging(decay=0.5)
        order = [monitor, averaging] if monitor_first else [averaging, monitor]
        averaged = DigitsModel(arch="mlp")
        log_dir = tmp_path / str(monitor_first)
        trainer(log_dir, [trained, *order], max_steps=6).fit(averaged)
        values += read_scalars(log_dir)["landscape/hessian/lambda_max"].values()
        measured = averaged
        if monitor_first:
            measured = DigitsModel(arch="mlp")
            measured.load_state_dict(trained.state)
        references.append(_top_eigenvalue(measured, monitor._probe_data))
    assert values == pytest.approx(references, rel=1e-5)
    assert abs(references[0] - references[1]) > 1e-2 * references[0]


def test_lightnings_pruning_prunes_as_without_monitors(tmp_path):
    # The measurement at step 8 runs the pruning hook, which assigns the masked weight that
    # the epoch's end ranks the next mask by (no validation pass assigns it again here).
    assert_run_unchanged(
        tmp_path,
        _every_probe_monitor(4),
        project_callbacks=lambda: [ModelPruning("l1_unstructured", amount=0.3, verbose=0)],
        max_steps=12,
    )


class _SparseBagOfWords(pl.LightningModule):
    """Token ids to classes through an embedding with sparse gradients (for SparseAdam or
    SGD), whose gradient cannot be flattened into a vector."""

    vocabulary = 40

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(self.vocabulary, 6, sparse=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(1))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return F.cross_entropy(self(tokens), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocabulary, (64, 5), generator=generator)
        labels = torch.randint(0, 3, (64,), generator=generator)
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(tokens, labels), batch_size=16
        )


class _FrequencyScaledBagOfWords(_SparseBagOfWords):
    """An embedding whose gradient is scaled by each row's frequency in the batch: the
    gradient training steps along, but no loss's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(self.vocabulary, 6, scale_grad_by_freq=True)


@pytest.mark.parametrize("model_class", [_SparseBagOfWords, _FrequencyScaledBagOfWords])
def test_an_embedding_with_sparse_or_scaled_gradients_is_measured_and_its_gradient_read(
    tmp_path, recwarn, model_class
):
    """Measured by the loss's Hessian, read as training steps along it."""
    pl.seed_everything(0)
    model = model_class()
    monitor = HessianEigenvalueMonitor(every_n_steps=4, measure_at_end=False, tol=1e-6)
    norms = GradientNormMonitor(every_n_steps=1)
    trainer(tmp_path, [monitor, norms], max_steps=4).fit(model)
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    logged = read_scalars(tmp_path)
    assert sorted(logged["landscape/grad_norm/embedding"]) == [0, 1, 2, 3]
    dense = copy.deepcopy(model)
    dense.embedding.sparse = dense.embedding.scale_grad_by_freq = False
    hessian = dense_hessian(
        dense,
        lambda forward, batch: F.cross_entropy(forward(batch[0]), batch[1]),
        *monitor._probe_data,
    )
    eigenvalues = torch.linalg.eigvalsh(hessian.double())
    assert logged["landscape/hessian/lambda_max"][4] == pytest.approx(
        eigenvalues[-1].item(), rel=1e-4
    )
    assert logged["landscape/hessian/lambda_min"][4] == pytest.approx(
        eigenvalues[0].item(), rel=1e-4, abs=1e-6
    )
    assert (model.embedding.sparse, model.embedding.scale_grad_by_freq) == (
        model_class is _SparseBagOfWords,
        model_class is _FrequencyScaledBagOfWords,
    )


class _RenormedBagOfWords(_SparseBagOfWords):
    """An embedding with ``max_norm``: every lookup rescales the rows it reads in place.
    Most rows are read rarely, so the probe's would be rescaled at the measurement rather
    than at their next lookup in training, after steps of weight decay."""

    vocabulary = 400

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(self.vocabulary, 6, max_norm=1.0)

    def configure_optimizers(self):  # weight decay moves every row at every step
        return torch.optim.SGD(self.parameters(), lr=0.5, weight_decay=0.1)


@pytest.mark.parametrize("model_class", [_RenormedBagOfWords, _FrequencyScaledBagOfWords])
def test_an_embedding_with_max_norm_or_scaled_gradients_trains_as_without_monitors(
    tmp_path, model_class
):
    assert_run_unchanged(tmp_path, _every_probe_monitor(4), model_class=model_class, max_steps=8)


class _SpeechToText(pl.LightningModule):
    """A CTC model: frames of random features to label sequences, scored by nn.CTCLoss,
    whose kernel has no double backward (measurements run its recursion instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5)
        )
        self.ctc = torch.nn.CTCLoss(zero_infinity=True)

    def training_step(self, batch, batch_idx):
        frames, targets, target_lengths = batch
        log_probs = self.net(frames.transpose(0, 1)).log_softmax(-1)  # (time, batch, labels)
        frame_counts = torch.full((frames.shape[0],), frames.shape[1])
        return self.ctc(log_probs, targets, frame_counts, target_lengths)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        frames = torch.randn(48, 10, 6, generator=generator)
        targets = torch.randint(1, 5, (48, 4), generator=generator)
        lengths = torch.randint(1, 5, (48,), generator=generator)
        dataset = torch.utils.data.TensorDataset(frames, targets, lengths)
        return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)


def test_a_ctc_speech_model_is_measured(tmp_path, recwarn):
    pl.seed_everything(0)
    _assert_measured_as_the_functional_api(tmp_path, _SpeechToText(), recwarn)


def test_a_ctc_speech_model_trains_as_without_monitors(tmp_path):
    assert_run_unchanged(tmp_path, _every_probe_monitor(4), _SpeechToText, max_steps=8)


class _NoBatchIndex(DigitsModel):
    """``training_step(self, batch)``: Lightning allows leaving ``batch_idx`` out."""

    def training_step(self, batch):
        return super().training_step(batch, None)


def test_a_training_step_without_batch_idx_is_measured(tmp_path, recwarn):
    pl.seed_everything(0)
    trainer(tmp_path, _every_probe_monitor(2), max_steps=4).fit(_NoBatchIndex())
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    assert 4 in read_scalars(tmp_path)["landscape/hessian/lambda_max"]


class _LSTMClassifier(torch.nn.Module):
    """Reads the 8 rows of a digit in turn (on CUDA, cuDNN's LSTM has no double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        out, _ = self.rnn(x.view(-1, 8, 8))
        return self.head(out[:, -1])


class _Recurrent(DigitsModel):
    def __init__(self) -> None:
        super().__init__()
        self.net = _LSTMClassifier()


def test_a_recurrent_network_is_measured(tmp_path, recwarn):
    pl.seed_everything(0)
    _assert_measured_as_the_functional_api(tmp_path, _Recurrent(), recwarn)


def test_cudnn_is_off_for_the_forward_passes_of_a_recurrent_network_on_cuda():
    cuda, enabled = torch.device("cuda"), torch.backends.cudnn.enabled
    with _no_cudnn_for_recurrent(_LSTMClassifier(), cuda):
        assert not torch.backends.cudnn.enabled
    assert torch.backends.cudnn.enabled == enabled
    for model, device in ((DigitsModel(), cuda), (_LSTMClassifier(), torch.device("cpu"))):
        with _no_cudnn_for_recurrent(model, device):
            assert torch.backends.cudnn.enabled == enabled


class _Checkpointed(DigitsModel):
    """Activation checkpointing of the network's tail (dropout and the head), as large
    models save memory; ``use_reentrant=None`` runs it plainly."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x):
        features, tail = self.net[:5](x), self.net[5:]
        if self.use_reentrant is None:
            return tail(features)
        return checkpoint(tail, features, use_reentrant=self.use_reentrant)


def test_a_network_with_activation_checkpointing_is_measured(tmp_path, recwarn):
    pl.seed_everything(0)
    model = _Checkpointed(use_reentrant=False)
    logged, probe = _fit_measured(tmp_path, model, recwarn)
    model.use_reentrant = None
    assert logged == pytest.approx(_top_eigenvalue(model, probe), rel=1e-4)


def test_a_network_with_activation_checkpointing_trains_as_without_monitors(tmp_path):
    assert_run_unchanged(
        tmp_path, _every_probe_monitor(3), lambda: _Checkpointed(use_reentrant=False), max_steps=9
    )


def test_reentrant_checkpointing_is_skipped_with_the_fix_named(tmp_path):
    # reentrant checkpoints refuse torch.autograd.grad, which every product needs
    fit = trainer(tmp_path, [HessianEigenvalueMonitor(every_n_steps=2)], max_steps=4)
    with pytest.warns(
        UserWarning, match="skipped the measurement at step 2: .*use_reentrant=False"
    ):
        fit.fit(_Checkpointed(use_reentrant=True))
    assert fit.global_step == 4
    assert not [tag for tag in read_scalars(tmp_path) if tag.startswith("landscape/hessian")]


class _ImageLogger(Logger):
    """Takes images the way Lightning's ``WandbLogger`` does: ``log_image(key, images, step)``."""

    name, version = "images", 0

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, tuple[int, list]] = {}

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_image(self, key, images, step=None) -> None:
        self.images[key] = (step, images)


def test_figures_reach_loggers_with_log_image(tmp_path):
    images = _ImageLogger()
    monitors = [
        HessianSpectrumMonitor(every_n_epochs=None),
        LossLandscapeMonitor(line_points=5, resolution=3),
    ]
    tensorboard = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, monitors, max_steps=4, logger=[tensorboard, images]).fit(DigitsModel())
    tags = {"landscape/spectrum/density", "landscape/slices/line", "landscape/slices/surface"}
    assert set(images.images) == tags
    for step, (image,) in images.images.values():
        assert step == 4 and image.dtype == np.uint8 and image.shape[2] == 3
    assert tags <= set(read_runs(tmp_path)[0].images)  # TensorBoard still gets them
    assert not list(tmp_path.rglob("*.png"))


def test_figures_no_logger_takes_are_written_as_png_files(tmp_path):
    """Under ``CSVLogger`` alone they go to ``<log_dir>/landscape``, as the image loggers
    of the same seeded run get them."""

    def fit(name, logger):
        pl.seed_everything(0)
        monitors = [
            HessianSpectrumMonitor(every_n_epochs=None),
            LossLandscapeMonitor(line_points=5, resolution=3),
        ]
        trainer(tmp_path / name, monitors, max_steps=4, logger=logger).fit(DigitsModel())

    images = _ImageLogger()
    fit("images", images)
    fit("csv", pl.loggers.CSVLogger(tmp_path / "csv"))
    folder = tmp_path / "csv" / "lightning_logs" / "version_0" / "landscape"
    for tag in ("spectrum/density", "slices/line", "slices/surface"):
        step, (expected,) = images.images[f"landscape/{tag}"]
        written = np.asarray(Image.open(folder / f"{tag}_step{step}.png"))
        np.testing.assert_array_equal(written, expected)


class _ScalarLogger(Logger):
    """Takes scalars alone and keeps runs apart by name and version, as MLflow's logger
    does below a ``save_dir`` (``./mlruns``) that runs share."""

    def __init__(self, save_dir, version) -> None:
        super().__init__()
        self._save_dir, self._version = str(save_dir), version

    name = "experiment"
    save_dir = property(lambda self: self._save_dir)
    version = property(lambda self: self._version)

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_runs_sharing_a_save_dir_write_their_figures_apart(tmp_path):
    """Beside the run's checkpoints (``save_dir/name/version``), not in the shared
    ``save_dir`` that ``trainer.log_dir`` gives for such loggers."""
    for version in (0, "3f2a"):
        monitor = LossLandscapeMonitor(line_points=5, resolution=3)
        logger = _ScalarLogger(tmp_path / "shared", version)
        trainer(tmp_path, [monitor], max_steps=2, logger=logger).fit(DigitsModel())
    for run in ("version_0", "3f2a"):
        folder = tmp_path / "shared" / "experiment" / run / "landscape"
        assert {p.relative_to(folder).as_posix() for p in folder.rglob("*.*")} == {
            "slices/line_step2.png",
            "slices/surface_step2.png",
            "slices_step2.pt",
        }


def _cross_entropy(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def test_a_module_stepping_two_optimizers_trains_as_without_monitors(tmp_path):
    """Manual optimisation, as a GAN's: every monitor given the loss, one reading each
    optimiser's gradients as it steps."""
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=3, loss_fn=_cross_entropy, probe="current"),
        HessianSpectrumMonitor(every_n_epochs=None, loss_fn=_cross_entropy),
        SharpnessMonitor(every_n_steps=3, loss_fn=_cross_entropy),
        GradientNoiseScaleMonitor(every_n_steps=3, loss_fn=_cross_entropy),
        GradientNormMonitor(every_n_steps=3, weight_norms=True, update_ratio=True),
    ]
    assert_run_unchanged(tmp_path, monitors, TwoOptimizers, max_steps=12)


def test_curves_share_the_x_axis_of_the_module_s_own_logs_when_a_batch_steps_two_optimizers(
    tmp_path,
):
    """Each batch steps two optimisers, so ``global_step`` runs at twice the batches, but
    Lightning's loggers count a batch once: the module's ``self.log`` and Lightning's
    ``LearningRateMonitor`` are at the batch count, and so is every curve of ours."""
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=4, loss_fn=_cross_entropy),
        GradientNormMonitor(every_n_steps=2),
        BatchSizeScheduler({0: 32}),
        LearningRateMonitor(),
    ]
    trainer(tmp_path, monitors, max_steps=20, log_every_n_steps=1).fit(TwoOptimizers())
    logged = read_scalars(tmp_path)
    batches = list(range(10))  # each one's own loss, learning rates and gradients, before its steps
    assert sorted(logged["train_loss"]) == batches
    assert sorted(logged["lr-SGD"]) == batches
    assert sorted(logged["landscape/grad_norm/total"]) == batches
    # After every second batch (4 global steps), and at the end: with its updates, as
    # measured after them.
    assert sorted(logged["landscape/hessian/lambda_max"]) == [2, 4, 6, 8, 10]
    assert sorted(logged["landscape/batch_size/per_device"]) == [0, 8]  # 8 batches an epoch
