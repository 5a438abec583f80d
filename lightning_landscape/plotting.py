"""Pictures for TensorBoard: drawn with matplotlib when it is installed, plainly otherwise."""

from __future__ import annotations

import torch
from torch import Tensor


def _figure(width: int, height: int):
    """A matplotlib figure without pyplot's global state, or ``None`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width / 100, height / 100), dpi=100)


def _pixels(figure) -> Tensor:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    figure.tight_layout()
    canvas.draw()
    width, height = canvas.get_width_height()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    return rgba.view(height, width, 4)[..., :3].permute(2, 0, 1).contiguous()


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
    figure = _figure(width, height)
    floor = float(density.max()) * 1e-8
    if figure is None:
        return _bars(grid, (density + floor).log10(), height, width)
    axes = figure.add_subplot()
    axes.semilogy(grid.numpy(), (density + floor).numpy(), color="tab:blue")
    axes.axvline(0.0, color="gray", linewidth=0.8)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    return _pixels(figure)


def line_image(
    steps: Tensor, losses: Tensor, xlabel: str, height: int = 300, width: int = 500
) -> Tensor:
    """A 1-D loss slice as an RGB image tensor ``(3, height, width)``, uint8.

    Args:
        steps: positions along the direction.
        losses: loss at each position.
        xlabel: what the positions are.
        height: image height in pixels.
        width: image width in pixels.
    """
    figure = _figure(width, height)
    if figure is None:
        return _bars(steps, losses, height, width)
    axes = figure.add_subplot()
    axes.plot(steps.numpy(), losses.numpy(), color="tab:blue")
    axes.axvline(0.0, color="gray", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("loss")
    return _pixels(figure)


def surface_image(
    alphas: Tensor, betas: Tensor, losses: Tensor, height: int = 400, width: int = 480
) -> Tensor:
    """A 2-D loss slice as contours over a heatmap, RGB ``(3, height, width)``, uint8.

    Without matplotlib, a plain heatmap (dark is low loss), rows following ``betas``
    upwards.

    Args:
        alphas: steps along the first direction (columns of ``losses``).
        betas: steps along the second direction (rows of ``losses``).
        losses: the loss grid, shape ``(len(betas), len(alphas))``.
        height: image height in pixels.
        width: image width in pixels.
    """
    figure = _figure(width, height)
    if figure is None:
        scaled = (losses - losses.min()) / (losses.max() - losses.min()).clamp_min(1e-12)
        grid = torch.nn.functional.interpolate(
            scaled.flip(0)[None, None].float(), size=(height, width)
        )[0, 0]
        return (grid * 255).to(torch.uint8).expand(3, height, width).contiguous()
    axes = figure.add_subplot()
    mesh = axes.contourf(alphas.numpy(), betas.numpy(), losses.numpy(), levels=30, cmap="viridis")
    axes.contour(
        alphas.numpy(), betas.numpy(), losses.numpy(), levels=15, colors="white", linewidths=0.5
    )
    axes.plot([0.0], [0.0], marker="+", color="red")
    figure.colorbar(mesh, ax=axes, label="loss")
    axes.set_xlabel("direction 1")
    axes.set_ylabel("direction 2")
    return _pixels(figure)


def _bars(xs: Tensor, ys: Tensor, height: int, width: int) -> Tensor:
    """Each pixel column a bar of ``ys`` (resampled), a grey column at ``x = 0``."""
    columns = torch.nn.functional.interpolate(ys[None, None].float(), size=width, mode="linear")[
        0, 0
    ]
    level = (
        (columns - columns.min()) / (columns.max() - columns.min()).clamp_min(1e-12) * (height - 1)
    ).long()
    rows = torch.arange(height - 1, -1, -1)[:, None]
    image = torch.full((3, height, width), 255, dtype=torch.uint8)
    image[:, rows.expand(height, width) <= level[None, :]] = torch.tensor(
        [31, 119, 180], dtype=torch.uint8
    )[:, None]
    zero = int(((0.0 - float(xs[0])) / float(xs[-1] - xs[0])) * (width - 1))
    if 0 <= zero < width:
        image[:, :, zero] = 128
    return image
