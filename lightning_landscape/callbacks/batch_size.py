"""Change the batch size between epochs, with the learning rate in step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.parsing import (
    lightning_getattr,
    lightning_hasattr,
    lightning_setattr,
)
from torch import Tensor
from torch.optim.lr_scheduler import OneCycleLR

from lightning_landscape._validation import check_choice, check_int
from lightning_landscape.batch_size import LRScaling, Milestones, ScheduleState, lr_scale
from lightning_landscape.callbacks._logging import Layout, log_metrics, logger_step
from lightning_landscape.callbacks.base import LandscapeCallback
from lightning_landscape.callbacks.noise_scale import GradientNoiseScaleMonitor

_TAG = "landscape/batch_size"
# Param-group entries besides "lr" that hold a learning rate (OneCycleLR keeps max_lr and
# min_lr there).
_LR_KEYS = ("initial_lr", "max_lr", "min_lr")
# LR-scheduler attributes that hold learning rates: the rates it starts from, CyclicLR's
# peaks, the floors of ReduceLROnPlateau and the cosine schedules.
_SCHEDULER_LR_ATTRS = ("base_lrs", "max_lrs", "min_lrs", "eta_min")


def _scaled(value: Any, factor: float) -> Any:
    """A learning rate, or a list of them, times ``factor``; other values as they were."""
    if isinstance(value, list):
        return [_scaled(v, factor) for v in value]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value * factor if number or isinstance(value, Tensor) else value


def _set_lr(group: dict[str, Any], lr: Any) -> None:
    """Set a param group's ``lr``: a tensor rate, which a compiled optimizer step reads, in
    place, as torch's schedulers set it."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _schedulers_in(scheduler: Any) -> Iterator[Any]:
    """The scheduler and those it runs (``SequentialLR``, ``ChainedScheduler``), whose
    ``base_lrs`` take over at their milestones."""
    yield scheduler
    for inner in getattr(scheduler, "_schedulers", ()):
        yield from _schedulers_in(inner)


