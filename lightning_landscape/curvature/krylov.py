"""Krylov methods: Lanczos with full re-orthogonalisation for extreme eigenpairs."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_landscape._validation import check_choice
from lightning_landscape.curvature._checks import (
    RELATIVE_TO,
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

# Weight of a random direction mixed into a warm start: it keeps the Krylov space from
# closing on the warm vectors (an exact eigenvector would end it after one product) while
# costing little accuracy when the warm vectors are good.
WARM_START_NOISE = 1e-2


class KrylovBasis:
    """An orthonormal Krylov basis and the tridiagonal matrix of the operator in it.

    Storage grows by doubling, so a run that converges after a few products never holds
    ``capacity`` vectors (100 vectors of a 25M-parameter model would be 10 GB).

    Args:
        operator: the symmetric operator.
        capacity: most vectors the basis holds.
        basis_device: where the basis lives (``"cpu"`` saves accelerator memory on large
            models); defaults to the operator's device.
    """

    _INITIAL_ROWS = 16

    def __init__(
        self,
        operator: SymmetricOperator,
        capacity: int,
        basis_device: torch.device | str | None = None,
    ) -> None:
        self.operator = operator
        self.capacity = capacity
        device = torch.device(basis_device) if basis_device is not None else operator.device
        rows = min(capacity, self._INITIAL_ROWS)
        self._storage = torch.empty(rows, operator.size, dtype=operator.dtype, device=device)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[i] couples vectors i and i+1; 0 between blocks
        self.size = 0
        self._previous: Tensor | None = None

    @property
    def vectors(self) -> Tensor:
        """The basis vectors, one per row."""
        return self._storage[: self.size]

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def _append(self, v: Tensor) -> None:
        if self.size == self._storage.shape[0]:
            grown = self._storage.new_empty(
                min(2 * self.size, self.capacity), self._storage.shape[1]
            )
            grown[: self.size] = self._storage
            self._storage = grown
        self._storage[self.size].copy_(v)
        self.size += 1

    def orthogonalize_(self, w: Tensor) -> Tensor:
        """Remove from ``w`` its components in the basis.

        Classical Gram-Schmidt, repeated only when the first pass cancelled most of ``w``
        (the criterion of Daniel, Gragg, Kaufman and Stewart): the pass is memory-bound and
        costs as much as a product on large models.
        """
        return self._orthogonalized(w)[0]

    def _orthogonalized(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w`` less its components in the basis, and the norm of those components (a
        0-d tensor: read only where it is checked, as reading it waits for the device)."""
        if self.size == 0:
            return w, w.new_zeros(())
        basis = self.vectors
        local = w.to(basis.device)
        norm = torch.linalg.vector_norm(local)
        components = basis @ local
        removed = torch.linalg.vector_norm(components)
        for _ in range(2):
            local = local - basis.T @ components
            reduced = torch.linalg.vector_norm(local)
            if reduced > 0.7071 * norm:
                break
            norm = reduced
            components = basis @ local
        return local.to(w.device), removed

    def extend(self, v: Tensor) -> tuple[Tensor, float]:
        """Append the unit vector ``v``; return the next residual direction and its norm.

        Raises:
            AsymmetricOperatorError: if the direction has components along the earlier
                vectors that a symmetric operator leaves at rounding.
        """
        self._append(v)
        w = self.operator.matvec(v)
        alpha = float(torch.dot(v, w))
        self.alphas.append(alpha)
        # The three-term recurrence removes the large components; Gram-Schmidt the rounding.
        w -= alpha * v
        if self._previous is not None and self.betas[-1] != 0.0:
            w -= self.betas[-1] * self._previous
        self._previous = v
        w, removed_norm = self._orthogonalized(w)
        beta, removed = float(torch.linalg.vector_norm(w)), float(removed_norm)
        # A symmetric operator's three-term recurrence leaves the direction orthogonal to
        # the earlier ones but for rounding.
        scale = max(beta, *map(abs, self.alphas), *self.betas)
        check_symmetric(
            removed, scale, "a new Lanczos direction's components along the earlier ones"
        )
        return w, beta

    def random_orthogonal(self, generator: torch.Generator) -> Tensor:
        """A random unit vector orthogonal to the basis (to restart after a breakdown)."""
        w = self.orthogonalize_(gaussian(self.operator, generator))
        return w / torch.linalg.vector_norm(w)

    def ritz(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor]:
        """Eigenvalues (ascending) and eigenvectors of the tridiagonal rows ``start:stop``."""
        stop = self.size if stop is None else stop
        alphas = torch.tensor(self.alphas[start:stop], dtype=torch.float64)
        betas = torch.tensor(self.betas[start : stop - 1], dtype=torch.float64)
        tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        return torch.linalg.eigh(tridiagonal)


