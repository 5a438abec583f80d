"""Preconditioned sharpness λ_max(P⁻¹H) of Adam (against a dense matrix), of RMSprop
(against torch's own steps on a quadratic) and of SGD with per-group rates, in Trainer
runs."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_landscape import HessianEigenvalueMonitor
from lightning_landscape.curvature import HessianOperator, ScaledOperator, lanczos
from lightning_landscape.stability import (
    adam_preconditioner,
    preconditioner,
    rmsprop_preconditioner,
)
from tests.lightning_support import DigitsModel, digits, fit_ddp_spawn, read_scalars, trainer
from tests.support import (
    ComplexGain,
    ComplexGainTwin,
    cross_entropy,
    dense_hessian,
    make_batch,
    make_model,
)


def _optimizer_steps(model, batch, optimizer, steps=5):
    for _ in range(steps):
        optimizer.zero_grad()
        cross_entropy(model, batch).backward()
        optimizer.step()


def _expected_p(optimizer, param, lr0):
    """Torch's Adam step, read off its documented update: Δw = −η_g m̂/(√v̂ + ε)."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    state = optimizer.state[param]
    t = float(state["step"])
    beta1, beta2 = group["betas"]
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    v_hat = v / (1 - beta2**t)
    return (1 - beta1**t) * (v_hat.sqrt() + group["eps"]) * lr0 / group["lr"]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioned_sharpness_equals_the_dense_eigenvalue(amsgrad):
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    first, *rest = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [first], "lr": 0.003}, {"params": rest}], lr=0.01, amsgrad=amsgrad
    )
    assert adam_preconditioner(optimizer, list(model.parameters())) is None  # no state yet
    _optimizer_steps(model, batch, optimizer)
    adam = adam_preconditioner(optimizer, list(model.parameters()))
    assert adam.threshold == pytest.approx(38 / 0.003)  # the first group's rate

    p = torch.cat([_expected_p(optimizer, q, 0.003).reshape(-1) for q in model.parameters()])
    s = p.rsqrt()
    dense = s[:, None] * dense_hessian(model, cross_entropy, batch) * s[None, :]
    expected = torch.linalg.eigvalsh(dense)[-1]

    operator = HessianOperator(model, cross_entropy, batch)
    scaled = ScaledOperator(operator, operator.flatten(adam.inverse_sqrt))
    result = lanczos(scaled, 1, "largest", tol=1e-10, max_iter=200)
    assert float(result.eigenvalues[0]) == pytest.approx(float(expected), rel=1e-8)


@pytest.mark.parametrize(
    "optimizer_class",
    [
        torch.optim.Adam,
        partial(torch.optim.RMSprop, centered=True, momentum=0.9),
        partial(torch.optim.SGD, momentum=0.9),
    ],
    ids=["adam", "rmsprop", "sgd"],
)
def test_a_complex_parameter_is_preconditioned_as_its_real_view(optimizer_class):
    """As torch steps a twin holding it as its real view: Adam and RMSprop scale each
    coordinate by its own second moment, SGD's per-group rate applies to both."""
    batch, scalings = make_batch("tanh_mlp"), []
    for model in (ComplexGain(), ComplexGainTwin()):
        rest = [model.gain, model.weight, model.bias, *model.pre.parameters()]
        groups = [{"params": rest}, {"params": model.head.parameters(), "lr": 0.003}]
        optimizer = optimizer_class(groups, lr=0.01)
        _optimizer_steps(model, batch, optimizer)
        operator = HessianOperator(model, cross_entropy, batch)
        scalings.append(
            operator.flatten(preconditioner(optimizer, operator.parameters).inverse_sqrt)
        )
    torch.testing.assert_close(*scalings, rtol=1e-12, atol=0)


def test_no_preconditioner_for_sgd_or_parameters_the_optimizer_does_not_hold():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    assert adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), []) is None
    first, *rest = list(model.parameters())
    optimizer = torch.optim.Adam(rest, lr=0.01)
    _optimizer_steps(model, batch, optimizer)
    assert adam_preconditioner(optimizer, rest) is not None
    assert adam_preconditioner(optimizer, [first, *rest]) is None


