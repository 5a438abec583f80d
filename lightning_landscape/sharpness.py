"""Sharpness measures: how much the loss rises in a neighbourhood of the weights (pure torch).

Each measure comes twice: on a :class:`~lightning_landscape.curvature.HessianOperator`
(``sam``, ``adaptive``, ``worst_case``, ``average``), which fixes the probe batches, dropout
masks and mode and lets several measures share one point, and as a one-call function on a
model (``sam_sharpness``, ``adaptive_sharpness``, ``worst_case_sharpness``,
``average_sharpness``). The weights themselves are never written: perturbed losses are
evaluated on shifted copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._batches import BatchSizeFn
from lightning_landscape._context import Mode
from lightning_landscape._params import ParamFilter
from lightning_landscape._stats import Samples
from lightning_landscape._validation import check_int, check_positive_float
from lightning_landscape.curvature.linear_operator import gaussian, make_generator
from lightning_landscape.curvature.operator import HessianOperator, LossFn


@dataclass
class SharpnessResult:
    """A sharpness value.

    Attributes:
        value: the measure (see each function for its definition).
        loss: the loss at the weights.
        stderr: standard error of a Monte-Carlo estimate (0 for deterministic measures).
        n_evaluations: loss (or loss-and-gradient) evaluations used.
    """

    value: float
    loss: float
    stderr: float
    n_evaluations: int


def _ascent_step(operator: HessianOperator, rho: float, scale: Tensor | None) -> Tensor:
    """``ρ T²g / ‖T g‖`` (T = diag(scale); T = I for SAM): the first-order worst direction."""
    gradient = operator.gradient
    scaled = gradient if scale is None else scale * gradient
    norm = torch.linalg.vector_norm(scaled)
    if norm == 0:
        return torch.zeros_like(gradient)
    return rho * (scaled if scale is None else scale * scaled) / norm


def sam(operator: HessianOperator, rho: float = 0.05) -> SharpnessResult:
    """SAM sharpness ``L(w + ρ g/‖g‖) − L(w)`` (Foret et al. 2021).

    Args:
        operator: the probe loss and its point.
        rho: radius of the perturbation.
    """
    check_positive_float("rho", rho)
    loss = float(operator.loss)
    perturbed = float(operator.loss_at(_ascent_step(operator, rho, None)))
    return SharpnessResult(perturbed - loss, loss, 0.0, 2)


def adaptive(operator: HessianOperator, rho: float = 0.5, eta: float = 0.01) -> SharpnessResult:
    """Adaptive (ASAM) sharpness ``L(w + ρ T²g/‖Tg‖) − L(w)``, ``T = diag(|w| + η)`` (Kwon et al. 2021).

    Scaling by ``|w|`` makes the measure invariant to the rescalings of ReLU networks that
    leave the function unchanged but fool plain SAM.

    Args:
        operator: the probe loss and its point.
        rho: radius in the rescaled coordinates (ASAM's default 0.5).
        eta: floor of the scale, so that zero weights still move.
    """
    check_positive_float("rho", rho)
    check_positive_float("eta", eta)
    scale = operator.parameters_vector.abs() + eta
    loss = float(operator.loss)
    perturbed = float(operator.loss_at(_ascent_step(operator, rho, scale)))
    return SharpnessResult(perturbed - loss, loss, 0.0, 2)


def worst_case(
    operator: HessianOperator, epsilon: float = 1e-3, steps: int = 10
) -> SharpnessResult:
    """Keskar et al. (2017) ε-sharpness ``100 · (max L(w + δ) − L(w)) / (1 + L(w))``.

    The maximum is over the box ``|δ_i| <= ε (|w_i| + 1)``, approached by projected
    sign-gradient ascent from ``δ = 0`` (steps of ``2.5/steps`` of the box, as in PGD); the
    best point visited counts. On a convex separable loss it reaches the exact maximum.

    Args:
        operator: the probe loss and its point.
        epsilon: relative size of the box.
        steps: ascent steps (each one loss-and-gradient evaluation).
    """
    check_positive_float("epsilon", epsilon)
    check_int("steps", steps, minimum=1)
    bound = epsilon * (operator.parameters_vector.abs() + 1)
    loss = float(operator.loss)
    delta = torch.zeros_like(bound)
    gradient = operator.gradient
    best = loss
    for _ in range(steps):
        delta = torch.clamp(delta + 2.5 / steps * bound * gradient.sign(), -bound, bound)
        value, gradient = operator.loss_and_gradient(delta)
        best = max(best, float(value))
    return SharpnessResult(100 * (best - loss) / (1 + loss), loss, 0.0, 1 + steps)


def average(
    operator: HessianOperator,
    sigma: float = 0.01,
    samples: int = 8,
    generator: torch.Generator | int | None = None,
) -> SharpnessResult:
    """Average-case sharpness ``E_δ L(w + δ) − L(w)``, ``δ ~ N(0, σ²I)``, with its standard error.

    Antithetic pairs ``(δ, −δ)`` cancel the first-order term: each sample is
    ``(L(w + δ) + L(w − δ))/2 − L(w)``, whose mean is ``σ²/2 · tr(H)`` to second order.

    Args:
        operator: the probe loss and its point.
        sigma: standard deviation of each coordinate of the perturbation.
        samples: antithetic pairs drawn.
        generator: seed or generator of the perturbations (identical on all processes).
    """
    check_positive_float("sigma", sigma)
    check_int("samples", samples, minimum=2)
    rng = make_generator(operator, generator)
    loss = float(operator.loss)
    rises = Samples()
    for _ in range(samples):
        delta = sigma * gaussian(operator, rng)
        pair = float(operator.loss_at(delta)) + float(operator.loss_at(-delta))
        rises.add(pair / 2 - loss)
    return SharpnessResult(rises.mean, loss, rises.stderr, 1 + 2 * samples)


def _on_model(
    measure: Callable[[HessianOperator], SharpnessResult],
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    params: ParamFilter,
    mode: Mode | None,
    dtype: torch.dtype | None,
    batch_size_fn: BatchSizeFn | None,
) -> SharpnessResult:
    with HessianOperator(
        model, loss_fn, batches, params, mode, dtype, batch_size_fn=batch_size_fn
    ) as operator:
        return measure(operator)


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    rho: float = 0.05,
    *,
    params: ParamFilter = None,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
) -> SharpnessResult:
    """SAM sharpness of ``model`` on ``batches`` (see :func:`sam`).

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches).
        rho: radius of the perturbation.
        params: parameter-name regular expressions selecting what is perturbed.
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: compute in ``torch.float32`` or ``torch.float64``.
        batch_size_fn: sample count of a batch, which weights it among several batches
            (and processes); by default the first dimension of its first tensor.
    """
    measure = partial(sam, rho=rho)
    return _on_model(measure, model, loss_fn, batches, params, mode, dtype, batch_size_fn)


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    rho: float = 0.5,
    eta: float = 0.01,
    *,
    params: ParamFilter = None,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
) -> SharpnessResult:
    """Adaptive (ASAM) sharpness of ``model`` on ``batches`` (see :func:`adaptive`).

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches).
        rho: radius in the rescaled coordinates.
        eta: floor of the scale.
        params: parameter-name regular expressions selecting what is perturbed.
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: compute in ``torch.float32`` or ``torch.float64``.
        batch_size_fn: sample count of a batch, which weights it among several batches
            (and processes); by default the first dimension of its first tensor.
    """
    measure = partial(adaptive, rho=rho, eta=eta)
    return _on_model(measure, model, loss_fn, batches, params, mode, dtype, batch_size_fn)


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    epsilon: float = 1e-3,
    steps: int = 10,
    *,
    params: ParamFilter = None,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
) -> SharpnessResult:
    """Keskar ε-sharpness of ``model`` on ``batches`` (see :func:`worst_case`).

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches).
        epsilon: relative size of the box.
        steps: ascent steps.
        params: parameter-name regular expressions selecting what is perturbed.
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: compute in ``torch.float32`` or ``torch.float64``.
        batch_size_fn: sample count of a batch, which weights it among several batches
            (and processes); by default the first dimension of its first tensor.
    """
    measure = partial(worst_case, epsilon=epsilon, steps=steps)
    return _on_model(measure, model, loss_fn, batches, params, mode, dtype, batch_size_fn)


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    sigma: float = 0.01,
    samples: int = 8,
    generator: torch.Generator | int | None = None,
    *,
    params: ParamFilter = None,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
) -> SharpnessResult:
    """Average-case sharpness of ``model`` on ``batches`` (see :func:`average`).

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches).
        sigma: standard deviation of each coordinate of the perturbation.
        samples: antithetic pairs drawn.
        generator: seed or generator of the perturbations.
        params: parameter-name regular expressions selecting what is perturbed.
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: compute in ``torch.float32`` or ``torch.float64``.
        batch_size_fn: sample count of a batch, which weights it among several batches
            (and processes); by default the first dimension of its first tensor.
    """
    measure = partial(average, sigma=sigma, samples=samples, generator=generator)
    return _on_model(measure, model, loss_fn, batches, params, mode, dtype, batch_size_fn)
