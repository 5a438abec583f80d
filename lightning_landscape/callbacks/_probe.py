"""Probe data: the batches a monitor measures on."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, SequentialSampler

from lightning_landscape._batches import copy_batch, holds_opaque, tensors_in


def _sized_loader(trainer: pl.Trainer) -> DataLoader | None:
    loader = trainer.train_dataloader
    if (
        isinstance(loader, DataLoader)
        and loader.batch_size is not None
        and not isinstance(loader.dataset, IterableDataset)
    ):
        return loader
    return None


def probe_indices(trainer: pl.Trainer, batches: int, seed: int) -> list[list[list[int]]] | None:
    """Sample indices of ``batches`` probe batches for every rank: element ``r`` is rank r's.

    Rank ``r`` of ``w`` draws from indices ``r, r + w, r + 2w, ...``, so ranks hold disjoint
    shards whose union a single-process run can rebuild. A run that trains on the head of
    each shard alone (see :func:`_trained_head`) draws from that head, so the probe measures
    the objective being trained rather than data the run never sees. Every rank draws all
    the shards, so the one rank that writes checkpoints saves each rank's probe for a
    resume. ``None`` when the train loader is not a map-style ``DataLoader`` with a batch
    size (the caller then captures live batches).

    Args:
        trainer: the trainer, after its train dataloader is set up.
        batches: number of probe batches per rank.
        seed: seed of the draw.
    """
    loader = _sized_loader(trainer)
    if loader is None:
        return None
    world_size = trainer.world_size
    head = _trained_head(trainer, loader)
    return [
        _draw(
            torch.arange(rank, len(loader.dataset), world_size)[:head],
            batches,
            loader.batch_size,
            seed,
        )
        for rank in range(world_size)
    ]


def _trained_head(trainer: pl.Trainer, loader: DataLoader) -> int | None:
    """How many samples at the head of each rank's shard the run trains on, when it trains
    on those alone: a loader that keeps its order, cut short (``overfit_batches``, which
    turns shuffling off, or ``limit_train_batches`` without shuffling); ``None`` otherwise."""
    sampler = loader.sampler
    in_order = isinstance(sampler, SequentialSampler) or (
        type(sampler) is DistributedSampler and not sampler.shuffle  # rank r: r, r + w, ...
    )
    if not in_order or trainer.num_training_batches >= len(loader):
        return None
    return int(trainer.num_training_batches) * loader.batch_size


def _draw(shard: torch.Tensor, batches: int, size: int, seed: int) -> list[list[int]]:
    order = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed))]
    return [
        order[i * size : (i + 1) * size].tolist() for i in range(batches) if i * size < len(order)
    ]


def probe_misfit(trainer: pl.Trainer, by_rank: list[list[list[int]]]) -> str | None:
    """Why probe indices drawn by :func:`probe_indices` (e.g. in a checkpoint) do not fit
    this run, or ``None`` when they do: one shard per process, every index in the train set."""
    loader = _sized_loader(trainer)
    if loader is None:
        return "indexes a train set that this run's loader does not index by position"
    if len(by_rank) != trainer.world_size:
        return f"holds {len(by_rank)} shards for {trainer.world_size} processes"
    largest = max((i for rows in by_rank for row in rows for i in row), default=-1)
    if largest >= len(loader.dataset):
        return f"indexes sample {largest} of a train set of {len(loader.dataset)}"
    return None


def load_probe(trainer: pl.Trainer, indices: list[list[int]], seed: int) -> list[Any]:
    """Collate the batches at ``indices`` and prepare them as the training loop does its own.

    The dataset's random transforms draw from the CPU generators (torch, numpy, Python)
    seeded with ``seed``, so the probe depends on the seed alone and a resumed run gets
    back the probe it checkpointed. Every generator is restored after, so the training
    streams do not move.
    """
    loader = _sized_loader(trainer)
    assert loader is not None
    with isolate_rng():
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: accelerators too
        random.seed(seed)
        np.random.seed(seed)
        return [
            _as_training_batch(trainer, loader.collate_fn([loader.dataset[i] for i in row]))
            for row in indices
        ]


def _as_training_batch(trainer: pl.Trainer, batch: Any) -> Any:
    # The steps of Lightning's training loop between the loader and `training_step`: the
    # precision's input conversion (float64 under "64-true"), the module's and datamodule's
    # `on_before_batch_transfer`, then the move with the transfer hooks.
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def detached_copy(batch: Any) -> Any:
    """A copy of a live training batch that later in-place changes cannot reach."""
    return copy_batch(batch, lambda t: t.detach().clone())


class CurrentBatch:
    """The batch just trained on, as the loader gave it to ``training_step``.

    A ``training_step`` that writes into its batch (``x /= 255`` on a float batch, a dict
    entry replaced by its scaled value) leaves a batch that a measurement re-running it
    would change a second time. Each batch's tensors are compared by identity and version
    counter before and after the step. The first batch of a fit is copied before the step,
    and so is every batch once a step has written its own: a project whose steps leave
    their batches alone pays for one copy. A batch holding an object whose writes cannot
    be seen (PyG's ``Batch``) is copied before every step.
    """

    def __init__(self) -> None:
        # Whether steps write (or may, unseen) into their batches; None: no step yet.
        self._writes: bool | None = None
        self._batch: Any = None
        self._before: list[tuple[Tensor, int | None]] | None = []  # None: not comparable
        self._copy: Any = None

    @property
    def seen(self) -> bool:
        """Whether a batch has been trained on."""
        return self._writes is not None

    @property
    def batch(self) -> Any:
        """The last batch trained on, as drawn.

        Raises:
            RuntimeError: if its step wrote into it and no copy was taken (steps that write
                only sometimes): measuring the written batch would apply the write twice.
        """
        if self._batch is None:
            raise RuntimeError(
                "training_step wrote into its batch in place, which the first batch did not "
                "show, so no copy of the batch as drawn was kept; from now on every batch is "
                "copied before training_step"
            )
        return self._batch

    def before_step(self, batch: Any) -> None:
        self._before = None if holds_opaque(batch) else _versions(batch)
        self._copy = None if self._writes is False else detached_copy(batch)

    def after_step(self, batch: Any) -> None:
        written = self._before is None or _changed(self._before, _versions(batch))
        self._writes = bool(self._writes) or written
        self._batch = self._copy if written else batch
        self._before, self._copy = [], None


def _changed(
    before: list[tuple[Tensor, int | None]], after: list[tuple[Tensor, int | None]]
) -> bool:
    return len(after) != len(before) or any(
        a is not b or va != vb for (a, va), (b, vb) in zip(after, before)
    )


def _versions(batch: Any) -> list[tuple[Tensor, int | None]]:
    # Inference tensors keep no version counter; they cannot be written outside inference.
    return [(t, None if t.is_inference() else t._version) for t in tensors_in(batch)]
