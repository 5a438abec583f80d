"""The Hessian operator against exact dense Hessians."""

import copy
import itertools
import random
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_landscape.curvature import (
    AsymmetricOperatorError,
    Batches,
    HessianOperator,
    NondeterministicLossError,
    OnceDifferentiableError,
    ReducedPrecisionWarning,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from lightning_landscape.gradients import gradient_noise_scale
from lightning_landscape.sharpness import (
    adaptive_sharpness,
    average_sharpness,
    sam_sharpness,
    worst_case_sharpness,
)
from tests.support import (
    MODELS,
    NEEDS_LINEAR_CROSS_ENTROPY,
    ComplexGain,
    ComplexGainTwin,
    Cube,
    CubeMisdifferentiated,
    CubeOnce,
    TanhMLP,
    cross_entropy,
    dense_hessian,
    input_gradient_penalty,
    make_batch,
    make_model,
)


def _random_vector(size: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(3), dtype=dtype)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_product_matches_dense_hessian(name):
    model, batch = make_model(name), make_batch(name)
    model.train()
    dense = dense_hessian(model, cross_entropy, batch)
    with HessianOperator(model, cross_entropy, batch) as op:
        v = _random_vector(op.size)
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op @ v, dense @ v, rtol=1e-10, atol=1e-12)  # graph reused


@pytest.mark.parametrize("name", ["tied_layers", "aliased_block"])
def test_a_shared_weight_or_aliased_block_keeps_the_models_own_tensors(name):
    model, batch = make_model(name), make_batch(name)
    held = [
        (module, attribute, tensor)
        for module in model.modules()
        for attribute, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]
    ]
    with HessianOperator(model, cross_entropy, batch) as op:
        v = _random_vector(op.size)
        op.matvec(v)
        op.loss_at(1e-2 * v)
        op.loss_and_gradient(1e-2 * v)
    assert all(getattr(module, attribute) is tensor for module, attribute, tensor in held)


