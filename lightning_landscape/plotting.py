"""Pictures for TensorBoard: drawn with matplotlib when it is installed, plainly otherwise."""

from __future__ import annotations

import torch
from torch import Tensor


def density_image(grid: Tensor, density: Tensor, height: int = 300, width: int = 500) -> Tensor:
    """An eigenvalue density as an RGB image tensor of shape ``(3, height, width)``, uint8.

    The density is drawn on a log scale (outliers carry little mass but matter most), with
    a mark at zero. Without matplotlib each pixel column is a bar of the log density.

    Args:
        grid: eigenvalue grid, increasing.
        density: density on ``grid``.
        height: image height in pixels.
        width: image width in pixels.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return _bars(grid, density, height, width)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    floor = float(density.max()) * 1e-8
    axes.semilogy(grid.numpy(), (density + floor).numpy(), color="tab:blue")
    axes.axvline(0.0, color="gray", linewidth=0.8)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    figure.tight_layout()
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    return rgba.view(height, width, 4)[..., :3].permute(2, 0, 1).contiguous()


def _bars(grid: Tensor, density: Tensor, height: int, width: int) -> Tensor:
    columns = torch.nn.functional.interpolate(
        density[None, None].float(), size=width, mode="linear"
    )[0, 0]
    logs = (columns + float(density.max()) * 1e-8).log10()
    level = ((logs - logs.min()) / (logs.max() - logs.min()).clamp_min(1e-12) * (height - 1)).long()
    rows = torch.arange(height - 1, -1, -1)[:, None]
    image = torch.full((3, height, width), 255, dtype=torch.uint8)
    image[:, rows.expand(height, width) <= level[None, :]] = torch.tensor(
        [31, 119, 180], dtype=torch.uint8
    )[:, None]
    zero = int(((0.0 - float(grid[0])) / float(grid[-1] - grid[0])) * (width - 1))
    if 0 <= zero < width:
        image[:, :, zero] = 128
    return image
