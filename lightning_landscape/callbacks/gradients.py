"""GradientNormMonitor: total and grouped gradient norms, before clipping."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape._params import named_once
from lightning_landscape._validation import check_bool, check_int
from lightning_landscape.callbacks._logging import Layout, log_metrics
from lightning_landscape.callbacks.base import LandscapeCallback
from lightning_landscape.gradients import GroupBy, group_norms, parameter_groups


class GradientNormMonitor(LandscapeCallback):
    """Gradient norms, in total and per group, as the optimizer is about to step.

    Read in ``on_before_optimizer_step``: after gradient accumulation, after AMP unscaling,
    after DDP's all-reduce (so every rank agrees), before gradient clipping. Logged under
    ``landscape/grad_norm/``: ``total`` and one value per group; with ``weight_norms`` also
    ``landscape/weight_norm/...``; with ``update_ratio`` the norm of the step each group
    took over the norm of its weights, ``landscape/update_ratio/...`` (this keeps a copy of
    the weights at logged steps). Values equal Lightning's ``grad_norm`` utility.

    Args:
        norm_type: ``p`` of the norm (``float("inf")`` for the largest entry).
        group_by: ``"module"`` (top-level modules, or deeper with ``depth``),
            ``"parameter"`` (every parameter) or ``"regex"`` (``patterns``).
        depth: module depth of the groups for ``group_by="module"``.
        patterns: regular expressions naming the groups for ``group_by="regex"``, searched
            in every name a parameter is held under (a block also held as ``backbone``).
        weight_norms: also log the weights' norms.
        update_ratio: also log ‖Δw‖/‖w‖ of each group after the step.
        every_n_steps: log every this many optimizer steps; ``None`` follows the Trainer's
            ``log_every_n_steps``.
    """

    def __init__(
        self,
        norm_type: float = 2.0,
        group_by: GroupBy = "module",
        depth: int = 1,
        patterns: Sequence[str] | None = None,
        weight_norms: bool = False,
        update_ratio: bool = False,
        every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(norm_type, bool)
            or not isinstance(norm_type, (int, float))
            or not norm_type > 0
        ):
            raise ValueError(f"`norm_type` must be a positive number or inf, got {norm_type!r}")
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, minimum=1)
        parameter_groups(["probe.weight"], group_by, depth, patterns)  # validates the grouping
        self.norm_type = float(norm_type)
        self.group_by: GroupBy = group_by
        self.depth = depth
        self.patterns = list(patterns) if patterns is not None else None
        self.weight_norms = check_bool("weight_norms", weight_norms)
        self.update_ratio = check_bool("update_ratio", update_ratio)
        self.every_n_steps = every_n_steps
        self._before: tuple[int, list[str], list[Tensor], list[Tensor]] | None = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step % (self.every_n_steps or trainer.log_every_n_steps):
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [
            (n, p, aliases)
            for n, p, aliases in named_once(pl_module)
            if id(p) in stepped and p.grad is not None
        ]
        if not named:
            return
        with self._failure_warned(step):
            groups = parameter_groups(
                [n for n, _, _ in named],
                self.group_by,
                self.depth,
                self.patterns,
                aliases=[aliases for _, _, aliases in named],
            )
            params = [p for _, p, _ in named]
            metrics = self._norms("grad_norm", [p.grad for p in params], groups)
            if self.weight_norms:
                metrics |= self._norms("weight_norm", params, groups)
            log_metrics(trainer, metrics, step)
            if self.update_ratio:
                self._before = (step, groups, params, [p.detach().clone() for p in params])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
    ) -> None:
        if self._before is None:
            return
        step, groups, params, before = self._before
        self._before = None
        with self._failure_warned(step):
            updates, update_total = group_norms(
                [p.detach() - b for p, b in zip(params, before)], groups, self.norm_type
            )
            weights, weight_total = group_norms(before, groups, self.norm_type)
            ratios = {name: updates[name] / weights[name] for name in updates}
            ratios["total"] = update_total / weight_total
            values = torch.stack(list(ratios.values())).tolist()
            log_metrics(
                trainer, {f"landscape/update_ratio/{n}": v for n, v in zip(ratios, values)}, step
            )

    def _norms(self, kind: str, tensors: list[Tensor], groups: list[str]) -> dict[str, float]:
        per_group, total = group_norms(tensors, groups, self.norm_type)
        values = torch.stack([total, *per_group.values()]).tolist()  # one device transfer
        names = ["total", *per_group]
        return {f"landscape/{kind}/{name}": value for name, value in zip(names, values)}

    def layout(self) -> Layout:
        charts = {"gradient norm (total)": ["Multiline", ["landscape/grad_norm/total"]]}
        if self.update_ratio:
            charts["update / weight ratio (total)"] = [
                "Multiline",
                ["landscape/update_ratio/total"],
            ]
        return {"landscape": charts}
