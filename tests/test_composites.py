"""The composites that measurements run in place of kernels without a right double
backward give the kernels' values and gradients, and a right double backward."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck

from lightning_landscape._composites import _CompositeKernels
from tests.lightning_support import ACCELERATOR

# benchmarks/gpu_check.sh compares the composites with the CUDA kernels
DEVICE = torch.device("cuda" if ACCELERATOR == "gpu" else "cpu")
_TARGETS = torch.tensor([[1, 1, 2, 0, 0], [0, 0, 0, 0, 0], [2, 3, 3, 1, 2]], device=DEVICE)


def _agree(kernel, inputs):
    """The kernel and, inside the mode, its composite: same value and gradient; and the
    composite's second derivatives pass ``gradgradcheck``."""
    expected = kernel(*inputs)
    with _CompositeKernels():
        value = kernel(*inputs)
    torch.testing.assert_close(value, expected)
    for a, b in zip(
        torch.autograd.grad(expected.sum(), inputs, allow_unused=True, materialize_grads=True),
        torch.autograd.grad(value.sum(), inputs, allow_unused=True, materialize_grads=True),
    ):
        torch.testing.assert_close(b, a)

    def composite(*args):
        with _CompositeKernels():
            return kernel(*args).tanh()

    assert gradgradcheck(composite, inputs)


@pytest.mark.parametrize(
    ("blank", "reduction", "concatenated", "zero_infinity"),
    list(itertools.product([0, 4], ["mean", "sum", "none"], [False, True], [False, True])),
)
def test_ctc_loss(blank, reduction, concatenated, zero_infinity):
    """A repeated label, an empty target, frames of unequal counts, and no alignment at
    all for the third utterance (5 labels, one repeated, need 6 frames; it has 5)."""
    logits = torch.randn(8, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits = logits.to(DEVICE)
    targets = _TARGETS if blank == 0 else _TARGETS - 1  # labels avoid the blank
    lengths = torch.tensor([3, 0, 5], device=DEVICE)
    if concatenated:
        targets = torch.cat([row[:n] for row, n in zip(targets, lengths)])
    frames = torch.tensor([8, 4, 5], device=DEVICE)

    def loss(logits):
        return F.ctc_loss(
            logits.log_softmax(2), targets, frames, lengths, blank, reduction, zero_infinity
        )

    if not zero_infinity:  # an infinite loss has no derivatives (the next test)
        frames[2] = 8
    _agree(loss, (logits.requires_grad_(),))


def test_ctc_loss_without_alignment_is_infinite():
    log_probs = torch.randn(5, 1, 5, dtype=torch.float64, device=DEVICE).log_softmax(2)
    expected = F.ctc_loss(log_probs, _TARGETS[2:], [5], [5], reduction="none")
    with _CompositeKernels():
        loss = F.ctc_loss(log_probs, _TARGETS[2:], [5], [5], reduction="none")
    assert torch.isinf(expected).all() and torch.equal(loss, expected)


def test_ctc_loss_of_empty_targets_unbatched_or_not():
    logits = torch.randn(5, 2, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    empty = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    _agree(lambda x: F.ctc_loss(x.log_softmax(2), empty, [5, 3], [0, 0]), (logits,))
    _agree(lambda x: F.ctc_loss(x[:, 0].log_softmax(1), _TARGETS[0, :3], [5], [3]), (logits,))


@pytest.mark.parametrize(
    ("mode", "padding_idx", "offsets", "weighted"),
    [
        ("mean", None, False, False),
        ("mean", 0, True, False),
        ("sum", 0, True, True),
        ("sum", None, False, True),
        ("max", 0, True, False),
        ("max", None, False, False),
    ],
)
def test_embedding_bag(mode, padding_idx, offsets, weighted):
    """Bags of equal length, or cut at offsets with an empty bag and the end offset."""
    weight = torch.randn(10, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    tokens = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 0, 0, 7, 7], device=DEVICE)
    starts = torch.tensor([0, 4, 4, 7, 12], device=DEVICE) if offsets else None
    if not offsets:
        tokens = tokens.view(4, 3)
    weights = torch.rand(tokens.shape, dtype=torch.float64, device=DEVICE) if weighted else None

    def bags(weight):
        return F.embedding_bag(
            tokens,
            weight,
            starts,
            mode=mode,
            per_sample_weights=weights,
            include_last_offset=offsets,
            padding_idx=padding_idx,
        )

    _agree(bags, (weight,))
