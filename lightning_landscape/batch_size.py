"""Batch-size schedules and learning-rate coupling (pure Python, no Lightning).

A schedule is any callable ``schedule(epoch, state) -> per-device batch size`` for the
epoch about to start; :class:`ScheduleState` tells it where training stands. Three are
provided: fixed :class:`Milestones`, a :class:`Ramp` (linear or geometric growth), and
:class:`NoiseScaleSchedule`, which follows the measured gradient noise scale, the batch
size beyond which larger batches stop paying for themselves (McCandlish et al. 2018).
Growing the batch instead of decaying the learning rate is Smith et al. (2017); keeping
the learning rate in proportion to the batch is Goyal et al. (2017).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from lightning_landscape._validation import check_choice, check_int

Growth = Literal["linear", "geometric"]
LRScaling = Literal["linear", "sqrt", "none"]


@dataclass(frozen=True)
class ScheduleState:
    """Where training stands when a schedule picks the next epoch's batch size.

    Attributes:
        batch_size: the per-device batch size in force.
        initial_batch_size: the per-device batch size training started with.
        replicas: global batch / per-device batch (devices x nodes x accumulation).
        last_change_epoch: the epoch the batch size last changed (0 if never).
        noise_scale: the latest gradient noise scale ``B_simple`` in samples (global),
            ``None`` when no ``GradientNoiseScaleMonitor`` has measured it yet.
    """

    batch_size: int
    initial_batch_size: int
    replicas: int = 1
    last_change_epoch: int = 0
    noise_scale: float | None = None


class Schedule(Protocol):
    def __call__(self, epoch: int, state: ScheduleState) -> int: ...


def round_to_multiple(size: float, multiple: int) -> int:
    """The nearest positive multiple of ``multiple`` (at least ``multiple`` itself)."""
    return max(multiple, multiple * round(size / multiple))


class Milestones:
    """The batch size changes at given epochs and stays until the next milestone.

    Args:
        milestones: epoch -> per-device batch size from that epoch on, epochs in
            increasing order; before the first milestone the initial batch size holds.
    """

    def __init__(self, milestones: Mapping[int, int]) -> None:
        if not isinstance(milestones, Mapping) or not milestones:
            raise TypeError(
                f"`milestones` must be a non-empty {{epoch: batch_size}} dict, got {milestones!r}"
            )
        epochs = list(milestones)
        for epoch, size in milestones.items():
            check_int("milestones epoch", epoch, minimum=0)
            check_int(f"milestones[{epoch}]", size, minimum=1)
        if epochs != sorted(set(epochs)):
            raise ValueError(f"`milestones` epochs must be strictly increasing, got {epochs}")
        self.milestones = dict(milestones)

    def __call__(self, epoch: int, state: ScheduleState) -> int:
        reached = [size for start, size in self.milestones.items() if start <= epoch]
        return reached[-1] if reached else state.initial_batch_size

    def __repr__(self) -> str:
        return f"Milestones({self.milestones})"


class Ramp:
    """Grow from the initial batch size to ``end_size`` between two epochs.

    Args:
        end_size: per-device batch size reached at ``end_epoch`` and kept after.
        start_epoch: last epoch at the initial batch size.
        end_epoch: first epoch at ``end_size``.
        growth: ``"geometric"`` (the same factor every epoch) or ``"linear"``.
        multiple: sizes are rounded to a multiple of this (e.g. 8 for tensor cores).
    """

    def __init__(
        self,
        end_size: int,
        start_epoch: int = 0,
        end_epoch: int = 10,
        growth: Growth = "geometric",
        multiple: int = 1,
    ) -> None:
        check_int("end_size", end_size, minimum=1)
        check_int("start_epoch", start_epoch, minimum=0)
        check_int("end_epoch", end_epoch, minimum=start_epoch + 1)
        check_choice("growth", growth, ("linear", "geometric"))
        check_int("multiple", multiple, minimum=1)
        self.end_size = end_size
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.growth = growth
        self.multiple = multiple

    def __call__(self, epoch: int, state: ScheduleState) -> int:
        start = state.initial_batch_size
        fraction = min(max((epoch - self.start_epoch) / (self.end_epoch - self.start_epoch), 0), 1)
        if self.growth == "linear":
            size = start + (self.end_size - start) * fraction
        else:
            size = start * (self.end_size / start) ** fraction
        return round_to_multiple(size, self.multiple)


class NoiseScaleSchedule:
    """Follow the gradient noise scale: a global batch of about ``B_simple`` samples.

    Needs a ``GradientNoiseScaleMonitor`` among the Trainer's callbacks. Until it has
    measured, while its ``|G|²`` estimate is not positive (the noise scale beyond what
    its batch resolves) and between changes, the batch size in force is kept.

    Args:
        min_size: smallest per-device batch size.
        max_size: largest per-device batch size (``None``: no limit).
        every_n_epochs: change the batch size at most this often.
        multiple: sizes are rounded to a multiple of this.
    """

    needs_noise_scale = True

    def __init__(
        self,
        min_size: int = 1,
        max_size: int | None = None,
        every_n_epochs: int = 1,
        multiple: int = 1,
    ) -> None:
        check_int("min_size", min_size, minimum=1)
        if max_size is not None:
            check_int("max_size", max_size, minimum=min_size)
        check_int("every_n_epochs", every_n_epochs, minimum=1)
        check_int("multiple", multiple, minimum=1)
        self.min_size = min_size
        self.max_size = max_size
        self.every_n_epochs = every_n_epochs
        self.multiple = multiple

    def __call__(self, epoch: int, state: ScheduleState) -> int:
        if state.noise_scale is None or epoch - state.last_change_epoch < self.every_n_epochs:
            return state.batch_size
        size = max(
            round_to_multiple(state.noise_scale / state.replicas, self.multiple), self.min_size
        )
        return size if self.max_size is None else min(size, self.max_size)


def lr_scale(global_batch: int, initial_global_batch: int, rule: LRScaling) -> float:
    """Learning-rate factor for a global batch relative to the one the LR was tuned for.

    Args:
        global_batch: the global batch size now.
        initial_global_batch: the global batch size at the start.
        rule: ``"linear"`` (Goyal et al. 2017), ``"sqrt"`` (Krizhevsky 2014; Hoffer et
            al. 2017) or ``"none"``.
    """
    ratio = global_batch / initial_global_batch
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
