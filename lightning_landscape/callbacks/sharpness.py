"""SharpnessMonitor: SAM, adaptive, worst-case and average sharpness on the probe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl

from lightning_landscape import sharpness
from lightning_landscape._batches import BatchSizeFn
from lightning_landscape._context import Mode
from lightning_landscape._params import ParamFilter
from lightning_landscape._validation import check_choice, check_int, check_positive_float
from lightning_landscape.callbacks._logging import Layout
from lightning_landscape.callbacks._loss import LossFn
from lightning_landscape.callbacks.base import Probe, ProbeLossMonitor
from lightning_landscape.curvature import HessianOperator

Measure = Literal["sam", "adaptive", "worst_case", "average"]


class SharpnessMonitor(ProbeLossMonitor):
    """Sharpness of the probe loss around the weights, under ``landscape/sharpness/``.

    ``sam``: L(w + ρ g/‖g‖) − L(w) (Foret et al. 2021); ``adaptive``: the same in
    coordinates scaled by |w| (ASAM, Kwon et al. 2021); ``worst_case``: Keskar et al.'s
    100·(max L − L)/(1 + L) over the box |δ_i| <= ε(|w_i| + 1); ``average``: E L(w + δ) − L(w)
    for δ ~ N(0, σ²I), with ``average_stderr``. The weights are never written: perturbed
    losses are evaluated on shifted copies. Also logged: ``n_evaluations`` and ``seconds``.

    Args:
        measures: which measures to take (each costs about ``n`` forward passes:
            sam 2, adaptive 2, worst_case ``1 + worst_case_steps`` with gradients,
            average ``1 + 2·samples``).
        rho: SAM radius.
        adaptive_rho: ASAM radius in the |w|-scaled coordinates.
        epsilon: relative size of the worst-case box.
        worst_case_steps: projected-ascent steps of the worst case.
        sigma: standard deviation of the average-case perturbation.
        samples: antithetic pairs of the average case.
        params: regular expressions selecting the perturbed parameters.
        mode: ``"train"``: each submodule in the mode it trains in; ``"eval"``: all in
            eval mode.
        every_n_steps: measure every this many optimizer steps (``None``: never by steps).
        every_n_epochs: measure at the end of every this many epochs (``None``: never).
        measure_at_start: also measure before the first optimizer step.
        measure_at_end: also measure when training ends.
        probe: ``"fixed"`` probe batches drawn once, or the ``"current"`` batch.
        probe_batches: number of fixed probe batches.
        loss_fn: ``loss_fn(module, batch)``; by default the module's ``training_step``.
        batch_size_fn: ``batch_size_fn(batch)``, the sample count of a probe batch, which
            weights it among several probe batches and DDP ranks; by default the first
            dimension of its first tensor.
        seed: seed of the probe draw, dropout masks and random perturbations.
        name: names this monitor, to run several of its kind in one Trainer (e.g. on
            different ``params``): its metrics then go under ``landscape/sharpness/<name>/``.
    """

    metric_prefix = "landscape/sharpness"

    def __init__(
        self,
        measures: Sequence[Measure] = ("sam", "adaptive"),
        rho: float = 0.05,
        adaptive_rho: float = 0.5,
        epsilon: float = 1e-3,
        worst_case_steps: int = 10,
        sigma: float = 0.01,
        samples: int = 8,
        params: ParamFilter = None,
        mode: Mode = "train",
        every_n_steps: int | None = 300,
        every_n_epochs: int | None = None,
        measure_at_start: bool = False,
        measure_at_end: bool = True,
        probe: Probe = "fixed",
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
        if isinstance(measures, str) or not measures:
            raise ValueError(
                f"`measures` must be a non-empty list of measure names, got {measures!r}"
            )
        for measure in measures:
            check_choice("measures", measure, ("sam", "adaptive", "worst_case", "average"))
        for arg, value in (
            ("rho", rho),
            ("adaptive_rho", adaptive_rho),
            ("epsilon", epsilon),
            ("sigma", sigma),
        ):
            check_positive_float(arg, value)
        check_int("worst_case_steps", worst_case_steps, minimum=1)
        check_int("samples", samples, minimum=2)
        self._set_probe_loss_args(params, mode, batch_size_fn)
        self.measures = list(dict.fromkeys(measures))
        self.rho = rho
        self.adaptive_rho = adaptive_rho
        self.epsilon = epsilon
        self.worst_case_steps = worst_case_steps
        self.sigma = sigma
        self.samples = samples

    def _take(self, name: str, operator: HessianOperator) -> sharpness.SharpnessResult:
        if name == "sam":
            return sharpness.sam(operator, self.rho)
        if name == "adaptive":
            return sharpness.adaptive(operator, self.adaptive_rho)
        if name == "worst_case":
            return sharpness.worst_case(operator, self.epsilon, self.worst_case_steps)
        return sharpness.average(operator, self.sigma, self.samples, self.seed)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        evaluations = 0
        with self._operator(pl_module, batches) as operator:
            for name in self.measures:
                result = self._take(name, operator)
                metrics[f"{self.metric_prefix}/{name}"] = result.value
                evaluations += result.n_evaluations
                if name == "average":
                    metrics[f"{self.metric_prefix}/average_stderr"] = result.stderr
        metrics[f"{self.metric_prefix}/n_evaluations"] = float(evaluations)
        return metrics

    def layout(self) -> Layout:
        tags = [f"{self.metric_prefix}/{name}" for name in self.measures]
        return {
            "landscape": {
                "sharpness": ["Multiline", tags],
                "cost of the sharpness monitor": [
                    "Multiline",
                    [f"{self.metric_prefix}/n_evaluations", f"{self.metric_prefix}/seconds"],
                ],
            }
        }
