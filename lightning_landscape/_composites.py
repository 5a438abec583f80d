"""Kernels whose double backward is wrong or missing, run as composites during measurements.

Every Hessian-vector product differentiates the forward pass twice. A few of PyTorch's
fused kernels do not allow it: the double backward of weight norm takes the norm for a
constant, so the Hessian of a weight-normalised layer came out wrong (by 40 % on a tanh
MLP) without an error; ``hardsigmoid`` (MobileNetV3's squeeze-and-excitation gate),
``embedding_bag``, ``ctc_loss`` (speech models), ``cdist`` and ``pdist`` (prototype and
metric-learning heads), the multi-class margin losses and ``segment_reduce`` (pooling
over graphs) have none, so every measurement was skipped; a layer, batch or instance
normalisation given a bias but no weight leaves the bias out of its double backward; an
embedding lookup whose gradient is scaled by each row's frequency in the batch
(``scale_grad_by_freq=True``, no loss's gradient) gives products ``H·D``, not symmetric,
and is looked up unscaled, in first-order passes too (embedding layers are unscaled in
every measurement, by ``lightning_landscape._context``); the chunked
``linear_cross_entropy`` (given ``options``, as large-vocabulary heads call it) computes
its gradients inside custom ops, as constants, so its double backward leaves out the
loss's curvature without an error (λ_max 0.13 for 0.36 on a test model), and is run as
its reference path, a linear layer and a cross-entropy. A torch-function mode computes
them from ops whose double backward is right, with the same values, for a model whose
graph showed one of the kernels, from then on.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import _reduction
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode


def composite_kernels(model: nn.Module) -> contextlib.AbstractContextManager:
    """Run the kernels named in this module's docstring as composites, once a pass of
    ``model`` was seen running one (:func:`composites_needed`).

    Args:
        model: the module measured.
    """
    return _CompositeKernels() if model in _NEEDING_COMPOSITES else contextlib.nullcontext()


_NEEDING_COMPOSITES: weakref.WeakSet[nn.Module] = weakref.WeakSet()

# The autograd nodes those kernels leave in a graph, less the overload's number (the CTC
# kernels taking lengths as tensors end in 1).
_REPLACED_NODES = frozenset(
    {
        "WeightNormInterfaceBackward",
        "HardsigmoidBackward",
        "EmbeddingBagBackward",
        "CtcLossBackward",
        "CudnnCtcLossBackward",
        "CdistBackward",
        "PdistBackward",
        "MultiMarginLossBackward",
        "MultilabelMarginLossBackward",
        "SegmentReduceBackward",
        "GeneratedBackwardFor_torch_nn__linear_cross_entropy_batch_chunked_defaultBackward",
        "GeneratedBackwardFor_torch_nn__linear_cross_entropy_batch_chunked_no_reduction_defaultBackward",
    }
)


# Normalisations whose double backward leaves out a bias given without a weight: the
# bias's block of the Hessian comes out zero, or the product raises.
_NORMALISATION_NODES = frozenset({"NativeLayerNormBackward", "NativeBatchNormBackward"})


def _node_name(node: Any) -> str:
    return type(node).__name__.rstrip("0123456789")


def _scales_gradient(node: Any) -> bool:
    """A lookup scaling its rows' gradients by their frequency: wrong from the first
    derivative on."""
    return _node_name(node) == "EmbeddingBackward" and node._saved_scale_grad_by_freq


def _needs_composite(node: Any) -> bool:
    name = _node_name(node)
    if name in _REPLACED_NODES or _scales_gradient(node):
        return True
    return (
        name in _NORMALISATION_NODES
        and node._saved_weight is None
        and node.next_functions[2][0] is not None  # the bias, differentiated
    )


def composites_needed(graph: Iterable[Any], model: nn.Module, *, products: bool = True) -> bool:
    """Whether a loss whose graph (its :func:`~lightning_landscape._graph.nodes`) comes
    from a pass of ``model`` without composites ran a kernel whose double backward is
    wrong or missing: a graph for Hessian-vector products must then be built again under
    :func:`use_composites`.

    The graph names the kernels wherever they were called: in a layer, in ``forward``
    or in the loss function.

    Args:
        graph: the nodes of the pass's graph.
        model: the module measured.
        products: ``False`` for a pass differentiated once, which only a kernel giving
            no loss's gradient (a frequency-scaled lookup) makes wrong.
    """
    needs = _needs_composite if products else _scales_gradient
    return model not in _NEEDING_COMPOSITES and any(map(needs, graph))


def use_composites(model: nn.Module) -> None:
    """Run every later pass of ``model`` in a measurement through the composites.

    Args:
        model: the module measured.
    """
    _NEEDING_COMPOSITES.add(model)


class _CompositeKernels(TorchFunctionMode):
    """Route each call of a kernel in ``_COMPOSITES`` to its composite."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _COMPOSITES.get(func, func)(*args, **(kwargs or {}))


