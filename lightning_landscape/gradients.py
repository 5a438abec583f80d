"""Gradient statistics: grouped norms (pure torch)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_landscape._validation import check_choice, check_int

GroupBy = Literal["parameter", "module", "regex"]


def parameter_groups(
    names: Sequence[str],
    group_by: GroupBy = "module",
    depth: int = 1,
    patterns: Sequence[str] | None = None,
) -> list[str]:
    """The group of each named parameter.

    Args:
        names: parameter names (``"encoder.layer.0.weight"``).
        group_by: ``"parameter"`` (each its own group), ``"module"`` (the first ``depth``
            components of the name: ``"encoder"`` at depth 1) or ``"regex"`` (the first of
            ``patterns`` that ``re.search`` finds in the name; ``"other"`` if none does).
        depth: module depth for ``group_by="module"``.
        patterns: regular expressions for ``group_by="regex"``.

    Raises:
        ValueError: for an unknown ``group_by``, ``depth < 1``, or ``"regex"`` without
            valid ``patterns``.
    """
    check_choice("group_by", group_by, ("parameter", "module", "regex"))
    check_int("depth", depth, minimum=1)
    if group_by == "parameter":
        return list(names)
    if group_by == "module":
        return [".".join(name.split(".")[:depth]) for name in names]
    if not patterns:
        raise ValueError('`patterns` must list regular expressions when `group_by="regex"`')
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise ValueError(f"`patterns` holds an invalid regular expression: {err}") from None
    return [next((p.pattern for p in compiled if p.search(name)), "other") for name in names]


def group_norms(
    tensors: Sequence[Tensor], groups: Sequence[str], norm_type: float = 2.0
) -> tuple[dict[str, Tensor], Tensor]:
    """The p-norm of each group's tensors taken together as one vector, and of all of them.

    Args:
        tensors: one tensor per parameter (gradients, weights, updates).
        groups: the group of each tensor (see :func:`parameter_groups`).
        norm_type: ``p`` of the norm, ``math.inf`` for the largest absolute entry.

    Returns:
        The norm of each group (0-d tensors on the tensors' device, so one transfer reads
        them all) and the total norm.
    """
    norms = torch.stack([torch.linalg.vector_norm(t.detach(), norm_type) for t in tensors])
    names = list(dict.fromkeys(groups))
    index = torch.tensor([names.index(g) for g in groups], device=norms.device)
    if math.isinf(norm_type):
        per_group = torch.zeros(len(names), dtype=norms.dtype, device=norms.device)
        per_group = per_group.scatter_reduce(0, index, norms, reduce="amax", include_self=False)
        total = norms.max()
    else:
        powered = norms.pow(norm_type)
        per_group = torch.zeros(len(names), dtype=norms.dtype, device=norms.device).index_add(
            0, index, powered
        )
        per_group = per_group.pow(1 / norm_type)
        total = powered.sum().pow(1 / norm_type)
    return dict(zip(names, per_group)), total
