"""Eigenvalues, trace and spectral density against exact dense Hessians of tiny networks."""

import pytest
import torch
from torch import nn

from lightning_landscape.curvature import (
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from tests.support import MODELS, cross_entropy, dense_hessian, make_batch, make_model


def _exact(name):
    model, batch = make_model(name), make_batch(name)
    model.train()
    return model, batch, torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch))


def _extremes(ascending, k=3):
    return torch.cat([ascending[-k:].flip(0), ascending[:k].flip(0)])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_top3_bottom3_tight_tolerance(name):
    model, batch, exact = _exact(name)
    result = hessian_eigenvalues(
        model, cross_entropy, batch, k=3, which="both", tol=1e-10, max_iter=400
    )
    expected = _extremes(exact)
    assert result.converged
    assert expected.abs().min() > 1e-3 * expected.abs().max()  # relative error is meaningful
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_top3_bottom3_default_tolerance(name):
    model, batch, exact = _exact(name)
    result = hessian_eigenvalues(model, cross_entropy, batch, k=3, which="both")
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, _extremes(exact), rtol=1e-3, atol=0)
    assert (result.residuals <= 1e-3 * result.eigenvalues.abs()).all()


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_one_sided_requests(which):
    model, batch, exact = _exact("relu_mlp")
    result = hessian_eigenvalues(model, cross_entropy, batch, k=2, which=which)
    expected = exact[-2:].flip(0) if which == "largest" else exact[:2].flip(0)
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_largest_means_algebraic_on_a_negated_loss(method):
    """With the loss negated, the dominant eigenvalue is negative; it is not the largest."""
    model, batch, exact = _exact("tanh_mlp")

    def negated(m, b):
        return -cross_entropy(m, b)

    largest = hessian_eigenvalues(
        model, negated, batch, k=1, method=method, tol=1e-8, max_iter=3000
    )
    smallest = hessian_eigenvalues(
        model, negated, batch, k=1, which="smallest", method=method, tol=1e-8, max_iter=3000
    )
    torch.testing.assert_close(largest.eigenvalues, -exact[:1], rtol=1e-5, atol=0)
    torch.testing.assert_close(smallest.eigenvalues, -exact[-1:], rtol=1e-5, atol=0)
    assert abs(exact[-1]) > abs(exact[0])  # so -λ_max dominates the negated spectrum


def test_power_iteration_with_deflation():
    model, batch, exact = _exact("conv_bn")
    result = hessian_eigenvalues(
        model, cross_entropy, batch, k=2, method="power", tol=1e-7, max_iter=5000
    )
    torch.testing.assert_close(result.eigenvalues, exact[-2:].flip(0), rtol=1e-5, atol=0)


def test_eigenvectors_are_eigenvectors():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    dense = dense_hessian(model, cross_entropy, batch)
    result = hessian_eigenvalues(
        model, cross_entropy, batch, k=2, which="both", tol=1e-8, max_iter=200
    )
    for value, vector in zip(result.eigenvalues, result.eigenvectors):
        torch.testing.assert_close(vector.norm(), torch.tensor(1.0, dtype=vector.dtype))
        assert (dense @ vector - value * vector).norm() < 1e-6 * abs(value)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
@pytest.mark.parametrize("name", ["tanh_mlp", "conv_bn"])
def test_trace_within_three_standard_errors(name, method):
    model, batch, exact = _exact(name)
    result = hessian_trace(model, cross_entropy, batch, method=method, tol=0.02, max_iter=300)
    assert result.stderr > 0
    assert abs(result.trace - float(exact.sum())) <= 3 * result.stderr


def test_hutchpp_exact_when_the_sketch_spans_the_space():
    model, batch, exact = _exact("tanh_mlp")
    result = hessian_trace(model, cross_entropy, batch, sketch_size=83, max_iter=200)
    assert result.trace == pytest.approx(float(exact.sum()), rel=1e-9)
    assert result.stderr < 1e-9 * abs(result.trace)


@pytest.mark.parametrize("name", ["tanh_mlp", "relu_mlp", "dropout_mlp"])
def test_spectral_density(name):
    model, batch, exact = _exact(name)
    result = spectral_density(model, cross_entropy, batch, n_vectors=30, n_steps=100)
    spacing = result.grid[1] - result.grid[0]
    assert float(result.density.sum() * spacing) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(result.weights.sum(1), torch.ones(30, dtype=torch.float64))
    # The quadrature mean is a Hutchinson estimate of trace / n: within a few of its stderr.
    assert result.mean == pytest.approx(
        float(exact.mean()), abs=0.25 * float(exact.abs().max()) / 30**0.5
    )
    exact_negative = float((exact < -result.bandwidth).double().mean())
    assert abs(result.negative_mass - exact_negative) <= 0.05


def test_negative_mass_of_a_trained_network_against_its_dense_spectrum():
    """A huge near-null bulk straddles zero: only what lies clearly below counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        cross_entropy(model, (x, y)).backward()
        optimizer.step()
    result = spectral_density(model, cross_entropy, (x, y), n_vectors=4, n_steps=40)
    exact = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, (x, y)))
    assert abs(result.negative_mass - float((exact < -result.bandwidth).double().mean())) <= 0.05
    # counting every node below zero would report the null space's half as negative
    assert float((exact.abs() < 1e-6 * exact.abs().max()).double().mean()) > 0.3