def _with_unit_weight(normalisation: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``normalisation`` given a weight of ones where it has a bias but no weight, which
    its double backward gets right."""
    signature = inspect.signature(normalisation)

    def normalised(*args: Any, **kwargs: Any) -> Tensor:
        call = signature.bind(*args, **kwargs)
        bias = call.arguments.get("bias")
        if call.arguments.get("weight") is None and bias is not None:
            call.arguments["weight"] = torch.ones_like(bias)
        return normalisation(*call.args, **call.kwargs)

    return normalised


def _unscaled(lookup: Callable[..., Tensor], position: int) -> Callable[..., Tensor]:
    """``lookup`` with its ``scale_grad_by_freq`` argument, at ``position``, set to False."""

    def unscaled(*args: Any, **kwargs: Any) -> Tensor:
        if len(args) > position:
            args = (*args[:position], False, *args[position + 1 :])
        else:
            kwargs["scale_grad_by_freq"] = False
        return lookup(*args, **kwargs)

    return unscaled


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    return v * (g / torch.norm_except_dim(v, 2, dim))  # PyTorch's own unfused form


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    output = F.relu6(input + 3) / 6
    return input.copy_(output) if inplace else output


def _embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """``F.embedding_bag`` as a lookup followed by a sum, mean or max over each bag."""
    if input.dim() == 2:  # bags of equal length, one per row
        bags = torch.arange(input.shape[0], device=input.device).repeat_interleave(input.shape[1])
        count = input.shape[0]
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    else:
        assert offsets is not None  # F.embedding_bag refuses 1-D input without offsets
        starts = offsets[:-1] if include_last_offset else offsets
        positions = torch.arange(input.shape[0], device=input.device)
        bags = torch.searchsorted(starts, positions, right=True) - 1
        count = starts.shape[0]
    rows = F.embedding(input, weight, None, max_norm, norm_type, False, sparse)  # unscaled
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    if padding_idx is not None:  # left out of its bag, as if absent
        kept = input != padding_idx
        rows, bags = rows[kept], bags[kept]
    shape = (count, weight.shape[1])
    if mode == "max":  # an empty bag stays 0
        index = bags.unsqueeze(1).expand_as(rows)
        return rows.new_zeros(shape).scatter_reduce(0, index, rows, "amax", include_self=False)
    summed = rows.new_zeros(shape).index_add(0, bags, rows)
    if mode == "sum":
        return summed
    sizes = torch.bincount(bags, minlength=count).clamp_min(1).unsqueeze(1)
    return summed / sizes


def _ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | Sequence[int],
    target_lengths: Tensor | Sequence[int],
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
) -> Tensor:
    """``F.ctc_loss`` by the forward recursion over alignments, in log space.

    A step per time frame: slower than the kernel, which has no double backward.
    """
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs, targets = log_probs.unsqueeze(1), targets.reshape(1, -1)
    frames, count, _ = log_probs.shape
    device = log_probs.device
    input_lengths = torch.as_tensor(input_lengths, device=device).reshape(-1)
    target_lengths = torch.as_tensor(target_lengths, device=device).reshape(-1)
    longest = int(target_lengths.max()) if count else 0
    positions = torch.arange(longest, device=device)
    if targets.dim() == 1:  # concatenated: cut into padded rows
        starts = torch.cumsum(target_lengths, 0) - target_lengths
        index = (starts.unsqueeze(1) + positions).clamp_max(max(targets.shape[0] - 1, 0))
        targets = targets[index] if targets.numel() else index
    padded = torch.where(positions < target_lengths.unsqueeze(1), targets[:, :longest], blank)
    # Labels interleaved with blanks; a label may be reached from two states back unless it
    # repeats the label there.
    states = torch.full((count, 2 * longest + 1), blank, dtype=torch.long, device=device)
    states[:, 1::2] = padded
    skips = torch.zeros_like(states, dtype=torch.bool)
    skips[:, 2:] = (states[:, 2:] != blank) & (states[:, 2:] != states[:, :-2])
    emissions = log_probs.gather(2, states.unsqueeze(0).expand(frames, -1, -1))
    never = torch.finfo(log_probs.dtype).min / 4  # log 0, finite so gradients stay finite
    width = states.shape[1]
    # A batch of empty targets has the one state (a blank).
    alpha = torch.cat(
        [emissions[0, :, :2], emissions.new_full((count, max(width - 2, 0)), never)], 1
    )
    for t in range(1, frames):
        one_back = F.pad(alpha, (1, 0), value=never)[:, :width]
        two_back = torch.where(skips, F.pad(alpha, (2, 0), value=never)[:, :width], never)
        stepped = torch.logsumexp(torch.stack([alpha, one_back, two_back]), 0) + emissions[t]
        alpha = torch.where((t < input_lengths).unsqueeze(1), stepped, alpha)
    ends = torch.stack([2 * target_lengths, (2 * target_lengths - 1).clamp_min(0)], 1)
    final = alpha.gather(1, ends)
    final[:, 1] = torch.where(target_lengths > 0, final[:, 1], never)
    losses = -torch.logsumexp(final, 1)
    impossible = losses > -never / 2  # no alignment fits in the frames
    losses = torch.where(impossible, 0.0 if zero_infinity else float("inf"), losses)
    if reduction == "mean":
        return (losses / target_lengths.clamp_min(1)).mean()
    if reduction == "sum":
        return losses.sum()
    return losses.squeeze(0) if unbatched else losses


def _cdist(
    x1: Tensor,
    x2: Tensor,
    p: float = 2.0,
    compute_mode: str = "use_mm_for_euclid_dist_if_necessary",
) -> Tensor:
    """``torch.cdist``: the kernel where it multiplies matrices (Euclidean distances
    between sets of over 25 points, or on request), a path with a double backward; else
    the norms of all pairwise differences (memory rows1·rows2·features)."""
    multiplies = compute_mode == "use_mm_for_euclid_dist" or (
        compute_mode == "use_mm_for_euclid_dist_if_necessary"
        and max(x1.shape[-2], x2.shape[-2]) > 25
    )
    if p == 2 and multiplies:
        return torch.cdist(x1, x2, p, compute_mode)  # the mode is off inside its handler
    return _norms(x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def _pdist(input: Tensor, p: float = 2.0) -> Tensor:
    """``torch.pdist``: the norms of the differences of rows i < j, in row-major order."""
    rows, columns = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return _norms(input[rows] - input[columns], p)


def _norms(differences: Tensor, p: float) -> Tensor:
    """The ``p``-norms of ``differences`` along the last dimension; 0 with a 0 gradient for
    a zero difference, as the kernels give it (the Euclidean norm's own double backward
    divides by zero there, which a point's distance to itself would reach)."""
    zero = (differences == 0).all(-1, keepdim=True)
    norms = torch.linalg.vector_norm(differences.masked_fill(zero, 1), ord=p, dim=-1)
    return norms.masked_fill(zero.squeeze(-1), 0)


def _multi_margin_loss(
    input: Tensor,
    target: Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``F.multi_margin_loss``: each other class's hinge ``margin - x[y] + x[i]``, to the
    power ``p``, times ``weight[y]`` (after the power, as the kernel does), over classes."""
    scores = input.reshape(-1, input.shape[-1])
    own = target.reshape(-1, 1)
    hinges = F.relu(margin - scores.gather(1, own) + scores)  # relu: no gradient at 0
    hinges = (hinges if p == 1 else hinges.square()).scatter(1, own, 0)
    if weight is not None:
        hinges = hinges * weight[own]
    losses = hinges.sum(1) / scores.shape[1]
    return _reduce_losses(losses.reshape(target.shape), size_average, reduce, reduction)


def _multilabel_margin_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``F.multilabel_margin_loss``: the hinge ``1 - (x[j] - x[i])`` of every class ``j``
    listed before the first -1 (as often as listed) against every class ``i`` not listed,
    over classes (memory samples·classes²)."""
    scores = input.reshape(-1, input.shape[-1])
    labels = target.reshape(scores.shape)
    listed = (labels >= 0).cumprod(1).to(scores.dtype)
    times_listed = torch.zeros_like(scores).scatter_add(1, labels.clamp_min(0), listed)
    pairs = times_listed.unsqueeze(2) * (times_listed == 0).unsqueeze(1)  # [sample, j, i]
    hinges = F.relu(1 - scores.unsqueeze(2) + scores.unsqueeze(1))
    losses = (hinges * pairs).sum((1, 2)) / scores.shape[1]
    return _reduce_losses(losses.reshape(input.shape[:-1]), size_average, reduce, reduction)


def _segment_reduce(
    data: Tensor,
    reduce: str,
    *,
    lengths: Tensor | None = None,
    indices: Tensor | None = None,
    offsets: Tensor | None = None,
    axis: int = 0,
    unsafe: bool = False,
    initial: float | None = None,
) -> Tensor:
    """``torch.segment_reduce`` over ``lengths`` (or ``offsets``) as a scatter of each
    position into its segment; ``initial`` joins every segment and fills the empty ones,
    which are otherwise 0, 1, -inf, inf or NaN."""
    if lengths is None:
        assert offsets is not None  # the kernel does not take indices either
        lengths = offsets.diff(dim=-1)
    axis %= data.dim()
    ends = lengths.cumsum(-1).long()
    positions = torch.arange(data.shape[axis], device=data.device).expand(*ends.shape[:-1], -1)
    segment = torch.searchsorted(ends, positions.contiguous(), right=True)
    trailing = data.dim() - axis - 1
    index = segment.reshape(*segment.shape, *[1] * trailing).expand_as(data)
    shape = (*data.shape[:axis], lengths.shape[-1], *data.shape[axis + 1 :])
    counts = lengths.reshape(*lengths.shape, *[1] * trailing)
    if reduce in ("sum", "mean"):
        sums = data.new_zeros(shape).scatter_add(axis, index, data)
        sums = sums if initial is None else sums + initial
        if reduce == "sum":
            return sums
        means = sums / counts
        return means if initial is None else torch.where(counts == 0, initial, means)
    empty = {"prod": 1.0, "max": -math.inf, "min": math.inf}[reduce]
    start = data.new_full(shape, empty if initial is None else initial)
    kind = {"prod": "prod", "max": "amax", "min": "amin"}[reduce]
    return start.scatter_reduce(axis, index, data, kind, include_self=initial is not None)


def _linear_cross_entropy(*args: Any, **kwargs: Any) -> Tensor:
    """``linear_cross_entropy`` by its reference path: the loss and gradient of the chunked
    one, the full logits in memory (as any double backward holds each chunk's anyway)."""
    return F.linear_cross_entropy(*args, **{**kwargs, "options": None})


def _reduce_losses(
    losses: Tensor, size_average: bool | None, reduce: bool | None, reduction: str
) -> Tensor:
    if size_average is not None or reduce is not None:  # the deprecated arguments win
        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses


_COMPOSITES: dict[Callable[..., Any], Callable[..., Any]] = {
    torch._weight_norm: _weight_norm,
    F.hardsigmoid: _hardsigmoid,
    F.embedding_bag: _embedding_bag,
    F.embedding: _unscaled(F.embedding, 5),
    torch.embedding: _unscaled(torch.embedding, 3),
    F.ctc_loss: _ctc_loss,
    torch.cdist: _cdist,
    torch.pdist: _pdist,
    F.multi_margin_loss: _multi_margin_loss,
    F.multilabel_margin_loss: _multilabel_margin_loss,
    torch.segment_reduce: _segment_reduce,
    **{norm: _with_unit_weight(norm) for norm in (F.layer_norm, F.batch_norm, F.instance_norm)},
}
if hasattr(F, "linear_cross_entropy"):  # recent torch only
    _COMPOSITES[F.linear_cross_entropy] = _linear_cross_entropy
