"""Hessian monitors: sharpness, the smallest eigenvalue and the saddle/minimum label."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape._batches import BatchSizeFn
from lightning_landscape._context import Mode
from lightning_landscape._params import ParamFilter
from lightning_landscape._validation import (
    check_bool,
    check_device,
    check_int,
    check_positive_float,
)
from lightning_landscape.callbacks._logging import Layout, figures_folder, log_density
from lightning_landscape.callbacks._loss import LossFn
from lightning_landscape.callbacks.base import Probe, ProbeLossMonitor
from lightning_landscape.curvature import (
    EigenResult,
    ScaledOperator,
    SpectralDensity,
    SymmetricOperator,
    lanczos,
    slq_with_trace,
)
from lightning_landscape.curvature._checks import check_eigen_args
from lightning_landscape.curvature.trace import MIN_SAMPLES
from lightning_landscape.stability import (
    KNOWN_OPTIMIZERS,
    preconditioner,
    stability_threshold,
    stepping_optimizer,
)


class HessianEigenvalueMonitor(ProbeLossMonitor):
    """Sharpness (top Hessian eigenvalues), λ_min and whether the point is a saddle.

    One warm-started Lanczos run per measurement gives the ``k`` largest and the smallest
    eigenvalues of the Hessian of the probe loss. Logged under ``landscape/hessian/``:
    ``lambda_max`` (and ``lambda_<i>``, i = 1..k, when ``k > 1``), ``lambda_min``,
    ``neg_ratio`` = |min(λ_min, 0)|/λ_max, ``saddle`` (1 when λ_min < −saddle_tol·|λ_max|,
    else 0 for minimum-like), ``grad_norm`` of the probe loss, ``stability_threshold``
    (2/η for SGD, (2+2β)/η with momentum β, of the optimiser stepping the measured
    parameters; none when several do, nor for an optimiser whose stability it does not
    know, as a warning says), ``n_hvp`` and ``seconds``. Where stability
    depends on a preconditioned Hessian, also ``preconditioned_lambda_max`` = λ_max(P⁻¹H)
    next to ``preconditioned_threshold``: with Adam or AdamW, ``P = (1 − β₁ᵗ)·diag(√v̂ + ε)`` from
    the optimiser's state and the threshold (2+2β₁)/((1−β₁)η), 38/η for β₁ = 0.9 (Cohen
    et al. 2022); with RMSprop, ``P = diag(√v + ε)`` and (2+2μ)/η with momentum μ; with
    SGD whose parameter groups step at different rates η_g (a slower
    backbone), ``P⁻¹ = η_g/η`` and the first measured group's threshold, instead of
    ``stability_threshold``. The smallest Ritz value is an upper bound of λ_min: a
    ``saddle`` label is never an artefact of an unconverged solver, and a minimum-like
    label waits until a λ_min near zero is known to a tenth of the tolerance.

    Args:
        k: number of largest eigenvalues.
        which: ``"both"`` (k largest and the smallest), ``"largest"`` or ``"smallest"``.
        tol: residual tolerance of each eigenpair: ``‖Hv − λv‖ <= tol·max|λ|``,
            relative to the spectral radius, except for a λ_min not clearly negative, which
            is wanted to ``tol·max(|λ_min|, λ_max/10)`` before the point is called
            minimum-like.
            The default 1e-2 keeps λ_max typically within 1e-4 (its error is about
            ‖r‖²/gap) and λ_min within about 2 % of λ_max, what the saddle test needs. The
            smallest Ritz value never lies below λ_min, so the ``saddle`` label can only err
            towards minimum-like, for a λ_min that close to the threshold.
        max_iter: most Hessian-vector products per measurement; a value still short of
            ``tol`` when they run out is not logged (a warning says so), but a saddle the
            smallest Ritz value already proves is.
        params: regular expressions selecting the parameters (a block of the Hessian).
        mode: ``"train"`` measures the network as training runs it, each submodule in
            the mode it trains in (a frozen BatchNorm stays in eval): the curvature the
            optimiser sees; ``"eval"`` puts every submodule in eval mode.
        saddle_tol: the point is a saddle when λ_min < −saddle_tol·|λ_max|.
        warm_start: start each run from the previous eigenvectors (far fewer products).
        checkpoint_warm_start: keep those eigenvectors in checkpoints, so a resumed run
            starts warm too. Each is a bfloat16 copy of the selected parameters: with the
            default ``k=1`` and Adam's preconditioned run, three of them add half again to
            a checkpoint holding the weights and Adam's state in float32. Without them the
            first measurement after a resume starts cold (on the digits CNN, 4 more
            products under SGD, 9 under Adam).
        preconditioned: with Adam, AdamW, RMSprop or SGD with per-group rates, also measure the
            preconditioned sharpness ``λ_max(P⁻¹H)`` that decides their stability (a
            second Lanczos run of about 6 warm-started products: on the digits CNN
            benchmark the measurements take about 18 % of the training time under Adam,
            7-10 % under SGD).
        basis_device: where the Lanczos vectors live: ``None`` on the model's device,
            ``"cpu"`` to spare accelerator memory on large models (each vector is one copy
            of the selected parameters; a measurement holds up to 16 of them, more if it
            needs more products).
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
        seed: seed of the probe draw, dropout masks and random start vectors.
        name: names this monitor, to run several of its kind in one Trainer (e.g. on
            different ``params``): its metrics then go under ``landscape/hessian/<name>/``.
    """

    metric_prefix = "landscape/hessian"

    def __init__(
        self,
        k: int = 1,
        which: Literal["both", "largest", "smallest"] = "both",
        tol: float = 1e-2,
        max_iter: int = 100,
        params: ParamFilter = None,
        mode: Mode = "train",
        saddle_tol: float = 1e-2,
        warm_start: bool = True,
        checkpoint_warm_start: bool = True,
        preconditioned: bool = True,
        basis_device: str | None = None,
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
        check_eigen_args(k, which, tol, max_iter, size=k)
        check_positive_float("saddle_tol", saddle_tol)
        self._set_probe_loss_args(params, mode, batch_size_fn)
        self.k = k
        self.which = which
        self.tol = tol
        self.max_iter = max_iter
        self.saddle_tol = saddle_tol
        self.warm_start = check_bool("warm_start", warm_start)
        self.checkpoint_warm_start = check_bool("checkpoint_warm_start", checkpoint_warm_start)
        self.preconditioned = check_bool("preconditioned", preconditioned)
        self.basis_device = check_device("basis_device", basis_device)
        self._warm: Tensor | None = None
        self._warm_preconditioned: Tensor | None = None

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, float]:
        with self._operator(pl_module, batches) as operator:
            optimizer = stepping_optimizer(trainer.optimizers, operator.parameters)
            result = self._lanczos(operator, self.k, self.which, self._warm)
            metrics = {
                f"{self.metric_prefix}/grad_norm": float(operator.gradient.norm()),
                f"{self.metric_prefix}/n_hvp": float(result.n_hvp),
            }
            scaling = (
                preconditioner(optimizer, operator.parameters)
                if self.preconditioned and self.which != "smallest" and optimizer is not None
                else None
            )
            unsettled = []  # what max_iter ran out before: left unlogged, as it is unknown
            if scaling is not None:
                scaled = ScaledOperator(operator, operator.flatten(scaling.inverse_sqrt))
                preconditioned = self._lanczos(scaled, 1, "largest", self._warm_preconditioned)
                if preconditioned.pair_converged[0]:
                    metrics[f"{self.metric_prefix}/preconditioned_lambda_max"] = float(
                        preconditioned.eigenvalues[0]
                    )
                else:
                    unsettled.append("the preconditioned λ_max")
                metrics[f"{self.metric_prefix}/preconditioned_threshold"] = scaling.threshold
                metrics[f"{self.metric_prefix}/n_hvp"] += preconditioned.n_hvp
                if self.warm_start:
                    self._warm_preconditioned = preconditioned.eigenvectors.detach().to("cpu")
        if self.warm_start:
            self._warm = result.eigenvectors.detach().to("cpu")
        values, settled = result.eigenvalues.tolist(), result.pair_converged.tolist()
        top_settled, bottom_settled = all(settled[: self.k]), settled[-1]
        if self.which != "smallest":
            if top_settled:
                metrics[f"{self.metric_prefix}/lambda_max"] = values[0]
                if self.k > 1:
                    metrics.update(
                        {
                            f"{self.metric_prefix}/lambda_{i + 1}": v
                            for i, v in enumerate(values[: self.k])
                        }
                    )
            else:
                unsettled.append("λ_max")
            threshold = stability_threshold(optimizer, operator.parameters) if optimizer else None
            if optimizer is not None and not isinstance(optimizer, KNOWN_OPTIMIZERS):
                self._warn_once(
                    "unknown-optimizer",
                    f"logs no stability threshold for {type(optimizer).__name__}: it knows "
                    "those of SGD, Adam, AdamW and RMSprop; λ_max is logged alone",
                )
            if threshold is not None:
                metrics[f"{self.metric_prefix}/stability_threshold"] = threshold
        if self.which != "largest":
            if bottom_settled:
                metrics[f"{self.metric_prefix}/lambda_min"] = values[-1]
            else:
                unsettled.append("λ_min")
        if self.which == "both" and top_settled:
            lambda_max, lambda_min = values[0], values[-1]
            saddle = lambda_min < -self.saddle_tol * abs(lambda_max)
            if bottom_settled:
                metrics[f"{self.metric_prefix}/neg_ratio"] = (
                    abs(min(lambda_min, 0.0)) / abs(lambda_max) if lambda_max else 0.0
                )
            if bottom_settled or saddle:  # the smallest Ritz value bounds λ_min from above
                metrics[f"{self.metric_prefix}/saddle"] = float(saddle)
        if unsettled:
            self._warn_once(
                "unsettled",
                f"ran out of its max_iter={self.max_iter} products at step "
                f"{self._last_step}: {' and '.join(unsettled)} not logged, as not known "
                "to the tolerance; raise max_iter",
            )
        return metrics

    def _lanczos(
        self, operator: SymmetricOperator, k: int, which: str, warm: Tensor | None
    ) -> EigenResult:
        init = (
            warm
            if self.warm_start and warm is not None and warm.shape[1] == operator.size
            else None
        )
        # λ_min matters next to λ_max (the saddle test), not to digits of its own: wanting
        # a clearly negative one to tol·λ_max instead of tol·|λ_min| saves two thirds of
        # the products. One near zero is still wanted to a tenth of that: otherwise the
        # bottom Ritz value stops in the dense bulk near zero before the Krylov space has
        # reached an isolated negative eigenvalue (digits CNN: 12 of 100 cold and 4 of 40
        # warm measurements under Adam called a saddle a minimum).
        return lanczos(
            operator,
            k,
            which,
            self.tol,
            self.max_iter,
            init,
            self.seed,
            self.basis_device,
            relative_to="spectral_radius_if_negative",
        )

    def layout(self) -> Layout:
        top = [f"{self.metric_prefix}/lambda_max", f"{self.metric_prefix}/stability_threshold"]
        if self.k > 1:
            top += [f"{self.metric_prefix}/lambda_{i + 1}" for i in range(1, self.k)]
        return {
            "landscape": {
                "sharpness vs stability threshold (2/lr)": ["Multiline", top],
                "smallest eigenvalue": ["Multiline", [f"{self.metric_prefix}/lambda_min"]],
                "saddle label and |lambda_min|/lambda_max": [
                    "Multiline",
                    [f"{self.metric_prefix}/saddle", f"{self.metric_prefix}/neg_ratio"],
                ],
                "preconditioned sharpness vs its threshold (Adam, RMSprop, SGD with per-group rates)": [
                    "Multiline",
                    [
                        f"{self.metric_prefix}/preconditioned_lambda_max",
                        f"{self.metric_prefix}/preconditioned_threshold",
                    ],
                ],
                "probe gradient norm": ["Multiline", [f"{self.metric_prefix}/grad_norm"]],
                "cost of the Hessian monitor": [
                    "Multiline",
                    [f"{self.metric_prefix}/n_hvp", f"{self.metric_prefix}/seconds"],
                ],
            }
        }

    def state_dict(self) -> dict[str, Any]:
        # A start vector needs no more digits than bfloat16's: they are mixed with 1 %
        # noise anyway, and each is a copy of the parameters in every checkpoint.
        kept = self.checkpoint_warm_start
        return {
            **super().state_dict(),
            "warm_start": _compact(self._warm) if kept else None,
            "warm_start_preconditioned": _compact(self._warm_preconditioned) if kept else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._warm = state_dict.get("warm_start")
        self._warm_preconditioned = state_dict.get("warm_start_preconditioned")


class HessianSpectrumMonitor(ProbeLossMonitor):
    """The Hessian's trace and eigenvalue spectral density, by default once an epoch.

    The density comes from stochastic Lanczos quadrature, and the trace from the same
    products: the first Lanczos basis serves as Hutch++'s sketch, and block-sign probes
    estimate the rest (``slq_with_trace``). Logged under ``landscape/spectrum/``:
    ``trace`` and ``trace_stderr``, ``negative_mass`` (the share of the spectrum clearly
    below zero, by more than the density's resolution of 1 % of the spectral width),
    ``n_hvp`` and ``seconds``; the density as a TensorBoard histogram and an image (rank
    0). A measurement costs at most ``trace_max_iter + n_vectors · n_steps`` products
    (108 by default, about 250 training steps' worth; 80 when the trace converges early).

    Args:
        trace_tol: stop the trace once its standard error is this fraction of it.
        trace_max_iter: most products for the trace beyond the density's (at least 32:
            four samples of up to 8 sign patterns).
        n_vectors: SLQ start vectors.
        n_steps: Lanczos steps per SLQ vector.
        basis_device: where the ``n_steps`` Lanczos vectors live: ``None`` on the model's
            device, ``"cpu"`` to spare accelerator memory on large models.
        params: regular expressions selecting the parameters (a block of the Hessian).
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
        seed: seed of the probe draw, dropout masks and random vectors.
        name: names this monitor, to run several of its kind in one Trainer (e.g. on
            different ``params``): its metrics then go under ``landscape/spectrum/<name>/``.
    """

    metric_prefix = "landscape/spectrum"

    def __init__(
        self,
        trace_tol: float = 1e-2,
        trace_max_iter: int = 60,
        n_vectors: int = 1,
        n_steps: int = 48,
        basis_device: str | None = None,
        params: ParamFilter = None,
        mode: Mode = "train",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
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
        check_positive_float("trace_tol", trace_tol)
        check_int("trace_max_iter", trace_max_iter, minimum=MIN_SAMPLES * 8)
        check_int("n_vectors", n_vectors, minimum=1)
        check_int("n_steps", n_steps, minimum=1)
        self._set_probe_loss_args(params, mode, batch_size_fn)
        self.trace_tol = trace_tol
        self.trace_max_iter = trace_max_iter
        self.n_vectors = n_vectors
        self.n_steps = n_steps
        self.basis_device = check_device("basis_device", basis_device)
        self._density: SpectralDensity | None = None

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, float]:
        with self._operator(pl_module, batches) as operator:
            density, trace = slq_with_trace(
                operator,
                self.n_vectors,
                self.n_steps,
                self.trace_tol,
                self.trace_max_iter,
                generator=self.seed,
                basis_device=self.basis_device,
                block_sizes=operator.block_sizes,
            )
        self._density = density
        return {
            f"{self.metric_prefix}/trace": trace.trace,
            f"{self.metric_prefix}/trace_stderr": trace.stderr,
            f"{self.metric_prefix}/negative_mass": density.negative_mass,
            f"{self.metric_prefix}/n_hvp": float(trace.n_hvp + density.n_hvp),
        }

    def on_measured(self, trainer: pl.Trainer, step: int) -> None:
        assert self._density is not None
        log_density(
            trainer,
            f"{self.metric_prefix}/density",
            self._density.grid,
            self._density.density,
            step,
            figures_folder(trainer),
        )
        self._density = None

    def layout(self) -> Layout:
        return {
            "landscape": {
                "Hessian trace": ["Multiline", [f"{self.metric_prefix}/trace"]],
                "negative mass of the spectrum": [
                    "Multiline",
                    [f"{self.metric_prefix}/negative_mass"],
                ],
                "cost of the spectrum monitor": [
                    "Multiline",
                    [f"{self.metric_prefix}/n_hvp", f"{self.metric_prefix}/seconds"],
                ],
            }
        }


def _compact(vectors: Tensor | None) -> Tensor | None:
    return None if vectors is None else vectors.to(torch.bfloat16)
