"""Drop-in PyTorch Lightning callbacks that show where training is on its loss landscape.

The measurements themselves are plain torch and work on any ``nn.Module``:
:mod:`lightning_landscape.curvature` holds the Hessian operator and its spectral algorithms.
The callbacks are imported on first use, so the math can be imported without Lightning.
"""

from typing import Any

from lightning_landscape.errors import (
    AsymmetricOperatorError,
    NondeterministicLossError,
    NonFiniteError,
    OnceDifferentiableError,
    PeerFailureError,
    ReducedPrecisionWarning,
)

__version__ = "0.1.0"

__all__ = [
    "AsymmetricOperatorError",
    "BatchSizeScheduler",
    "GradientNoiseScaleMonitor",
    "GradientNormMonitor",
    "HessianEigenvalueMonitor",
    "HessianSpectrumMonitor",
    "Initializer",
    "LandscapeMonitor",
    "LossLandscapeMonitor",
    "NonFiniteError",
    "NondeterministicLossError",
    "OnceDifferentiableError",
    "PeerFailureError",
    "ReducedPrecisionWarning",
    "SharpnessMonitor",
    "__version__",
]

_CALLBACKS = frozenset(__all__) - globals().keys()  # the exports not imported above


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        from lightning_landscape import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_landscape' has no attribute {name!r}")
