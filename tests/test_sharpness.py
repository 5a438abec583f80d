"""Sharpness measures against closed forms on quadratic losses L = ½wᵀAw + bᵀw."""

import pytest
import torch
from torch import nn

from lightning_landscape.sharpness import (
    adaptive_sharpness,
    average_sharpness,
    sam_sharpness,
    worst_case_sharpness,
)

N = 12


class Weights(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())


def quadratic(model, batch):
    a, b = batch
    w = model.w
    return 0.5 * w @ a @ w + b @ w


def _loss(a, b, w):
    return float(0.5 * w @ a @ w + b @ w)


def _problem(seed=0, diagonal=False):
    g = torch.Generator().manual_seed(seed)
    if diagonal:
        a = torch.diag(torch.rand(N, generator=g, dtype=torch.float64) * 3 + 0.1)
    else:
        q = torch.randn(N, N, generator=g, dtype=torch.float64)
        a = q @ q.T / N + torch.diag(torch.linspace(-0.5, 2, N, dtype=torch.float64))
    b = torch.randn(N, generator=g, dtype=torch.float64)
    w = torch.randn(N, generator=g, dtype=torch.float64)
    return Weights(w), (a, b), w


def test_sam_matches_the_closed_form():
    model, (a, b), w = _problem()
    g = a @ w + b
    delta = 0.1 * g / g.norm()
    result = sam_sharpness(model, quadratic, (a, b), rho=0.1)
    assert result.value == pytest.approx(_loss(a, b, w + delta) - _loss(a, b, w), rel=1e-10)
    assert result.value == pytest.approx(float(0.1 * g.norm() + 0.5 * delta @ a @ delta), rel=1e-10)
    assert torch.equal(model.w.detach(), w)  # the weights were never written


def test_adaptive_matches_the_closed_form():
    model, (a, b), w = _problem(1)
    g = a @ w + b
    scale = w.abs() + 0.01
    delta = 0.5 * scale**2 * g / (scale * g).norm()
    result = adaptive_sharpness(model, quadratic, (a, b))
    assert result.value == pytest.approx(_loss(a, b, w + delta) - _loss(a, b, w), rel=1e-10)


def test_worst_case_reaches_the_best_vertex_of_the_box():
    model, (a, b), w = _problem(2, diagonal=True)
    bound = 0.05 * (w.abs() + 1)
    best = w + bound * torch.sign(a @ w + b)  # convex and separable: a vertex, by coordinate
    expected = 100 * (_loss(a, b, best) - _loss(a, b, w)) / (1 + _loss(a, b, w))
    result = worst_case_sharpness(model, quadratic, (a, b), epsilon=0.05, steps=5)
    assert result.value == pytest.approx(expected, rel=1e-10)


def test_average_is_half_sigma_squared_trace():
    model, (a, b), _ = _problem(3)
    sigma = 0.1
    result = average_sharpness(model, quadratic, (a, b), sigma=sigma, samples=200, generator=0)
    expected = sigma**2 / 2 * float(a.trace())
    assert result.stderr > 0
    assert abs(result.value - expected) <= 4 * result.stderr


@pytest.mark.parametrize(
    "function, kwargs, match",
    [
        (sam_sharpness, {"rho": 0}, "`rho`"),
        (adaptive_sharpness, {"eta": -1.0}, "`eta`"),
        (worst_case_sharpness, {"steps": 0}, "`steps`"),
        (worst_case_sharpness, {"epsilon": 0.0}, "`epsilon`"),
        (average_sharpness, {"samples": 1}, "`samples`"),
        (average_sharpness, {"sigma": float("inf")}, "`sigma`"),
    ],
)
def test_bad_arguments(function, kwargs, match):
    model, batch, _ = _problem()
    with pytest.raises(ValueError, match=match):
        function(model, quadratic, batch, **kwargs)
