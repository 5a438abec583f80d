"""What the autograd graph of a measurement's loss shows before it is differentiated twice."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_landscape.errors import OnceDifferentiableError

# The code of every backward that ``@once_differentiable`` wraps.
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def nodes(loss: Tensor) -> Iterator[Any]:
    """Every node of the graph that computed ``loss``, each once."""
    if loss.grad_fn is None:
        return
    seen, waiting = {loss.grad_fn}, [loss.grad_fn]
    while waiting:
        node = waiting.pop()
        yield node
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                waiting.append(parent)


def check_twice_differentiable(graph: Iterable[Any]) -> None:
    """Refuse a graph (its :func:`nodes`) holding a custom ``autograd.Function`` whose
    backward is marked ``@once_differentiable``.

    Such a backward runs without a graph; differentiating the gradient towards the
    weights then leaves out what it computed from its saved tensors, without an error
    (the error it plants is reached only when differentiating towards its own inputs).

    Raises:
        OnceDifferentiableError: naming the function.
    """
    for node in graph:
        function = getattr(node, "_forward_cls", None)  # a custom Function's
        backward = getattr(function, "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
            raise OnceDifferentiableError(
                f"the loss runs {function.__qualname__}, a custom autograd.Function whose "
                "backward is marked @once_differentiable: Hessian-vector products through "
                "it would leave out its second derivatives. Write its backward with "
                "differentiable torch operations to measure curvature through it."
            )
