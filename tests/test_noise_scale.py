"""Gradient noise scale against brute-force per-example gradients."""

import dataclasses

import pytest
import torch
from torch.func import functional_call, grad, vmap

from lightning_landscape.gradients import gradient_noise_scale, noise_scale_from_norms, split_batch
from tests.support import (
    cross_entropy,
    labels_count,
    make_batch,
    make_model,
    split_sequence_first,
)


def _per_example_gradients(model, x, y):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        return cross_entropy(lambda inp: functional_call(model, p, (inp,)), (xi[None], yi[None]))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)


def test_unbiased_against_per_example_gradients():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp", n=48)
    per_example = _per_example_gradients(model, x, y)
    mean = per_example.mean(0)
    trace_cov = float(((per_example - mean) ** 2).sum() / (len(x) - 1))  # sample covariance
    grad_sq = float(mean @ mean) - trace_cov / len(x)  # unbiased |G|²
    estimates = []
    for seed in range(300):  # the estimator is unbiased over random micro-batch splits
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        estimates.append(
            gradient_noise_scale(model, cross_entropy, (x[order], y[order]), micro_batches=4)
        )
    traces = torch.tensor([e.trace_cov for e in estimates], dtype=torch.float64)
    norms = torch.tensor([e.grad_sq for e in estimates], dtype=torch.float64)
    assert abs(traces.mean() - trace_cov) <= 4 * traces.std() / len(traces) ** 0.5
    assert abs(norms.mean() - grad_sq) <= 4 * norms.std() / len(norms) ** 0.5
    assert estimates[0].small_batch == 12 and estimates[0].big_batch == 48


def test_closed_form_and_the_simple_noise_scale():
    estimate = noise_scale_from_norms(small_sq=3.0, small_batch=4, big_sq=1.5, big_batch=16)
    assert estimate.grad_sq == pytest.approx((16 * 1.5 - 4 * 3.0) / 12)
    assert estimate.trace_cov == pytest.approx((3.0 - 1.5) / (1 / 4 - 1 / 16))
    assert estimate.b_simple == pytest.approx(estimate.trace_cov / estimate.grad_sq)


def test_split_batch_and_errors():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = split_batch((x, y), 3)
    assert [len(p[1]) for p in parts] == [4, 3, 3] and torch.equal(
        torch.cat([p[1] for p in parts]), y
    )
    with pytest.raises(ValueError, match="cannot be split"):
        split_batch((x, y), 11)
    with pytest.raises(
        ValueError, match="no tensor to split in a batch of type object: pass `split_fn`"
    ):
        split_batch(object(), 2)


def test_split_batch_splits_each_loader_s_batch_and_shares_the_rest():
    # Lightning zips the batches of several train loaders into one, of different lengths
    a, b = torch.arange(8), torch.arange(4)
    parts = split_batch({"a": (a, a), "b": (b, b), "temperature": torch.tensor(0.5)}, 2)
    assert [p["a"][0].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [p["b"][1].tolist() for p in parts] == [[0, 1], [2, 3]]
    assert all(p["temperature"].item() == 0.5 for p in parts)
    with pytest.raises(ValueError, match="a batch of 4 samples cannot be split into 5"):
        split_batch({"a": a, "b": b}, 5)
    model = make_model("tanh_mlp")
    with pytest.raises(ValueError, match="`micro_batches`"):
        gradient_noise_scale(model, cross_entropy, make_batch("tanh_mlp"), micro_batches=1)


@dataclasses.dataclass(frozen=True)
class _Batch:
    images: torch.Tensor
    labels: torch.Tensor
    count: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "count", len(self.labels))


def test_split_batch_splits_dataclasses_frozen_ones_too():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = split_batch(_Batch(x, y), 2)
    assert [p.labels.tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [p.count for p in parts] == [5, 5]  # a field computed from the split ones


def test_a_split_fn_measures_sequence_first_batches_as_their_batch_first_twin():
    model, (x, y) = make_model("tanh_mlp"), make_batch("tanh_mlp", n=12)
    sequence = torch.stack([x, 2 * x, -x])  # (time, batch, features): 3 steps of 12 samples

    def batch_first_loss(m, batch):
        return cross_entropy(m, (batch[0].mean(1), batch[1]))

    def sequence_first_loss(m, batch):
        return cross_entropy(m, (batch[0].mean(0), batch[1]))

    expected = gradient_noise_scale(model, batch_first_loss, (sequence.transpose(0, 1), y), 3)
    measured = gradient_noise_scale(
        model,
        sequence_first_loss,
        (sequence, y),
        3,
        split_fn=split_sequence_first,
        batch_size_fn=labels_count,
    )
    assert measured.grad_sq == pytest.approx(expected.grad_sq, rel=1e-10)
    assert measured.trace_cov == pytest.approx(expected.trace_cov, rel=1e-10)
    # by default the time dimension would be split: three "micro-batches" of one step each
    with pytest.raises(ValueError, match="cannot be split into 4 micro-batches .* pass `split_fn`"):
        gradient_noise_scale(model, sequence_first_loss, (sequence, y), 4)


def test_split_fn_and_batch_size_fn_errors():
    model, batch = make_model("tanh_mlp"), make_batch("tanh_mlp")
    with pytest.raises(ValueError, match="`split_fn` returned 1 micro-batch"):
        gradient_noise_scale(model, cross_entropy, batch, split_fn=lambda b, parts: [b])
    with pytest.raises(TypeError, match="`batch_size_fn` must be callable"):
        gradient_noise_scale(model, cross_entropy, batch, batch_size_fn=12)
