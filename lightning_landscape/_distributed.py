"""The few collectives the measurements need, as no-ops outside ``torch.distributed``."""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_landscape.errors import PeerFailureError


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


def end_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, before it finalises.

    A gloo worker thread may still hold the tensors of a finished collective when Python
    begins to finalise; freeing them then takes the GIL, which aborts the process after a
    completed run (pytorch/pytorch#190489): 3 of 16 short two-process CPU runs with a
    Hessian monitor ended so. Lightning ends the group itself only under NCCL. Any number
    of calls leave one handler.
    """
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all processes of the default group."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _FailureSignalled(Exception):
    """A collective inside a process's local work learned that another process failed."""


def _on_any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process of the default group (one summed element)."""
    summed = torch.tensor([float(flag)], device=device)
    return all_reduce_sum_(summed).item() > 0


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process, asked inside :func:`failing_together`.

    Every process must ask in the same order. The failure flag is summed first, so a
    process whose local work failed before asking still pairs with the others.

    Args:
        flag: this process's answer.
        device: where the flags are summed (a CUDA device under NCCL).
    """
    _join_failure_flag(device)
    return _on_any_process(flag, device)


def _join_failure_flag(device: torch.device) -> None:
    """Sum this process's "no failure" into the flag of :func:`failing_together` ahead of a
    collective inside its block, and raise if another process failed before it."""
    if _on_any_process(False, device):
        raise _FailureSignalled


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce sum whose backward is itself, so it differentiates any number of times.

    Every process holds the sum and differentiates its own share of a loss summed over
    processes, so the gradient reaching each summand is the sum of those shares. Each sum
    is preceded by a failure flag over all processes: a process whose local work failed
    waits in the flag of :func:`failing_together`, which this one then joins.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        summed = tensor.clone(memory_format=torch.contiguous_format)
        _join_failure_flag(tensor.device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _SumOverProcesses.apply(grad, ctx.group), None


def differentiable_sum_over_processes(
    tensor: Tensor, group: dist.ProcessGroup | None = None
) -> Tensor:
    """``tensor`` summed over the processes of ``group`` (default: all), differentiably.

    Every process must differentiate through it in the same order, each its own share of
    a loss that is the sum of the processes' shares, inside :func:`failing_together`, which
    turns a failure on one process into an error on every process rather than collectives
    that no longer pair up.
    """
    return _SumOverProcesses.apply(tensor, group)


def all_reduce_sum_or_raise(local: Callable[[], Tensor], device: torch.device) -> Tensor:
    """``local()`` summed over all processes; if it raises on any, every process raises.

    Args:
        local: this process's share of the sum, run under :func:`failing_together`.
        device: where the failure flag is summed (a CUDA device under NCCL).

    Raises:
        PeerFailureError: on the processes that did not fail, when another did (the failing
            process re-raises its own error).
    """
    with failing_together(device):
        tensor = local()
    return all_reduce_sum_(tensor)


@contextlib.contextmanager
def failing_together(device: torch.device) -> Iterator[None]:
    """Run a block of local work; if it raises on any process, raise on every process.

    Put it around the local half of a measurement whose results are then all-reduced:
    every process sums a failure flag after the block. The only collectives the block may
    hold are :func:`differentiable_sum_over_processes` and :func:`any_process`, which sum
    the flag first too, so a process that failed before one still pairs with the others.
    Outside ``torch.distributed`` the block's error passes through unchanged.

    Raises:
        PeerFailureError: on the processes whose block succeeded, when another's failed.
    """
    active = distributed_active()
    failed: list[Exception] = []
    signalled = False
    try:
        yield
    except _FailureSignalled:  # the flag is summed: every process is on its way to raise
        signalled = True
    except Exception as err:  # raised again below, on every process
        if not active:
            raise
        failed.append(err)
    if signalled or (active and _on_any_process(bool(failed), device)):
        _raise_everywhere(failed)


def _raise_everywhere(failed: list[Exception]) -> NoReturn:
    """Every process calls this once it knows that some process failed.

    ``failed`` holds this process's own error, if any. It is taken out, and the error is
    raised from a name cleared on the way out: a frame of its traceback that still held it
    would make a cycle, keeping the failed work's tensors (the memory a measurement ran out
    of) alive until a garbage collection.
    """
    failure = failed.pop() if failed else None
    messages: list[str | None] = [None] * dist.get_world_size()
    own = None if failure is None else f"{type(failure).__name__}: {failure}"
    dist.all_gather_object(messages, own)
    if failure is None:
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise PeerFailureError(f"rank {rank} failed: {message}")
    try:
        raise failure
    finally:
        failure = None


def broadcast_int(value: int, device: torch.device) -> int:
    """Return rank 0's ``value`` on every process of the default group."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def broadcast_(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's on every process of the default group."""
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)
