"""The sharpness above which an optimiser's iteration on a quadratic diverges."""

from __future__ import annotations

import torch


def stability_threshold(optimizer: torch.optim.Optimizer) -> float | None:
    """The largest Hessian eigenvalue at which the optimiser is stable on a quadratic.

    Gradient descent with step ``η`` diverges along an eigen-direction with ``λ > 2/η``;
    heavy-ball momentum ``β`` moves the limit to ``(2 + 2β)/η``; Nesterov momentum to
    ``(2 + 2β)/(η(1 + 2β))`` (Cohen et al. 2021, "Edge of Stability"). The first parameter
    group decides.

    Adaptive optimisers (Adam, RMSprop, Adagrad...) are stable while the *preconditioned*
    sharpness ``λ_max(P⁻¹H)`` stays below ``(2 + 2β₁)/(η(1 − β₁))``; that is a different
    matrix from the Hessian measured here, so no threshold is returned for them.

    Args:
        optimizer: a torch optimiser.

    Returns:
        The threshold, or ``None`` for optimisers it is not defined for.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if lr <= 0:
        return None
    beta = float(group.get("momentum", 0.0))
    if group.get("nesterov", False):
        return (2 + 2 * beta) / (lr * (1 + 2 * beta))
    return (2 + 2 * beta) / lr
