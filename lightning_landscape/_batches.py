"""Probe batches: telling one batch from a list of them, counting and moving samples."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

BatchSizeFn = Callable[[Any], int]


class Batches(list):
    """A list that is always several batches, whatever they are.

    A plain list holding tensors reads as one ``[inputs, targets]`` batch; ``Batches([x1,
    x2])`` is two batches that are bare tensors (an autoencoder's, a language model's).
    """


def _is_single_batch(batches: Any) -> bool:
    # A DataLoader yields ``[inputs, targets, ...]``, a list holding tensors: one batch.
    # A list holding no tensor directly (tuples, dicts, custom objects) is a list of batches.
    if isinstance(batches, Batches):
        return False
    return not isinstance(batches, list) or any(isinstance(b, Tensor) for b in batches)


def as_batch_list(batches: Any) -> list[Any]:
    """Return ``batches`` as a non-empty list of batches.

    A :class:`Batches` is a list of batches, and so is a ``DataLoader``: every batch it
    yields (the whole dataset, as PyHessian's ``full_dataset``); any other ``list`` that
    holds a tensor directly is one batch (what a ``DataLoader`` yields), one that holds
    none a list of batches; anything else is one batch.

    Args:
        batches: one batch, a list of batches or a ``DataLoader``.

    Raises:
        ValueError: if ``batches`` is empty or ``None``.
    """
    if isinstance(batches, DataLoader):
        batches = Batches(batches)
    if batches is None or (isinstance(batches, (list, tuple)) and len(batches) == 0):
        raise ValueError("`batches` is empty: give at least one batch")
    return [batches] if _is_single_batch(batches) else list(batches)


# Leaves that nothing can write into.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _leaves(batch: Any) -> Iterator[Any]:
    """What nested dicts, lists, tuples, namedtuples and dataclasses hold, depth-first."""
    if isinstance(batch, Mapping):
        for item in batch.values():
            yield from _leaves(item)
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from _leaves(item)
    elif _is_dataclass_instance(batch):
        for field in dataclasses.fields(batch):
            yield from _leaves(getattr(batch, field.name))
    else:
        yield batch


def tensors_in(batch: Any) -> Iterator[Tensor]:
    """Every tensor inside nested dicts, lists, tuples, namedtuples and dataclasses,
    depth-first."""
    return (leaf for leaf in _leaves(batch) if isinstance(leaf, Tensor))


def holds_opaque(batch: Any) -> bool:
    """Whether ``batch`` holds an object these helpers cannot look into (PyG's ``Batch``, a
    numpy array): neither a tensor, a container they walk, nor an immutable value."""
    return any(not isinstance(leaf, (Tensor, *_IMMUTABLE)) for leaf in _leaves(batch))


def first_tensor(batch: Any) -> Tensor | None:
    """Return the first tensor with at least one dimension found depth-first in ``batch``."""
    return next((tensor for tensor in tensors_in(batch) if tensor.dim() > 0), None)


def sample_count(batch: Any, batch_size_fn: BatchSizeFn | None = None) -> int:
    """Return the number of samples in ``batch``.

    Args:
        batch: a batch as the loss function consumes it.
        batch_size_fn: returns the sample count of a batch; by default the leading
            dimension of the first tensor found in the batch.

    Raises:
        ValueError: if the count cannot be inferred or is not positive.
    """
    if batch_size_fn is not None:
        count = int(batch_size_fn(batch))
    else:
        tensor = first_tensor(batch)
        if tensor is None:
            raise ValueError(
                "cannot infer the number of samples in a batch of type "
                f"{type(batch).__name__}: pass `batch_size_fn`"
            )
        count = tensor.shape[0]
    if count < 1:
        raise ValueError(f"a batch must hold at least one sample, got {count}")
    return count


def map_tensors(
    fn: Callable[[Tensor], Tensor], batch: Any, other: Callable[[Any], Any] | None = None
) -> Any:
    """Apply ``fn`` to every tensor inside nested dicts, lists, tuples, namedtuples and
    dataclasses, and ``other`` (if given) to any other object they hold; without ``other``,
    those are returned as they are."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if _is_dataclass_instance(batch):
        # A new instance through __init__, frozen ones too (Lightning's apply_to_collection
        # refuses those); fields computed in __post_init__ follow the mapped ones.
        mapped = {
            field.name: map_tensors(fn, getattr(batch, field.name), other)
            for field in dataclasses.fields(batch)
            if field.init
        }
        return dataclasses.replace(batch, **mapped)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(fn, value, other) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(fn, item, other) for item in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(fn, item, other) for item in batch)
    return batch if other is None else other(batch)


def copy_batch(batch: Any, copy_tensor: Callable[[Tensor], Tensor] = torch.clone) -> Any:
    """A copy of ``batch`` that no write into the original reaches, and the reverse.

    Containers are rebuilt around tensors copied by ``copy_tensor``; an object the helpers
    cannot look into (PyG's ``Batch``) is deep-copied whole, or kept as it is when it
    cannot be copied.
    """
    return map_tensors(copy_tensor, batch, _deep_copy_or_same)


def _deep_copy_or_same(value: Any) -> Any:
    if isinstance(value, _IMMUTABLE):
        return value
    try:
        return copy.deepcopy(value)
    except (TypeError, RuntimeError, copy.Error):  # locks, non-leaf tensors, ...
        return value


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move the tensors of ``batch`` to ``device``; cast them to the precision ``dtype`` if
    given (see :func:`at_precision`)."""

    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=None if dtype is None else at_precision(t, dtype))

    return map_tensors(move, batch)


def at_precision(tensor: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``tensor`` takes at the precision of the real ``dtype``: that for a
    floating tensor, its complex counterpart for a complex one, its own for the others
    (indices, masks)."""
    if tensor.is_complex():
        return dtype.to_complex()
    return dtype if tensor.is_floating_point() else tensor.dtype


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