class BatchSizeScheduler(LandscapeCallback):
    """Set the per-device batch size at every epoch boundary by a schedule.

    The new size is written with Lightning's ``lightning_setattr`` to ``attr_name`` on the
    LightningModule, the DataModule or their hparams (as ``BatchSizeFinder`` does), and
    the train loader is rebuilt for the next epoch (through Lightning's own reloading:
    ``reload_dataloaders_every_n_epochs`` is 1 for that epoch only, then back to yours).
    With ``lr_scaling`` every learning rate follows the global batch size relative to the
    starting one: each optimizer param group's (``lr``, a tensor one in place, and
    ``initial_lr``/``max_lr``/``min_lr`` where present) and each LR scheduler's
    (``base_lrs``, ``CyclicLR``'s ``max_lrs``, the floors ``min_lrs`` and ``eta_min``, in
    the schedulers that ``SequentialLR`` and ``ChainedScheduler`` run too), so a schedule
    keeps its shape at the new scale (a ``OneCycleLR`` stepped per optimizer step plans
    its cycle over a number of steps, which the batch size changes: a warning says so).
    After an increase the learning rate can be warmed up linearly from the old scale to
    the new over ``warmup_steps`` optimizer steps. Every rank takes rank 0's decision, at
    the same epoch boundary. A resumed run continues at the scheduled size (the learning
    rates come back with the optimizer and scheduler states).

    Logged at the start of every epoch: ``landscape/batch_size/per_device``, ``global``
    (per-device x devices x nodes x gradient accumulation) and ``lr_scale``. The accumulation
    that Lightning's ``GradientAccumulationScheduler`` sets for an epoch counts: the global
    size, and with ``lr_scaling`` the learning rate, follow its changes too.

    Args:
        schedule: ``schedule(epoch, state) -> per-device batch size`` for the epoch
            about to start (:class:`~lightning_landscape.batch_size.Milestones`,
            :class:`~lightning_landscape.batch_size.Ramp`,
            :class:`~lightning_landscape.batch_size.NoiseScaleSchedule`, or your own
            callable taking a :class:`~lightning_landscape.batch_size.ScheduleState`), or
            a dict ``{epoch: batch_size}`` for milestones.
        lr_scaling: ``"linear"``, ``"sqrt"`` or ``"none"``: how the learning rate follows
            the global batch size.
        warmup_steps: optimizer steps over which the learning rate reaches its new scale
            after each increase (0: at once).
        attr_name: the attribute the train dataloader reads its batch size from.
    """

    def __init__(
        self,
        schedule: Callable[[int, ScheduleState], int] | dict[int, int],
        lr_scaling: LRScaling = "none",
        warmup_steps: int = 0,
        attr_name: str = "batch_size",
    ) -> None:
        super().__init__()
        if isinstance(schedule, dict):
            schedule = Milestones(schedule)
        if not callable(schedule):
            raise TypeError(
                "`schedule` must be callable as schedule(epoch, state) -> batch size, or an "
                f"{{epoch: batch_size}} dict, got {schedule!r}"
            )
        check_choice("lr_scaling", lr_scaling, ("linear", "sqrt", "none"))
        check_int("warmup_steps", warmup_steps, minimum=0)
        if not isinstance(attr_name, str) or not attr_name:
            raise TypeError(f"`attr_name` must be a non-empty string, got {attr_name!r}")
        self.schedule = schedule
        self.lr_scaling: LRScaling = lr_scaling
        self.warmup_steps = warmup_steps
        self.attr_name = attr_name
        self._noise_monitor: Any = None
        self._replicas = self._initial_replicas = 1  # global over per-device batch size
        self._initial = self._size = 0
        self._lr_scale = 1.0
        self._last_change = 0
        self._warmup: list[float] | None = None  # [starting factor, steps done]
        self._resumed = False
        self._user_reload = 0
        self._hooks: list[Any] = []
        self._hooks_on: list[Any] = []
        self._scheduled_lrs: dict[int, list[float]] = {}

    @property
    def batch_size(self) -> int:
        """The per-device batch size in force."""
        return self._size

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.fit_loop._data_source.is_module():
            raise ValueError(
                "BatchSizeScheduler cannot rebuild dataloaders passed straight to `Trainer.fit()`: "
                "return them from `train_dataloader()` of the LightningModule or a LightningDataModule"
            )
        if not lightning_hasattr(pl_module, self.attr_name):
            raise ValueError(
                f"BatchSizeScheduler: no `{self.attr_name}` attribute on the LightningModule, its "
                "hparams, the DataModule or its hparams; set `attr_name` to the attribute "
                "`train_dataloader()` reads its batch size from"
            )
        monitors = [c for c in trainer.callbacks if isinstance(c, GradientNoiseScaleMonitor)]
        if not monitors and getattr(self.schedule, "needs_noise_scale", False):
            raise ValueError(
                "BatchSizeScheduler: the noise-scale schedule needs a GradientNoiseScaleMonitor "
                "among the Trainer's callbacks"
            )
        self._noise_monitor = monitors[0] if monitors else None  # any schedule may read it
        self._user_reload = trainer.reload_dataloaders_every_n_epochs
        self._replicas = self._initial_replicas = self._replicas_at(trainer, 0)
        # Every fit starts from the module's own size and rates (one scheduler may serve
        # several); resuming restores the checkpointed schedule after this hook.
        self._initial = self._size = int(lightning_getattr(pl_module, self.attr_name))
        self._lr_scale, self._last_change, self._warmup, self._resumed = 1.0, 0, None, False
        self._switch(trainer, pl_module, self._decide(trainer, 0), epoch=0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed:  # Lightning rebuilds the loader from the module's default size
            lightning_setattr(pl_module, self.attr_name, self._size)
        else:
            self._rescale_lr(trainer, self._scale())  # the optimizers exist only now
        self._warn_of_planned_steps(trainer)
        self._hooks_on = list(trainer.optimizers)
        for optimizer in self._hooks_on:
            self._hooks += [
                optimizer.register_step_pre_hook(self._warm_up),
                optimizer.register_step_post_hook(self._warmed_up),
            ]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loader was rebuilt at this epoch's start (after a change): back to the user's
        # own reloading, so unchanged epochs keep their loader (and its workers).
        trainer.reload_dataloaders_every_n_epochs = self._user_reload
        # As decided at the last epoch's end, but for a resumed run, set up at epoch 0.
        self._replicas = self._replicas_at(trainer, trainer.current_epoch)
        metrics = {
            f"{_TAG}/per_device": float(self._size),
            f"{_TAG}/global": float(self._size * self._replicas),
            f"{_TAG}/lr_scale": self._lr_scale,
        }
        log_metrics(trainer, metrics, logger_step(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self._switch(trainer, pl_module, self._decide(trainer, epoch), epoch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._hooks_on.clear()

    def layout(self) -> Layout:
        return {
            "landscape": {
                "batch size (per device, global)": [
                    "Multiline",
                    [f"{_TAG}/per_device", f"{_TAG}/global"],
                ],
                "learning-rate scale": ["Multiline", [f"{_TAG}/lr_scale"]],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_batch_size": self._initial,
            "batch_size": self._size,
            "lr_scale": self._lr_scale,
            "last_change_epoch": self._last_change,
            "warmup": self._warmup,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial = state_dict["initial_batch_size"]
        self._size = state_dict["batch_size"]
        self._lr_scale = state_dict["lr_scale"]
        self._last_change = state_dict["last_change_epoch"]
        self._warmup = state_dict["warmup"]
        self._resumed = True

    # ------------------------------------------------------------------ internals
    def _decide(self, trainer: pl.Trainer, epoch: int) -> int:
        noise = None if self._noise_monitor is None else self._noise_monitor.b_simple
        replicas = self._replicas_at(trainer, epoch)
        state = ScheduleState(self._size, self._initial, replicas, self._last_change, noise)
        size = trainer.strategy.broadcast(self.schedule(epoch, state), src=0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"BatchSizeScheduler: the schedule gave {size!r} for epoch {epoch}; a batch size is an int >= 1"
            )
        return size

    def _scale(self) -> float:
        return lr_scale(
            self._size * self._replicas, self._initial * self._initial_replicas, self.lr_scaling
        )

    @staticmethod
    def _replicas_at(trainer: pl.Trainer, epoch: int) -> int:
        """Global over per-device batch size in ``epoch``: devices x nodes x gradient
        accumulation, as Lightning's ``GradientAccumulationScheduler`` sets it when one
        does (at the start of the epoch, so its schedule is read instead)."""
        accumulation = next(
            (
                callback.get_accumulate_grad_batches(epoch)
                for callback in trainer.callbacks
                if isinstance(callback, GradientAccumulationScheduler)
            ),
            trainer.accumulate_grad_batches,
        )
        return trainer.world_size * accumulation

    def _switch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, size: int, epoch: int
    ) -> None:
        replicas = self._replicas_at(trainer, epoch)
        if size == self._size and replicas == self._replicas:
            return
        old_scale, self._replicas = self._lr_scale, replicas
        if size != self._size:
            self._size, self._last_change = size, epoch
            lightning_setattr(pl_module, self.attr_name, size)
            trainer.reload_dataloaders_every_n_epochs = 1  # rebuild the loader for the next epoch
        if trainer.optimizers:  # at setup they do not exist yet: on_fit_start scales them
            self._rescale_lr(trainer, self._scale())
            if self.warmup_steps and self._lr_scale > old_scale:
                self._warmup = [old_scale / self._lr_scale, 0]

    def _rescale_lr(self, trainer: pl.Trainer, scale: float) -> None:
        factor = scale / self._lr_scale
        self._lr_scale = scale
        if factor == 1:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                _set_lr(group, group["lr"] * factor)
                for key in _LR_KEYS:
                    if key in group:
                        group[key] = _scaled(group[key], factor)
        for config in trainer.lr_scheduler_configs:
            for scheduler in _schedulers_in(config.scheduler):
                for name in _SCHEDULER_LR_ATTRS:
                    if hasattr(scheduler, name):
                        setattr(scheduler, name, _scaled(getattr(scheduler, name), factor))

    def _warn_of_planned_steps(self, trainer: pl.Trainer) -> None:
        """A OneCycleLR stepped per optimizer step plans its cycle over a number of steps,
        usually ``trainer.estimated_stepping_batches`` at the starting batch size."""
        for config in trainer.lr_scheduler_configs:
            if config.interval != "step":
                continue
            for scheduler in _schedulers_in(config.scheduler):
                if isinstance(scheduler, OneCycleLR):
                    self._warn_once(
                        "planned steps",
                        f"changes the number of optimizer steps per epoch, while OneCycleLR "
                        f"plans its cycle over {scheduler.total_steps} steps: a larger batch "
                        "ends training before the cycle does, and a smaller one steps past "
                        "its end, which stops the run with torch's 'Tried to step' error. "
                        "Step it per epoch (interval='epoch'), or plan it for the schedule's "
                        "steps",
                    )
                    return

    def _warm_up(self, optimizer: Any, *_: Any) -> None:
        """Before a step during warmup: scale the learning rates down for this step only."""
        if self._warmup is None:
            return
        start, done = self._warmup
        factor = start + (1 - start) * (done + 1) / self.warmup_steps
        # Copies, since a tensor rate is scaled in place.
        self._scheduled_lrs[id(optimizer)] = [_scaled(g["lr"], 1) for g in optimizer.param_groups]
        for group in optimizer.param_groups:
            _set_lr(group, group["lr"] * factor)

    def _warmed_up(self, optimizer: Any, *_: Any) -> None:
        """After the step: put the scheduled rates back exactly; count the first optimizer's steps."""
        saved = self._scheduled_lrs.pop(id(optimizer), None)
        if saved is None:
            return
        for group, lr in zip(optimizer.param_groups, saved):
            _set_lr(group, lr)
        if optimizer is self._hooks_on[0] and self._warmup is not None:
            self._warmup[1] += 1
            if self._warmup[1] >= self.warmup_steps:
                self._warmup = None
