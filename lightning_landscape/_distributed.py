"""The few collectives the measurements need, as no-ops outside ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_active(requested: bool | None = None) -> bool:
    """Whether to all-reduce across processes.

    Args:
        requested: ``None`` follows ``torch.distributed`` (on when a process group with
            more than one process is initialised); ``False`` forces a local measurement;
            ``True`` demands a process group.

    Raises:
        RuntimeError: if ``requested`` is ``True`` and no process group is initialised.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if requested is None:
        return initialised and dist.get_world_size() > 1
    if requested and not initialised:
        raise RuntimeError("`distributed=True` but torch.distributed is not initialised")
    return requested


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all processes of the default group."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_int(value: int, device: torch.device) -> int:
    """Return rank 0's ``value`` on every process of the default group."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def broadcast_(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's on every process of the default group."""
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)
