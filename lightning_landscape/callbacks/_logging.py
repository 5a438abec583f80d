"""Where the numbers go: every logger of the Trainer, its callback metrics, one TensorBoard layout."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

# A TensorBoard custom-scalars layout: category -> chart title -> ["Multiline", [tags]].
Layout = dict[str, dict[str, list]]


def logger_step(trainer: pl.Trainer, batch_ended: bool = False) -> int:
    """The step at which the Trainer's loggers put values now: the training batches that
    stepped, as for the module's own ``self.log`` and Lightning's ``LearningRateMonitor``,
    so that our curves share their x-axis. Lightning counts one per batch whatever the
    optimisers it steps, so this is ``global_step`` unless a batch steps several of them
    (a GAN's) or none (manual optimisation).

    Args:
        batch_ended: called at the end of a batch that stepped, which Lightning counts only
            after ``on_train_batch_end``: what is measured then has its update.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped + int(batch_ended)


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send ``metrics`` to every logger at ``step`` and into ``trainer.callback_metrics``."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)  # rank-zero-only inside the loggers
    publish(trainer, metrics)


def publish(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Put ``metrics`` into ``trainer.callback_metrics`` (for checkpointing, early stopping)."""
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


def figures_folder(trainer: pl.Trainer) -> Path:
    """``landscape`` in the run's folder: raw grids, and figures that no logger takes.

    The run's folder is the first logger's ``log_dir`` for TensorBoard and CSV loggers;
    for others ``save_dir/name/version``, where ``ModelCheckpoint`` puts a run's
    checkpoints, since their ``save_dir`` (``trainer.log_dir``), as MLflow's ``./mlruns``,
    is shared by runs; ``default_root_dir`` without a logger. Every rank must ask: rank
    0's folder is broadcast under DDP.
    """
    if not trainer.loggers:
        folder = trainer.default_root_dir
    elif isinstance(logger := trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        folder = logger.log_dir
    else:
        version = logger.version
        run = version if isinstance(version, str) else f"version_{version}"
        folder = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), run)
    return Path(trainer.strategy.broadcast(folder)) / "landscape"


def _image_loggers(trainer: pl.Trainer) -> list[Logger]:
    """The loggers that take images: TensorBoard's, and any with Lightning's
    ``log_image(key, images, step)`` (``WandbLogger``)."""
    return [
        logger
        for logger in trainer.loggers
        if isinstance(logger, TensorBoardLogger) or callable(getattr(logger, "log_image", None))
    ]


def log_image(trainer: pl.Trainer, tag: str, image: torch.Tensor, step: int, folder: Path) -> None:
    """An RGB uint8 image tensor ``(3, H, W)`` to every logger that takes images, or, when
    none does (``CSVLogger``, MLflow's, no logger), a PNG at the tag's path below ``folder``
    (``landscape/slices/line`` at step 8: ``slices/line_step8.png``); rank 0 alone writes.

    Args:
        trainer: the trainer.
        tag: the image's name, ``landscape/...``.
        image: the image.
        step: the loggers' step.
        folder: see :func:`figures_folder`.
    """
    if not trainer.is_global_zero:
        return
    loggers = _image_loggers(trainer)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="CHW")
        else:  # an (H, W, 3) array is what every image logger reads
            logger.log_image(key=tag, images=[image.permute(1, 2, 0).numpy()], step=step)
    if not loggers:
        from PIL import Image

        path = folder / f"{tag.removeprefix('landscape/')}_step{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def log_density(
    trainer: pl.Trainer,
    tag: str,
    grid: torch.Tensor,
    density: torch.Tensor,
    step: int,
    folder: Path,
) -> None:
    """A density on a grid as a TensorBoard histogram (bucket masses) and as an image
    (see :func:`log_image`)."""
    if not trainer.is_global_zero:
        return
    from lightning_landscape.plotting import density_image

    mass = density * (grid[1] - grid[0])
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram_raw(
                tag,
                min=float(grid[0]),
                max=float(grid[-1]),
                num=float(mass.sum()),
                sum=float((grid * mass).sum()),
                sum_squares=float((grid**2 * mass).sum()),
                bucket_limits=grid.tolist(),
                bucket_counts=mass.tolist(),
                global_step=step,
            )
    log_image(trainer, tag, density_image(grid, density), step, folder)
