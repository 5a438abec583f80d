"""Tiny models with exactly computable Hessians, shared by the tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

N_CLASSES = 3

NEEDS_LINEAR_CROSS_ENTROPY = pytest.mark.skipif(
    not hasattr(F, "linear_cross_entropy"), reason="torch without linear_cross_entropy"
)


def cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def input_gradient_penalty(model: nn.Module, batch: Any) -> Tensor:
    """A loss that differentiates inside (gradient penalty, R1, Jacobian regularisation)."""
    x, y = batch
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(model(x), y)
    (input_gradient,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + 0.1 * input_gradient.pow(2).sum()


class Cube(torch.autograd.Function):
    """``x³`` with a backward of its own, written in differentiable torch operations."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CubeOnce(Cube):
    """The same, its backward marked ``@once_differentiable`` (custom CUDA extensions')."""

    backward = staticmethod(once_differentiable(Cube.backward))


class _CubeGradient(torch.autograd.Function):
    """``3x²·grad``, with a backward written by hand that doubles its derivative in
    ``grad``."""

    @staticmethod
    def forward(ctx, grad, x):
        ctx.save_for_backward(grad, x)
        return 3 * x**2 * grad

    @staticmethod
    def backward(ctx, outer):
        grad, x = ctx.saved_tensors
        return 6 * x**2 * outer, 6 * x * grad * outer  # the first should be 3x²·outer


class CubeMisdifferentiated(Cube):
    """``x³`` whose backward is a custom Function with a hand-written backward of its own,
    as extensions supporting double backward have, one derivative of it wrong: products
    that are not symmetric, without an error of autograd's own."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _CubeGradient.apply(grad, x)


class TanhMLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, N_CLASSES))


class ReluMLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, N_CLASSES))


class DropoutMLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, N_CLASSES))


class ConvBN(nn.Sequential):
    """Inputs of shape (N, 1, 6, 6)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, N_CLASSES),
        )


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TanhMLP()
        self.unused = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class TinyAttention(nn.Module):
    """Self-attention over a short sequence through ``scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(dim=1))


class TiedLayers(nn.Module):
    """Two layers that share one weight parameter (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.head = nn.Linear(6, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class AliasedBlock(nn.Module):
    """A block reachable under two names, as projects alias one for ``BackboneFinetuning``
    (``self.backbone = self.body``); with BatchNorm, so buffers are reached twice too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.backbone = self.body
        self.head = nn.Linear(8, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class ComplexGain(nn.Module):
    """A learnt complex weight and bias between real layers, as Fourier layers hold them.

    Its own real ``gain`` (3 entries) comes first in a flat vector, so the complex weight
    starts at an odd offset. Built in ``dtype`` and the complex dtype of that precision:
    ``Module.to(dtype)`` would drop the imaginary parts.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=dtype))
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=dtype.to_complex()) / 2)
        self.bias = nn.Parameter(torch.randn(4, dtype=dtype.to_complex()) / 2)
        self.pre = nn.Linear(6, 3, dtype=dtype)
        self.head = nn.Linear(8, N_CLASSES, dtype=dtype)

    def complex_parameters(self) -> tuple[Tensor, Tensor]:
        return self.weight, self.bias

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.complex_parameters()
        z = (self.gain * torch.tanh(self.pre(x))).to(weight.dtype) @ weight + bias
        return self.head(torch.cat([z.abs(), z.angle()], dim=-1))


class ComplexGainTwin(ComplexGain):
    """:class:`ComplexGain` holding each complex parameter as its real view, ``(re, im)``
    pairs along a last dimension: the real model the complex one is measured as."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__(dtype, seed)
        self.weight = nn.Parameter(torch.view_as_real(self.weight.detach()).clone())
        self.bias = nn.Parameter(torch.view_as_real(self.bias.detach()).clone())

    def complex_parameters(self) -> tuple[Tensor, Tensor]:
        # not view_as_complex: a dense Hessian's slices of a flat vector start at odd offsets
        return tuple(torch.complex(p[..., 0], p[..., 1]) for p in (self.weight, self.bias))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "tanh_mlp": TanhMLP,
    "relu_mlp": ReluMLP,
    "dropout_mlp": DropoutMLP,
    "conv_bn": ConvBN,
    "unused_param": WithUnused,
    "tied_layers": TiedLayers,
    "aliased_block": AliasedBlock,
}


def make_batch(
    name: str, n: int = 32, dtype: torch.dtype = torch.float64, seed: int = 1
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = {"conv_bn": (n, 1, 6, 6), "attention": (n, 5, 4)}.get(name, (n, 6))
    inputs = torch.randn(shape, generator=generator, dtype=dtype)
    targets = torch.randint(0, N_CLASSES, (n,), generator=generator)
    return inputs, targets


def make_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    factory = TinyAttention if name == "attention" else MODELS[name]
    return factory().to(dtype)


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    seed: int = 0,
    params: list[str] | None = None,
) -> Tensor:
    """The exact Hessian by ``torch.autograd.functional.hessian``, independent of our code.

    The forward pass runs in the model's current mode on copies of the buffers, with the
    RNG seeded to ``seed`` (the dropout masks the operator draws for batch 0).
    """
    model = copy.deepcopy(model)  # functional_call leaves its tensors in an aliased block
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        named = [(n, p) for n, p in named if n in params]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_at(w: Tensor) -> Tensor:
        tensors = {n: b.clone() for n, b in model.named_buffers()}
        offset = 0
        for name, p in named:
            tensors[name] = w[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return loss_fn(lambda inputs: functional_call(model, tensors, (inputs,)), batch)

    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        return torch.autograd.functional.hessian(loss_at, flat)


def split_sequence_first(batch, parts: int) -> list:
    """Micro-batches of a ``(sequence-first inputs, labels)`` batch: split along dim 1."""
    x, y = batch
    return list(zip(x.tensor_split(parts, dim=1), y.tensor_split(parts)))


def labels_count(batch) -> int:
    """Sample count of an ``(inputs, labels)`` batch whose inputs are sequence-first."""
    return len(batch[1])
