"""The composites that measurements run in place of kernels without a right double
backward give the kernels' values and gradients, and a right double backward."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck

from lightning_landscape._composites import _CompositeKernels
from lightning_landscape.curvature import HessianOperator
from tests.lightning_support import ACCELERATOR
from tests.support import NEEDS_LINEAR_CROSS_ENTROPY

# benchmarks/gpu_check.sh compares the composites with the CUDA kernels
DEVICE = torch.device("cuda" if ACCELERATOR == "gpu" else "cpu")
_TARGETS = torch.tensor([[1, 1, 2, 0, 0], [0, 0, 0, 0, 0], [2, 3, 3, 1, 2]], device=DEVICE)


def _agree(kernel, inputs, *, smooth=True):
    """The kernel and, inside the mode, its composite: same value and gradient; and the
    composite's second derivatives pass ``gradgradcheck`` or, where the function has a
    kink (``smooth=False``), are finite."""
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

    if smooth:
        assert gradgradcheck(composite, inputs)
        return
    gradients = torch.autograd.grad(composite(*inputs).sum(), inputs, create_graph=True)
    directions = [torch.ones_like(g) for g in gradients]
    for second in torch.autograd.grad(gradients, inputs, directions, allow_unused=True):
        assert second is None or torch.isfinite(second).all()


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


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, float("inf")])
def test_cdist_and_pdist(p):
    """Batched and broadcast sets. A zero distance, a kink unless both points are one
    (a set against itself), has the kernels' zero gradient and finite second derivatives."""
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 4, 3, dtype=torch.float64, generator=generator).to(DEVICE)
    x2 = torch.randn(1, 3, 3, dtype=torch.float64, generator=generator).to(DEVICE)
    x1, x2 = x1.requires_grad_(), x2.requires_grad_()
    _agree(lambda a, b: torch.cdist(a, b, p=p), (x1, x2))
    _agree(lambda a: torch.cdist(a, a, p=p), (x1,))
    _agree(lambda a: torch.pdist(a[0], p=p), (x1,))
    _agree(lambda a: F.pdist(torch.cat([a[0], a[0, :1]]), p=p), (x1,))
    repeated = torch.cat([x1.detach()[:1, :2], x2.detach()], 1).requires_grad_()
    _agree(lambda a, b: torch.cdist(a, b, p=p), (x1, repeated), smooth=False)
    many = torch.randn(26, 3, dtype=torch.float64, generator=generator).to(DEVICE)
    _agree(lambda a, b: torch.cdist(a, b, p=p), (many.requires_grad_(), x2[0]))


