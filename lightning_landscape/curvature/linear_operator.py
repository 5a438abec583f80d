"""What the spectral algorithms need from an operator, and a dense one for matrices."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_landscape._distributed import broadcast_int


@runtime_checkable
class SymmetricOperator(Protocol):
    """A symmetric linear map on flat vectors (``HessianOperator`` is one).

    Under ``torch.distributed`` every process must return the same product, so that the
    algorithms built on it take identical steps everywhere.
    """

    size: int
    dtype: torch.dtype
    device: torch.device
    distributed: bool

    def matvec(self, vector: Tensor) -> Tensor: ...


class DenseOperator:
    """A symmetric matrix as a :class:`SymmetricOperator` (tests, small problems).

    Args:
        matrix: a square symmetric matrix.
    """

    distributed = False

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.n_matvec = 0

    def matvec(self, vector: Tensor) -> Tensor:
        self.n_matvec += 1
        return self.matrix @ vector


class ScaledOperator:
    """``S A S`` for a symmetric operator ``A`` and a diagonal ``S``, itself symmetric.

    With ``S = P^{-1/2}`` its eigenvalues are those of the preconditioned ``P⁻¹A``.

    Args:
        operator: the operator ``A``.
        scale: the diagonal of ``S`` as a flat vector of ``operator.size``.
    """

    def __init__(self, operator: SymmetricOperator, scale: Tensor) -> None:
        if scale.shape != (operator.size,):
            raise ValueError(
                f"`scale` must be a vector of size {operator.size}, got shape {tuple(scale.shape)}"
            )
        self.operator = operator
        self.scale = scale.to(device=operator.device, dtype=operator.dtype)
        self.size = operator.size
        self.dtype = operator.dtype
        self.device = operator.device
        self.distributed = operator.distributed

    def matvec(self, vector: Tensor) -> Tensor:
        return self.scale * self.operator.matvec(self.scale * vector)


def make_generator(
    operator: SymmetricOperator, generator: torch.Generator | int | None
) -> torch.Generator:
    """A generator on the operator's device, seeded identically on every process.

    Args:
        operator: the operator whose device and distribution the vectors follow.
        generator: a seed, a generator to draw the seed from, or ``None`` for seed 0 (so
            results are reproducible by default).

    Raises:
        TypeError: if ``generator`` is of another type.
    """
    if generator is None:
        seed = 0
    elif isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    elif isinstance(generator, int) and not isinstance(generator, bool):
        seed = generator
    else:
        raise TypeError(
            f"`generator` must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
        )
    if operator.distributed:
        seed = broadcast_int(seed, operator.device)  # rank 0's seed decides for everyone
    return torch.Generator(device=operator.device).manual_seed(seed)


def gaussian(
    operator: SymmetricOperator, generator: torch.Generator, count: int | None = None
) -> Tensor:
    """Standard normal vector(s) in the operator's space (``count`` rows if given)."""
    shape = (operator.size,) if count is None else (count, operator.size)
    return torch.randn(shape, generator=generator, dtype=operator.dtype, device=operator.device)


def rademacher(
    operator: SymmetricOperator, generator: torch.Generator, count: int | None = None
) -> Tensor:
    """Random ±1 vector(s) in the operator's space (``count`` rows if given)."""
    shape = (operator.size,) if count is None else (count, operator.size)
    bits = torch.randint(
        0, 2, shape, generator=generator, device=operator.device, dtype=operator.dtype
    )
    return bits.mul_(2).sub_(1)
