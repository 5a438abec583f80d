"""Lightning callbacks: thin layers that decide when to measure, on what, and where to log."""

from lightning_landscape.callbacks.base import LandscapeCallback, LandscapeMonitor
from lightning_landscape.callbacks.batch_size import BatchSizeScheduler
from lightning_landscape.callbacks.gradients import GradientNormMonitor
from lightning_landscape.callbacks.hessian import HessianEigenvalueMonitor, HessianSpectrumMonitor
from lightning_landscape.callbacks.initializer import Initializer
from lightning_landscape.callbacks.landscape import LossLandscapeMonitor
from lightning_landscape.callbacks.noise_scale import GradientNoiseScaleMonitor
from lightning_landscape.callbacks.sharpness import SharpnessMonitor

__all__ = [
    "BatchSizeScheduler",
    "GradientNoiseScaleMonitor",
    "GradientNormMonitor",
    "HessianEigenvalueMonitor",
    "HessianSpectrumMonitor",
    "Initializer",
    "LandscapeCallback",
    "LandscapeMonitor",
    "LossLandscapeMonitor",
    "SharpnessMonitor",
]
