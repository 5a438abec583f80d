"""BatchSizeScheduler in real Trainer runs: sizes, batch counts, learning rates, resume, DDP."""

import json
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_landscape import BatchSizeScheduler, GradientNoiseScaleMonitor
from lightning_landscape.batch_size import NoiseScaleSchedule, Ramp
from tests.lightning_support import DigitsModel, digits, fit_ddp_spawn, read_scalars, trainer

LR = 0.05


class Record(Callback):
    """Per epoch: batch size seen, batches in the epoch, learning rate of the first step."""

    def __init__(self, directory=None):
        self.epochs: dict[int, tuple[int, int, float]] = {}
        self.directory = directory

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.epochs[trainer.current_epoch] = (len(batch[0]), trainer.num_training_batches, lr)

    def on_train_end(self, trainer, pl_module):
        if self.directory is not None:  # ddp_spawn: the main process never sees this object
            path = self.directory / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps({**self.epochs, "steps": trainer.global_step}))


class StepLRModel(DigitsModel):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def _fit(tmp_path, scheduler, model=None, epochs=4, **kwargs):
    record = Record()
    fit = trainer(tmp_path, [scheduler, record], max_steps=-1, max_epochs=epochs, **kwargs)
    fit.fit(model or DigitsModel(arch="mlp", lr=LR))
    return record.epochs, fit


def test_milestones_give_the_sizes_and_batch_counts_and_are_logged(tmp_path):
    epochs, _ = _fit(tmp_path, BatchSizeScheduler({0: 16, 2: 64}))
    assert [(size, batches) for size, batches, _ in epochs.values()] == [
        (16, 16),
        (16, 16),
        (64, 4),
        (64, 4),
    ]
    logged = read_scalars(tmp_path)
    assert list(logged["landscape/batch_size/per_device"].items()) == [
        (0, 16.0),
        (16, 16.0),
        (32, 64.0),
        (36, 64.0),
    ]
    assert logged["landscape/batch_size/global"][32] == 64.0


def test_a_callable_schedule_sees_the_state(tmp_path):
    doubling = BatchSizeScheduler(lambda epoch, state: state.batch_size * 2 if epoch else 16)
    epochs, _ = _fit(tmp_path, doubling, epochs=3)
    assert [(size, batches) for size, batches, _ in epochs.values()] == [(16, 16), (32, 8), (64, 4)]


