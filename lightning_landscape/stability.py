"""The sharpness above which an optimiser's iteration on a quadratic diverges."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape._params import real_view

# The optimisers whose stability this module knows: a threshold on λ_max (SGD) or on a
# preconditioned λ_max (SGD with per-group rates, Adam, AdamW, RMSprop).
KNOWN_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def stability_threshold(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor] | None = None
) -> float | None:
    """The largest Hessian eigenvalue at which the optimiser is stable on a quadratic.

    Gradient descent with step ``η`` diverges along an eigen-direction with ``λ > 2/η``;
    heavy-ball momentum ``β`` moves the limit to ``(2 + 2β)/η``; Nesterov momentum to
    ``(2 + 2β)/(η(1 + 2β))`` (Cohen et al. 2021, "Edge of Stability"); dampening ``d`` of
    the momentum scales the step to ``η(1 − d)``. Weight decay ``δ`` adds ``δ·I`` to the
    Hessian the step sees and so lowers the threshold by ``δ``: left out, as it is about
    1e-5 of the threshold in common settings, so that groups decayed and not decayed (the
    usual split of weights from biases and norms) share one.

    Parameter groups that step at different rates (a smaller rate for a pretrained
    backbone) are stable against ``λ_max`` of the Hessian scaled by their rates, not of the
    Hessian: no threshold is returned then. Nor for adaptive optimisers: both are stable
    while a *preconditioned* sharpness ``λ_max(P⁻¹H)`` stays below a threshold of their
    own, which :func:`preconditioner` gives. Nor for an ascent (``maximize=True``), which
    diverges along any positive curvature.

    Args:
        optimizer: a torch optimiser.
        params: the parameters the Hessian is taken over: only the groups holding them
            count. ``None``: every group.

    Returns:
        The threshold, or ``None`` where no single one applies (also when the optimiser
        does not step every one of ``params``).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    groups = optimizer.param_groups if params is None else _groups_holding(optimizer, params)
    thresholds = {_sgd_threshold(group) for group in groups}
    return thresholds.pop() if len(thresholds) == 1 else None


def stepping_optimizer(
    optimizers: Sequence[torch.optim.Optimizer], params: Sequence[Tensor]
) -> torch.optim.Optimizer | None:
    """The optimiser that steps every one of ``params``, if one does.

    A module with several optimisers (a GAN's generator and discriminator) has a
    threshold per optimiser: a Hessian over the parameters of one is compared with that
    one's, and one over the parameters of several has none.

    Args:
        optimizers: the run's optimisers (``trainer.optimizers``).
        params: the parameters the Hessian is taken over.
    """
    wanted = {id(param) for param in params}
    return next((o for o in optimizers if wanted <= _group_of_each_param(o).keys()), None)


def _sgd_step(group: dict) -> float:
    """The group's learning rate times ``1 − dampening`` (torch's SGD damps only momentum)."""
    dampening = float(group.get("dampening", 0.0)) if group.get("momentum", 0.0) else 0.0
    return float(group["lr"]) * (1 - dampening)


def _sgd_threshold(group: dict) -> float | None:
    beta, step = float(group.get("momentum", 0.0)), _sgd_step(group)
    if step <= 0 or group.get("maximize", False):  # ascent has no threshold
        return None
    if group.get("nesterov", False):
        return (2 + 2 * beta) / (step * (1 + 2 * beta))
    return (2 + 2 * beta) / step


@dataclass(frozen=True)
class Preconditioner:
    """An optimiser's next step seen as heavy-ball momentum with one step size on ``P⁻¹H``.

    On a quadratic the iteration is stable while ``λ_max(P⁻¹H) < threshold``.

    Attributes:
        inverse_sqrt: ``P^{-1/2}`` for each parameter, shaped like it (a complex one like
            its real view, ``torch.view_as_real``); ``λ(P⁻¹H)`` are the eigenvalues of the
            symmetric ``P^{-1/2} H P^{-1/2}``.
        threshold: the bound on ``λ_max(P⁻¹H)``, with the rate of the first parameter
            group that holds a measured parameter.
    """

    inverse_sqrt: list[Tensor]
    threshold: float


def preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> Preconditioner | None:
    """The preconditioner that decides the stability of ``optimizer`` on ``params``.

    That of :func:`adam_preconditioner` for Adam and AdamW, of
    :func:`rmsprop_preconditioner` for RMSprop, of :func:`sgd_preconditioner` for SGD whose
    groups step at different rates; ``None`` otherwise (plain SGD compares ``λ_max`` itself
    with :func:`stability_threshold`).

    Args:
        optimizer: the optimiser.
        params: the parameters the Hessian is taken over, in its order.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return sgd_preconditioner(optimizer, params)
    if isinstance(optimizer, torch.optim.RMSprop):
        return rmsprop_preconditioner(optimizer, params)
    return adam_preconditioner(optimizer, params)


def sgd_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> Preconditioner | None:
    """SGD whose parameter groups step at different rates, as one rate on ``P⁻¹H``.

    Only the groups holding ``params`` count. A group stepping at ``η_g`` (times
    ``1 − d_g`` with dampening ``d_g``) moves like the first of them on ``P⁻¹H`` with
    ``P⁻¹ = η_g/η_0`` on its parameters. When the groups share their momentum and
    Nesterov flag, the iteration is stable while ``λ_max(P⁻¹H)`` stays below the first
    group's :func:`stability_threshold`. ``None`` for other optimisers, when the groups
    step at one rate (the threshold then applies to ``λ_max`` itself), when the momenta
    differ, the first group does not move, a group ascends, or ``params`` holds a
    parameter the optimiser does not.

    Args:
        optimizer: the optimiser.
        params: the parameters the Hessian is taken over, in its order.
    """
    groups = _descending_groups(optimizer, params, torch.optim.SGD)
    momenta = {(float(g.get("momentum", 0.0)), bool(g.get("nesterov", False))) for g in groups}
    if len({_sgd_step(g) for g in groups}) < 2 or len(momenta) > 1:
        return None
    threshold = _sgd_threshold(groups[0])
    if threshold is None:
        return None
    group_of = _group_of_each_param(optimizer)
    reference = _sgd_step(groups[0])
    inverse_sqrt = [
        torch.full_like(
            real_view(param.detach()), math.sqrt(_sgd_step(group_of[id(param)]) / reference)
        )
        for param in params
    ]
    return Preconditioner(inverse_sqrt, threshold)


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> Preconditioner | None:
    """The preconditioner of Adam's (or AdamW's) next step on ``params``, from its state.

    Adam moves ``w ← w − η m̂/(√v̂ + ε)``, with ``m`` an average of gradients with weight
    ``1 − β₁``. With the second moments frozen this is heavy-ball momentum on ``P⁻¹H``,
    ``P = (1 − β₁ᵗ)·diag(√v̂ + ε)``, which is stable on a quadratic while
    ``λ_max(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η)`` — 38/η for β₁ = 0.9 (Cohen et al. 2022,
    "Adaptive Gradient Methods at the Edge of Stability").

    Only the groups holding ``params`` count: those with another learning rate than the
    first of them get it folded into ``P``; weight decay is not part of ``P`` (the
    measured Hessian is the loss's). A parameter that never had a gradient has no state
    and has not moved: ``P⁻¹ = 0`` there. ``None`` for other optimisers, before the first
    step (no second moments yet), for parameters the optimiser does not hold, when the
    groups' ``β₁`` differ, or when a group ascends.

    Args:
        optimizer: the optimiser.
        params: the parameters the Hessian is taken over, in its order.
    """
    groups = _descending_groups(optimizer, params, (torch.optim.Adam, torch.optim.AdamW))
    if not groups:
        return None
    lr, beta1 = float(groups[0]["lr"]), float(groups[0]["betas"][0])
    if lr <= 0 or not 0 <= beta1 < 1 or any(float(g["betas"][0]) != beta1 for g in groups):
        return None

    def denominator(group: dict, state: dict) -> Tensor:
        step = float(state["step"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        second = real_view(second)  # Adam steps a complex parameter's coordinates apart
        unbiased = (second / (1 - group["betas"][1] ** step)).sqrt() + group["eps"]
        return (1 - beta1**step) * unbiased

    threshold = (2 + 2 * beta1) / ((1 - beta1) * lr)
    return _diagonal(optimizer, params, lr, "exp_avg_sq", denominator, threshold)


def rmsprop_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> Preconditioner | None:
    """The preconditioner of RMSprop's next step on ``params``, from its state.

    RMSprop moves ``w ← w − η g/(√v + ε)``, ``v`` an average of squared gradients (less
    the squared average gradient when ``centered``), through a heavy-ball buffer with
    momentum ``μ``. With ``v`` frozen this is heavy-ball momentum on ``P⁻¹H``,
    ``P = diag(√v + ε)``, which is stable on a quadratic while
    ``λ_max(P⁻¹H) < (2 + 2μ)/η``, 2/η without momentum (as for Adam, Cohen et al. 2022).

    Only the groups holding ``params`` count: those with another learning rate than the
    first of them get it folded into ``P``; weight decay is not part of ``P``. A parameter
    that never had a gradient has not moved: ``P⁻¹ = 0`` there. ``None`` for other
    optimisers, before the first step, for parameters the optimiser does not hold, when
    the groups' momenta differ, or when a group ascends.

    Args:
        optimizer: the optimiser.
        params: the parameters the Hessian is taken over, in its order.
    """
    groups = _descending_groups(optimizer, params, torch.optim.RMSprop)
    if not groups:
        return None
    lr, momentum = float(groups[0]["lr"]), float(groups[0]["momentum"])
    if lr <= 0 or any(float(g["momentum"]) != momentum for g in groups):
        return None

    def denominator(group: dict, state: dict) -> Tensor:
        second = real_view(state["square_avg"])  # stepped coordinate by coordinate too
        if group["centered"]:
            second = second - real_view(state["grad_avg"]) ** 2
        return second.sqrt() + group["eps"]

    return _diagonal(optimizer, params, lr, "square_avg", denominator, (2 + 2 * momentum) / lr)


def _diagonal(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    lr: float,
    state_key: str,
    denominator: Callable[[dict, dict], Tensor],
    threshold: float,
) -> Preconditioner | None:
    """An adaptive optimiser's diagonal ``P = (η/η_g)·denominator(group, state)``: a
    group's own rate ``η_g`` acts as a further preconditioner. A parameter without
    ``state_key`` in its state never had a gradient and has not moved: ``P⁻¹ = 0`` there.
    ``None`` before the first step."""
    if not any(state_key in optimizer.state.get(param, {}) for param in params):
        return None
    group_of = _group_of_each_param(optimizer)
    inverse_sqrt = []
    for param in params:
        group, state = group_of[id(param)], optimizer.state.get(param, {})
        if state_key not in state:
            inverse_sqrt.append(torch.zeros_like(real_view(param.detach())))
        else:
            inverse_sqrt.append((float(group["lr"]) / (lr * denominator(group, state))).sqrt())
    return Preconditioner(inverse_sqrt, threshold)


def _descending_groups(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    kinds: type[torch.optim.Optimizer] | tuple[type[torch.optim.Optimizer], ...],
) -> list[dict]:
    """The groups holding ``params`` of an optimiser of ``kinds``; none for another
    optimiser or when one of them ascends (``maximize=True``: no threshold bounds it)."""
    if not isinstance(optimizer, kinds):
        return []
    groups = _groups_holding(optimizer, params)
    return [] if any(g.get("maximize", False) for g in groups) else groups


def _group_of_each_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _groups_holding(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict]:
    """The groups of ``optimizer`` that hold any of ``params``, in its order; none when it
    does not hold them all."""
    group_of = _group_of_each_param(optimizer)
    if any(id(param) not in group_of for param in params):
        return []
    held = {id(group_of[id(param)]) for param in params}
    return [group for group in optimizer.param_groups if id(group) in held]
