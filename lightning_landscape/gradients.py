"""Gradient statistics: grouped norms and the gradient noise scale (pure torch)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_landscape._batches import BatchSizeFn, map_tensors, sample_count, tensors_in
from lightning_landscape._context import Mode, device_of
from lightning_landscape._distributed import all_reduce_sum_, distributed_active, failing_together
from lightning_landscape._params import ParamFilter, uncompiled_name
from lightning_landscape._validation import check_callable, check_choice, check_int
from lightning_landscape.curvature.operator import HessianOperator, LossFn

GroupBy = Literal["layer", "parameter", "module", "regex"]
#: ``split_fn(batch, parts)`` returns a batch's micro-batches.
SplitFn = Callable[[Any, int], Iterable[Any]]


# A parametrized weight's tensors: "<layer>.parametrizations.<weight>.original<i>".
_PARAMETRIZED = re.compile(r"\.?parametrizations\.[^.]+\.original\d*$")


def layer_of(name: str) -> str:
    """The layer holding the parameter ``name``: the module it belongs to (``"encoder.0"``
    for ``"encoder.0.weight"``, also for a parametrized weight's tensors, and without the
    ``_orig_mod.`` of a compiled module); a parameter of the root module is its own."""
    name = uncompiled_name(name)
    parametrized = _PARAMETRIZED.search(name)
    if parametrized is not None:
        return name[: parametrized.start()] or name
    return name.rpartition(".")[0] or name


def parameter_groups(
    names: Sequence[str],
    group_by: GroupBy = "layer",
    depth: int = 1,
    patterns: Sequence[str] | None = None,
    aliases: Sequence[Sequence[str]] | None = None,
) -> list[str]:
    """The group of each named parameter.

    Args:
        names: parameter names (``"encoder.layer.0.weight"``).
        group_by: ``"layer"`` (the module holding it: :func:`layer_of`),
            ``"parameter"`` (each its own group), ``"module"`` (the first ``depth``
            components of the name: ``"encoder"`` at depth 1) or ``"regex"`` (the first of
            ``patterns`` that ``re.search`` finds in the name; ``"other"`` if none does).
        depth: module depth for ``group_by="module"``.
        patterns: regular expressions for ``group_by="regex"``.
        aliases: every name of each parameter, for ``group_by="regex"`` to search (a
            block also held as ``self.backbone`` has two); by default its name alone.

    Raises:
        ValueError: for an unknown ``group_by``, ``depth < 1``, or ``"regex"`` without
            valid ``patterns``.
    """
    check_choice("group_by", group_by, ("layer", "parameter", "module", "regex"))
    check_int("depth", depth, minimum=1)
    if group_by == "layer":
        return [layer_of(name) for name in names]
    if group_by == "parameter":
        return list(names)
    if group_by == "module":
        return [".".join(name.split(".")[:depth]) for name in names]
    if not patterns:
        raise ValueError('`patterns` must list regular expressions when `group_by="regex"`')
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise ValueError(f"`patterns` holds an invalid regular expression: {err}") from None
    searched = aliases if aliases is not None else [[name] for name in names]
    return [
        next((p.pattern for p in compiled if any(p.search(n) for n in every)), "other")
        for every in searched
    ]


def group_norms(
    tensors: Sequence[Tensor], groups: Sequence[str], norm_type: float = 2.0
) -> tuple[dict[str, Tensor], Tensor]:
    """The p-norm of each group's tensors taken together as one vector, and of all of them.

    Args:
        tensors: one tensor per parameter (gradients, weights, updates), dense or sparse.
        groups: the group of each tensor (see :func:`parameter_groups`).
        norm_type: ``p`` of the norm, ``math.inf`` for the largest absolute entry.

    Returns:
        The norm of each group (0-d tensors on the tensors' device, so one transfer reads
        them all) and the total norm.
    """
    return combined_norms(tensor_norms(tensors, norm_type), groups, norm_type)


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The p-norm of each tensor, dense or sparse, in one 1-D tensor.

    Args:
        tensors: the tensors.
        norm_type: ``p`` of the norm, ``math.inf`` for the largest absolute entry.
    """
    return torch.stack([torch.linalg.vector_norm(_entries(t), norm_type) for t in tensors])


