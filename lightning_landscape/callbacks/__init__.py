"""Lightning callbacks: thin layers that decide when to measure, on what, and where to log."""

from lightning_landscape.callbacks.base import LandscapeMonitor
from lightning_landscape.callbacks.hessian import HessianEigenvalueMonitor

__all__ = ["HessianEigenvalueMonitor", "LandscapeMonitor"]