def breakdown_tolerance(dtype: torch.dtype) -> float:
    """Below ``this * ‖T‖`` a new Lanczos direction is rounding noise: the space is invariant."""
    return torch.finfo(dtype).eps ** (2 / 3)


def wanted_indices(ascending: Tensor, k: int, which: str) -> Tensor:
    """Indices into ascending eigenvalues of the wanted ones, in descending order of value."""
    n = ascending.shape[0]
    top = torch.arange(n - 1, max(n - k, 0) - 1, -1)
    bottom = torch.arange(min(k, n) - 1, -1, -1)
    if which == "largest":
        return top
    if which == "smallest":
        return bottom
    return torch.cat([top, bottom])


def lanczos(
    operator: SymmetricOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_iter: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    basis_device: torch.device | str | None = None,
    relative_to: str = "eigenvalue",
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full re-orthogonalisation.

    One run gives the ``k`` largest and the ``k`` smallest *algebraic* eigenvalues. The run
    stops when every wanted Ritz pair has ``‖Hv − θv‖ <= tol·|θ|`` (see
    ``residual_small``). Ritz values are interior to the spectrum: the smallest one is an
    upper bound of λ_min, so a negative one proves a negative eigenvalue exists.

    When the Krylov space closes before the operator's dimension is exhausted (repeated
    eigenvalues), the run restarts with a random vector orthogonal to it, so repeated
    eigenvalues are found with their multiplicity; it stops once a closed block adds
    nothing to the wanted set.

    Args:
        operator: the symmetric operator (e.g. a ``HessianOperator``).
        k: number of eigenvalues wanted at each requested end.
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        tol: relative residual tolerance.
        max_iter: most operator products (Krylov dimension).
        init: warm start: one or several vectors (rows), e.g. previous eigenvectors; the
            run starts from their sum, lightly mixed with a random direction.
        generator: seed or generator of the random start (identical on all processes).
        basis_device: device of the Krylov basis, e.g. ``"cpu"`` for large models.
        relative_to: ``"eigenvalue"`` wants each eigenvalue to ``tol`` of itself;
            ``"spectral_radius"`` to ``tol`` of the largest ``|λ|``;
            ``"spectral_radius_if_negative"`` the latter only for clearly negative
            eigenvalues (see ``residual_small``).

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: for ``k < 1``, an unknown ``which``, ``tol <= 0``, ``max_iter < k``,
            ``k`` above the dimension, or an ``init`` of the wrong size.
        AsymmetricOperatorError: if the operator's products are not symmetric (seen at no
            cost in the re-orthogonalisation).
    """
    check_eigen_args(k, which, tol, max_iter, operator.size)
    check_choice("relative_to", relative_to, RELATIVE_TO)
    rng = make_generator(operator, generator)
    basis = KrylovBasis(operator, min(max_iter, operator.size), basis_device)
    v = _start_vector(operator, init, rng)
    block_start, beta, scale, converged = 0, 0.0, 0.0, False
    while True:
        w, beta = basis.extend(v)
        # Earlier blocks are closed (invariant, zero residuals): only the running one can lag.
        values, vectors = basis.ritz(block_start)
        scale = max(scale, float(values.abs().max()))  # spectral radius seen so far
        breakdown = beta <= breakdown_tolerance(operator.dtype) * scale
        if breakdown:
            beta = 0.0
        if basis.size == operator.size:  # the whole space is spanned: Ritz pairs are exact
            converged = True
            break
        if breakdown:
            if block_start > 0 and _adds_nothing(basis, block_start, k, which, tol * scale):
                converged = True
                break
        elif basis.size >= k and _converged(
            values, beta * vectors[-1].abs(), k, which, tol, scale, relative_to
        ):
            converged = True
            break
        if basis.full:
            break
        basis.betas.append(beta)
        if breakdown:
            v, block_start = basis.random_orthogonal(rng), basis.size
        else:
            v = w / beta
    return _result(basis, beta, k, which, converged, tol, scale, relative_to)


def _start_vector(operator: SymmetricOperator, init: Tensor | None, rng: torch.Generator) -> Tensor:
    noise = gaussian(operator, rng)
    noise /= torch.linalg.vector_norm(noise)
    if init is None:
        return noise
    if init.shape[-1] != operator.size or init.dim() > 2:
        raise ValueError(
            f"`init` must hold vectors of size {operator.size} (shape (n,) or (m, n)), "
            f"got shape {tuple(init.shape)}"
        )
    warm = init.reshape(-1, operator.size).to(device=operator.device, dtype=operator.dtype).sum(0)
    norm = torch.linalg.vector_norm(warm)
    if not norm > 0:
        return noise
    v = warm / norm + WARM_START_NOISE * noise
    return v / torch.linalg.vector_norm(v)


def _converged(
    values: Tensor,
    residuals: Tensor,
    k: int,
    which: str,
    tol: float,
    scale: float,
    relative_to: str,
) -> bool:
    wanted = wanted_indices(values, k, which)
    return all(_met(values[wanted], residuals[wanted], tol, scale, relative_to))


def _met(
    values: Tensor, residuals: Tensor, tol: float, scale: float, relative_to: str
) -> list[bool]:
    """Whether each Ritz pair meets the tolerance (see ``residual_small``)."""
    return [
        residual_small(float(r), float(v), tol, scale, relative_to)
        for v, r in zip(values, residuals)
    ]


def _adds_nothing(basis: KrylovBasis, start: int, k: int, which: str, slack: float) -> bool:
    """Whether a closed block leaves the wanted eigenvalues of the earlier blocks as they were.

    Later blocks only hold further copies of this block's eigenvalues, so the search ends.
    """
    earlier, _ = basis.ritz(0, start)
    block, _ = basis.ritz(start)
    if earlier.shape[0] < k:
        return False
    top_ok = block[-1] <= earlier[-k] + slack
    bottom_ok = block[0] >= earlier[k - 1] - slack
    return bool({"largest": top_ok, "smallest": bottom_ok, "both": top_ok and bottom_ok}[which])


def _result(
    basis: KrylovBasis,
    beta: float,
    k: int,
    which: str,
    converged: bool,
    tol: float,
    scale: float,
    relative_to: str,
) -> EigenResult:
    values, vectors = basis.ritz()
    wanted = wanted_indices(values, k, which)
    coefficients = vectors[:, wanted].T.to(dtype=basis.vectors.dtype, device=basis.vectors.device)
    residuals = beta * vectors[-1, wanted].abs()
    met = (
        [True] * len(wanted)
        if converged
        else _met(values[wanted], residuals, tol, scale, relative_to)
    )
    return EigenResult(
        eigenvalues=values[wanted],
        eigenvectors=coefficients @ basis.vectors,
        residuals=residuals,
        n_hvp=basis.size,
        converged=converged,
        pair_converged=torch.tensor(met),
    )