def test_the_adam_threshold_is_that_of_the_groups_holding_the_parameters():
    """A backbone frozen by a zero rate in the first group leaves the head's measurable."""
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    first, *rest = list(model.parameters())
    optimizer = torch.optim.Adam([{"params": [first], "lr": 0.0}, {"params": rest}], lr=0.01)
    _optimizer_steps(model, batch, optimizer)
    assert adam_preconditioner(optimizer, rest).threshold == pytest.approx(38 / 0.01)
    assert adam_preconditioner(optimizer, [first, *rest]) is None


def test_adam_leaves_a_parameter_without_gradients_where_it_is():
    """A layer the loss never reaches (a pretrained pooler a fine-tuned head skips) gets no
    state: Adam does not move it, so its rows of P⁻¹ are 0, not a reason to measure nothing."""
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    unused = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    params = [*model.parameters(), unused]
    optimizer = torch.optim.Adam(params, lr=0.01)
    _optimizer_steps(model, batch, optimizer)
    scaling = adam_preconditioner(optimizer, params)
    used = adam_preconditioner(optimizer, list(model.parameters()))
    assert torch.equal(scaling.inverse_sqrt[-1], torch.zeros(4, dtype=torch.float64))
    for a, b in zip(scaling.inverse_sqrt, used.inverse_sqrt):
        assert torch.equal(a, b)
    assert scaling.threshold == used.threshold
    fresh = torch.optim.Adam(params, lr=0.01)
    assert adam_preconditioner(fresh, params) is None  # before the first step


def test_no_adam_preconditioner_for_an_ascent():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, maximize=True)
    _optimizer_steps(model, batch, optimizer)
    assert adam_preconditioner(optimizer, list(model.parameters())) is None


