"""Loss-landscape slices along filter-normalised directions (Li et al. 2018), pure torch.

All functions work on a :class:`~lightning_landscape.curvature.HessianOperator`, which
fixes the probe batches, dropout masks and mode and evaluates the loss on shifted copies
of the weights (the weights themselves are never written). Under ``torch.distributed``
the points can be shared among the ranks (``shard``), each rank evaluating its points on
the whole probe, so N processes slice N times faster.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_landscape.curvature.linear_operator import gaussian, make_generator
from lightning_landscape.curvature.operator import HessianOperator


def filter_normalized_direction(
    operator: HessianOperator,
    generator: torch.Generator | int | None = None,
    ignore_biases_and_norms: bool = True,
) -> Tensor:
    """A random direction whose every filter has the norm of the matching weight filter.

    A filter is a slice along the first dimension of a weight tensor (an output unit of a
    linear layer, an output channel of a convolution). Scaling each random filter to its
    weight filter's norm removes the scale invariance that makes raw random slices of
    networks with normalisation meaningless (Li et al. 2018, "Visualizing the Loss
    Landscape of Neural Nets").

    Args:
        operator: the probe loss and its point.
        generator: seed or generator (identical on all processes).
        ignore_biases_and_norms: zero the direction on 1-D parameters (biases, norm-layer
            scales), as Li et al. do by default; otherwise scale them like one filter.

    Returns:
        A flat direction in the operator's parameter space.
    """
    direction = gaussian(operator, make_generator(operator, generator))
    weights = operator.unflatten(operator.parameters_vector)
    # A complex parameter's real view has a dimension more than the parameter itself.
    for d, w, param in zip(operator.unflatten(direction), weights, operator.parameters):
        if param.dim() <= 1:
            if ignore_biases_and_norms:
                d.zero_()
            else:
                d.mul_(torch.linalg.vector_norm(w) / torch.linalg.vector_norm(d).clamp_min(1e-12))
            continue
        filters_d, filters_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
        scale = filters_w.norm(dim=1) / filters_d.norm(dim=1).clamp_min(1e-12)
        filters_d.mul_(scale[:, None])  # views of ``direction``: scaled in place
    return direction


def loss_line(
    operator: HessianOperator, direction: Tensor, alphas: Tensor, shard: tuple[int, int] = (0, 1)
) -> Tensor:
    """The loss at ``w + α·direction`` for each ``α`` in ``alphas``.

    Args:
        operator: the probe loss and its point ``w``.
        direction: a flat direction (e.g. :func:`filter_normalized_direction`).
        alphas: 1-D tensor of step lengths.
        shard: ``(rank, world_size)``: evaluate only the points ``i`` with
            ``i % world_size == rank`` and leave the others 0, so that summing the results of
            all ranks gathers the line (see :func:`losses_at`).
    """
    return losses_at(operator, lambda i: float(alphas[i]) * direction, len(alphas), shard)


def loss_surface(
    operator: HessianOperator,
    x_direction: Tensor,
    y_direction: Tensor,
    alphas: Tensor,
    betas: Tensor,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """The loss at ``w + α·x + β·y`` on the grid ``betas × alphas`` (rows follow ``betas``).

    Args:
        operator: the probe loss and its point ``w``.
        x_direction: first flat direction.
        y_direction: second flat direction.
        alphas: 1-D tensor of steps along ``x_direction`` (columns).
        betas: 1-D tensor of steps along ``y_direction`` (rows).
        shard: ``(rank, world_size)`` share of the points to evaluate (see :func:`loss_line`).
    """
    columns = len(alphas)

    def offset(i: int) -> Tensor:
        return float(alphas[i % columns]) * x_direction + float(betas[i // columns]) * y_direction

    return losses_at(operator, offset, columns * len(betas), shard).view(len(betas), columns)


def losses_at(
    operator: HessianOperator,
    offset: Callable[[int], Tensor],
    count: int,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """The loss at ``w + offset(i)`` for ``i`` in this rank's share of ``range(count)``.

    Points of other ranks are left 0: with ``shard = (rank, world_size)`` on every rank
    and an operator that does not all-reduce (each rank holding the whole probe), a sum
    over ranks assembles every point, each evaluated once — N devices, N times faster.

    Args:
        operator: the probe loss and its point ``w``.
        offset: the shift of point ``i``.
        count: number of points.
        shard: ``(rank, world_size)``.
    """
    rank, world_size = shard
    losses = torch.zeros(count, dtype=torch.float64)
    for i in range(rank, count, world_size):
        losses[i] = float(operator.loss_at(offset(i)))
    return losses