def test_loss_and_gradient_at_the_point():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    op = HessianOperator(model, cross_entropy, batch)
    loss = cross_entropy(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(op.loss, loss.detach())
    torch.testing.assert_close(op.gradient, torch.cat([g.reshape(-1) for g in grads]))


def test_unused_parameter_has_zero_rows():
    model, batch = make_model("unused_param"), make_batch("unused_param")
    op = HessianOperator(model, cross_entropy, batch)
    product = op.unflatten(op.matvec(_random_vector(op.size)))
    unused = [i for i, name in enumerate(op.param_names) if name.startswith("unused")]
    assert unused and all(product[i].abs().max() == 0 for i in unused)
    assert all(op.unflatten(op.gradient)[i].abs().max() == 0 for i in unused)


def test_several_batches_weight_by_sample_count():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp", n=30)
    whole = HessianOperator(model, cross_entropy, (x, y))
    split = HessianOperator(model, cross_entropy, [(x[:10], y[:10]), (x[10:], y[10:])])
    v = _random_vector(whole.size)
    torch.testing.assert_close(split.matvec(v), whole.matvec(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.loss, whole.loss)
    torch.testing.assert_close(split.gradient, whole.gradient)


def test_a_dataloader_is_all_its_batches():
    """The whole dataset's Hessian, as PyHessian's ``full_dataset``; a last, smaller batch
    weighs by its samples."""
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp", n=30)
    whole = HessianOperator(model, cross_entropy, (x, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    looped = HessianOperator(model, cross_entropy, loader)
    v = _random_vector(whole.size)
    torch.testing.assert_close(looped.matvec(v), whole.matvec(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(looped.loss, whole.loss)


def test_several_batches_with_batchnorm_sum_per_batch_hessians():
    model, (x, y) = make_model("conv_bn"), make_batch("conv_bn", n=24)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    expected = sum(
        w * dense_hessian(model, cross_entropy, b, seed=i)
        for i, (w, b) in enumerate(zip((1 / 3, 2 / 3), halves))
    )
    op = HessianOperator(model, cross_entropy, halves)
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), expected @ v, rtol=1e-10, atol=1e-12)


def test_dropout_masks_are_fixed_across_products_of_several_batches():
    model, (x, y) = make_model("dropout_mlp"), make_batch("dropout_mlp")
    op = HessianOperator(model, cross_entropy, [(x[:16], y[:16]), (x[16:], y[16:])])
    v = _random_vector(op.size)
    first = op.matvec(v)
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    expected = sum(
        0.5 * dense_hessian(model, cross_entropy, b, seed=i)
        for i, b in enumerate([(x[:16], y[:16]), (x[16:], y[16:])])
    )
    torch.testing.assert_close(first, expected @ v, rtol=1e-10, atol=1e-12)


def _mixup(model, batch):
    """Mixup with its weight drawn as projects draw it, from numpy (and a flip from Python's
    ``random``): a measurement must see the same draws in every forward pass."""
    x, y = batch
    weight = float(np.random.beta(0.4, 0.4))
    order = torch.arange(len(x)).flip(0) if random.random() < 0.5 else torch.arange(len(x))
    mixed = weight * x + (1 - weight) * x[order]
    logits = model(mixed)
    return weight * F.cross_entropy(logits, y) + (1 - weight) * F.cross_entropy(logits, y[order])


def test_numpy_and_python_draws_are_fixed_across_products_and_points():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp")
    op = HessianOperator(model, _mixup, [(x[:16], y[:16]), (x[16:], y[16:])])
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), op.matvec(v), rtol=0, atol=0)
    torch.testing.assert_close(op.loss_at(torch.zeros_like(v)), op.loss, rtol=0, atol=0)


def _scales_its_batch_in_place(model, batch):
    x, y = batch
    x /= 2.0  # as `images /= 255` does when the loader already yields floats
    return cross_entropy(model, (x, y))


def test_a_loss_that_writes_into_its_batch_sees_the_batch_as_given_in_every_pass():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp")
    given = x.clone()
    halves = [(x[:16], y[:16]), (x[16:], y[16:])]
    op = HessianOperator(model, _scales_its_batch_in_place, halves)
    v = _random_vector(op.size)
    expected = sum(0.5 * dense_hessian(model, cross_entropy, (b / 2, t)) for b, t in halves)
    torch.testing.assert_close(op.matvec(v), expected @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(v), expected @ v, rtol=1e-10, atol=1e-12)
    assert torch.equal(x, given)


class _OwnGenerators(TanhMLP):
    """Input noise drawn from generators the model holds: torch's, numpy's, Python's."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = torch.Generator().manual_seed(0)
        self.scale = np.random.default_rng(0)
        self.coin = random.Random(0)

    def forward(self, x):
        scale = self.scale.uniform() * (2 if self.coin.random() < 0.5 else 1)
        noise = torch.randn(x.shape, generator=self.noise, dtype=x.dtype)
        return super().forward(x + 0.1 * scale * noise)


def test_generators_the_model_holds_start_every_pass_where_they_were():
    model, (x, y) = _OwnGenerators().double(), make_batch("tanh_mlp")
    states = (model.noise.get_state(), model.scale.bit_generator.state, model.coin.getstate())
    op = HessianOperator(model, cross_entropy, [(x[:16], y[:16]), (x[16:], y[16:])])
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), op.matvec(v), rtol=0, atol=0)
    torch.testing.assert_close(op.loss_at(torch.zeros_like(v)), op.loss, rtol=0, atol=0)
    assert torch.equal(model.noise.get_state(), states[0])
    assert model.scale.bit_generator.state == states[1]
    assert model.coin.getstate() == states[2]


# Generators a training script keeps at its top level, reached by global name.
_SCRIPT_NOISE = torch.Generator().manual_seed(1)
_SCRIPT_SCALE = np.random.default_rng(1)
_SCRIPT_COIN = random.Random(1)


def _script_noise(x):
    scale = _SCRIPT_SCALE.uniform() * (2 if _SCRIPT_COIN.random() < 0.5 else 1)
    return 0.1 * scale * torch.randn(x.shape, generator=_SCRIPT_NOISE, dtype=x.dtype)


class _ScriptGenerators(TanhMLP):
    def forward(self, x):
        return super().forward(x + _script_noise(x))


def _noisy_cross_entropy(model, batch, weight):
    x, y = batch
    return weight * F.cross_entropy(model(x + _script_noise(x)), y)


@pytest.mark.parametrize(
    ("model_class", "loss_fn"),
    [(_ScriptGenerators, cross_entropy), (TanhMLP, partial(_noisy_cross_entropy, weight=2.0))],
    ids=["the model's code", "the loss function"],
)
def test_generators_reached_by_global_name_start_every_pass_where_they_were(model_class, loss_fn):
    model, (x, y) = model_class().double(), make_batch("tanh_mlp")
    states = (_SCRIPT_NOISE.get_state(), _SCRIPT_SCALE.bit_generator.state, _SCRIPT_COIN.getstate())
    op = HessianOperator(model, loss_fn, [(x[:16], y[:16]), (x[16:], y[16:])])
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), op.matvec(v), rtol=0, atol=0)
    torch.testing.assert_close(op.loss_at(torch.zeros_like(v)), op.loss, rtol=0, atol=0)
    assert torch.equal(_SCRIPT_NOISE.get_state(), states[0])
    assert _SCRIPT_SCALE.bit_generator.state == states[1]
    assert _SCRIPT_COIN.getstate() == states[2]


# Seeds of generators created at every call: new draws each time, as from fresh entropy
# (np.random.default_rng()), but the same in every run of the tests.
_FRESH_SEEDS = itertools.count()


def _freshly_noisy_cross_entropy(model, batch):
    x, y = batch
    noise = np.random.default_rng(next(_FRESH_SEEDS)).normal(size=tuple(x.shape))
    return F.cross_entropy(model(x + 0.1 * torch.as_tensor(noise)), y)


def test_a_loss_random_at_every_pass_is_refused_once_a_batch_is_seen_twice():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp")
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    v = _random_vector(83)
    op = HessianOperator(model, _freshly_noisy_cross_entropy, batches)
    op.matvec(v)  # each batch passed once: nothing to compare yet
    with pytest.raises(NondeterministicLossError, match="loss of probe batch 0 changed"):
        op.matvec(v)
    steady = HessianOperator(model, cross_entropy, batches)
    torch.testing.assert_close(steady.matvec(v), steady.matvec(v), rtol=0, atol=0)
    one_batch = HessianOperator(model, _freshly_noisy_cross_entropy, batches[0])
    one_batch.matvec(v)  # one retained graph, one draw: a fixed matrix
    with pytest.raises(NondeterministicLossError):
        one_batch.loss_and_gradient()  # a second pass at the point


def test_a_loss_random_at_every_pass_has_no_sharpness():
    # a difference of two losses of different draws: sharpness would be the draws' spread
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    with pytest.raises(NondeterministicLossError):
        sam_sharpness(model, _freshly_noisy_cross_entropy, batch)


def test_a_loss_that_differentiates_inside_is_evaluated_and_differentiated():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    op = HessianOperator(model, input_gradient_penalty, batch)
    offset = _random_vector(op.size) * 1e-2
    shifted = op.loss_at(offset)  # a loss-only pass
    assert not shifted.requires_grad
    torch.testing.assert_close(shifted, op.loss_and_gradient(offset)[0], rtol=0, atol=0)
    v = _random_vector(op.size)
    expected = dense_hessian(model, input_gradient_penalty, batch) @ v
    torch.testing.assert_close(op.matvec(v), expected, rtol=1e-8, atol=1e-10)


def test_batch_forms_dict_and_list_of_tensors():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp")
    reference = HessianOperator(model, cross_entropy, (x, y))
    as_list = HessianOperator(model, cross_entropy, [x, y])  # what a DataLoader yields
    as_dict = HessianOperator(
        model, lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), {"x": x, "y": y}
    )
    v = _random_vector(reference.size)
    expected = reference.matvec(v)
    torch.testing.assert_close(as_list.matvec(v), expected, rtol=0, atol=0)
    torch.testing.assert_close(as_dict.matvec(v), expected, rtol=0, atol=0)


def test_batches_of_bare_tensors_are_several_batches():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp", n=30)

    def labelled(m, inputs):  # a loss whose batch is a bare tensor, like an autoencoder's
        return F.cross_entropy(m(inputs), y[:10] if inputs.shape[0] == 10 else y[10:])

    whole = HessianOperator(model, cross_entropy, (x, y))
    split = HessianOperator(model, labelled, Batches([x[:10], x[10:]]))
    v = _random_vector(whole.size)
    torch.testing.assert_close(split.matvec(v), whole.matvec(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.loss, whole.loss)


def test_eval_mode_uses_running_statistics():
    model, batch = make_model("conv_bn"), make_batch("conv_bn")
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    dense_eval = dense_hessian(model, cross_entropy, batch)
    model.train()
    op = HessianOperator(model, cross_entropy, batch, mode="eval")
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), dense_eval @ v, rtol=1e-10, atol=1e-12)
    assert model.training


def test_works_inside_no_grad_and_selects_blocks():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    names = ["2.weight", "2.bias"]
    dense = dense_hessian(model, cross_entropy, batch, params=names)
    with torch.no_grad():
        op = HessianOperator(model, cross_entropy, batch, params=r"^2\.")
        assert op.param_names == names
        v = _random_vector(op.size)
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_a_block_is_selected_by_any_name_it_is_reachable_under():
    model, batch = make_model("aliased_block"), make_batch("aliased_block")
    names = ["body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias"]
    dense = dense_hessian(model, cross_entropy, batch, params=names)
    op = HessianOperator(model, cross_entropy, batch, params=r"^backbone\.")  # the alias
    assert op.param_names == names
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_a_compiled_block_is_selected_by_the_names_the_user_gives_it():
    """``self.net = torch.compile(net)`` puts ``_orig_mod`` into the names; a filter
    written as the user names the layers (``^net\\.0\\.``) still finds them."""
    holder = torch.nn.Module()
    holder.net = torch.compile(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    )
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    op = HessianOperator(
        holder, lambda m, b: F.cross_entropy(m.net(b[0]), b[1]), batch, params=r"^net\.0\."
    )
    assert op.param_names == ["net._orig_mod.0.weight", "net._orig_mod.0.bias"]


def test_float32_model_measured_in_float64_without_touching_it():
    model32 = make_model("tanh_mlp", dtype=torch.float32)
    x, y = make_batch("tanh_mlp", dtype=torch.float32)
    model64 = make_model("tanh_mlp", dtype=torch.float32).double()
    dense = dense_hessian(model64, cross_entropy, (x.double(), y))
    op = HessianOperator(model32, cross_entropy, (x, y), dtype=torch.float64)
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert all(p.dtype == torch.float32 for p in model32.parameters())


def test_a_complex_parameter_is_measured_over_its_real_coordinates():
    """As the twin holding each complex parameter as its real view, whose dense Hessian our
    code plays no part in; the complex weight starts at an odd offset of a flat vector."""
    model, twin, batch = ComplexGain(), ComplexGainTwin(), make_batch("tanh_mlp")
    dense = dense_hessian(twin, cross_entropy, batch)
    with (
        HessianOperator(model, cross_entropy, batch) as op,
        HessianOperator(twin, cross_entropy, batch) as real,
    ):
        v = _random_vector(op.size)
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
        assert [t.shape for t in op.unflatten(v)] == [p.shape for p in twin.parameters()]
        assert torch.equal(op.parameters_vector, real.parameters_vector)
        torch.testing.assert_close(op.loss_and_gradient(), real.loss_and_gradient())
        torch.testing.assert_close(op.loss_and_gradient(1e-2 * v), real.loss_and_gradient(1e-2 * v))
    result = hessian_eigenvalues(model, cross_entropy, batch, which="both", tol=1e-8)
    expected = torch.linalg.eigvalsh(dense)[[-1, 0]]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize(
    ("model_dtype", "dtype", "tolerance"),
    [(torch.float32, torch.float64, 1e-10), (torch.float64, torch.float32, 1e-4)],
)
def test_a_complex_model_is_measured_at_the_precision_asked(model_dtype, dtype, tolerance):
    """Complex parameters take the complex dtype of that precision, also the bias left out
    of the Hessian (in float64 it would turn the float32 head's input float64)."""
    model = ComplexGain(model_dtype)
    x, y = make_batch("tanh_mlp", dtype=model_dtype)
    selected = ["weight", "head.weight", "head.bias"]
    twin = ComplexGainTwin(model_dtype).double()  # a real twin casts without loss
    dense = dense_hessian(twin, cross_entropy, (x.double(), y), params=selected)
    op = HessianOperator(model, cross_entropy, (x, y), params=r"^(weight|head\.)", dtype=dtype)
    assert op.param_names == selected and op.dtype == dtype
    v = _random_vector(op.size)
    product = op.matvec(v.to(dtype)).double()
    torch.testing.assert_close(product, dense @ v, rtol=tolerance, atol=tolerance)
    assert model.weight.dtype == model.bias.dtype == model_dtype.to_complex()


class _SignalModel(torch.nn.Module):
    """Complex signals through a complex weight, then a real head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128) / 2)
        self.head = torch.nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, signal):
        return self.head((signal @ self.weight).abs())


def test_complex_inputs_take_the_precision_asked():
    """A complex128 signal would turn the head's input float64 in a float32 measurement."""
    generator = torch.Generator().manual_seed(1)
    signal = torch.randn(32, 4, dtype=torch.complex128, generator=generator)
    batch = (signal, torch.randint(0, 3, (32,), generator=generator))
    model = _SignalModel()
    exact = HessianOperator(model, cross_entropy, batch)
    single = HessianOperator(model, cross_entropy, batch, dtype=torch.float32)
    v = _random_vector(exact.size)
    product = single.matvec(v.float()).double()
    torch.testing.assert_close(product, exact.matvec(v), rtol=1e-4, atol=1e-4)


def test_autocast_is_off_inside_the_measurement():
    model = make_model("tanh_mlp", dtype=torch.float32)
    x, y = make_batch("tanh_mlp", dtype=torch.float32)
    reference = HessianOperator(model, cross_entropy, (x, y)).matvec(
        _random_vector(83, torch.float32)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = HessianOperator(model, cross_entropy, (x, y)).matvec(
            _random_vector(83, torch.float32)
        )
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)


def _autocast_loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return cross_entropy(model, batch)


def test_an_autocast_inside_the_loss_is_reported_once_per_operator():
    model = make_model("tanh_mlp", dtype=torch.float32)
    batch = make_batch("tanh_mlp", dtype=torch.float32)
    v = _random_vector(83, torch.float32)
    with warnings.catch_warnings():  # an autocast around the measurement is turned off
        warnings.simplefilter("error", ReducedPrecisionWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            HessianOperator(model, cross_entropy, batch).matvec(v)
    operator = HessianOperator(model, _autocast_loss, batch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        operator.matvec(v)
        operator.loss_at(torch.zeros(83))  # a second forward pass: no second warning
    record = [w for w in record if w.category is ReducedPrecisionWarning]
    assert len(record) == 1
    assert str(record[0].message).startswith(
        "the loss ran `0` (Linear) and 3 more module(s) in torch.bfloat16"
    )


def test_attention_model_gets_a_double_backward():
    model, batch = make_model("attention"), make_batch("attention")
    model.train()
    loss = cross_entropy(model, batch)  # the default (fused) kernel: no double backward
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(
            grads, list(model.parameters()), grad_outputs=[torch.ones_like(g) for g in grads]
        )
    dense = dense_hessian(model, cross_entropy, batch)
    op = HessianOperator(model, cross_entropy, batch)
    v = _random_vector(op.size)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-9, atol=1e-11)


class _Gated(torch.nn.Module):
    """MobileNetV3's squeeze-and-excitation gate: hardsigmoid has no double backward."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.hidden, self.gate = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8)
        self.hardsigmoid = torch.nn.Hardsigmoid(inplace)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.head(h * self.hardsigmoid(3 * self.gate(h)))


class _Bags(torch.nn.Module):
    """Bags of token ids through ``nn.EmbeddingBag``, which has no double backward: of
    equal length, or cut at offsets (one bag empty, one holding the padding id alone)."""

    def __init__(self, mode: str, offsets: bool) -> None:
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(12, 4, mode=mode, padding_idx=0)
        self.head = torch.nn.Linear(4, 3)
        self.offsets, self.weighted = offsets, mode == "sum"

    def forward(self, tokens):
        weights = tokens.float().div(12).double() if self.weighted else None
        if not self.offsets:
            return self.head(self.bag(tokens, per_sample_weights=weights))
        flat = tokens.reshape(-1).clone()
        starts = torch.arange(0, flat.shape[0], 5)
        starts[1], flat[starts[-1] : starts[-1] + 5] = 0, 0  # bag 0 empty, the last padding
        weights = None if weights is None else weights.reshape(-1)
        return self.head(self.bag(flat, starts, per_sample_weights=weights))


class _Transcriber(torch.nn.Module):
    """Frames to label scores, trained by CTC, which has no double backward: through the
    ``nn.CTCLoss`` it holds, or ``F.ctc_loss`` in the loss function."""

    def __init__(self, holds_its_loss: bool) -> None:
        super().__init__()
        self.frames = torch.nn.Linear(6, 5)
        if holds_its_loss:
            self.ctc = torch.nn.CTCLoss(blank=4)

    def forward(self, frames):
        return torch.tanh(self.frames(frames)).mul(3).log_softmax(-1)


def _transcription_loss(model, batch):
    frames, targets, frame_counts, target_lengths = batch
    return model.ctc(model(frames), targets, frame_counts, target_lengths)


def _functional_transcription_loss(model, batch):
    frames, targets, frame_counts, target_lengths = batch
    return F.ctc_loss(model(frames), targets, frame_counts, target_lengths, blank=4)


class _Prototypes(torch.nn.Module):
    """Scores by the distance to learnt class prototypes (prototypical networks), through
    ``torch.cdist``, which has no double backward; ``hardsigmoid`` called as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 4)
        self.prototypes = torch.nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return -torch.cdist(F.hardsigmoid(2 * self.embed(x)), self.prototypes)


class _NormalisedByHand(torch.nn.Module):
    """A layer that normalises its weight with ``torch._weight_norm`` itself, as layers
    written by hand do: no hook or parametrization shows the fused kernel, whose double
    backward is wrong without an error."""

    def __init__(self) -> None:
        super().__init__()
        self.direction = torch.nn.Parameter(torch.randn(8, 6))
        self.scale = torch.nn.Parameter(torch.rand(8, 1) + 0.5)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        weight = torch._weight_norm(self.direction, self.scale, 0)
        return self.head(torch.tanh(F.linear(x, weight)))


class _ShiftedNormalisations(torch.nn.Module):
    """The inputs batch-normalised and a hidden layer layer-normalised, each with a learnt
    shift but no scale: both kernels' double backward leaves such a bias out, the first
    without an error (its bias's block of the Hessian comes out zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shift = torch.nn.Parameter(torch.randn(6))
        self.hidden, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
        self.hidden_shift = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = F.batch_norm(x, None, None, None, self.input_shift, training=True)
        hidden = F.layer_norm(self.hidden(x), (8,), None, self.hidden_shift)
        return self.head(torch.tanh(hidden))


class _ChunkedHead(torch.nn.Module):
    """A hidden layer under a classification head whose logits are never held whole: the
    chunked ``linear_cross_entropy`` of large-vocabulary heads, as a layer (mean over the
    batch) or called in the loss (per sample). Both compute their gradients inside custom
    ops, as constants, so their double backward leaves out the loss's curvature without an
    error."""

    def __init__(self, layer: bool) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(6, 8)
        chunked = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=5)
        if layer:
            self.head = torch.nn.LinearCrossEntropyLoss(8, 3, bias=True, options=chunked)
        else:
            self.classes = torch.nn.Parameter(torch.randn(3, 8))
            self.options = chunked

    def forward(self, x):
        return torch.tanh(self.hidden(x))


def _chunked_head_loss(model, batch):
    inputs, targets = batch
    if hasattr(model, "head"):
        return model.head(model(inputs), targets)
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    losses = F.linear_cross_entropy(
        model(inputs),
        model.classes,
        targets,
        weight=weights,
        reduction="none",
        options=model.options,
    )
    return losses.mean()


def _spread_prototypes_loss(model, batch):
    """Cross-entropy, and the prototypes pushed apart through ``torch.pdist``."""
    return cross_entropy(model, batch) - 0.1 * torch.pdist(model.prototypes).mean()


def _margin_loss(model, batch):
    inputs, targets = batch
    return F.multi_margin_loss(model(inputs), targets, p=2, margin=2.0)


def _multilabel_loss(model, batch):
    inputs, targets = batch
    labels = torch.stack([targets, (targets + 1) % 3, torch.full_like(targets, -1)], 1)
    return F.multilabel_margin_loss(model(inputs), labels)


def _with_a_kernel_lacking_its_double_backward(kind):
    """The model, its loss function and a batch."""
    torch.manual_seed(0)
    if kind.startswith("ctc loss"):  # a label repeated, one target empty, unequal frames
        targets = torch.tensor([[1, 1, 2], [3, 0, 0], [0, 2, 0]])
        frames = torch.randn(9, 3, 6, dtype=torch.float64)
        batch = (frames, targets, torch.tensor([9, 6, 7]), torch.tensor([3, 0, 2]))
        if kind.endswith("function"):
            return _Transcriber(False).double(), _functional_transcription_loss, batch
        return _Transcriber(True).double(), _transcription_loss, batch
    if kind == "normalisations with a shift but no scale":
        return _ShiftedNormalisations().double(), cross_entropy, make_batch("tanh_mlp", n=16)
    if kind == "weight norm by hand":
        return _NormalisedByHand().double(), cross_entropy, make_batch("tanh_mlp", n=16)
    if kind.startswith("chunked"):
        model = _ChunkedHead(layer=kind.endswith("layer")).double()
        return model, _chunked_head_loss, make_batch("tanh_mlp", n=16)
    if kind.startswith("cdist"):
        return _Prototypes().double(), _spread_prototypes_loss, make_batch("tanh_mlp", n=16)
    if kind.endswith("margin loss"):
        loss_fn = _multilabel_loss if kind.startswith("multilabel") else _margin_loss
        return make_model("tanh_mlp"), loss_fn, make_batch("tanh_mlp", n=16)
    if kind.startswith("embedding bag"):
        mode = kind.split(", ")[1]
        model = _Bags(mode, offsets=kind.endswith("offsets")).double()
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 12, (16, 5), generator=generator)
        return model, cross_entropy, (tokens, torch.randint(0, 3, (16,), generator=generator))
    if kind.startswith("hardsigmoid"):
        model = _Gated(inplace=kind.endswith("in place"))
    elif kind == "weight norm":
        model = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(6, 8))
    elif kind == "weight norm hook, whole tensor":  # dim=None: one norm for the whole weight
        model = torch.nn.utils.weight_norm(torch.nn.Linear(6, 8), dim=None)
    else:
        model = torch.nn.utils.weight_norm(torch.nn.Linear(6, 8))
    if kind.startswith("weight norm"):
        model = torch.nn.Sequential(model, torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model.double(), cross_entropy, make_batch("tanh_mlp", n=16)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "kind",
    [
        "weight norm",
        "weight norm hook",
        "weight norm hook, whole tensor",
        "weight norm by hand",
        "normalisations with a shift but no scale",
        "hardsigmoid",
        "hardsigmoid in place",
        "embedding bag, mean",
        "embedding bag, sum, offsets",
        "embedding bag, max, offsets",
        "ctc loss",
        "ctc loss as a function",
        "cdist, pdist and hardsigmoid as functions",
        "multi margin loss",
        "multilabel margin loss",
        *(
            pytest.param(kind, marks=NEEDS_LINEAR_CROSS_ENTROPY)
            for kind in ("chunked linear cross-entropy layer", "chunked linear cross-entropy")
        ),
    ],
)
def test_products_through_a_kernel_lacking_its_double_backward_differentiate_the_gradient(kind):
    """The fused weight-norm kernel's double backward holds the norm constant (40 % off),
    those of layer and batch norm leave out a bias given without a weight, the chunked
    linear cross-entropy's its own curvature; hardsigmoid, embedding_bag, ctc_loss, cdist,
    pdist and the margin losses have none,
    whether a layer, ``forward`` or the loss calls them. Measured through composites: the
    same loss and gradient, and products that are the derivative of that gradient."""
    _assert_measured_as_trained_with_products_of_its_gradient(
        *_with_a_kernel_lacking_its_double_backward(kind)
    )


def _assert_measured_as_trained_with_products_of_its_gradient(model, loss_fn, batch):
    """The operator's loss and gradient are the model's own, and its products the
    derivative of that gradient (central differences)."""
    loss = loss_fn(model, batch)
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
    op = HessianOperator(model, loss_fn, batch)
    torch.testing.assert_close(op.loss, loss.detach())
    torch.testing.assert_close(op.gradient, gradient)
    vector = torch.randn(op.size, dtype=op.dtype, generator=torch.Generator().manual_seed(0))
    step = 1e-6
    difference = op.loss_and_gradient(step * vector)[1] - op.loss_and_gradient(-step * vector)[1]
    torch.testing.assert_close(op.matvec(vector), difference / (2 * step), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("hook", [False, True])
def test_spectral_norm_is_measured_by_the_exact_largest_singular_value(hook):
    """Spectral norm's power iteration holds its singular vectors constant, so products
    left out the curvature of σ₁ (by 14 %). Once the vectors have converged, measured
    through σ₁ from an SVD, the loss and gradient are the training's and products the
    derivative of that gradient, as a parametrization or as the older hook, on any
    ``dim``; the model's vectors stay where they were."""
    torch.manual_seed(0)
    normalise = (
        torch.nn.utils.spectral_norm if hook else torch.nn.utils.parametrizations.spectral_norm
    )
    model = torch.nn.Sequential(
        normalise(torch.nn.Linear(6, 8)), torch.nn.Tanh(), normalise(torch.nn.Linear(8, 3), dim=1)
    ).double()
    batch = make_batch("tanh_mlp", n=16)
    with torch.no_grad():  # power iteration, one step a pass, as training runs it
        for _ in range(300):
            model(batch[0])
    _assert_measured_as_trained_with_products_of_its_gradient(model, cross_entropy, batch)
    state = copy.deepcopy(model.state_dict())
    op = HessianOperator(model, cross_entropy, batch)
    op.matvec(torch.ones(op.size, dtype=op.dtype))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


class _FrequencyScaledLookup(torch.nn.Module):
    """Sequences of token ids summed after a lookup whose gradient is scaled by each
    row's frequency in the batch (``scale_grad_by_freq=True``): through ``nn.Embedding``
    or ``nn.EmbeddingBag``, or ``F.embedding`` or ``torch.embedding`` called in
    ``forward``."""

    def __init__(self, lookup: str, scaled: bool = True) -> None:
        super().__init__()
        self.lookup = lookup
        if lookup == "layer":
            self.embed = torch.nn.Embedding(12, 4, scale_grad_by_freq=scaled)
        elif lookup == "bag":
            self.embed = torch.nn.EmbeddingBag(12, 4, mode="sum", scale_grad_by_freq=scaled)
        else:
            self.table = torch.nn.Parameter(torch.randn(12, 4))
        self.scaled = scaled
        self.head = torch.nn.Linear(4, 3)

    def forward(self, tokens):
        if self.lookup == "bag":
            summed = self.embed(tokens)
        elif self.lookup == "layer":
            summed = self.embed(tokens).sum(1)
        elif self.lookup == "function":
            summed = F.embedding(tokens, self.table, scale_grad_by_freq=self.scaled).sum(1)
        else:
            summed = torch.embedding(self.table, tokens, -1, self.scaled).sum(1)
        return self.head(torch.tanh(summed))


def _scaled_and_plain(lookup):
    """A ``_FrequencyScaledLookup``, the same weights in an unscaled ``nn.Embedding``
    (``EmbeddingBag``'s kernel has no double backward), and a batch whose token ids meet
    rows 5 to 10 times."""
    torch.manual_seed(0)
    model = _FrequencyScaledLookup(lookup).double()
    plain = _FrequencyScaledLookup("layer", scaled=False).double()
    with torch.no_grad():
        for reference, weights in zip(plain.parameters(), model.parameters(), strict=True):
            reference.copy_(weights)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 12, (16, 5), generator=generator)
    return model, plain, (tokens, torch.randint(0, 3, (16,), generator=generator))


@pytest.mark.parametrize("lookup", ["layer", "bag", "function", "torch function"])
def test_a_lookup_scaling_its_gradient_by_frequency_is_measured_by_the_loss_s_hessian(lookup):
    """Scaling each row's gradient by its count in the batch changes the gradient, not
    the loss: a preconditioning, whose double backward made the products ``H·D``, not
    symmetric (λ_max 0.595 for 0.636 and λ_min −0.085 for −0.232 here, without an
    error). Measurements take the loss's own gradient and Hessian."""
    model, plain, batch = _scaled_and_plain(lookup)
    op = HessianOperator(model, cross_entropy, batch)
    gradient = torch.autograd.grad(cross_entropy(plain, batch), list(plain.parameters()))
    torch.testing.assert_close(op.gradient, torch.cat([g.reshape(-1) for g in gradient]))
    measured = torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=op.dtype)])
    torch.testing.assert_close(measured, dense_hessian(plain, cross_entropy, batch))
    for module in model.modules():  # given back as trained
        assert getattr(module, "scale_grad_by_freq", True)


