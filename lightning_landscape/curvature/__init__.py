"""Curvature of the loss: Hessian-vector products and spectral algorithms (pure torch)."""

from lightning_landscape._batches import Batches
from lightning_landscape.curvature.api import hessian_eigenvalues, hessian_trace, spectral_density
from lightning_landscape.curvature.density import slq, slq_with_trace
from lightning_landscape.curvature.krylov import lanczos
from lightning_landscape.curvature.linear_operator import (
    DenseOperator,
    ScaledOperator,
    SymmetricOperator,
)
from lightning_landscape.curvature.operator import HessianOperator
from lightning_landscape.curvature.power import power_iteration
from lightning_landscape.curvature.results import EigenResult, SpectralDensity, TraceResult
from lightning_landscape.curvature.trace import hutchinson, hutchpp
from lightning_landscape.errors import (
    AsymmetricOperatorError,
    NondeterministicLossError,
    NonFiniteError,
    OnceDifferentiableError,
    PeerFailureError,
    ReducedPrecisionWarning,
)

__all__ = [
    "AsymmetricOperatorError",
    "Batches",
    "DenseOperator",
    "EigenResult",
    "HessianOperator",
    "NonFiniteError",
    "NondeterministicLossError",
    "OnceDifferentiableError",
    "PeerFailureError",
    "ReducedPrecisionWarning",
    "ScaledOperator",
    "SpectralDensity",
    "SymmetricOperator",
    "TraceResult",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "slq",
    "slq_with_trace",
    "spectral_density",
]
