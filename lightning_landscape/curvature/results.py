"""What the curvature functions return."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: 1-D float64 tensor in descending order; for ``which="both"`` the
            ``k`` largest followed by the ``k`` smallest.
        eigenvectors: one unit eigenvector per row, in the order of ``eigenvalues``, as
            flat vectors (``HessianOperator.unflatten`` splits them per parameter).
        residuals: ``‖Hv − λv‖`` of each pair.
        n_hvp: Hessian-vector products used.
        converged: whether every pair met the tolerance.
        pair_converged: whether each pair met it, in the order of ``eigenvalues`` (when
            the products ran out, those that did are still known to the tolerance).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    n_hvp: int
    converged: bool
    pair_converged: Tensor


@dataclass
class TraceResult:
    """A stochastic trace estimate.

    Attributes:
        trace: the estimate.
        stderr: its standard error (from the spread of the random samples).
        n_hvp: Hessian-vector products used.
        converged: whether ``stderr <= tol * |trace|`` was reached within the budget.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"krylov hutch++"``.
    """

    trace: float
    stderr: float
    n_hvp: int
    converged: bool
    method: str


@dataclass
class SpectralDensity:
    """An eigenvalue density from stochastic Lanczos quadrature.

    The density is the average over random start vectors of Gauss quadrature rules: node
    ``nodes[i, j]`` carries weight ``weights[i, j] / n_vectors``; the rules are exact for
    polynomials up to degree ``2 * n_steps - 1``. Unused slots (a run that found an
    invariant subspace early) have weight 0.

    Attributes:
        nodes: ``(n_vectors, n_steps)`` Ritz values.
        weights: ``(n_vectors, n_steps)`` quadrature weights; each row sums to 1.
        grid: points where ``density`` is evaluated.
        density: Gaussian-smoothed density on ``grid``; integrates to 1.
        bandwidth: standard deviation of the smoothing Gaussians.
        negative_mass: share of the spectrum below ``-bandwidth`` (clearly negative: the
            quadrature cannot tell the sign of eigenvalues closer to zero than that).
        n_hvp: Hessian-vector products used.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    bandwidth: float
    negative_mass: float
    n_hvp: int

    @property
    def mean(self) -> float:
        """Mean eigenvalue of the quadrature measure (an estimate of trace / size)."""
        return float((self.nodes * self.weights).sum() / self.weights.shape[0])