@pytest.mark.parametrize("lookup", ["layer", "bag", "function", "torch function"])
def test_first_order_measurements_of_a_lookup_scaling_by_frequency_take_the_loss_s_gradient(
    lookup,
):
    """As the Hessian's do, where no pass kept for products has shown the lookup (several
    batches are differentiated once each, before any product): SAM's ascent follows that
    gradient, and the noise scale is that of its micro-batches' gradients."""
    model, plain, batch = _scaled_and_plain(lookup)
    tokens, targets = batch
    halves = Batches([(tokens[:8], targets[:8]), (tokens[8:], targets[8:])])
    measured = sam_sharpness(model, cross_entropy, halves, rho=0.5)
    expected = sam_sharpness(plain, cross_entropy, halves, rho=0.5)
    assert measured.value == pytest.approx(expected.value, rel=1e-12)
    # On a copy: SAM's passes have shown the lookup in this model already.
    measured = gradient_noise_scale(copy.deepcopy(model), cross_entropy, batch)
    expected = gradient_noise_scale(plain, cross_entropy, batch)
    assert measured.grad_sq == pytest.approx(expected.grad_sq, rel=1e-12)
    assert measured.trace_cov == pytest.approx(expected.trace_cov, rel=1e-12)


def _cubed_hidden_loss(cube):
    def loss(model, batch):
        inputs, targets = batch
        return F.cross_entropy(model[2](cube.apply(torch.tanh(model[0](inputs)))), targets)

    return loss


