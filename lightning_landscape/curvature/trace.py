"""Stochastic trace estimators: Hutchinson and Hutch++ with Rademacher vectors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_landscape._validation import check_int, check_positive_float
from lightning_landscape.curvature.linear_operator import SymmetricOperator, make_generator, rademacher
from lightning_landscape.curvature.results import TraceResult

# Fewest random samples before the sample standard error is trusted for stopping.
MIN_SAMPLES = 8


class _Samples:
    """Running mean and standard error of quadratic-form samples ``zᵀHz``."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, operator: SymmetricOperator, z: torch.Tensor) -> None:
        self.values.append(float(torch.dot(z, operator.matvec(z))))

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)

    @property
    def stderr(self) -> float:
        n = len(self.values)
        if n < 2:
            return float("inf")
        mean = self.mean
        return math.sqrt(math.fsum((v - mean) ** 2 for v in self.values) / (n - 1) / n)


def _sample_until(
    operator: SymmetricOperator,
    samples: _Samples,
    rng: torch.Generator,
    budget: int,
    tol: float,
    offset: float = 0.0,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> bool:
    """Draw samples until ``stderr <= tol·|offset + mean|`` or the budget is spent."""
    for _ in range(budget):
        z = rademacher(operator, rng)
        samples.add(operator, z if project is None else project(z))
        if len(samples.values) >= MIN_SAMPLES and samples.stderr <= tol * abs(offset + samples.mean):
            return True
    return False


def hutchinson(
    operator: SymmetricOperator,
    tol: float = 1e-2,
    max_iter: int = 100,
    generator: torch.Generator | int | None = None,
) -> TraceResult:
    """Hutchinson's estimator ``tr(H) ≈ mean(zᵀHz)`` over Rademacher vectors ``z``.

    Args:
        operator: the symmetric operator.
        tol: stop once the standard error is at most ``tol`` times the estimate.
        max_iter: most products.
        generator: seed or generator of the random vectors.
    """
    check_positive_float("tol", tol)
    check_int("max_iter", max_iter, minimum=2)
    samples = _Samples()
    converged = _sample_until(operator, samples, make_generator(operator, generator), max_iter, tol)
    return TraceResult(samples.mean, samples.stderr, len(samples.values), converged, "hutchinson")


def hutchpp(
    operator: SymmetricOperator,
    tol: float = 1e-2,
    max_iter: int = 100,
    sketch_size: int = 10,
    generator: torch.Generator | int | None = None,
) -> TraceResult:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace, Hutchinson on the rest.

    ``Q`` spans ``H S`` for a Rademacher sketch ``S``; ``tr(QᵀHQ)`` is computed exactly
    and the remainder ``tr((I−QQᵀ)H(I−QQᵀ))`` by Hutchinson, whose samples give the
    standard error. Neural-network Hessians have a few outlying eigenvalues that dominate
    Hutchinson's variance; removing them buys a much smaller error for the same products.

    Args:
        operator: the symmetric operator.
        tol: stop once the standard error is at most ``tol`` times the estimate.
        max_iter: most products (the sketch takes ``2 * sketch_size``).
        sketch_size: dimension of the sketched subspace.
        generator: seed or generator of the random vectors.
    """
    check_positive_float("tol", tol)
    check_int("sketch_size", sketch_size, minimum=1)
    check_int("max_iter", max_iter, minimum=2 * sketch_size + 2)
    rng = make_generator(operator, generator)
    sketch = rademacher(operator, rng, sketch_size)
    images = torch.stack([operator.matvec(s) for s in sketch], dim=1)
    q = torch.linalg.qr(images).Q.T  # orthonormal rows spanning H S
    low_rank = math.fsum(float(torch.dot(row, operator.matvec(row))) for row in q)

    def deflate(z: torch.Tensor) -> torch.Tensor:
        return z - q.T @ (q @ z)

    samples = _Samples()
    budget = max_iter - 2 * sketch_size
    converged = _sample_until(operator, samples, rng, budget, tol, low_rank, deflate)
    return TraceResult(
        low_rank + samples.mean, samples.stderr, 2 * sketch_size + len(samples.values), converged, "hutch++"
    )