def combined_norms(
    norms: Tensor, groups: Sequence[str], norm_type: float = 2.0
) -> tuple[dict[str, Tensor], Tensor]:
    """The p-norm of each group and of all, from the p-norms of their parts.

    Args:
        norms: the norm of each part (:func:`tensor_norms`).
        groups: the group of each part.
        norm_type: ``p`` of the norms, ``math.inf`` for the largest absolute entry.

    Returns:
        The norm of each group (0-d tensors) and the total norm, as :func:`group_norms`.
    """
    names = list(dict.fromkeys(groups))
    position = {name: i for i, name in enumerate(names)}
    index = torch.tensor([position[g] for g in groups], device=norms.device)
    if math.isinf(norm_type):
        per_group = torch.zeros(len(names), dtype=norms.dtype, device=norms.device)
        per_group = per_group.scatter_reduce(0, index, norms, reduce="amax", include_self=False)
        total = norms.max()
    else:
        powered = norms.pow(norm_type)
        per_group = torch.zeros(len(names), dtype=norms.dtype, device=norms.device).index_add(
            0, index, powered
        )
        per_group = per_group.pow(1 / norm_type)
        total = powered.sum().pow(1 / norm_type)
    return dict(zip(names, per_group)), total


def _entries(tensor: Tensor) -> Tensor:
    """The tensor's entries, or for a sparse one (the gradient of ``Embedding(sparse=True)``)
    its stored ones, duplicates summed: the same norms, and no dense copy."""
    tensor = tensor.detach()
    return tensor.coalesce().values() if tensor.is_sparse else tensor


@dataclass
class NoiseScaleEstimate:
    """The gradient noise scale from two batch sizes (McCandlish et al. 2018, appendix A).

    Attributes:
        grad_sq: unbiased estimate of |G|², the squared norm of the true gradient.
        trace_cov: unbiased estimate of tr(Σ), the trace of the per-example gradient covariance.
        small_batch: the small batch size (harmonic mean when micro-batches differ).
        big_batch: the big batch size.
    """

    grad_sq: float
    trace_cov: float
    small_batch: float
    big_batch: int

    @property
    def b_simple(self) -> float:
        """The simple noise scale tr(Σ)/|G|²: about the batch size beyond which larger
        batches stop paying off (the critical batch size)."""
        return self.trace_cov / self.grad_sq if self.grad_sq > 0 else math.inf


