"""The stability threshold of SGD, against torch's own optimiser on a quadratic."""

import pytest
import torch

from lightning_landscape.stability import (
    sgd_preconditioner,
    stability_threshold,
    stepping_optimizer,
)

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
    return _sgd_diverges(torch.tensor([[curvature]], dtype=torch.float64), [w], [{}], settings)


def _sgd_diverges(hessian, params, groups, settings) -> bool:
    """Whether torch's SGD, one group per parameter, blows up on ``wᵀ H w / 2`` from ones."""
    optimizer = torch.optim.SGD(
        [{"params": [p], **group} for p, group in zip(params, groups)], **settings
    )
    for _ in range(3000):
        optimizer.zero_grad()
        w = torch.cat([p.reshape(-1) for p in params])
        (0.5 * w @ hessian @ w).backward()
        optimizer.step()
    return bool(torch.cat([p.reshape(-1) for p in params]).abs().max() > 1)


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


def test_the_threshold_is_that_of_the_groups_stepping_the_measured_parameters():
    head, body, unstepped = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    groups = [{"params": [body], "lr": 0.01}, {"params": [head]}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    assert stability_threshold(optimizer) is None
    assert stability_threshold(optimizer, [head]) == pytest.approx(3.8 / 0.1)
    assert stability_threshold(optimizer, [body]) == pytest.approx(3.8 / 0.01)
    assert stability_threshold(optimizer, [head, unstepped]) is None  # one does not move


def test_the_optimiser_stepping_the_measured_parameters_is_found_among_several():
    generator, discriminator = torch.zeros(1), torch.zeros(1)
    optimizers = [torch.optim.SGD([discriminator], lr=0.1), torch.optim.SGD([generator], lr=0.01)]
    assert stepping_optimizer(optimizers, [generator]) is optimizers[1]
    assert stepping_optimizer(optimizers, [discriminator]) is optimizers[0]
    assert stepping_optimizer(optimizers, [generator, discriminator]) is None
    assert stepping_optimizer([], [generator]) is None


def test_no_threshold_for_adaptive_optimisers_a_zero_rate_or_an_ascent():
    assert stability_threshold(torch.optim.Adam([torch.zeros(1)])) is None
    assert stability_threshold(torch.optim.SGD([torch.zeros(1)], lr=0.0)) is None
    # Ascent diverges along any positive curvature, however small its rate.
    assert stability_threshold(torch.optim.SGD([torch.zeros(1)], lr=0.1, maximize=True)) is None


@pytest.mark.parametrize("settings", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}])
def test_groups_at_different_rates_are_stable_below_the_preconditioned_threshold(settings):
    a = torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hessian = a.T @ a
    params = [torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    groups = [{"lr": 0.1}, {"lr": 0.01, "dampening": 0.0}]
    optimizer = torch.optim.SGD(
        [{"params": [p], **g} for p, g in zip(params, groups)], lr=0.1, **settings
    )
    scaling = sgd_preconditioner(optimizer, params)
    assert stability_threshold(optimizer) is None
    s = torch.cat([t.reshape(-1) for t in scaling.inverse_sqrt])
    sharpness = torch.linalg.eigvalsh(s[:, None] * hessian * s[None, :])[-1]
    for factor, diverges in ((0.99, False), (1.01, True)):
        scaled = factor * scaling.threshold / sharpness * hessian
        fresh = [torch.ones_like(p, requires_grad=True) for p in params]
        assert _sgd_diverges(scaled, fresh, groups, {"lr": 0.1, **settings}) == diverges


def test_no_sgd_preconditioner_where_the_threshold_applies_or_none_does():
    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    one_rate = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    momenta = torch.optim.SGD([{"params": [a]}, {"params": [b], "momentum": 0.5}], lr=0.1)
    rates = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1)
    assert sgd_preconditioner(one_rate, [a, b]) is None
    assert sgd_preconditioner(momenta, [a, b]) is None
    assert sgd_preconditioner(rates, [a, b, c]) is None  # c is not the optimiser's
    assert sgd_preconditioner(rates, [b]) is None  # one group's: its own threshold applies
    ascent = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.01, "maximize": True}])
    assert sgd_preconditioner(ascent, [a, b]) is None
    assert sgd_preconditioner(rates, [a, b]).threshold == pytest.approx(2 / 0.1)
