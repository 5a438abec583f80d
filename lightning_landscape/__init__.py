"""Drop-in PyTorch Lightning callbacks that show where training is on its loss landscape.

The measurements themselves are plain torch and work on any ``nn.Module``:
:mod:`lightning_landscape.curvature` holds the Hessian operator and its spectral algorithms.
"""

from lightning_landscape.errors import NonFiniteError

__version__ = "0.1.0"

__all__ = ["NonFiniteError", "__version__"]
