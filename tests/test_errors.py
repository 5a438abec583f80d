"""Bad input gets a clear error naming the argument; non-finite values one exception type."""

import pytest
import torch
from torch import nn

import lightning_landscape
from lightning_landscape.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from tests.support import cross_entropy, make_batch, make_model


@pytest.fixture
def setup():
    return make_model("tanh_mlp"), make_batch("tanh_mlp")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "`k`"),
        ({"k": "3"}, TypeError, "`k`"),
        ({"tol": 0}, ValueError, "`tol`"),
        ({"tol": float("nan")}, ValueError, "`tol`"),
        ({"which": "largest_magnitude"}, ValueError, "`which`"),
        ({"method": "arnoldi"}, ValueError, "`method`"),
        ({"mode": "test"}, ValueError, "`mode`"),
        ({"dtype": torch.float16}, ValueError, "`dtype`"),
        ({"params": "no_such_layer"}, ValueError, "`params`"),
        ({"params": 3}, TypeError, "`params`"),
        ({"params": "("}, ValueError, "`params`"),
        ({"init": torch.ones(5)}, ValueError, "`init`"),
    ],
)
def test_bad_eigen_arguments(setup, kwargs, error, match):
    model, batch = setup
    with pytest.raises(error, match=match):
        hessian_eigenvalues(model, cross_entropy, batch, **kwargs)


@pytest.mark.parametrize(
    "loss_fn, error, match",
    [
        (
            lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
            ValueError,
            "scalar",
        ),
        (lambda m, b: torch.tensor(1.0), ValueError, "no grad path"),
        (lambda m, b: 1.0, TypeError, "Tensor"),
        ("cross_entropy", TypeError, "`loss_fn`"),
    ],
)
def test_bad_losses(setup, loss_fn, error, match):
    model, batch = setup
    with pytest.raises(error, match=match):
        hessian_eigenvalues(model, loss_fn, batch)


def test_bad_batches_and_models(setup):
    model, batch = setup
    for empty in ([], None, ()):
        with pytest.raises(ValueError, match="`batches`"):
            HessianOperator(model, cross_entropy, empty)
    with pytest.raises(TypeError, match="`model`"):
        HessianOperator(lambda x: x, cross_entropy, batch)
    frozen = make_model("tanh_mlp").requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters selected"):
        HessianOperator(frozen, cross_entropy, batch)
    with pytest.raises(ValueError, match="`batch_size_fn`"):
        HessianOperator(model, lambda m, b: m(b.x).sum(), [(object(),), (object(),)])


def test_bad_trace_and_density_arguments(setup):
    model, batch = setup
    with pytest.raises(ValueError, match="`method`"):
        hessian_trace(model, cross_entropy, batch, method="exact")
    with pytest.raises(ValueError, match="`max_iter`"):
        hessian_trace(model, cross_entropy, batch, max_iter=5, sketch_size=10)
    with pytest.raises(ValueError, match="`n_steps`"):
        spectral_density(model, cross_entropy, batch, n_steps=0)
    with pytest.raises(ValueError, match="`bandwidth`"):
        spectral_density(model, cross_entropy, batch, bandwidth=-1.0)


def test_non_finite_loss_raises_the_exported_type(setup):
    model, batch = setup
    assert lightning_landscape.NonFiniteError is lightning_landscape.curvature.NonFiniteError
    with pytest.raises(lightning_landscape.NonFiniteError, match="loss"):
        hessian_eigenvalues(model, lambda m, b: cross_entropy(m, b) * float("nan"), batch)


def test_non_finite_product_with_finite_loss_raises_the_exported_type(setup):
    model, batch = setup
    with torch.no_grad():
        model[0].bias[0] = 0.0

    def cusp(m, b):  # |w|^1.5 at w = 0: finite loss and gradient, infinite curvature
        return cross_entropy(m, b) + m[0].bias[0].abs() ** 1.5

    op = HessianOperator(model, cusp, batch)
    assert torch.isfinite(op.loss) and torch.isfinite(op.gradient).all()
    with pytest.raises(lightning_landscape.NonFiniteError, match="product"):
        op.matvec(torch.ones(op.size, dtype=torch.float64))
