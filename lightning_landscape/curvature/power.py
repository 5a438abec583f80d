"""Power iteration with deflation (the method of PyHessian, with correct ordering)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape.curvature._checks import (
    check_eigen_args,
    check_symmetric,
    residual_small,
)
from lightning_landscape.curvature.linear_operator import (
    SymmetricOperator,
    gaussian,
    make_generator,
)
from lightning_landscape.curvature.results import EigenResult


@dataclass
class _Pair:
    value: float
    vector: Tensor
    residual: float
    converged: bool
    n_hvp: int


def _iterate(
    operator: SymmetricOperator,
    start: Tensor,
    *,
    sign: float,
    shift: float,
    deflate: list[Tensor],
    tol: float,
    max_iter: int,
) -> _Pair:
    """Power iteration on ``sign · (H − shift·I)`` restricted to the complement of ``deflate``.

    Convergence is judged on ``H`` itself: ``‖Hv − θv‖ <= tol·|θ|``.

    Raises:
        AsymmetricOperatorError: if two iterates ``u, v`` give ``⟨u, Hv⟩ ≠ ⟨Hu, v⟩``
            beyond rounding (seen at no cost).
    """

    def project(x: Tensor) -> Tensor:
        for u in deflate:
            x = x - torch.dot(u, x) * u
        return x / torch.linalg.vector_norm(x)

    v = project(start)
    value, residual, scale = 0.0, float("inf"), 0.0
    previous: tuple[Tensor, Tensor] | None = None
    for iteration in range(1, max_iter + 1):
        hv = operator.matvec(v)
        value = float(torch.dot(v, hv))
        scale = max(scale, float(torch.linalg.vector_norm(hv)))  # at most ‖H‖
        if previous is not None:
            u, hu = previous
            asymmetry = abs(float(torch.dot(u, hv) - torch.dot(hu, v)))
            check_symmetric(asymmetry, scale, "⟨u, Hv⟩ − ⟨Hu, v⟩ of two iterates")
        previous = v, hv
        residual = float(torch.linalg.vector_norm(hv - value * v))
        if residual_small(residual, value, tol, abs(value)):
            return _Pair(value, v, residual, True, iteration)
        v = project(sign * (hv - shift * v))
    return _Pair(value, v, residual, False, max_iter)


def power_iteration(
    operator: SymmetricOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_iter: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | int | None = None,
) -> EigenResult:
    """Extreme eigenpairs by power iteration with deflation.

    Plain power iteration finds the eigenvalue of largest *magnitude*; PyHessian reports
    that as the top eigenvalue even when it is negative. Here, if the dominant eigenvalue
    lies at the other end, it is used as a shift (``H + |μ|I`` is positive semi-definite)
    so the result is the largest (or smallest) *algebraic* eigenvalue. Further pairs come
    from deflation against the pairs found.

    Args:
        operator: the symmetric operator.
        k: number of eigenvalues wanted at each requested end.
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        tol: relative residual tolerance.
        max_iter: most products per eigenpair.
        init: start vectors (rows), used in order; random where missing.
        generator: seed or generator of the random starts.

    Returns:
        An :class:`EigenResult` (``n_hvp`` counts every product, shift runs included).

    Raises:
        AsymmetricOperatorError: if the operator's products are not symmetric (seen at no
            cost, from consecutive iterates).
    """
    check_eigen_args(k, which, tol, max_iter, operator.size)
    rng = make_generator(operator, generator)
    starts = [] if init is None else list(init.reshape(-1, operator.size))

    def run(sign: float, shift: float, deflate: list[Tensor]) -> _Pair:
        start = starts.pop(0) if starts else gaussian(operator, rng)
        start = start.to(device=operator.device, dtype=operator.dtype)
        return _iterate(
            operator, start, sign=sign, shift=shift, deflate=deflate, tol=tol, max_iter=max_iter
        )

    dominant = run(1.0, 0.0, [])
    runs = [dominant]
    pairs: list[_Pair] = []
    for side, sign in (("largest", 1.0), ("smallest", -1.0)):
        if which not in (side, "both"):
            continue
        found = [dominant] if sign * dominant.value >= 0 else []
        while len(found) < k:
            # sign·(H − shift·I) is positive semi-definite: its dominant pair is our end's.
            found.append(run(sign, -sign * abs(dominant.value), [p.vector for p in found]))
            runs.append(found[-1])
        found.sort(key=lambda p: -p.value)
        pairs += found
    return EigenResult(
        eigenvalues=torch.tensor([p.value for p in pairs], dtype=torch.float64),
        eigenvectors=torch.stack([p.vector for p in pairs]),
        residuals=torch.tensor([p.residual for p in pairs], dtype=torch.float64),
        n_hvp=sum(r.n_hvp for r in runs),
        converged=all(p.converged for p in pairs),
        pair_converged=torch.tensor([p.converged for p in pairs]),
    )
