"""Initialisation by rule, and a signal-propagation report that catches bad scaling (pure torch).

Trainable parameters want random values *with proper scaling*: too large and tanh units
saturate (gradients vanish backwards), too small and activations vanish forwards, and a
constant (all-zero, all-one) weight matrix leaves every unit of a layer identical forever.
:func:`initialize` applies schemes by rule; :func:`signal_report` measures what a forward
and a backward pass look like layer by layer at the current weights.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

SCHEMES = (
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
    "trunc_normal",
    "normal",
    "uniform",
    "zeros",
    "ones",
)

# The activation that follows a layer decides its gain (torch.nn.init.calculate_gain names).
_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SELU: "selu",
    nn.GELU: "relu",  # no gain of its own in torch; ReLU's is the usual stand-in
    nn.SiLU: "relu",
}

Rule = str | Mapping[str, Any]


@dataclass
class Applied:
    """One parameter that a rule initialised."""

    module: str
    parameter: str
    scheme: str
    std: float


@dataclass
class InitReport:
    """What :func:`initialize` did, parameter by parameter."""

    applied: list[Applied] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [f"{'parameter':40s} {'scheme':16s} {'std':>10s}"]
        rows += [
            f"{a.module + '.' + a.parameter:40s} {a.scheme:16s} {a.std:10.4g}" for a in self.applied
        ]
        return "\n".join(rows)


def _following_activation(model: nn.Module) -> dict[str, str]:
    """Module name -> the nonlinearity that directly follows it inside an ``nn.Sequential``."""
    found: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, _), (_, following) in itertools.pairwise(children):
            kind = _ACTIVATIONS.get(type(following))
            if kind is not None:
                found[f"{parent_name}.{name}" if parent_name else name] = kind
    return found


def _spec(rule: Rule) -> dict[str, Any]:
    spec = {"scheme": rule} if isinstance(rule, str) else dict(rule)
    if spec.get("scheme") not in SCHEMES:
        raise ValueError(
            f"`rules` names an unknown scheme {spec.get('scheme')!r}; known: {', '.join(SCHEMES)}"
        )
    if (
        spec["scheme"] in ("normal", "uniform", "trunc_normal")
        and "std" not in spec
        and "bound" not in spec
    ):
        raise ValueError(
            f"`rules`: scheme {spec['scheme']!r} needs an explicit scale ('std' or 'bound')"
        )
    return spec


def _apply(
    weight: Tensor, spec: dict[str, Any], nonlinearity: str, generator: torch.Generator
) -> None:
    scheme = spec["scheme"]
    gain_name = spec.get("nonlinearity", nonlinearity)
    slope = spec.get("negative_slope", 0.01)
    if scheme.startswith("kaiming"):
        fill = nn.init.kaiming_uniform_ if scheme == "kaiming_uniform" else nn.init.kaiming_normal_
        fill(
            weight,
            a=slope if gain_name == "leaky_relu" else 0,
            nonlinearity=gain_name,
            generator=generator,
        )
    elif scheme.startswith("xavier"):
        gain = spec.get(
            "gain", nn.init.calculate_gain(gain_name, slope if gain_name == "leaky_relu" else None)
        )
        fill = nn.init.xavier_uniform_ if scheme == "xavier_uniform" else nn.init.xavier_normal_
        fill(weight, gain=gain, generator=generator)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, gain=spec.get("gain", 1.0), generator=generator)
    elif scheme == "trunc_normal":  # bounds in multiples of std, unlike torch's absolute ones
        std, cut = spec["std"], spec.get("cutoff", 2.0)
        nn.init.trunc_normal_(weight, 0.0, std, -cut * std, cut * std, generator=generator)
    elif scheme == "normal":
        nn.init.normal_(weight, 0.0, spec["std"], generator=generator)
    elif scheme == "uniform":
        bound = spec.get("bound", spec.get("std", 0.0) * math.sqrt(3))
        nn.init.uniform_(weight, -bound, bound, generator=generator)
    else:
        weight.fill_(0.0 if scheme == "zeros" else 1.0)


def _rule_for(name: str, module: nn.Module, rules: Mapping[Any, Rule]) -> tuple[Any, Rule] | None:
    for key, rule in rules.items():
        if isinstance(key, type) and isinstance(module, key):
            return key, rule
        if isinstance(key, str) and re.search(key, name):
            return key, rule
    return None


def initialize(
    model: nn.Module, rules: Mapping[Any, Rule], generator: torch.Generator | int | None = None
) -> InitReport:
    """Initialise ``model``'s modules by rule; return what was applied where.

    Each module (``named_modules`` order) takes the first rule whose key is its type (a
    module class) or a regular expression found in its name. The scheme fills the module's
    ``weight``; its ``bias`` is zeroed. A rule is a scheme name or a dict
    ``{"scheme": ..., **options}`` with options ``nonlinearity`` (kaiming/xavier gain;
    inferred from the activation that follows the module in an ``nn.Sequential``, else
    ``"relu"`` for kaiming and ``"linear"`` for xavier), ``gain``, ``negative_slope``,
    ``std`` (normal, trunc_normal, uniform), ``cutoff`` (trunc_normal bounds, in stds),
    ``bound`` (uniform). ``zeros``/``ones`` on a matrix feeding a nonlinearity is allowed
    with a warning: every unit of the layer then stays identical.

    Args:
        model: the network.
        rules: module type or name regex -> rule.
        generator: seed or generator, so a seed gives the same weights on any machine.

    Raises:
        ValueError: for an unknown scheme or a scale-less normal/uniform rule.
        TypeError: for a rule key that is neither a module class nor a string.
    """
    specs = {}
    for key, rule in rules.items():
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise TypeError(f"`rules` keys must be module classes or name regexes, got {key!r}")
        specs[key] = _spec(rule)
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else generator)
    activations = _following_activation(model)
    report, used = InitReport(), set()
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            match = _rule_for(name, module, rules)
            if match is None or not isinstance(weight, Tensor):
                continue
            key, _ = match
            used.add(key)
            spec = specs[key]
            nonlinearity = activations.get(
                name, "relu" if spec["scheme"].startswith("kaiming") else "linear"
            )
            if spec["scheme"] in ("zeros", "ones") and weight.dim() >= 2 and name in activations:
                warnings.warn(
                    f"`{spec['scheme']}` on {name}.weight, which feeds a {activations[name]}: every unit "
                    "of the layer gets the same gradient and stays identical",
                    stacklevel=2,
                )
            local = torch.empty_like(
                weight, device="cpu"
            )  # drawn on the CPU: same seed, same weights
            _apply(local, spec, nonlinearity, generator)
            weight.copy_(local)
            report.applied.append(
                Applied(
                    name,
                    "weight",
                    spec["scheme"],
                    float(weight.std()) if weight.numel() > 1 else 0.0,
                )
            )
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                bias.zero_()
                report.applied.append(Applied(name, "bias", "zeros", 0.0))
    for key in rules:
        if key not in used:
            warnings.warn(
                f"initialize: the rule {key!r} matched no module with a weight", stacklevel=2
            )
    return report


@dataclass
class LayerSignal:
    """Forward and backward signal at one layer."""

    name: str
    activation_std: float
    gradient_std: float
    flags: list[str]


@dataclass
class SignalReport:
    """Per-layer signal propagation; :attr:`flagged` lists the layers in trouble."""

    layers: list[LayerSignal]

    @property
    def flagged(self) -> list[LayerSignal]:
        return [layer for layer in self.layers if layer.flags]

    def metrics(self, prefix: str = "landscape/signal") -> dict[str, float]:
        """Loggable values: ``<prefix>/activation_std/<layer>`` and ``gradient_std``."""
        out = {}
        for layer in self.layers:
            out[f"{prefix}/activation_std/{layer.name}"] = layer.activation_std
            out[f"{prefix}/gradient_std/{layer.name}"] = layer.gradient_std
        return out

    def __str__(self) -> str:
        rows = [f"{'layer':30s} {'activation std':>15s} {'gradient std':>13s}  flags"]
        rows += [
            f"{s.name:30s} {s.activation_std:15.4g} {s.gradient_std:13.4g}  {', '.join(s.flags)}"
            for s in self.layers
        ]
        return "\n".join(rows)


def signal_report(
    model: nn.Module,
    inputs: Any,
    vanishing: float = 1e-2,
    exploding: float = 1e2,
    saturation: float = 3.0,
    seed: int = 0,
) -> SignalReport:
    """Activation and gradient scale at every layer with a weight, at the current weights.

    ``model(inputs)`` runs forward; a standard-normal gradient is sent back from the
    output, so the backward signal does not depend on a loss. With unit-scale inputs a
    healthy network keeps both stds within ``[vanishing, exploding]``; flags:
    ``"vanishing activations"``, ``"exploding activations"``, ``"vanishing gradients"``,
    ``"exploding gradients"``, ``"saturating"`` for a layer feeding a tanh or sigmoid with
    outputs of std above ``saturation`` (the units sit on the flat tails), and
    ``"symmetric"`` for a weight matrix whose rows are all equal (a constant
    initialisation: its units can never differ). ``.grad``, the RNG and BatchNorm
    statistics are left as they were.

    Args:
        model: the network.
        inputs: the model's input (a tensor, or a tuple of positional inputs).
        vanishing: std below which a signal counts as vanished.
        exploding: std above which a signal counts as exploded.
        saturation: std of the input of a tanh or sigmoid above which it saturates.
        seed: seed of the backward signal and of dropout.
    """
    activations = _following_activation(model)
    layers = [
        (n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Tensor)
    ]
    outputs: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, module in layers
        if not list(module.children())
    ]
    buffers = [b.clone() for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            result = model(*args)
            captured = {
                n: o for n, o in outputs.items() if isinstance(o, Tensor) and o.requires_grad
            }
            signal = torch.randn(result.shape, dtype=result.dtype, device=result.device)
            grads = torch.autograd.grad(result, list(captured.values()), signal, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    gradient_of = dict(zip(captured, grads))
    report = []
    for name, module in layers:
        if name not in captured:
            continue
        act = float(captured[name].detach().std())
        grad = gradient_of[name]
        grad_std = float(grad.std()) if grad is not None else 0.0
        flags = []
        for kind, value in (("activations", act), ("gradients", grad_std)):
            if value < vanishing:
                flags.append(f"vanishing {kind}")
            elif value > exploding:
                flags.append(f"exploding {kind}")
        if activations.get(name) in ("tanh", "sigmoid") and act > saturation:
            flags.append("saturating")
        weight = module.weight.detach()
        if weight.dim() >= 2 and weight.shape[0] > 1 and bool((weight == weight[:1]).all()):
            flags.append("symmetric")
        report.append(LayerSignal(name, act, grad_std, flags))
    return SignalReport(report)


def lsuv(
    model: nn.Module,
    inputs: Any,
    tol: float = 0.1,
    max_iter: int = 10,
    generator: torch.Generator | int | None = None,
) -> dict[str, float]:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas 2016).

    Every layer with a matrix or convolution weight gets an orthogonal weight and a zero
    bias; then, layer after layer in forward order, its weight is rescaled until the
    variance of its output on ``inputs`` is within ``tol`` of 1 (at most ``max_iter``
    rescalings each), the model running in its current mode. BatchNorm statistics and the
    RNG are left as they were.

    Args:
        model: the network.
        inputs: a batch of inputs (a tensor, or a tuple of positional inputs).
        tol: accepted distance of each output variance from 1.
        max_iter: most rescalings per layer.
        generator: seed or generator of the orthogonal pre-initialisation.

    Returns:
        The output variance of each layer after its last rescaling.
    """
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an int >= 1, got {max_iter!r}")
    weighted = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() >= 2
    ]
    initialize(model, {f"^{re.escape(name)}$": "orthogonal" for name, _ in weighted}, generator)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    buffers = [b.clone() for b in model.buffers()]
    variances: dict[str, float] = {}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for name, module in weighted:
                captured: list[Tensor] = []
                handle = module.register_forward_hook(
                    lambda _m, _i, out, sink=captured: sink.append(out)
                )
                try:
                    for _ in range(max_iter):
                        captured.clear()
                        model(*args)
                        variance = float(captured[0].var())
                        if abs(variance - 1) < tol or variance == 0:
                            break
                        module.weight.div_(math.sqrt(variance))
                    captured.clear()
                    model(*args)
                    variances[name] = float(captured[0].var())
                finally:
                    handle.remove()
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    return variances