@pytest.mark.parametrize(
    "settings", [{}, {"momentum": 0.9}, {"centered": True}, {"momentum": 0.5, "centered": True}]
)
def test_rmsprop_with_frozen_moments_diverges_just_past_the_preconditioned_threshold(settings):
    """RMSprop whose averages stop moving (``alpha = 1`` after a few steps) is heavy-ball
    momentum on ``P⁻¹H``: torch's own steps converge at 0.99 of the threshold and blow up
    at 1.01, with the second group at its own rate."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=generator, dtype=torch.float64)
    params = [torch.ones(n, dtype=torch.float64, requires_grad=True) for n in (3, 4)]
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.003}]
    optimizer = torch.optim.RMSprop(groups, lr=0.01, alpha=0.5, **settings)
    assert rmsprop_preconditioner(optimizer, params) is None  # no state yet
    for _ in range(5):  # second moments of gradients of scales apart
        for p in params:
            scales = 10 ** torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.grad = scales * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        optimizer.step()
    scaling = rmsprop_preconditioner(optimizer, params)
    assert scaling.threshold == pytest.approx((2 + 2 * settings.get("momentum", 0.0)) / 0.01)
    s = torch.cat([t.reshape(-1) for t in scaling.inverse_sqrt])
    sharpness = torch.linalg.eigvalsh(s[:, None] * (a.T @ a) * s[None, :])[-1]
    for group in optimizer.param_groups:
        group["alpha"] = 1.0
    for factor, diverges in ((0.99, False), (1.01, True)):
        hessian = factor * scaling.threshold / sharpness * (a.T @ a)
        with torch.no_grad():
            for p in params:
                p.fill_(1.0)
        for state in optimizer.state.values():
            if "momentum_buffer" in state:
                state["momentum_buffer"].zero_()
        for _ in range(3000):
            optimizer.zero_grad()
            w = torch.cat(params)
            (0.5 * w @ hessian @ w).backward()
            optimizer.step()
        assert (not float(torch.cat(params).norm()) < 1e3) == diverges


class RMSpropDigits(DigitsModel):
    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=self.hparams.lr, momentum=0.5)


class AdamDigits(DigitsModel):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(0.8, 0.99))


class SlowFirstLayerDigits(DigitsModel):
    """SGD whose first layer steps at a tenth of the rate, as a pretrained backbone would."""

    def configure_optimizers(self):
        first, rest = self.net[0].parameters(), self.net[2].parameters()
        groups = [{"params": rest}, {"params": first, "lr": self.hparams.lr / 10}]
        return torch.optim.SGD(groups, lr=self.hparams.lr, momentum=0.9)


@pytest.mark.parametrize(
    "model_class, threshold",
    [
        (AdamDigits, (2 + 2 * 0.8) / (0.2 * 0.01)),
        (RMSpropDigits, (2 + 2 * 0.5) / 0.01),
        (SlowFirstLayerDigits, (2 + 2 * 0.9) / 0.01),
    ],
)
def test_monitor_logs_the_preconditioned_sharpness(tmp_path, model_class, threshold):
    x, y = digits(64).tensors
    fixed_loss = lambda module, batch: F.cross_entropy(module(x), y)
    monitor = HessianEigenvalueMonitor(every_n_steps=3, loss_fn=fixed_loss, tol=1e-6)
    model = model_class(arch="mlp", lr=0.01)
    fit = trainer(tmp_path, [monitor], max_steps=6)
    fit.fit(model)
    logged = read_scalars(tmp_path)
    assert set(logged["landscape/hessian/preconditioned_lambda_max"]) == {3, 6}
    assert logged["landscape/hessian/preconditioned_threshold"][6] == pytest.approx(threshold)
    assert "landscape/hessian/stability_threshold" not in logged  # GD's 2/η means nothing here

    scaling = preconditioner(fit.optimizers[0], list(model.parameters()))
    operator = HessianOperator(model, fixed_loss, (x, y))
    scaled = ScaledOperator(operator, operator.flatten(scaling.inverse_sqrt))
    expected = lanczos(scaled, 1, "largest", tol=1e-8, max_iter=300).eigenvalues[0]
    assert logged["landscape/hessian/preconditioned_lambda_max"][6] == pytest.approx(
        float(expected), rel=1e-4
    )
    assert math.isfinite(logged["landscape/hessian/lambda_max"][6])


def test_sgd_runs_log_no_preconditioned_sharpness(tmp_path):
    trainer(tmp_path, [HessianEigenvalueMonitor(every_n_steps=3)], max_steps=3).fit(
        DigitsModel(arch="mlp")
    )
    assert "landscape/hessian/preconditioned_lambda_max" not in read_scalars(tmp_path)


class NAdamDigits(DigitsModel):
    def configure_optimizers(self):
        return torch.optim.NAdam(self.parameters(), lr=self.hparams.lr)


def test_an_optimizer_of_unknown_stability_is_named_once_and_lambda_max_logged(tmp_path):
    with pytest.warns(UserWarning, match="no stability threshold for NAdam") as warned:
        trainer(tmp_path, [HessianEigenvalueMonitor(every_n_steps=2)], max_steps=4).fit(
            NAdamDigits(arch="mlp", lr=0.01)
        )
    assert sum("NAdam" in str(w.message) for w in warned) == 1
    logged = read_scalars(tmp_path)
    assert set(logged["landscape/hessian/lambda_max"]) == {2, 4}
    assert not [tag for tag in logged if "threshold" in tag]


@pytest.mark.timeout(240)
def test_under_ddp_both_ranks_measure_the_preconditioned_sharpness(tmp_path):
    monitor = HessianEigenvalueMonitor(every_n_steps=2)
    log_dir = fit_ddp_spawn(tmp_path, [monitor], AdamDigits(arch="mlp", lr=0.01), max_steps=2)
    logged = read_scalars(log_dir)
    assert set(logged["landscape/hessian/preconditioned_lambda_max"]) == {2}
    assert logged["landscape/hessian/preconditioned_lambda_max"][2] > 0