@pytest.mark.parametrize(
    ("p", "weighted", "reduction"),
    list(itertools.product([1, 2], [False, True], ["mean", "sum", "none"])),
)
def test_multi_margin_loss(p, weighted, reduction):
    scores = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores = scores.to(DEVICE).requires_grad_()
    targets = torch.tensor([0, 3, 3, 1, 2], device=DEVICE)
    weight = torch.rand(4, dtype=torch.float64, device=DEVICE) if weighted else None

    def loss(scores):
        return F.multi_margin_loss(scores, targets, p, 0.5, weight, reduction=reduction)

    _agree(loss, (scores,))
    _agree(lambda x: F.multi_margin_loss(x[0], targets[1], reduction=reduction), (scores,))
    _agree(lambda x: F.multi_margin_loss(x[0], targets[1:2], reduction=reduction), (scores,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multilabel_margin_loss(reduction):
    """Labels cut at the first -1, a label listed twice, a sample with none."""
    scores = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores = scores.to(DEVICE).requires_grad_()
    labels = torch.tensor(
        [[3, 0, -1, 1, 2], [1, 1, 4, -1, -1], [-1, 2, 0, 0, 0], [0, 1, 2, 3, 4]], device=DEVICE
    )
    _agree(lambda x: F.multilabel_margin_loss(x, labels, reduction=reduction), (scores,))
    _agree(lambda x: F.multilabel_margin_loss(x[1], labels[0], reduction=reduction), (scores,))


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_deprecated_reduction_arguments_win():
    scores = torch.randn(3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.tensor([0, 3, 1], device=DEVICE)
    labels = torch.tensor([[0, -1, 0, 0], [3, 2, -1, 0], [1, 0, 2, 3]], device=DEVICE)
    _agree(lambda x: F.multi_margin_loss(x, targets, reduce=False), (scores,))
    _agree(lambda x: F.multilabel_margin_loss(x, labels, size_average=False), (scores,))


@pytest.mark.parametrize("kind", ["layer", "batch", "instance"])
def test_a_normalisation_with_a_bias_but_no_weight(kind):
    """Its kernel's double backward leaves the bias out; with a weight of ones it is right.
    (Group normalisation of that kind fails its first backward, so it cannot be trained.)"""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=generator).to(DEVICE)
    bias = torch.randn(3, dtype=torch.float64, generator=generator).to(DEVICE)
    normalisations = {
        "layer": lambda x, b: F.layer_norm(x.transpose(1, 2), (3,), None, b),
        "batch": lambda x, b: F.batch_norm(x, None, None, None, b, training=True),
        "instance": lambda x, b: F.instance_norm(x, bias=b),
    }
    _agree(normalisations[kind], (x.requires_grad_(), bias.requires_grad_()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_products_through_cudnn_ctc_called_as_a_function_are_those_of_the_cpu():
    """cuDNN's CTC (float32, int32 concatenated targets and lengths, blank 0) passes a
    gradient it computed in the forward pass to its backward, which its double backward
    cannot differentiate, without an error. Found in the graph, it runs as the composite."""
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(9, 3, 6, generator=generator)
    targets = torch.tensor([1, 1, 2, 3, 2, 4], dtype=torch.int32)
    batch = (frames, targets, torch.tensor([9, 7, 8]), torch.tensor([3, 1, 2]))

    def loss_fn(model, batch):
        frames, targets, frame_counts, target_lengths = batch
        log_probs = model(frames).log_softmax(-1)
        lengths = frame_counts.int(), target_lengths.int()
        return F.ctc_loss(log_probs, targets, *lengths)

    vector = torch.randn(35, generator=generator, dtype=torch.float64)
    products = {}
    for device, dtype in (("cuda", torch.float32), ("cpu", torch.float64)):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 5).to(device, dtype)
        moved = tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in batch)
        products[device] = HessianOperator(model, loss_fn, moved).matvec(vector).cpu().double()
    torch.testing.assert_close(products["cuda"], products["cpu"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("reduce", "initial", "cut_by"),
    [
        ("sum", None, "lengths"),
        ("sum", 0.5, "offsets"),
        ("mean", None, "offsets"),
        ("mean", 0.5, "lengths"),
        ("max", None, "lengths"),
        ("max", 0.5, "offsets"),
        ("min", None, "offsets"),
        ("prod", None, "lengths"),
        ("prod", 2.0, "offsets"),
    ],
)
def test_segment_reduce(reduce, initial, cut_by):
    """Segments along the middle axis, cut differently in each row, one empty; and the
    first axis of a matrix. Ties of a maximum share its gradient as the kernel's do."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(2, 6, 3, dtype=torch.float64, generator=generator).to(DEVICE)
    lengths = torch.tensor([[2, 0, 4], [1, 3, 2]], device=DEVICE)
    cuts = {"lengths": lengths}
    if cut_by == "offsets":
        cuts = {"offsets": F.pad(lengths.cumsum(1), (1, 0))}

    def reduced(data):
        return torch.segment_reduce(data, reduce, axis=1, initial=initial, **cuts)

    if reduce == "mean" and initial is None:  # an empty segment's NaN has no derivatives
        cuts = {"lengths": torch.tensor([[2, 1, 3], [1, 3, 2]], device=DEVICE)}
    _agree(reduced, (data.requires_grad_(),))
    tied = torch.tensor([[1.0], [3.0], [3.0], [2.0]], dtype=torch.float64, device=DEVICE)
    segments = torch.tensor([3, 1], device=DEVICE)
    _agree(
        lambda x: torch.segment_reduce(x, reduce, lengths=segments, initial=initial),
        (tied.requires_grad_(),),
        smooth=False,
    )


@NEEDS_LINEAR_CROSS_ENTROPY
@pytest.mark.parametrize(
    ("reduction", "extras"),
    [("mean", ()), ("sum", ("bias", "weight")), ("none", ("weight",)), ("mean", ("ignored",))],
)
def test_chunked_linear_cross_entropy(reduction, extras):
    """Its chunks (of 3 of 7 samples) hold gradients computed in the forward pass, whose
    double backward leaves the loss's curvature out; the reference path keeps it."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(7, 4, dtype=torch.float64, generator=generator).to(DEVICE)
    classes = torch.randn(5, 4, dtype=torch.float64, generator=generator).to(DEVICE)
    targets = torch.tensor([0, 4, 2, 2, 1, 3, 4], device=DEVICE)
    inputs = [features.requires_grad_(), classes.requires_grad_()]
    if "bias" in extras:
        inputs.append(torch.randn(5, dtype=torch.float64, device=DEVICE).requires_grad_())
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64, device=DEVICE)

    def loss(features, classes, bias=None):
        return F.linear_cross_entropy(
            features,
            classes,
            targets,
            linear_bias=bias,
            weight=weight if "weight" in extras else None,
            ignore_index=2 if "ignored" in extras else None,
            reduction=reduction,
            options=options,
        )

    _agree(loss, tuple(inputs))
