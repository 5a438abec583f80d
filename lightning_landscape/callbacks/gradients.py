"""GradientNormMonitor: total and grouped gradient norms, before clipping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape._params import named_once
from lightning_landscape._validation import check_bool, check_int
from lightning_landscape.callbacks._logging import Layout, log_metrics, logger_step
from lightning_landscape.callbacks.base import LandscapeCallback
from lightning_landscape.gradients import (
    GroupBy,
    combined_norms,
    parameter_groups,
    tensor_norms,
)


class GradientNormMonitor(LandscapeCallback):
    """Gradient norms, in total and per layer (or other groups), as the optimizer is
    about to step.

    Read in ``on_before_optimizer_step``: after gradient accumulation, after AMP unscaling,
    after DDP's all-reduce (so every rank agrees), before gradient clipping. With several
    optimisers (manual optimisation, as in a GAN) each one's parameters are read as it is
    about to step, and a batch's reads are logged together, at the step the batch began
    at: ``total`` is over every parameter stepped in the batch. Logged under
    ``landscape/grad_norm/``: ``total`` and one value per group (by default per layer,
    named as the module, e.g. ``net.0``); with ``weight_norms`` also
    ``landscape/weight_norm/...``; with ``update_ratio`` the norm of the step each group
    took over the norm of its weights, ``landscape/update_ratio/...`` (this keeps a copy of
    the weights at logged steps). Values equal Lightning's ``grad_norm`` utility.

    Args:
        norm_type: ``p`` of the norm (``float("inf")`` for the largest entry).
        group_by: ``"layer"`` (each module holding parameters: a linear or
            convolution layer's weight and bias together), ``"module"`` (top-level
            modules, or deeper with ``depth``), ``"parameter"`` (every parameter) or
            ``"regex"`` (``patterns``).
        depth: module depth of the groups for ``group_by="module"``.
        patterns: regular expressions naming the groups for ``group_by="regex"``, searched
            in every name a parameter is held under (a block also held as ``backbone``).
        weight_norms: also log the weights' norms.
        update_ratio: also log ‖Δw‖/‖w‖ of each group after the step.
        every_n_steps: log every this many optimizer steps, the first batch that begins at
            or past each multiple; ``None`` follows the Trainer's ``log_every_n_steps``
            (whose 0, as ``barebones=True`` sets it, logs nothing).
    """

    def __init__(
        self,
        norm_type: float = 2.0,
        group_by: GroupBy = "layer",
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
        self._reads: _Reads | None = None  # those of the batch running, when it is logged
        self._logged_block: int | None = None  # global_step // cadence of the batch last logged

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A callback serving a second fit starts afresh; resuming restores after this hook.
        self._logged_block = None
        if stage == "fit" and not self._cadence(trainer):
            self._warn_once(
                "never",
                "follows Trainer(log_every_n_steps=0) (as barebones=True sets it), which logs "
                "nothing: pass `every_n_steps` to log the gradient norms",
            )

    @property
    def state_key(self) -> str:
        # Lightning files each callback's checkpointed state under this key: two monitors
        # reading other groups or norms keep theirs apart.
        return self._generate_state_key(
            norm_type=self.norm_type,
            group_by=self.group_by,
            depth=self.depth,
            patterns=self.patterns,
            every_n_steps=self.every_n_steps,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"logged_block": self._logged_block}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logged_block = state_dict.get("logged_block")  # absent from older checkpoints

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
    ) -> None:
        cadence = self._cadence(trainer)
        if not cadence:  # log_every_n_steps=0: Lightning logs nothing either
            return
        # The first batch at or past each multiple: a batch stepping several optimisers
        # (manual optimisation) counts a step for each, so it may begin past one.
        block = trainer.global_step // cadence
        due = block != self._logged_block
        self._reads = _Reads(logger_step(trainer), block) if due else None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        reads, self._reads = self._reads, None  # a failed read leaves the batch unlogged
        if reads is None:
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [
            (n, p, aliases)
            for n, p, aliases in named_once(pl_module)
            if id(p) in stepped and p.grad is not None and id(p) not in reads.seen
        ]
        with self._failure_warned(reads.step):
            if named:
                reads.add(named, self.norm_type, self.weight_norms, self.update_ratio)
            self._reads = reads

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
    ) -> None:
        reads, self._reads = self._reads, None
        if reads is None or not reads.names:
            return
        with self._failure_warned(reads.step):
            groups = parameter_groups(
                reads.names, self.group_by, self.depth, self.patterns, aliases=reads.aliases
            )
            metrics = self._norms("grad_norm", torch.cat(reads.grad_norms), groups)
            if self.weight_norms:
                metrics |= self._norms("weight_norm", torch.cat(reads.weight_norms), groups)
            if self.update_ratio:
                metrics |= self._update_ratios(reads, groups)
            log_metrics(trainer, metrics, reads.step)
            self._logged_block = reads.block

    def _cadence(self, trainer: pl.Trainer) -> int:
        return self.every_n_steps or trainer.log_every_n_steps

    def _norms(self, kind: str, norms: Tensor, groups: list[str]) -> dict[str, float]:
        return _metrics(kind, *combined_norms(norms, groups, self.norm_type))

    def _update_ratios(self, reads: _Reads, groups: list[str]) -> dict[str, float]:
        changes = [p.detach() - b for p, b in zip(reads.params, reads.before)]
        steps = tensor_norms(changes, self.norm_type)
        updates, update_total = combined_norms(steps, groups, self.norm_type)
        weights, weight_total = combined_norms(
            torch.cat(reads.weight_norms), groups, self.norm_type
        )
        ratios = {name: updates[name] / weights[name] for name in updates}
        return _metrics("update_ratio", ratios, update_total / weight_total)

    def layout(self) -> Layout:
        charts = {"gradient norm (total)": ["Multiline", ["landscape/grad_norm/total"]]}
        if self.update_ratio:
            charts["update / weight ratio (total)"] = [
                "Multiline",
                ["landscape/update_ratio/total"],
            ]
        return {"landscape": charts}


def _metrics(kind: str, per_group: dict[str, Tensor], total: Tensor) -> dict[str, float]:
    """``landscape/<kind>/total`` and one value per group, read in one device transfer."""
    values = torch.stack([total, *per_group.values()]).tolist()
    names = ["total", *per_group]
    return {f"landscape/{kind}/{name}": value for name, value in zip(names, values)}


@dataclass
class _Reads:
    """What the optimiser steps of a logged batch read, each parameter at its first step."""

    step: int  # where it is logged (the loggers' step as the batch begins)
    block: int  # the batch's global step over the cadence
    names: list[str] = field(default_factory=list)
    aliases: list[list[str]] = field(default_factory=list)
    grad_norms: list[Tensor] = field(default_factory=list)
    weight_norms: list[Tensor] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    before: list[Tensor] = field(default_factory=list)  # their weights, for update ratios
    seen: set[int] = field(default_factory=set)

    def add(
        self,
        named: list[tuple[str, Tensor, list[str]]],
        norm_type: float,
        weights: bool,
        updates: bool,
    ) -> None:
        """Read the parameters one optimiser is about to step, with their names."""
        params = [p for _, p, _ in named]
        self.grad_norms.append(tensor_norms([p.grad for p in params], norm_type))
        if weights or updates:
            self.weight_norms.append(tensor_norms(params, norm_type))
        if updates:
            self.params += params
            self.before += [p.detach().clone() for p in params]
        self.names += [name for name, _, _ in named]
        self.aliases += [aliases for _, _, aliases in named]
        self.seen.update(id(p) for p in params)
