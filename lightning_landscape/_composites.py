"""Kernels whose double backward is wrong or missing, run as composites during measurements.

Every Hessian-vector product differentiates the forward pass twice. A few of PyTorch's
fused kernels do not allow it: the double backward of weight norm takes the norm for a
constant, so the Hessian of a weight-normalised layer came out wrong (by 40 % on a tanh
MLP) without an error; ``hardsigmoid`` (MobileNetV3's squeeze-and-excitation gate),
``embedding_bag`` (``nn.EmbeddingBag``) and ``ctc_loss`` (``nn.CTCLoss``, speech models)
have none, so every measurement was skipped. While a measurement of a model holding such
a layer runs, a torch-function mode computes them from ops whose double backward is right,
with the same values (a ``ctc_loss`` called without an ``nn.CTCLoss`` module in the model
is not seen).
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
    if isinstance(module, (nn.Hardsigmoid, nn.EmbeddingBag, nn.CTCLoss)):
        return True
    # torch.nn.utils.weight_norm (a hook) or torch.nn.utils.parametrizations.weight_norm
    if any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values()):
        return True
    return parametrize.is_parametrized(module) and any(
        isinstance(p, _WeightNorm) for chain in module.parametrizations.values() for p in chain
    )


class _CompositeKernels(TorchFunctionMode):
    """Route each call of a kernel in ``_COMPOSITES`` to its composite."""

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


def _ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | Sequence[int],
    target_lengths: Tensor | Sequence[int],
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
) -> Tensor:
    """``F.ctc_loss`` by the forward recursion over alignments, in log space.

    A step per time frame: slower than the kernel, which has no double backward.
    """
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs, targets = log_probs.unsqueeze(1), targets.reshape(1, -1)
    frames, count, _ = log_probs.shape
    device = log_probs.device
    input_lengths = torch.as_tensor(input_lengths, device=device).reshape(-1)
    target_lengths = torch.as_tensor(target_lengths, device=device).reshape(-1)
    longest = int(target_lengths.max()) if count else 0
    positions = torch.arange(longest, device=device)
    if targets.dim() == 1:  # concatenated: cut into padded rows
        starts = torch.cumsum(target_lengths, 0) - target_lengths
        index = (starts.unsqueeze(1) + positions).clamp_max(max(targets.shape[0] - 1, 0))
        targets = targets[index] if targets.numel() else index
    padded = torch.where(positions < target_lengths.unsqueeze(1), targets[:, :longest], blank)
    # Labels interleaved with blanks; a label may be reached from two states back unless it
    # repeats the label there.
    states = torch.full((count, 2 * longest + 1), blank, dtype=torch.long, device=device)
    states[:, 1::2] = padded
    skips = torch.zeros_like(states, dtype=torch.bool)
    skips[:, 2:] = (states[:, 2:] != blank) & (states[:, 2:] != states[:, :-2])
    emissions = log_probs.gather(2, states.unsqueeze(0).expand(frames, -1, -1))
    never = torch.finfo(log_probs.dtype).min / 4  # log 0, finite so gradients stay finite
    width = states.shape[1]
    # A batch of empty targets has the one state (a blank).
    alpha = torch.cat(
        [emissions[0, :, :2], emissions.new_full((count, max(width - 2, 0)), never)], 1
    )
    for t in range(1, frames):
        one_back = F.pad(alpha, (1, 0), value=never)[:, :width]
        two_back = torch.where(skips, F.pad(alpha, (2, 0), value=never)[:, :width], never)
        stepped = torch.logsumexp(torch.stack([alpha, one_back, two_back]), 0) + emissions[t]
        alpha = torch.where((t < input_lengths).unsqueeze(1), stepped, alpha)
    ends = torch.stack([2 * target_lengths, (2 * target_lengths - 1).clamp_min(0)], 1)
    final = alpha.gather(1, ends)
    final[:, 1] = torch.where(target_lengths > 0, final[:, 1], never)
    losses = -torch.logsumexp(final, 1)
    impossible = losses > -never / 2  # no alignment fits in the frames
    losses = torch.where(impossible, 0.0 if zero_infinity else float("inf"), losses)
    if reduction == "mean":
        return (losses / target_lengths.clamp_min(1)).mean()
    if reduction == "sum":
        return losses.sum()
    return losses.squeeze(0) if unbatched else losses


_COMPOSITES: dict[Callable[..., Any], Callable[..., Any]] = {
    torch._weight_norm: _weight_norm,
    F.hardsigmoid: _hardsigmoid,
    F.embedding_bag: _embedding_bag,
    F.ctc_loss: _ctc_loss,
}
