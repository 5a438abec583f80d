"""Argument checks and the convergence rule shared by the eigen-solvers."""

from __future__ import annotations

from lightning_landscape._validation import check_choice, check_int, check_positive_float

WHICH = ("largest", "smallest", "both")


def check_eigen_args(k: int, which: str, tol: float, max_iter: int, size: int) -> None:
    """Validate the common eigen-solver arguments against an operator of ``size``."""
    check_int("k", k, minimum=1)
    check_choice("which", which, WHICH)
    check_positive_float("tol", tol)
    check_int("max_iter", max_iter, minimum=k)
    if k > size:
        raise ValueError(f"`k`={k} exceeds the number of selected parameters ({size})")


def residual_small(residual: float, value: float, tol: float, scale: float) -> bool:
    """The convergence rule ``‖Hv − λv‖ <= tol · |λ|``.

    ``|λ|`` is floored at ``tol · scale`` (``scale`` the largest ``|λ|`` seen), so that an
    eigenvalue at zero, where a relative rule can never hold, converges once it is known
    to ``tol²`` of the spectral radius.
    """
    return residual <= tol * max(abs(value), tol * scale)