def test_a_custom_function_with_a_differentiable_backward_is_measured():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp", n=16)
    op = HessianOperator(model, _cubed_hidden_loss(Cube), batch)
    vector = torch.randn(op.size, dtype=op.dtype, generator=torch.Generator().manual_seed(0))
    step = 1e-6
    difference = op.loss_and_gradient(step * vector)[1] - op.loss_and_gradient(-step * vector)[1]
    torch.testing.assert_close(op.matvec(vector), difference / (2 * step), rtol=1e-6, atol=1e-8)


def test_a_custom_function_differentiated_wrong_by_hand_is_refused_not_measured_wrong():
    """Its hand-written double backward gets one derivative wrong: products that are not
    symmetric, without an error of autograd's own."""
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp", n=16)
    loss = _cubed_hidden_loss(CubeMisdifferentiated)
    for method in ("lanczos", "power"):
        with pytest.raises(AsymmetricOperatorError, match="not symmetric"):
            hessian_eigenvalues(model, loss, batch, which="both", method=method)
    with pytest.raises(AsymmetricOperatorError):
        spectral_density(model, loss, batch, n_steps=16)
    with pytest.raises(AsymmetricOperatorError):
        hessian_trace(model, loss, batch, method="hutch++")


def test_a_custom_function_differentiable_once_is_refused_not_measured_wrong():
    """Its backward runs without a graph: a product towards the weights leaves out what
    it computed from its saved input, without an error of autograd's own."""
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp", n=16)
    op = HessianOperator(model, _cubed_hidden_loss(CubeOnce), batch)
    with pytest.raises(OnceDifferentiableError, match="CubeOnce, a custom autograd.Function"):
        op.matvec(torch.ones(op.size, dtype=op.dtype))


