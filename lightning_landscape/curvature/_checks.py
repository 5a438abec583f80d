"""Argument checks and the convergence rule shared by the eigen-solvers."""

from __future__ import annotations

from lightning_landscape._validation import check_choice, check_int, check_positive_float
from lightning_landscape.errors import AsymmetricOperatorError

WHICH = ("largest", "smallest", "both")


def check_eigen_args(k: int, which: str, tol: float, max_iter: int, size: int) -> None:
    """Validate the common eigen-solver arguments against an operator of ``size``."""
    check_int("k", k, minimum=1)
    check_choice("which", which, WHICH)
    check_positive_float("tol", tol)
    check_int("max_iter", max_iter, minimum=k)
    if k > size:
        raise ValueError(f"`k`={k} exceeds the number of selected parameters ({size})")


RELATIVE_TO = ("eigenvalue", "spectral_radius", "spectral_radius_if_negative")

# Under "spectral_radius_if_negative", the fraction of the spectral radius below which a
# value not known to be negative is wanted to tol of the floor rather than of itself. A
# tenth finds a λ_min of −2 to −3 % of λ_max hidden behind 1 500 eigenvalues in
# [0, 0.01·λ_max] from 24 of 24 random starts (the spectral-radius rule: 7), and near the
# minimum of a 64-256-256-10 MLP on digits costs 13-20 warm-started products (the
# eigenvalue rule's floor tol: 34-42; the spectral-radius rule: 3-5).
UNPROVEN_FLOOR = 0.1


def residual_small(
    residual: float, value: float, tol: float, scale: float, relative_to: str = "eigenvalue"
) -> bool:
    """The convergence rule ``‖Hv − λv‖ <= tol · |λ|``.

    With ``relative_to="eigenvalue"`` ``|λ|`` is floored at ``tol · scale`` (``scale`` the
    largest ``|λ|`` seen), so that an eigenvalue at zero, where a relative rule can never
    hold, converges once it is known to ``tol²`` of the spectral radius. With
    ``"spectral_radius"`` every eigenvalue is wanted to ``tol · scale``: enough to compare
    λ_min with λ_max, and far cheaper for a λ_min at the edge of a dense bulk, whose Ritz
    vector (not value) converges slowly; but from a start with little weight on an
    isolated negative eigenvalue (a random one, or a warm one whose eigenvectors have
    turned), a bottom Ritz value still inside a bulk near zero passes it before the Krylov
    space has reached that eigenvalue. ``"spectral_radius_if_negative"`` applies the
    spectral-radius rule to a value below ``−tol · scale`` (a negative eigenvalue, known to
    exist, measured next to λ_max) and floors ``|λ|`` of the others at
    ``UNPROVEN_FLOOR · scale``, so no negative eigenvalue is ruled out before the products
    that would reveal it have run.
    """
    if relative_to == "spectral_radius" or (
        relative_to == "spectral_radius_if_negative" and value < -tol * scale
    ):
        return residual <= tol * scale
    floor = UNPROVEN_FLOOR if relative_to == "spectral_radius_if_negative" else tol
    return residual <= tol * max(abs(value), floor * scale)


# What a symmetric operator's products leave of an asymmetry, as a share of the largest |λ|
# seen: about 2e-7 in float32, 2e-3 with a bfloat16 autocast inside the loss. Past this
# share the products are not symmetric; below it they move eigenvalues by about the
# default tolerances at most.
ASYMMETRY_TOLERANCE = 1e-2


def check_symmetric(asymmetry: float, scale: float, seen: str) -> None:
    """Refuse an operator whose products showed an asymmetry past its rounding.

    Args:
        asymmetry: what the products show that a symmetric operator's would not.
        scale: the largest ``|λ|`` seen.
        seen: what ``asymmetry`` is, for the message.

    Raises:
        AsymmetricOperatorError: if ``asymmetry > ASYMMETRY_TOLERANCE · scale``.
    """
    if asymmetry > ASYMMETRY_TOLERANCE * scale:
        raise AsymmetricOperatorError(
            f"the operator's products are not symmetric: {seen} came to "
            f"{asymmetry / scale:.1e} of its largest |λ| seen, which a symmetric operator "
            "leaves at rounding, so its eigenvalues would be wrong. A Hessian's are unless "
            "the loss runs a double backward that does not differentiate its backward: one "
            "written by hand for a custom autograd.Function, or a kernel's"
        )
