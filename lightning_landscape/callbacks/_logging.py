"""Where the numbers go: every logger of the Trainer, its callback metrics, one TensorBoard layout."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

# A TensorBoard custom-scalars layout: category -> chart title -> ["Multiline", [tags]].
Layout = dict[str, dict[str, list]]


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send ``metrics`` to every logger at ``step`` and into ``trainer.callback_metrics``."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)  # rank-zero-only inside the loggers
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})


def merge_layouts(layouts: Iterable[Layout]) -> Layout:
    merged: Layout = {}
    for layout in layouts:
        for category, charts in layout.items():
            merged.setdefault(category, {}).update(charts)
    return merged


def write_layout(trainer: pl.Trainer, layout: Layout) -> None:
    """Give every TensorBoard logger the layout, once per writer (rank 0 alone writes)."""
    if not trainer.is_global_zero or not layout:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(layout)
