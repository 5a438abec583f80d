"""The stability threshold of SGD, against torch's own optimiser on a quadratic."""

import pytest
import torch

from lightning_landscape.stability import stability_threshold

SETTINGS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.5},
    {"lr": 0.1, "dampening": 0.5},  # no momentum: torch ignores the dampening
]


def _diverges(curvature: float, settings: dict) -> bool:
    """Whether torch's SGD on ``curvature · w² / 2`` blows up from ``w = 1``."""
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], **settings)
    for _ in range(3000):
        optimizer.zero_grad()
        (0.5 * curvature * w.pow(2).sum()).backward()
        optimizer.step()
    return bool(w.abs() > 1)


@pytest.mark.parametrize("settings", SETTINGS)
def test_sgd_converges_below_the_threshold_and_diverges_above(settings):
    threshold = stability_threshold(torch.optim.SGD([torch.zeros(1)], **settings))
    assert not _diverges(0.99 * threshold, settings)
    assert _diverges(1.01 * threshold, settings)


def test_no_threshold_when_groups_step_at_different_rates():
    a, b = torch.zeros(1), torch.zeros(1)
    same = torch.optim.SGD([{"params": [a], "weight_decay": 1e-4}, {"params": [b]}], lr=0.1)
    assert stability_threshold(same) == pytest.approx(2 / 0.1)
    for other in ({"lr": 0.01}, {"momentum": 0.5}):
        mixed = torch.optim.SGD([{"params": [a]}, {"params": [b], **other}], lr=0.1, momentum=0.9)
        assert stability_threshold(mixed) is None


def test_no_threshold_for_adaptive_optimisers_or_a_zero_rate():
    assert stability_threshold(torch.optim.Adam([torch.zeros(1)])) is None
    assert stability_threshold(torch.optim.SGD([torch.zeros(1)], lr=0.0)) is None