def test_the_loader_is_rebuilt_only_when_the_size_changes(tmp_path):
    loaders = []

    class Loaders(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            loaders.append(id(trainer.train_dataloader))

    scheduler = BatchSizeScheduler({2: 64})
    fit = trainer(tmp_path, [scheduler, Loaders()], max_steps=-1, max_epochs=4)
    fit.fit(DigitsModel(arch="mlp"))
    assert loaders[0] == loaders[1] != loaders[2] == loaders[3]
    assert fit.reload_dataloaders_every_n_epochs == 0  # the user's setting, back in force

    epochs, fit = _fit(
        tmp_path / "user",
        BatchSizeScheduler({1: 64}),
        epochs=2,
        reload_dataloaders_every_n_epochs=3,
    )
    assert fit.reload_dataloaders_every_n_epochs == 3 and epochs[1][:2] == (64, 4)


def test_ramp_with_gradient_accumulation_reports_the_global_size(tmp_path):
    scheduler = BatchSizeScheduler(Ramp(end_size=128, start_epoch=0, end_epoch=2))
    epochs, _ = _fit(tmp_path, scheduler, epochs=3, accumulate_grad_batches=2)
    assert [size for size, _, _ in epochs.values()] == [32, 64, 128]
    # 8, 4 and 2 batches an epoch, an optimizer step every 2 of them
    assert read_scalars(tmp_path)["landscape/batch_size/global"] == {0: 64.0, 4: 128.0, 6: 256.0}


def test_the_accumulation_lightnings_scheduler_sets_counts_in_the_global_size(tmp_path):
    """Lightning's ``GradientAccumulationScheduler`` (listed after, so it sets an epoch's
    accumulation after the size is logged) doubles it from epoch 1, the milestones double
    the per-device size at epoch 2: the global size and the linear learning rate double at
    each."""
    record = Record()
    callbacks = [
        BatchSizeScheduler({2: 64}, lr_scaling="linear"),
        GradientAccumulationScheduler({1: 2}),
        record,
    ]
    fit = trainer(tmp_path, callbacks, max_steps=-1, max_epochs=3)
    fit.fit(DigitsModel(arch="mlp", lr=LR))
    assert [size for size, _, _ in record.epochs.values()] == [32, 32, 64]
    assert [lr for _, _, lr in record.epochs.values()] == pytest.approx([LR, 2 * LR, 4 * LR])
    logged = read_scalars(tmp_path)["landscape/batch_size/global"]
    assert list(logged.values()) == [32.0, 64.0, 128.0]


def test_a_resumed_run_counts_the_accumulation_of_its_own_epoch(tmp_path):
    """Stopped after epoch 1, it resumes at epoch 2 with the global size and rate of the
    unbroken run: not with the accumulation of epoch 0, where it was set up."""

    def callbacks():
        scheduler = BatchSizeScheduler({2: 64}, lr_scaling="linear")
        return [scheduler, GradientAccumulationScheduler({1: 2})]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(
        tmp_path / "a",
        [*callbacks(), checkpoint],
        max_steps=-1,
        max_epochs=2,
        enable_checkpointing=True,
    )
    first.fit(DigitsModel(arch="mlp", lr=LR))
    resumed = trainer(tmp_path / "b", callbacks(), max_steps=-1, max_epochs=3)
    resumed.fit(DigitsModel(arch="mlp", lr=LR), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert read_scalars(tmp_path / "b")["landscape/batch_size/global"] == {12: 128.0}
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(4 * LR)


@pytest.mark.parametrize("rule, factor", [("linear", 2.0), ("sqrt", math.sqrt(2))])
@pytest.mark.parametrize("with_scheduler", [False, True])
def test_lr_follows_the_global_batch(tmp_path, rule, factor, with_scheduler):
    model = (StepLRModel if with_scheduler else DigitsModel)(arch="mlp", lr=LR)
    epochs, fit = _fit(tmp_path, BatchSizeScheduler({1: 64, 2: 128}, lr_scaling=rule), model, 3)
    decay = [0.5**e if with_scheduler else 1.0 for e in range(3)]
    expected = [LR * decay[e] * factor**e for e in range(3)]
    assert [lr for _, _, lr in epochs.values()] == pytest.approx(expected, rel=1e-12)
    if with_scheduler:
        assert fit.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([LR * factor**2])


class ScheduleKindsModel(DigitsModel):
    """Schedules whose rates live beyond the param groups' ``lr``."""

    def __init__(self, kind: str) -> None:
        super().__init__(arch="mlp", lr=LR)
        self.kind = kind

    def configure_optimizers(self):
        scheduler = torch.optim.lr_scheduler
        if self.kind == "tensor_lr":  # as for a compiled optimizer step, read in place
            return torch.optim.SGD(self.parameters(), lr=torch.tensor(LR))
        optimizer = torch.optim.SGD(self.parameters(), lr=LR)
        if self.kind == "warmup_then_cosine":  # the rates of the second from its milestone
            warmup = scheduler.LinearLR(optimizer, 0.5, total_iters=4)
            cosine = scheduler.CosineAnnealingLR(optimizer, 40, eta_min=LR / 10)
            chosen = scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[4])
        elif self.kind == "one_cycle":  # its rates in the param groups
            chosen = scheduler.OneCycleLR(optimizer, LR, total_steps=40)
        else:  # per step between base_lrs and max_lrs
            chosen = scheduler.CyclicLR(optimizer, LR / 4, LR, step_size_up=6)
        return [optimizer], [{"scheduler": chosen, "interval": "step"}]


@pytest.mark.parametrize("kind", ["warmup_then_cosine", "cyclic", "one_cycle", "tensor_lr"])
@pytest.mark.filterwarnings("ignore:.*plans its cycle")
def test_lr_scaling_scales_every_rate_a_schedule_holds(tmp_path, kind):
    """The rate of every step is the unscaled run's, doubled from the epoch the global batch
    doubles: past SequentialLR's milestone, along CyclicLR's cycle, and for a tensor rate,
    which was left unscaled (and shrunk for good by the warmup)."""
    rates = {}

    class Steps(Callback):
        def __init__(self, name):
            self.name = name

        def on_train_start(self, trainer, pl_module):
            rates[self.name] = []
            trainer.optimizers[0].register_step_pre_hook(
                lambda optimizer, *_: rates[self.name].append(
                    float(optimizer.param_groups[0]["lr"])
                )
            )

    doubled = BatchSizeScheduler({1: 64}, lr_scaling="linear", warmup_steps=2)
    trainer(tmp_path / "a", [doubled, Steps("scaled")], max_steps=-1, max_epochs=3).fit(
        ScheduleKindsModel(kind)
    )
    kept = BatchSizeScheduler({1: 64})  # the same batches, unscaled rates
    trainer(tmp_path / "b", [kept, Steps("unscaled")], max_steps=-1, max_epochs=3).fit(
        ScheduleKindsModel(kind)
    )
    ratios = [s / u for s, u in zip(rates["scaled"], rates["unscaled"])]
    assert len(ratios) == 8 + 4 + 4  # 32 then 64 samples a batch
    assert ratios == pytest.approx([1.0] * 8 + [1.5, 2.0] + [2.0] * 6, rel=1e-6)


def test_a_one_cycle_schedule_planned_in_steps_is_warned_of(tmp_path):
    """Its cycle is planned over a number of steps that a new batch size changes; past
    its end torch stops the run."""
    with pytest.warns(UserWarning, match="OneCycleLR plans its cycle over 40 steps"):
        trainer(tmp_path, [BatchSizeScheduler({1: 64})], max_steps=-1, max_epochs=2).fit(
            ScheduleKindsModel("one_cycle")
        )


def test_warmup_ramps_the_lr_over_steps_after_an_increase(tmp_path):
    effective = []

    class Steps(Callback):
        def on_train_start(self, trainer, pl_module):
            # a step pre-hook registered after the scheduler's sees the rate the step uses
            trainer.optimizers[0].register_step_pre_hook(
                lambda optimizer, *_: effective.append(optimizer.param_groups[0]["lr"])
            )

    scheduler = BatchSizeScheduler({1: 128}, lr_scaling="linear", warmup_steps=2)
    fit = trainer(tmp_path, [scheduler, Steps()], max_steps=-1, max_epochs=3)
    fit.fit(DigitsModel(arch="mlp", lr=LR))
    assert effective == pytest.approx([LR] * 8 + [2.5 * LR, 4 * LR] + [4 * LR] * 2, rel=1e-12)
    assert fit.optimizers[0].param_groups[0]["lr"] == 4 * LR  # the scheduled rate stands


def test_resume_continues_at_the_scheduled_size_and_lr(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    scheduler = BatchSizeScheduler({1: 64, 2: 128}, lr_scaling="linear")
    first = trainer(
        tmp_path / "a",
        [scheduler, checkpoint],
        max_steps=-1,
        max_epochs=2,
        enable_checkpointing=True,
    )
    first.fit(DigitsModel(arch="mlp", lr=LR))
    record = Record()
    resumed = BatchSizeScheduler({1: 64, 2: 128}, lr_scaling="linear")
    second = trainer(
        tmp_path / "b", [resumed, record], max_steps=-1, max_epochs=3, enable_checkpointing=True
    )
    second.fit(DigitsModel(arch="mlp", lr=LR), ckpt_path=checkpoint.last_model_path)
    assert record.epochs == {2: (128, 2, pytest.approx(4 * LR))}
    assert resumed.batch_size == 128


def test_one_scheduler_serves_a_second_fit_from_its_start(tmp_path):
    scheduler = BatchSizeScheduler({1: 64}, lr_scaling="linear")
    first, _ = _fit(tmp_path / "a", scheduler, epochs=2)
    assert first[1] == (64, 4, pytest.approx(2 * LR))
    second, _ = _fit(tmp_path / "b", scheduler, epochs=2)
    assert second == first  # the second model starts at its own size and rate again


def test_noise_schedule_follows_the_monitor(tmp_path):
    monitor = GradientNoiseScaleMonitor(every_n_steps=2)
    values = []

    class ReadNoise(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            values.append(monitor.b_simple)

    scheduler = BatchSizeScheduler(NoiseScaleSchedule(min_size=4, max_size=200, multiple=4))
    record = Record()
    fit = trainer(tmp_path, [ReadNoise(), monitor, scheduler, record], max_steps=-1, max_epochs=2)
    fit.fit(DigitsModel(arch="mlp", lr=LR))
    # the smoothed unbiased |G|² estimate is positive at epoch end (for most seeds; the
    # digits MLP's gradient noise is large, and a negative estimate leaves b_simple None)
    assert values[0] is not None
    expected = min(max(4 * round(values[0] / 4), 4), 200)
    assert record.epochs[1][0] == min(expected, 256)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("loaders", ValueError, "passed straight to `Trainer.fit"),
        ("attribute", ValueError, "no `bs` attribute"),
        ("noise", ValueError, "needs a GradientNoiseScaleMonitor"),
        ("schedule", ValueError, "the schedule gave 0"),
    ],
)
def test_setup_errors(tmp_path, case, error, match):
    scheduler = {
        "loaders": BatchSizeScheduler({1: 64}),
        "attribute": BatchSizeScheduler({1: 64}, attr_name="bs"),
        "noise": BatchSizeScheduler(NoiseScaleSchedule()),
        "schedule": BatchSizeScheduler(lambda epoch, state: 0),
    }[case]
    fit = trainer(tmp_path, [scheduler], max_steps=1)
    with pytest.raises(error, match=match):
        if case == "loaders":
            fit.fit(DigitsModel(arch="mlp"), train_dataloaders=DataLoader(digits(), batch_size=8))
        else:
            fit.fit(DigitsModel(arch="mlp"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"schedule": 3}, TypeError, "`schedule`"),
        ({"schedule": {0: 16}, "lr_scaling": "cubic"}, ValueError, "`lr_scaling`"),
        ({"schedule": {0: 16}, "warmup_steps": -1}, ValueError, "`warmup_steps`"),
        ({"schedule": {2: 16, 1: 8}}, ValueError, "strictly increasing"),
        ({"schedule": {0: 16}, "attr_name": ""}, TypeError, "`attr_name`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchSizeScheduler(**kwargs)


@pytest.mark.timeout(240)
def test_ddp_ranks_switch_together(tmp_path):
    scheduler = BatchSizeScheduler({1: 64}, lr_scaling="linear")
    log_dir = fit_ddp_spawn(
        tmp_path,
        [scheduler, Record(tmp_path)],
        DigitsModel(arch="mlp", lr=LR),
        max_steps=-1,
        max_epochs=2,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0] == {"0": [32, 4, LR], "1": [64, 2, 2 * LR], "steps": 6}
    assert read_scalars(log_dir)["landscape/batch_size/global"] == {0: 64.0, 4: 128.0}