def test_lightning_demo_transformer_runs():
    """Lightning's demo transformer fails with fused attention kernels; ours must not."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=20, ninp=8, nhead=2, nhid=16, nlayers=1)
    tokens = torch.randint(0, 20, (4, 6))

    def lm_loss(m, batch):
        src, target = batch
        return F.nll_loss(m(src, target).view(-1, 20), target.view(-1))

    op = HessianOperator(model, lm_loss, (tokens, tokens))
    product = op.matvec(torch.randn(op.size))
    assert torch.isfinite(product).all() and product.abs().sum() > 0


class _Batch:
    """A custom batch type: the loss function alone knows what is inside."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets


def _custom_loss(model, batch):
    return F.cross_entropy(model(batch.inputs), batch.targets)


def test_custom_batch_objects():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp", n=30)
    v = _random_vector(83)
    expected = HessianOperator(model, cross_entropy, (x, y)).matvec(v)
    single = HessianOperator(model, _custom_loss, _Batch(x, y))
    torch.testing.assert_close(single.matvec(v), expected, rtol=0, atol=0)
    several = HessianOperator(
        model,
        _custom_loss,
        [_Batch(x[:10], y[:10]), _Batch(x[10:], y[10:])],
        batch_size_fn=lambda b: len(b.targets),
    )
    torch.testing.assert_close(several.matvec(v), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "measure",
    [
        lambda *a, **k: hessian_eigenvalues(*a, which="both", tol=1e-8, **k).eigenvalues,
        lambda *a, **k: torch.tensor(hessian_trace(*a, max_iter=40, **k).trace),
        lambda *a, **k: spectral_density(*a, n_steps=8, **k).density,
        lambda *a, **k: torch.tensor(sam_sharpness(*a, **k).value),
        lambda *a, **k: torch.tensor(adaptive_sharpness(*a, **k).value),
        lambda *a, **k: torch.tensor(worst_case_sharpness(*a, **k).value),
        lambda *a, **k: torch.tensor(average_sharpness(*a, **k).value),
    ],
    ids=["eigenvalues", "trace", "density", "sam", "adaptive", "worst_case", "average"],
)
def test_functional_measures_weight_custom_batches_by_batch_size_fn(measure):
    # batches of 10 and 20 samples: the mean loss weighs the second twice
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp", n=30)
    expected = measure(model, cross_entropy, [(x[:10], y[:10]), (x[10:], y[10:])])
    measured = measure(
        model,
        _custom_loss,
        [_Batch(x[:10], y[:10]), _Batch(x[10:], y[10:])],
        batch_size_fn=lambda batch: len(batch.targets),
    )
    torch.testing.assert_close(measured, expected, rtol=1e-8, atol=1e-10)


