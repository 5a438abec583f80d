"""``SyncBatchNorm`` with a double backward, for the forward passes of a measurement.

In training mode under ``torch.distributed``, ``nn.SyncBatchNorm`` gathers its statistics
in an autograd function whose backward runs fused kernels that have no derivative, so a
Hessian-vector product through it fails (and the forward refuses CPU tensors). While a
measurement runs, that forward is replaced by the same normalisation written with a
differentiable all-reduce: each process still normalises by the statistics of the union
of the processes' batches, as in training, and products differentiate through them. A
measurement on each process's batches alone normalises each batch by its own statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_landscape._distributed import differentiable_sum_over_processes


@contextlib.contextmanager
def differentiable_sync_batch_norm(model: nn.Module, synchronise: bool) -> Iterator[None]:
    """Give every ``nn.SyncBatchNorm`` of ``model`` a twice-differentiable forward.

    In training mode a layer normalises by the statistics of the batches a measurement
    sums over: those of all processes when it all-reduces (``synchronise``), else its own
    batch's. Outside ``torch.distributed`` and in eval mode the layer's own forward runs, as
    it does in training. Running statistics are not updated.

    Args:
        model: the module whose ``SyncBatchNorm`` layers are swapped for the block.
        synchronise: whether the measurement sums over processes.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    if not layers or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    own = [(layer, layer.__dict__.get("forward")) for layer in layers]
    for layer in layers:
        layer.forward = _measured_forward(layer, layer.forward, synchronise)
    try:
        yield
    finally:
        for layer, forward in own:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _measured_forward(
    layer: nn.SyncBatchNorm, forward: Callable[[Tensor], Tensor], synchronise: bool
) -> Callable[[Tensor], Tensor]:
    def measured(input: Tensor) -> Tensor:
        if not layer.training:
            return forward(input)
        group = layer.process_group or dist.group.WORLD
        if synchronise and dist.get_world_size(group) > 1:
            return synchronised_batch_norm(input, layer.weight, layer.bias, layer.eps, group)
        return F.batch_norm(input, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)

    return measured


def synchronised_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Batch normalisation by the statistics of the batches of all processes of ``group``.

    Two passes (the mean, then the centred squares), as a single process on the union of
    the batches computes them, rather than the cancellation-prone mean of squares.

    Args:
        input: ``(N, C, ...)`` activations of this process.
        weight: per-channel scale, or ``None``.
        bias: per-channel shift, or ``None``.
        eps: added to the variance.
        group: the processes whose batches are normalised together (default: all).
    """
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
    sums = differentiable_sum_over_processes(torch.cat([input.sum(dims), count]), group)
    total = sums[-1]
    centred = input - (sums[:-1] / total).view(shape)
    variance = differentiable_sum_over_processes(centred.square().sum(dims), group) / total
    output = centred * torch.rsqrt(variance + eps).view(shape)
    if weight is not None:
        output = output * weight.view(shape)
    if bias is not None:
        output = output + bias.view(shape)
    return output
