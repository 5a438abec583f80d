"""One-call curvature measurements on a model: build the operator, run the algorithm."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._batches import BatchSizeFn
from lightning_landscape._context import Mode
from lightning_landscape._params import ParamFilter
from lightning_landscape._validation import check_choice
from lightning_landscape.curvature._checks import check_eigen_args
from lightning_landscape.curvature.density import slq
from lightning_landscape.curvature.krylov import lanczos
from lightning_landscape.curvature.operator import HessianOperator, LossFn
from lightning_landscape.curvature.power import power_iteration
from lightning_landscape.curvature.results import EigenResult, SpectralDensity, TraceResult
from lightning_landscape.curvature.trace import hutchinson, hutchpp


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_iter: int = 100,
    method: str = "lanczos",
    init: Tensor | None = None,
    params: ParamFilter = None,
    generator: torch.Generator | int | None = None,
    *,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    basis_device: torch.device | str | None = None,
    relative_to: str = "eigenvalue",
) -> EigenResult:
    """Extreme eigenvalues of the Hessian of the mean loss over ``batches``.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches).
        k: eigenvalues wanted at each requested end.
        which: ``"largest"`` / ``"smallest"`` (algebraic) or ``"both"``.
        tol: relative residual tolerance ``‖Hv − λv‖ <= tol·|λ|``.
        max_iter: most Hessian-vector products (Lanczos) or products per pair (power).
        method: ``"lanczos"`` (one run for both ends, fast) or ``"power"`` (PyHessian's).
        init: warm-start vectors (rows), e.g. the previous result's ``eigenvectors``.
        params: parameter-name regular expressions selecting a block of the Hessian.
        generator: seed or generator of the random start (default: seed 0).
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: compute in ``torch.float32`` or ``torch.float64``.
        batch_size_fn: sample count of a batch, which weights it among several batches
            (and processes); by default the first dimension of its first tensor.
        basis_device: keep the Lanczos basis on this device (e.g. ``"cpu"``).
        relative_to: Lanczos wants each eigenvalue to ``tol`` of itself
            (``"eigenvalue"``) or of the spectral radius (``"spectral_radius"``, cheaper
            for a λ_min near zero, but it may stop in a bulk near zero before reaching an
            isolated negative eigenvalue; ``"spectral_radius_if_negative"`` relaxes only
            a λ_min already found clearly negative).

    Returns:
        An :class:`EigenResult`.
    """
    check_choice("method", method, ("lanczos", "power"))
    check_eigen_args(k, which, tol, max_iter, size=k)  # fail fast, before any forward pass
    with HessianOperator(
        model, loss_fn, batches, params, mode, dtype, batch_size_fn=batch_size_fn
    ) as operator:
        if method == "power":
            return power_iteration(operator, k, which, tol, max_iter, init, generator)
        return lanczos(
            operator, k, which, tol, max_iter, init, generator, basis_device, relative_to
        )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    method: str = "hutch++",
    tol: float = 1e-2,
    max_iter: int = 100,
    params: ParamFilter = None,
    generator: torch.Generator | int | None = None,
    *,
    sketch_size: int = 10,
    n_patterns: int = 8,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
) -> TraceResult:
    """Trace of the Hessian by Hutch++ (default) or Hutchinson, with its standard error.

    Hutch++ removes the outlying eigenvalues that dominate the variance near a minimum;
    block-sign probes (``BlockSigns`` over parameter tensors) cancel the cross-layer
    couplings that dominate it early in training.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches).
        method: ``"hutch++"`` or ``"hutchinson"``.
        tol: stop once the standard error is at most ``tol`` times the estimate.
        max_iter: most Hessian-vector products.
        params: parameter-name regular expressions selecting a block of the Hessian.
        generator: seed or generator of the random vectors.
        sketch_size: Hutch++'s sketch dimension.
        n_patterns: sign patterns per sample (a power of two; 1 for plain probes).
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: compute in ``torch.float32`` or ``torch.float64``.
        batch_size_fn: sample count of a batch, which weights it among several batches
            (and processes); by default the first dimension of its first tensor.

    Returns:
        A :class:`TraceResult`.
    """
    check_choice("method", method, ("hutch++", "hutchinson"))
    with HessianOperator(
        model, loss_fn, batches, params, mode, dtype, batch_size_fn=batch_size_fn
    ) as operator:
        blocks = operator.block_sizes
        if method == "hutchinson":
            return hutchinson(operator, tol, max_iter, generator, blocks, n_patterns)
        return hutchpp(operator, tol, max_iter, sketch_size, generator, blocks, n_patterns)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    n_vectors: int = 2,
    n_steps: int = 64,
    params: ParamFilter = None,
    generator: torch.Generator | int | None = None,
    *,
    grid_size: int = 1024,
    bandwidth: float = 0.01,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    basis_device: torch.device | str | None = None,
) -> SpectralDensity:
    """Eigenvalue spectral density of the Hessian by stochastic Lanczos quadrature.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batches: one batch, a list of batches or a ``DataLoader`` (all its batches).
        n_vectors: random start vectors averaged over.
        n_steps: Lanczos steps per vector.
        params: parameter-name regular expressions selecting a block of the Hessian.
        generator: seed or generator of the start vectors.
        grid_size: points of the density grid.
        bandwidth: smoothing width as a fraction of the spectral width.
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: compute in ``torch.float32`` or ``torch.float64``.
        batch_size_fn: sample count of a batch, which weights it among several batches
            (and processes); by default the first dimension of its first tensor.
        basis_device: keep the Lanczos basis on this device.

    Returns:
        A :class:`SpectralDensity`.
    """
    with HessianOperator(
        model, loss_fn, batches, params, mode, dtype, batch_size_fn=batch_size_fn
    ) as operator:
        return slq(operator, n_vectors, n_steps, grid_size, bandwidth, generator, basis_device)
