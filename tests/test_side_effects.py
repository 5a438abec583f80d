"""Every public function leaves the model, its gradients and the RNG as it found them."""

import random

import numpy as np
import pytest
import torch

from lightning_landscape.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from tests.support import cross_entropy, make_batch, make_model


def _snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def _assert_same(before, after):
    for key in ("params", "buffers"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), key
    assert [g is None for g in before["grads"]] == [g is None for g in after["grads"]]
    assert all(a is None or torch.equal(a, b) for a, b in zip(before["grads"], after["grads"]))
    assert before["modes"] == after["modes"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])
    assert before["python_rng"] == after["python_rng"]


def _hvp(model, loss_fn, batch):
    op = HessianOperator(model, loss_fn, batch)
    op.matvec(torch.ones(op.size, dtype=torch.float64))
    return op.gradient


MEASUREMENTS = {
    "hvp": _hvp,
    "eigenvalues_lanczos": lambda m, f, b: hessian_eigenvalues(m, f, b, k=2, which="both"),
    "eigenvalues_power": lambda m, f, b: hessian_eigenvalues(m, f, b, method="power"),
    "trace": lambda m, f, b: hessian_trace(m, f, b, max_iter=60),
    "density": lambda m, f, b: spectral_density(m, f, b, n_steps=10),
    "eigenvalues_eval_mode": lambda m, f, b: hessian_eigenvalues(m, f, b, mode="eval"),
    "several_batches": lambda m, f, b: hessian_eigenvalues(
        m, f, [(b[0][:16], b[1][:16]), (b[0][16:], b[1][16:])]
    ),
}


@pytest.mark.parametrize("measurement", sorted(MEASUREMENTS))
def test_no_side_effects(measurement):
    model = make_model("conv_bn")
    batch = make_batch("conv_bn")
    model.train()
    model[2].eval()  # a mixed-mode model: each flag must come back as it was
    cross_entropy(model, batch).backward()  # existing gradients...
    model[0].bias.grad = None  # ...and a missing one
    before = _snapshot(model)
    MEASUREMENTS[measurement](model, cross_entropy, batch)
    _assert_same(before, _snapshot(model))
