"""Kernels whose double backward is wrong or missing, run as composites during measurements.

Every Hessian-vector product differentiates the forward pass twice. A few of PyTorch's
fused kernels do not allow it: the double backward of weight norm takes the norm for a
constant, so the Hessian of a weight-normalised layer came out wrong (by 40 % on a tanh
MLP) without an error; ``hardsigmoid`` (MobileNetV3's squeeze-and-excitation gate) and
``embedding_bag`` (``nn.EmbeddingBag``) have none, so every measurement was skipped. While
a measurement runs, a torch-function mode computes them from ops whose double backward is
right, with the same values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode


def composite_kernels(model: nn.Module) -> contextlib.AbstractContextManager:
    """Run the kernels named in this module's docstring as composites, when ``model`` has
    a layer that calls one (the mode sees every op of the forward pass).

    Args:
        model: the module measured.
    """
    if any(_calls_a_replaced_kernel(m) for m in model.modules()):
        return _CompositeKernels()
    return contextlib.nullcontext()


def _calls_a_replaced_kernel(module: nn.Module) -> bool:
    if isinstance(module, (nn.Hardsigmoid, nn.EmbeddingBag)):
        return True
    # torch.nn.utils.weight_norm (a hook) or torch.nn.utils.parametrizations.weight_norm
    if any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values()):
        return True
    return parametrize.is_parametrized(module) and any(
        isinstance(p, _WeightNorm) for chain in module.parametrizations.values() for p in chain
    )


class _CompositeKernels(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _COMPOSITES.get(func, func)(*args, **(kwargs or {}))


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    return v * (g / torch.norm_except_dim(v, 2, dim))  # PyTorch's own unfused form


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    output = F.relu6(input + 3) / 6
    return input.copy_(output) if inplace else output


def _embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """``F.embedding_bag`` as a lookup followed by a sum, mean or max over each bag."""
    if input.dim() == 2:  # bags of equal length, one per row
        bags = torch.arange(input.shape[0], device=input.device).repeat_interleave(input.shape[1])
        count = input.shape[0]
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    else:
        assert offsets is not None  # F.embedding_bag refuses 1-D input without offsets
        starts = offsets[:-1] if include_last_offset else offsets
        positions = torch.arange(input.shape[0], device=input.device)
        bags = torch.searchsorted(starts, positions, right=True) - 1
        count = starts.shape[0]
    rows = F.embedding(input, weight, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    if padding_idx is not None:  # left out of its bag, as if absent
        kept = input != padding_idx
        rows, bags = rows[kept], bags[kept]
    shape = (count, weight.shape[1])
    if mode == "max":  # an empty bag stays 0
        index = bags.unsqueeze(1).expand_as(rows)
        return rows.new_zeros(shape).scatter_reduce(0, index, rows, "amax", include_self=False)
    summed = rows.new_zeros(shape).index_add(0, bags, rows)
    if mode == "sum":
        return summed
    sizes = torch.bincount(bags, minlength=count).clamp_min(1).unsqueeze(1)
    return summed / sizes


_COMPOSITES: dict[Callable[..., Any], Callable[..., Any]] = {
    torch._weight_norm: _weight_norm,
    F.hardsigmoid: _hardsigmoid,
    F.embedding_bag: _embedding_bag,
}
