"""GradientNoiseScaleMonitor: the simple noise scale B_simple = tr(Σ)/|G|², smoothed."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_landscape._batches import BatchSizeFn
from lightning_landscape._context import Mode
from lightning_landscape._params import ParamFilter
from lightning_landscape._validation import check_callable, check_int
from lightning_landscape.callbacks._logging import Layout
from lightning_landscape.callbacks._loss import LossFn
from lightning_landscape.callbacks.base import Probe, ProbeLossMonitor, measurement_dtype
from lightning_landscape.gradients import SplitFn, gradient_noise_scale


class GradientNoiseScaleMonitor(ProbeLossMonitor):
    """The gradient noise scale (McCandlish et al. 2018), a running estimate of the critical batch size.

    At each measurement the probe batch (by default the batch just trained on) is split
    into ``micro_batches``; their gradients and their mean give the unbiased two-batch-size
    estimates of |G|² and tr(Σ) (``gradient_noise_scale``), each smoothed by an exponential
    moving average; ``B_simple = tr(Σ)/|G|²`` of the averages. Under DDP every rank splits
    its own batch and the big batch is the union, so the estimate is that of the global
    batch. Logged under ``landscape/noise_scale/``: ``b_simple``, ``grad_sq``,
    ``trace_cov`` and ``seconds``; the current value is :attr:`b_simple` (the batch-size
    scheduler reads it). A measurement costs about one training step.

    Args:
        micro_batches: parts each probe batch is split into (its small batches).
        ema_decay: weight of the past in the moving averages (0: no smoothing).
        split_fn: ``split_fn(batch, parts)`` returns the micro-batches, for batches whose
            samples are not along the first dimension of every tensor (sequence-first
            tensors, a list of images of different sizes); by default each tensor is split
            along its first dimension.
        params: regular expressions selecting the parameters whose gradient counts.
        mode: ``"train"``: each submodule in the mode it trains in; ``"eval"``: all in
            eval mode.
        every_n_steps: measure every this many optimizer steps (``None``: never by steps).
        every_n_epochs: measure at the end of every this many epochs (``None``: never).
        measure_at_start: also measure before the first optimizer step.
        measure_at_end: also measure when training ends.
        probe: ``"current"`` batch (default) or ``"fixed"`` probe batches (the first is used).
        probe_batches: number of fixed probe batches.
        loss_fn: ``loss_fn(module, batch)``; by default the module's ``training_step``.
        batch_size_fn: ``batch_size_fn(batch)``, the sample count of a batch, which
            weights the micro-batches (and the ranks under DDP); by default the
            first dimension of its first tensor.
        seed: seed of the probe draw and dropout masks.
        name: names this monitor, to run several of its kind in one Trainer (e.g. on
            different ``params``): its metrics then go under ``landscape/noise_scale/<name>/``.
    """

    metric_prefix = "landscape/noise_scale"

    def __init__(
        self,
        micro_batches: int = 4,
        ema_decay: float = 0.9,
        split_fn: SplitFn | None = None,
        params: ParamFilter = None,
        mode: Mode = "train",
        every_n_steps: int | None = 50,
        every_n_epochs: int | None = None,
        measure_at_start: bool = False,
        measure_at_end: bool = False,
        probe: Probe = "current",
        probe_batches: int = 1,
        loss_fn: LossFn | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(
            every_n_steps,
            every_n_epochs,
            measure_at_start,
            measure_at_end,
            probe,
            probe_batches,
            loss_fn,
            seed,
            name,
        )
        check_int("micro_batches", micro_batches, minimum=2)
        if (
            isinstance(ema_decay, bool)
            or not isinstance(ema_decay, (int, float))
            or not 0 <= ema_decay < 1
        ):
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay!r}")
        self._set_probe_loss_args(params, mode, batch_size_fn)
        self.micro_batches = micro_batches
        self.split_fn = check_callable("split_fn", split_fn, "split_fn(batch, parts)")
        self.ema_decay = float(ema_decay)
        self._averages: tuple[float, float] | None = None  # (|G|², tr Σ)

    @property
    def b_simple(self) -> float | None:
        """The current smoothed noise scale; ``None`` before the first measurement and
        while the smoothed ``|G|²`` estimate is not positive (a warning says so)."""
        if self._averages is None or self._averages[0] <= 0:
            return None
        return self._averages[1] / self._averages[0]

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, float]:
        assert self._loss_fn is not None
        estimate = gradient_noise_scale(
            pl_module,
            self._loss_fn,
            batches[0],
            self.micro_batches,
            split_fn=self.split_fn,
            batch_size_fn=self.batch_size_fn,
            params=self.params,
            mode=self._forward_mode,
            dtype=measurement_dtype(pl_module),
            seed=self.seed,
        )
        new = (estimate.grad_sq, estimate.trace_cov)
        if self._averages is None:
            self._averages = new
        else:
            decay = self.ema_decay
            self._averages = tuple(
                decay * old + (1 - decay) * value for old, value in zip(self._averages, new)
            )
        metrics = {
            f"{self.metric_prefix}/grad_sq": self._averages[0],
            f"{self.metric_prefix}/trace_cov": self._averages[1],
        }
        if self.b_simple is not None:
            metrics[f"{self.metric_prefix}/b_simple"] = self.b_simple
        else:
            self._warn_once(
                "unresolved",
                f"logs no b_simple while its running estimate of |G|² is not positive "
                f"({self._averages[0]:.3g} at step {trainer.global_step}): the gradient noise "
                "of the measured batch hides the mean gradient, so the noise scale lies "
                "beyond what that batch resolves (a NoiseScaleSchedule keeps its size). "
                "Larger batches or a larger `ema_decay` resolve it",
            )
        return metrics

    def layout(self) -> Layout:
        return {
            "landscape": {
                "gradient noise scale B_simple (critical batch size)": [
                    "Multiline",
                    [f"{self.metric_prefix}/b_simple"],
                ],
                "|G|^2 and tr(Sigma)": [
                    "Multiline",
                    [f"{self.metric_prefix}/grad_sq", f"{self.metric_prefix}/trace_cov"],
                ],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "averages": self._averages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._averages = state_dict.get("averages")
