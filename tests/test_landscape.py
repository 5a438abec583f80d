"""Loss-landscape slices: filter normalisation and closed forms on a quadratic."""

import pytest
import torch

from lightning_landscape.curvature import HessianOperator
from lightning_landscape.landscape import filter_normalized_direction, loss_line, loss_surface
from tests.support import ComplexGain, ComplexGainTwin, cross_entropy, make_batch, make_model
from tests.test_sharpness import _loss, _problem, quadratic


def test_filters_take_the_norms_of_the_weight_filters():
    model, batch = make_model("conv_bn"), make_batch("conv_bn")
    op = HessianOperator(model, cross_entropy, batch)
    direction = filter_normalized_direction(op, generator=3)
    for name, d, w in zip(
        op.param_names, op.unflatten(direction), op.unflatten(op.parameters_vector)
    ):
        if w.dim() <= 1:
            assert d.abs().max() == 0, name  # biases and BatchNorm scales are left out
        else:
            torch.testing.assert_close(
                d.reshape(d.shape[0], -1).norm(dim=1), w.reshape(w.shape[0], -1).norm(dim=1)
            )
    again = filter_normalized_direction(op, generator=3)
    other = filter_normalized_direction(op, generator=4)
    assert torch.equal(direction, again) and not torch.equal(direction, other)
    kept = filter_normalized_direction(op, generator=3, ignore_biases_and_norms=False)
    bias = op.param_names.index("0.bias")
    torch.testing.assert_close(op.unflatten(kept)[bias].norm(), model[0].bias.detach().norm())


def test_a_complex_weight_is_filter_normalised_as_its_real_view_and_a_complex_bias_left_out():
    batch = make_batch("tanh_mlp")
    op = HessianOperator(ComplexGain(), cross_entropy, batch)
    twin = HessianOperator(ComplexGainTwin(), cross_entropy, batch)
    direction = op.unflatten(filter_normalized_direction(op, generator=3))
    expected = twin.unflatten(filter_normalized_direction(twin, generator=3))
    bias = op.param_names.index("bias")  # 1-D, though its real view, like the twin's, is 2-D
    assert direction[bias].abs().max() == 0 < expected[bias].abs().max()
    for i in set(range(len(direction))) - {bias}:
        assert torch.equal(direction[i], expected[i]), op.param_names[i]


def test_line_and_surface_match_the_quadratic():
    model, (a, b), w = _problem(4)
    op = HessianOperator(model, quadratic, (a, b))
    x = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alphas = torch.linspace(-1, 1, 5, dtype=torch.float64)
    betas = torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)
    line = loss_line(op, x, alphas)
    surface = loss_surface(op, x, y, alphas, betas)
    for i, alpha in enumerate(alphas):
        assert float(line[i]) == pytest.approx(_loss(a, b, w + alpha * x), rel=1e-12)
        for j, beta in enumerate(betas):
            assert float(surface[j, i]) == pytest.approx(
                _loss(a, b, w + alpha * x + beta * y), rel=1e-12
            )
    assert float(line[2]) == pytest.approx(
        float(op.loss), rel=1e-12
    )  # the centre is the current loss
    assert torch.equal(model.w.detach(), w)


def test_sharded_points_sum_to_the_whole_surface():
    model, (a, b), _ = _problem(5)
    op = HessianOperator(model, quadratic, (a, b))
    x, y = torch.ones(12, dtype=torch.float64), torch.arange(12, dtype=torch.float64) / 12
    steps = torch.linspace(-1, 1, 3, dtype=torch.float64)
    whole = loss_surface(op, x, y, steps, steps)
    shards = [loss_surface(op, x, y, steps, steps, shard=(rank, 2)) for rank in range(2)]
    assert all((s != 0).sum() < whole.numel() for s in shards)  # each rank did a part
    torch.testing.assert_close(shards[0] + shards[1], whole, rtol=0, atol=0)
