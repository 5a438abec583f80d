"""LossLandscapeMonitor: 1-D and 2-D loss slices along filter-normalised directions."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_landscape import landscape
from lightning_landscape._batches import BatchSizeFn, map_tensors
from lightning_landscape._context import Mode
from lightning_landscape._distributed import all_reduce_sum_, distributed_active, failing_together
from lightning_landscape._params import ParamFilter, real_view, select_parameters
from lightning_landscape._validation import check_bool, check_int, check_positive_float
from lightning_landscape.callbacks._logging import Layout, figures_folder, log_image
from lightning_landscape.callbacks._loss import LossFn
from lightning_landscape.callbacks.base import Probe, ProbeLossMonitor
from lightning_landscape.plotting import line_image, surface_image


class LossLandscapeMonitor(ProbeLossMonitor):
    """Loss slices around the weights (Li et al. 2018), as images and raw values.

    Along seeded filter-normalised random directions (biases and norm layers left out by
    default): a 1-D line ``L(w + α d)`` and a 2-D surface ``L(w + α x + β y)`` for ``α, β``
    in ``[−span, span]``; optionally the line through the initial weights,
    ``L(w + α (w − w₀))`` for ``α`` in ``[−1.25, 0.25]`` (``α = −1`` is the initial point).
    TensorBoard gets images under ``landscape/slices/...`` (contours with matplotlib, a plain
    heatmap without; PNG files in ``<run>/landscape/slices/`` when no logger takes images)
    and ``center_loss``, ``n_evaluations``, ``seconds``; the raw grids go to
    ``<run>/landscape/slices_step<step>.pt`` (rank 0), ``<run>`` the run's folder
    (``trainer.log_dir`` under TensorBoard and CSV loggers; ``save_dir/name/version``, where
    checkpoints go, under others). By default it measures once,
    when training ends: a 21 × 21 surface is 441 loss evaluations. Under DDP the ranks'
    probe shards are gathered and the points shared out, so N devices slice N times faster.

    Args:
        resolution: points per axis of the surface (0: no surface).
        line_points: points of the 1-D line (0: no line).
        span: the slices reach ``span`` times the directions.
        from_init: also slice along the way from the initial weights.
        ignore_biases_and_norms: leave 1-D parameters out of the random directions.
        params: regular expressions selecting the parameters the directions move.
        mode: ``"train"``: each submodule in the mode it trains in; ``"eval"``: all in
            eval mode.
        every_n_steps: measure every this many optimizer steps (``None``: never by steps).
        every_n_epochs: measure at the end of every this many epochs (``None``: never).
        measure_at_start: also measure before the first optimizer step.
        measure_at_end: also measure when training ends.
        probe: ``"fixed"`` probe batches drawn once, or the ``"current"`` batch.
        probe_batches: number of fixed probe batches.
        loss_fn: ``loss_fn(module, batch)``; by default the module's ``training_step``.
        batch_size_fn: ``batch_size_fn(batch)``, the sample count of a probe batch, which
            weights it among several probe batches and DDP ranks; by default the first
            dimension of its first tensor.
        seed: seed of the probe draw, dropout masks and directions.
        name: names this monitor, to run several of its kind in one Trainer (e.g. on
            different ``params``): its metrics then go under ``landscape/slices/<name>/``.
    """

    metric_prefix = "landscape/slices"

    def __init__(
        self,
        resolution: int = 21,
        line_points: int = 41,
        span: float = 1.0,
        from_init: bool = False,
        ignore_biases_and_norms: bool = True,
        params: ParamFilter = None,
        mode: Mode = "train",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        measure_at_start: bool = False,
        measure_at_end: bool = True,
        probe: Probe = "fixed",
        probe_batches: int = 1,
        loss_fn: LossFn | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(
            every_n_steps,
            every_n_epochs,
            measure_at_start,
            measure_at_end,
            probe,
            probe_batches,
            loss_fn,
            seed,
            name,
        )
        check_int("resolution", resolution, minimum=0)
        check_int("line_points", line_points, minimum=0)
        check_positive_float("span", span)
        if resolution == 1 or line_points == 1:
            raise ValueError("`resolution` and `line_points` must be 0 (off) or at least 2")
        self._set_probe_loss_args(params, mode, batch_size_fn)
        self.resolution = resolution
        self.line_points = line_points
        self.span = span
        self.from_init = check_bool("from_init", from_init)
        self.ignore_biases_and_norms = check_bool(
            "ignore_biases_and_norms", ignore_biases_and_norms
        )
        self._initial: Tensor | None = None
        self._slices: dict[str, Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.from_init and self._initial is None:
            self._initial = torch.cat(
                [real_view(p.detach()).reshape(-1).cpu() for p in self._selected(pl_module)]
            )
        super().on_train_start(trainer, pl_module)

    def _selected(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        return [p for _, p in select_parameters(pl_module, self.params)]

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, float]:
        # Under DDP every rank holds the whole probe and slices its share of the points.
        shard = (trainer.global_rank, trainer.world_size) if distributed_active() else (0, 1)
        if shard[1] > 1:
            batches = gather_batches(batches)
        slices: dict[str, Tensor] = {}
        # A failure on one rank must not leave the others waiting in the sum below.
        with (
            failing_together(pl_module.device),
            self._operator(pl_module, batches, distributed=False) as operator,
        ):
            x = landscape.filter_normalized_direction(
                operator, self.seed, self.ignore_biases_and_norms
            )
            if self.line_points:
                slices["line_steps"] = self._steps(self.line_points)
                slices["line"] = landscape.loss_line(operator, x, slices["line_steps"], shard)
            if self.resolution:
                y = landscape.filter_normalized_direction(
                    operator, self.seed + 1, self.ignore_biases_and_norms
                )
                grid = slices["surface_steps"] = self._steps(self.resolution)
                slices["surface"] = landscape.loss_surface(operator, x, y, grid, grid, shard)
            if self.from_init and self._initial is not None:
                towards = operator.parameters_vector - self._initial.to(
                    operator.device, operator.dtype
                )
                slices["from_init_steps"] = torch.linspace(
                    -1.25, 0.25, self.line_points or 41, dtype=torch.float64
                )
                slices["from_init"] = landscape.loss_line(
                    operator, towards, slices["from_init_steps"], shard
                )
            center = float(operator.loss)
        if shard[1] > 1:
            _sum_over_ranks(slices, pl_module.device)
        self._slices = slices
        evaluations = sum(v.numel() for k, v in slices.items() if not k.endswith("_steps"))
        return {
            f"{self.metric_prefix}/center_loss": center,
            f"{self.metric_prefix}/n_evaluations": float(evaluations),
        }

    def _steps(self, points: int) -> Tensor:
        return torch.linspace(-self.span, self.span, points, dtype=torch.float64)

    def on_measured(self, trainer: pl.Trainer, step: int) -> None:
        slices, self._slices = self._slices, {}
        figures = figures_folder(trainer)  # every rank asks (see there)
        if not trainer.is_global_zero:
            return
        if "line" in slices:
            image = line_image(
                slices["line_steps"],
                slices["line"],
                "step along a random filter-normalised direction",
            )
            log_image(trainer, f"{self.metric_prefix}/line", image, step, figures)
        if "surface" in slices:
            grid = slices["surface_steps"]
            log_image(
                trainer,
                f"{self.metric_prefix}/surface",
                surface_image(grid, grid, slices["surface"]),
                step,
                figures,
            )
        if "from_init" in slices:
            image = line_image(
                slices["from_init_steps"],
                slices["from_init"],
                "α in w + α(w − w₀); −1 is the initial point",
            )
            log_image(trainer, f"{self.metric_prefix}/from_init", image, step, figures)
        folder = figures / (self.name or "")
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(slices, folder / f"slices_step{step}.pt")

    def layout(self) -> Layout:
        return {
            "landscape": {
                "loss at the centre of the slices": [
                    "Multiline",
                    [f"{self.metric_prefix}/center_loss"],
                ]
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": self._initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._initial = state_dict.get("initial")


def gather_batches(batches: list[Any]) -> list[Any]:
    """Every rank's batches, in rank order (through the CPU: they are small)."""
    local = [map_tensors(lambda t: t.detach().cpu(), batch) for batch in batches]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [batch for rank_batches in gathered for batch in rank_batches]


def _sum_over_ranks(slices: dict[str, Tensor], device: torch.device) -> None:
    """Sum the loss tensors of every rank in place (each rank filled its own points)."""
    names = [name for name in slices if not name.endswith("_steps")]
    packed = torch.cat([slices[name].reshape(-1) for name in names]).to(device)
    all_reduce_sum_(packed)
    for name, part in zip(names, packed.cpu().split([slices[n].numel() for n in names])):
        slices[name] = part.view(slices[name].shape)