def noise_scale_from_norms(
    small_sq: float, small_batch: float, big_sq: float, big_batch: int
) -> NoiseScaleEstimate:
    """Unbiased |G|² and tr(Σ) from squared gradient norms at two batch sizes.

    With ``E|G_b|² = |G|² + tr(Σ)/b`` for a batch of ``b`` samples, two sizes ``b < B`` give
    ``|G|² ≈ (B|G_B|² − b|G_b|²)/(B − b)`` and ``tr(Σ) ≈ (|G_b|² − |G_B|²)/(1/b − 1/B)``.

    Args:
        small_sq: mean squared norm of the small-batch gradients.
        small_batch: small batch size.
        big_sq: squared norm of the big-batch gradient.
        big_batch: big batch size.
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch} and {big_batch}")
    grad_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace_cov = (small_sq - big_sq) / (1 / small_batch - 1 / big_batch)
    return NoiseScaleEstimate(grad_sq, trace_cov, small_batch, big_batch)


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    micro_batches: int = 4,
    *,
    split_fn: SplitFn | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    params: ParamFilter = None,
    mode: Mode | None = "train",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> NoiseScaleEstimate:
    """The noise scale of one batch, from the gradients of its micro-batches.

    The batch's tensors are split along their first dimension into ``micro_batches``
    parts: the small-batch gradients are the parts', the big-batch gradient their
    sample-weighted mean. Under ``torch.distributed`` every process splits its own batch
    and the big batch is the union over processes (the norms are all-reduced), so the
    estimate equals one process's on the union of the batches. The model is left as it
    was (see ``HessianOperator``).

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of a batch.
        batch: one batch, split along each tensor's first (sample) dimension (the
            batches of several loaders each into ``micro_batches``, see :func:`split_batch`).
        micro_batches: parts of the batch (at least 2).
        split_fn: ``split_fn(batch, parts)`` returns the micro-batches, for batches whose
            samples are not along the first dimension of every tensor (sequence-first
            tensors, a list of images of different sizes); by default :func:`split_batch`.
        batch_size_fn: sample count of a micro-batch, which weights its gradient; by
            default the first dimension of its first tensor.
        params: regular expressions selecting the parameters whose gradient counts.
        mode: forward pass in ``"train"`` or ``"eval"`` mode, or ``None`` to leave each
            submodule in its own mode.
        dtype: ``torch.float32`` or ``torch.float64`` to compute in (half-precision
            weights need one); defaults to the parameters' dtype.
        seed: seed of the dropout masks.

    Raises:
        ValueError: if ``micro_batches < 2``, the batch has fewer samples, or ``split_fn``
            returns fewer than two parts.
    """
    check_int("micro_batches", micro_batches, minimum=2)
    check_callable("split_fn", split_fn, "split_fn(batch, parts)")
    check_callable("batch_size_fn", batch_size_fn, "batch_size_fn(batch)")
    # A part that fails on one process must not leave the others waiting in the sum.
    with failing_together(device_of(model)):
        parts = _micro_batches(batch, micro_batches, split_fn)
        packed = _local_sums(model, loss_fn, parts, batch_size_fn, params, mode, dtype, seed)
    if distributed_active():
        all_reduce_sum_(packed)
    size = packed.numel() - 4
    total, small_sq_sum, inverse_sum, parts_count = packed[size:].tolist()
    big_sq = float((packed[:size] / total).pow(2).sum())
    return noise_scale_from_norms(
        small_sq_sum / parts_count, parts_count / inverse_sum, big_sq, int(total)
    )


def _micro_batches(batch: Any, parts: int, split_fn: SplitFn | None) -> list[Any]:
    if split_fn is None:
        return split_batch(batch, parts)
    split = list(split_fn(batch, parts))  # a generator too
    if len(split) < 2:
        raise ValueError(
            f"`split_fn` returned {len(split)} micro-batch(es): the noise scale needs at least 2"
        )
    return split


def _local_sums(
    model: nn.Module,
    loss_fn: LossFn,
    parts: Sequence[Any],
    batch_size_fn: BatchSizeFn | None,
    params: ParamFilter,
    mode: Mode | None,
    dtype: torch.dtype | None,
    seed: int,
) -> Tensor:
    """This process's sums: Σ n_i g_i, then Σ n_i, Σ |g_i|², Σ 1/n_i and the part count."""
    big = None
    stats = torch.zeros(3, dtype=torch.float64)
    for part in parts:
        with HessianOperator(
            model,
            loss_fn,
            part,
            params=params,
            mode=mode,
            dtype=dtype,
            seed=seed,
            distributed=False,
        ) as op:
            _, gradient = op.loss_and_gradient()
        count = sample_count(part, batch_size_fn)
        big = gradient * count if big is None else big.add_(gradient, alpha=count)
        stats += torch.tensor(
            [count, float(gradient.double().pow(2).sum()), 1 / count], dtype=torch.float64
        )
    assert big is not None
    return torch.cat(
        [
            big.double(),
            stats.to(big.device),
            torch.ones(1, dtype=torch.float64, device=big.device) * len(parts),
        ]
    )


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split every tensor of ``batch`` along its first dimension into ``parts`` near-equal parts.

    Tensors of different lengths (the batches of several train loaders, which Lightning
    zips into one) are each split into ``parts``, so every part holds the same share of
    each; 0-d tensors and other values go to every part.

    Raises:
        ValueError: if a tensor holds fewer than ``parts`` rows, or the batch no tensor
            (pass a ``split_fn`` to :func:`gradient_noise_scale` then).
    """
    lengths = [len(tensor) for tensor in tensors_in(batch) if tensor.dim()]
    if not lengths:
        raise ValueError(
            f"found no tensor to split in a batch of type {type(batch).__name__}: pass "
            "`split_fn` and `batch_size_fn`"
        )
    shortest = min(lengths)
    if shortest < parts:
        raise ValueError(
            f"a batch of {shortest} samples cannot be split into {parts} micro-batches "
            "(if its samples are not along the first dimension of every tensor, pass `split_fn`)"
        )
    return [map_tensors(_part(index, parts), batch) for index in range(parts)]


def _part(index: int, parts: int) -> Callable[[Tensor], Tensor]:
    return lambda tensor: tensor.tensor_split(parts)[index] if tensor.dim() else tensor