def test_loss_and_gradient_at_shifted_parameters_leave_the_model_alone():
    model, batch = make_model("conv_bn"), make_batch("conv_bn")
    op = HessianOperator(
        model, cross_entropy, [(batch[0][:16], batch[1][:16]), (batch[0][16:], batch[1][16:])]
    )
    before = [p.detach().clone() for p in model.parameters()]
    offset = 0.1 * _random_vector(op.size)
    loss, gradient = op.loss_and_gradient(offset)
    torch.testing.assert_close(op.loss_at(offset), loss, rtol=0, atol=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    shifted = make_model("conv_bn")
    with torch.no_grad():
        for p, d in zip(shifted.parameters(), op.unflatten(offset)):
            p.add_(d)
    halves = [
        cross_entropy(shifted, (batch[0][:16], batch[1][:16])),
        cross_entropy(shifted, (batch[0][16:], batch[1][16:])),
    ]
    expected = (halves[0] + halves[1]) / 2
    torch.testing.assert_close(loss, expected.detach())
    grads = torch.autograd.grad(expected, list(shifted.parameters()))
    torch.testing.assert_close(gradient, torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(op.parameters_vector, torch.cat([p.reshape(-1) for p in before]))


@pytest.mark.parametrize("selected", [None, ["2.weight"]], ids=["measured", "constant"])
def test_an_embedding_with_max_norm_rescales_copies_of_its_rows(selected):
    """A lookup under ``max_norm`` rescales the rows it reads in place."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.Flatten(), torch.nn.Linear(12, 3)
    ).double()
    before = [p.detach().clone() for p in model.parameters()]
    batch = (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 1]))
    op = HessianOperator(model, cross_entropy, batch, params=selected)
    product = op.matvec(torch.ones(op.size, dtype=op.dtype))
    op.loss_at(torch.zeros(op.size, dtype=op.dtype))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # every pass rescales its copy of the rows, as training's next lookup would
    rescaled = copy.deepcopy(model)
    with torch.no_grad():
        torch.embedding_renorm_(rescaled[0].weight, batch[0].reshape(-1), 1.0, 2.0)
    rescaled[0].max_norm = None
    hessian = dense_hessian(rescaled, cross_entropy, batch, params=selected)
    torch.testing.assert_close(product, hessian.sum(0))


def test_loss_only_evaluations_record_no_graph():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    recorded = []

    def spying_loss(m, b):
        loss = cross_entropy(m, b)
        recorded.append(loss.requires_grad)  # whether autograd built a graph to it
        return loss

    op = HessianOperator(model, spying_loss, batch)
    offset = 0.1 * _random_vector(op.size)
    value = op.loss_at(offset)
    loss, _ = op.loss_and_gradient(offset)
    assert recorded == [False, False] + [False, True]  # first, two passes at the point
    torch.testing.assert_close(value, loss, rtol=0, atol=0)
