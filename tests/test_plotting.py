"""Images are drawn with matplotlib when present and plainly without it."""

import pytest
import torch

from lightning_landscape import plotting


@pytest.fixture(params=["matplotlib", "plain"])
def renderer(request, monkeypatch):
    if request.param == "plain":
        monkeypatch.setattr(plotting, "_figure", lambda width, height: None)
    return request.param


def test_images_have_the_requested_size(renderer):
    grid = torch.linspace(-1, 4, 100)
    density = torch.exp(-(grid**2))
    steps = torch.linspace(-1, 1, 9)
    surface = steps[None, :] ** 2 + steps[:, None] ** 2
    for image, (height, width) in [
        (plotting.density_image(grid, density, 120, 200), (120, 200)),
        (plotting.line_image(steps, steps**2, "step", 120, 200), (120, 200)),
        (plotting.surface_image(steps, steps, surface, 160, 200), (160, 200)),
    ]:
        assert image.shape == (3, height, width) and image.dtype == torch.uint8
        assert image.float().std() > 0  # something was drawn


def test_plain_heatmap_is_dark_where_the_loss_is_low(monkeypatch):
    monkeypatch.setattr(plotting, "_figure", lambda width, height: None)
    steps = torch.linspace(-1, 1, 9)
    image = plotting.surface_image(steps, steps, steps[None, :] ** 2 + steps[:, None] ** 2, 90, 90)
    assert image[0, 45, 45] < image[0, 0, 0]
