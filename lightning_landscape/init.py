"""Initialisation by rule, and a signal-propagation report that catches bad scaling (pure torch).

Trainable parameters want random values *with proper scaling*: too large and tanh units
saturate (gradients vanish backwards), too small and activations vanish forwards, and a
constant (all-zero, all-one) weight matrix leaves every unit of a layer identical forever.
:func:`initialize` applies schemes by rule; :func:`signal_report` measures what a forward
and a backward pass look like layer by layer at the current weights.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_landscape._batches import first_tensor
from lightning_landscape._context import (
    HALF_PRECISION,
    compiled_run_eagerly,
    device_of,
    forked_rng,
)
from lightning_landscape._params import names_by_identity, uncompiled_name
from lightning_landscape._spectral_norm import SpectralNormHook

# ``torch.nn.utils.weight_norm`` is the function; its module holds the hook's class.
_WeightNormHook = sys.modules["torch.nn.utils.weight_norm"].WeightNorm

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
    "zero_gamma",
)

# Layers whose weight is a per-channel scale (gamma): what ``zero_gamma`` zeroes.
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

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

_RNN_ACTIVATIONS = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}

# Random schemes: they fill weight matrices and kernels. A weight of one dimension (a norm
# layer's scale, PReLU's slopes) has no fan to scale by, and a zero-mean draw would all but
# switch it off.
_RANDOM_SCHEMES = frozenset(SCHEMES) - {"zeros", "ones", "zero_gamma"}

# Matrices stacked in one parameter of a recurrent layer: one per gate.
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

Rule = str | Mapping[str, Any]


@dataclass
class Applied:
    """One parameter that a rule initialised; ``std`` is that of the values the rule drew
    (which a parametrization such as ``spectral_norm`` then transforms)."""

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
            f"{_joined(a.module, a.parameter):40s} {a.scheme:16s} {a.std:10.4g}"
            for a in self.applied
        ]
        return "\n".join(rows)


def _joined(module: str, parameter: str) -> str:
    return f"{module}.{parameter}" if module else parameter  # the root module's name is ""


def _following_activation(model: nn.Module) -> dict[str, str]:
    """Module name -> the nonlinearity its output goes through: the one directly following it
    inside an ``nn.Sequential``, or an ``nn.RNN``'s own."""
    found: dict[str, str] = {
        name: _RNN_ACTIVATIONS[module.mode]
        for name, module in model.named_modules()
        if isinstance(module, nn.RNNBase) and module.mode in _RNN_ACTIVATIONS
    }
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


def check_rules(rules: Mapping[Any, Rule]) -> dict[Any, dict[str, Any]]:
    """Validate initialisation rules; return each key's scheme and options as a dict.

    Raises:
        ValueError: for an unknown scheme or a scale-less normal/uniform rule.
        TypeError: for a rule key that is neither a module class nor a string.
    """
    if not isinstance(rules, Mapping):
        raise TypeError(
            f"`rules` must map module classes or name regexes to schemes, got {rules!r}"
        )
    specs = {}
    for key, rule in rules.items():
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise TypeError(f"`rules` keys must be module classes or name regexes, got {key!r}")
        specs[_module_class(key)] = _spec(rule)
    return specs


# "torch.nn.Linear": an import path ending in a class name (a YAML config cannot hold a class).
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\.[A-Z]\w*$")


def _module_class(key: Any) -> Any:
    """A string key naming a module class by import path is that class; others stay."""
    if not (isinstance(key, str) and _CLASS_PATH.match(key)):
        return key
    module_name, _, class_name = key.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return key
    return found if isinstance(found, type) and issubclass(found, nn.Module) else key


def _apply(
    weight: Tensor, spec: dict[str, Any], nonlinearity: str, generator: torch.Generator
) -> None:
    scheme = spec["scheme"]
    if weight.is_complex() and scheme not in ("zeros", "ones"):
        _apply_complex(weight, spec, nonlinearity, generator)
        return
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


def _apply_complex(
    weight: Tensor, spec: dict[str, Any], nonlinearity: str, generator: torch.Generator
) -> None:
    """A rule's variance as ``E|w|²`` of a complex weight: its real and imaginary parts each
    drawn by the rule and scaled by 1/√2 (torch's uniform fills would give each part the
    whole variance), or a unitary matrix for ``orthogonal`` (torch's fails on complex)."""
    if spec["scheme"] != "orthogonal":
        parts = torch.empty(2, *weight.shape, dtype=weight.real.dtype)
        for part in parts:
            _apply(part, spec, nonlinearity, generator)
        weight.copy_(torch.complex(parts[0], parts[1]) / math.sqrt(2))
        return
    rows = weight.shape[0]
    flat = torch.randn(rows, weight.numel() // rows, dtype=weight.dtype, generator=generator)
    wide = rows < flat.shape[1]
    q, r = torch.linalg.qr(flat.mT if wide else flat)
    q = q * torch.sgn(torch.diagonal(r))  # the factorisation whose R has a real diagonal > 0
    weight.copy_((q.mT if wide else q).reshape(weight.shape) * spec.get("gain", 1.0))


def weight_blocks(module: nn.Module) -> list[tuple[str, int]]:
    """The weights of ``module`` that a rule fills, each with the number of matrices stacked in it.

    A layer's ``weight`` holds one. A recurrent layer's ``weight_ih_l*`` and ``weight_hh_l*``
    stack one per gate (LSTM 4, GRU 3), and ``nn.MultiheadAttention``'s ``in_proj_weight``
    the query, key and value projections: each is a linear map of its own, with its own
    fan-out, so each is drawn by the scheme on its own.
    """
    if isinstance(module, nn.RNNBase):
        return [
            (name, 1 if name.startswith("weight_hr") else _GATES[module.mode])
            for name, _ in module.named_parameters(recurse=False)
            if name.startswith("weight")
        ]
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", 3)]
        return [(name, 1) for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    return [("weight", 1)] if isinstance(getattr(module, "weight", None), Tensor) else []


def _biases(module: nn.Module) -> list[str]:
    """The biases of ``module`` that a rule zeroes."""
    if isinstance(module, nn.RNNBase):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("bias")]
    name = "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias"
    return [name] if isinstance(getattr(module, name, None), Tensor) else []


def _fits(spec: dict[str, Any], module: nn.Module) -> bool:
    """Whether the rule can fill ``module``: ``zero_gamma`` any block, other schemes a
    module with weights, which the random schemes want of two or more dimensions."""
    if spec["scheme"] == "zero_gamma":
        return True
    weights = [getattr(module, name) for name, _ in weight_blocks(module)]
    return bool(weights) and (
        spec["scheme"] not in _RANDOM_SCHEMES or all(w.dim() >= 2 for w in weights)
    )


def _rule_for(
    names: list[str], module: nn.Module, rules: Mapping[Any, Any]
) -> tuple[Any, Any] | None:
    """The first rule whose key is the module's type or is found in one of its names, and
    that can fill the module (so a regex over a block passes its norm layers on to later
    rules)."""
    for key, spec in rules.items():
        matches = (isinstance(key, type) and isinstance(module, key)) or (
            isinstance(key, str) and any(re.search(key, name) for name in names)
        )
        if matches and _fits(spec, module):
            return key, spec
    return None


def initialize(
    model: nn.Module, rules: Mapping[Any, Rule], generator: torch.Generator | int | None = None
) -> InitReport:
    """Initialise ``model``'s modules by rule; return what was applied where.

    Each module (``named_modules`` order) takes the first rule whose key is its type (a
    module class, or its import path such as ``"torch.nn.Linear"``, as a YAML config
    writes it) or a regular expression found in its name (in any of its names, for a
    module held under two), and that can fill it: the random schemes pass over a weight
    of one dimension (a norm layer's scale, which a zero-mean draw would all but switch
    off), so ``{"encoder": {"scheme": "trunc_normal", "std": 0.02}, nn.LayerNorm: "ones"}``
    reaches the encoder's norm layers with the second rule. The
    scheme fills the module's ``weight`` and zeroes its ``bias``; a recurrent layer's
    (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) input and hidden weights gate by gate, and
    ``nn.MultiheadAttention``'s query, key and value projections one by one (its
    ``out_proj`` is an ``nn.Linear`` with rules of its own); see :func:`weight_blocks`.
    An embedding's ``padding_idx`` row stays zero, as it never trains; a tensor that
    two modules share (tied weights) is filled once, by the first one's rule.
    A rule is a scheme name or a dict
    ``{"scheme": ..., **options}`` with options ``nonlinearity`` (kaiming/xavier gain;
    inferred from the activation that follows the module in an ``nn.Sequential`` or an
    ``nn.RNN``'s own, else ``"relu"`` for kaiming and ``"linear"`` for xavier), ``gain``,
    ``negative_slope``,
    ``std`` (normal, trunc_normal, uniform), ``cutoff`` (trunc_normal bounds, in stds),
    ``bound`` (uniform). ``zeros``/``ones`` on a matrix feeding a nonlinearity is allowed
    with a warning: every unit of the layer then stays identical. ``zero_gamma`` (Goyal et
    al. 2017) is meant for residual blocks: it zeroes the scale of the *last*
    normalisation layer inside each matching module, after every other rule, so each
    residual branch starts as the identity.

    Args:
        model: the network.
        rules: module type or name regex -> rule.
        generator: seed or generator, so a seed gives the same weights on any machine.

    Raises:
        ValueError: for an unknown scheme or a scale-less normal/uniform rule.
        TypeError: for a rule key that is neither a module class nor a string.
    """
    report, unused = _initialize(model, rules, generator)
    for key, spec in unused.items():
        scheme = spec["scheme"]
        why = (
            f" (`{scheme}` is random: it fills weights of two or more dimensions, not the "
            "scale of a norm layer)"
            if scheme in _RANDOM_SCHEMES
            else ""
        )
        warnings.warn(
            f"initialize: the rule {key!r} matched no module with a weight it can fill{why}",
            stacklevel=2,
        )
    return report


def _initialize(
    model: nn.Module,
    rules: Mapping[Any, Rule],
    generator: torch.Generator | int | None,
    only: set[str] | None = None,
) -> tuple[InitReport, dict[Any, dict[str, Any]]]:
    """:func:`initialize` restricted to the modules named in ``only``; also returns the rules
    (keys resolved to classes where they name one) that matched nothing."""
    specs = check_rules(rules)
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else generator)
    activations = _following_activation(model)
    report, used = InitReport(), set()
    last_norms: dict[str, tuple[nn.Module, Any]] = {}
    # Each weight tensor filled, with its name and rule (the tensor kept, so that the id
    # of a parametrized weight, computed afresh at each access, is never reused).
    filled: dict[int, tuple[Tensor, str, Any]] = {}
    # A module held under two names (``self.backbone = self.body``) answers to both.
    aliases = names_by_identity(model.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for name, module in model.named_modules():
            match = _rule_for(aliases[id(module)], module, specs)
            if match is None or (only is not None and name not in only):
                continue
            key, spec = match
            if spec["scheme"] == "zero_gamma":
                norms = [(n, m) for n, m in module.named_modules() if isinstance(m, _NORMS)]
                if norms and isinstance(getattr(norms[-1][1], "weight", None), Tensor):
                    inner, norm = norms[-1]
                    last_norms[f"{name}.{inner}".strip(".")] = (norm, key)
                continue
            used.add(key)
            nonlinearity = activations.get(
                name, "relu" if spec["scheme"].startswith("kaiming") else "linear"
            )
            for parameter, blocks in weight_blocks(module):
                weight, label = getattr(module, parameter), _joined(name, parameter)
                _, tied, tied_key = filled.setdefault(id(weight), (weight, label, key))
                if tied != label:  # tied weights: one tensor, filled once
                    if tied_key != key:
                        warnings.warn(
                            f"initialize: {label} is {tied} (tied weights), filled by the "
                            f"rule {tied_key!r}, not by {key!r}",
                            stacklevel=3,
                        )
                    continue
                if (
                    spec["scheme"] in ("zeros", "ones")
                    and weight.dim() >= 2
                    and name in activations
                ):
                    warnings.warn(
                        f"`{spec['scheme']}` on {label}, which feeds a {activations[name]}: every "
                        "unit of the layer gets the same gradient and stays identical",
                        stacklevel=3,
                    )
                drawn = _drawn(module, weight, blocks, spec, nonlinearity, generator)
                if store_weight(module, parameter, drawn.to(weight), name):
                    _record(report, name, parameter, spec["scheme"], drawn)
            _zero_biases(report, name, module)
        # After the other rules, so a rule for the norm layers' own class cannot undo it.
        for name, (norm, key) in last_norms.items():
            used.add(key)
            norm.weight.zero_()
            _record(report, name, "weight", "zero_gamma", norm.weight)
            _zero_biases(report, name, norm)
    return report, {key: spec for key, spec in specs.items() if key not in used}


def _drawn(
    module: nn.Module,
    weight: Tensor,
    blocks: int,
    spec: dict[str, Any],
    nonlinearity: str,
    generator: torch.Generator,
) -> Tensor:
    """A draw of the rule for ``weight`` of ``module``, block by block, on the CPU (same
    seed, same weights anywhere); half precision in float32, which torch's CPU kernels
    (the QR of orthogonal) all take."""
    precision = torch.float32 if weight.dtype in HALF_PRECISION else weight.dtype
    drawn = torch.empty(weight.shape, dtype=precision)
    for block in drawn.chunk(blocks):
        _apply(block, spec, nonlinearity, generator)
    padding = getattr(module, "padding_idx", None)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and padding is not None:
        drawn[padding] = 0  # as torch leaves it: the padding row never trains
    return drawn


def store_weight(module: nn.Module, parameter: str, value: Tensor, name: str = "") -> bool:
    """Make ``value`` the module's ``parameter`` where the module keeps it.

    A parametrized weight (``torch.nn.utils.parametrizations.weight_norm``,
    ``spectral_norm``, ``orthogonal``) is computed at each access, so writing to it would
    change nothing: it is assigned, through the parametrization's right inverse. The older
    hook-based ``weight_norm`` and ``spectral_norm`` recompute the weight before each
    forward pass from their raw tensors, which are set as well.

    Args:
        module: the layer.
        parameter: the weight's name in ``module``.
        value: the weight, on the module's device.
        name: the module's name in the model, for the warning.

    Returns:
        ``False``, with a warning, for a parametrization without a right inverse, which
        leaves no way to set the weight.
    """
    if parametrize.is_parametrized(module, parameter):
        try:
            setattr(module, parameter, value)
        except RuntimeError as err:  # "parametrization ... does not implement right_inverse"
            warnings.warn(f"left {_joined(name, parameter)} as it was: {err}")
            return False
        return True
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) != parameter:
            continue
        if isinstance(hook, _WeightNormHook):
            getattr(module, f"{parameter}_g").copy_(torch.norm_except_dim(value, 2, hook.dim))
            getattr(module, f"{parameter}_v").copy_(value)
        elif isinstance(hook, SpectralNormHook):
            getattr(module, f"{parameter}_orig").copy_(value)
    getattr(module, parameter).copy_(value)
    return True


def _record(report: InitReport, module: str, parameter: str, scheme: str, value: Tensor) -> None:
    report.applied.append(
        Applied(module, parameter, scheme, float(value.std()) if value.numel() > 1 else 0.0)
    )


def _zero_biases(report: InitReport, name: str, module: nn.Module) -> None:
    for parameter in _biases(module):
        getattr(module, parameter).zero_()
        report.applied.append(Applied(name, parameter, "zeros", 0.0))


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` took from the source and what it initialised afresh.

    Attributes:
        loaded: model keys filled from the source.
        missing: model keys the source lacks.
        unexpected: source keys (after ``key_map``) the model lacks.
        mismatched: keys present in both with different shapes, as
            ``(key, source shape, model shape)``.
        reinitialized: modules initialised afresh because they own a missing or
            mismatched parameter.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mismatched = [f"{k} {tuple(a)} -> {tuple(b)}" for k, a, b in self.mismatched]
        return "\n".join(
            f"{title:14s} {len(keys):4d}  {', '.join(keys)}"
            for title, keys in (
                ("loaded", self.loaded),
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("mismatched", mismatched),
                ("reinitialized", self.reinitialized),
            )
        )


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    key_map: Mapping[str, str] | None = None,
    strict: bool = False,
    rules: Mapping[Any, Rule] | None = None,
    generator: torch.Generator | int | None = None,
) -> PretrainedReport:
    """Load the pretrained tensors that fit ``model``; initialise the rest afresh.

    A path is read with ``torch.load(..., weights_only=True)`` (no code runs from the
    file), or as a ``.safetensors`` file, the Hugging Face Hub's format (needs the
    ``safetensors`` package: the ``pretrained`` extra); a Lightning checkpoint's
    ``"state_dict"`` is used when present. Keys are renamed by ``key_map`` (regex ->
    replacement, applied in order with ``re.sub``, e.g. ``{"^model\\.": ""}``); then the
    names that wrappers add are matched up on either side: ``_orig_mod.``
    (``torch.compile``) anywhere and a leading ``module.`` (DDP, ``DataParallel``), so
    weights saved from a compiled or wrapped model load into a plain one and back. A
    source of which nothing loads gets a warning. Every module that owns a missing or
    shape-mismatched parameter is initialised by ``rules`` (its own
    ``reset_parameters()`` when no rule matches it), then whatever the source does
    provide is loaded, so no parameter keeps stale values.

    Args:
        model: the network to fill.
        source: a path to a saved state dict or checkpoint, or a state dict.
        key_map: regex -> replacement applied to the source's keys.
        strict: raise unless every key matches in name and shape.
        rules: initialisation rules (see :func:`initialize`) for what is not loaded.
        generator: seed or generator of that initialisation.

    Raises:
        TypeError: when ``source`` is not a path or a mapping of tensors.
        ValueError: under ``strict`` when any key is missing, unexpected or mismatched.
    """
    state = _read_state(source)
    for pattern, replacement in (key_map or {}).items():
        state = {re.sub(pattern, replacement, key): value for key, value in state.items()}
    own = model.state_dict()
    own_by_plain_name = {_unwrapped(key): key for key in own}
    state = {
        key if key in own else own_by_plain_name.get(_unwrapped(key), key): value
        for key, value in state.items()
    }
    report = PretrainedReport()
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            report.loaded.append(key)
    report.missing = [key for key in own if key not in state]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(
            f"load_pretrained(strict=True): the source does not fit the model\n{report}"
        )
    parameters = dict(model.named_parameters())
    stale = [key for key in report.missing + [m[0] for m in report.mismatched] if key in parameters]
    owners = sorted({key.rpartition(".")[0] for key in stale})
    if owners:
        ruled, _ = _initialize(model, rules or {}, generator, only=set(owners))
        ruled_modules = {a.module for a in ruled.applied}
        modules = dict(model.named_modules())
        for owner in owners:
            if owner not in ruled_modules:
                reset = getattr(modules[owner], "reset_parameters", None)
                if reset is None:
                    warnings.warn(
                        f"load_pretrained: {owner or type(model).__name__} has no rule and no "
                        "reset_parameters(); its unloaded parameters keep their values",
                        stacklevel=2,
                    )
                    continue
                reset()
        report.reinitialized = owners
    model.load_state_dict({key: state[key] for key in report.loaded}, strict=False)
    if state and not report.loaded:
        warnings.warn(
            f"load_pretrained: none of the source's {len(state)} tensors fits the model: its "
            f"names begin {list(state)[:2]}, the model's {list(own)[:2]}; give `key_map` "
            "to rename them",
            stacklevel=2,
        )
    return report


def _read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file (the Hugging Face Hub's format)."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(
            f"reading {os.fspath(path)} needs the safetensors package: "
            "pip install 'lightning-landscape[pretrained]'"
        ) from err
    return load_file(path, device="cpu")


def _unwrapped(key: str) -> str:
    """A state-dict key without the names that wrappers add to it: torch.compile's
    anywhere, DDP's and DataParallel's ``module.`` at the front."""
    key = uncompiled_name(key)
    while key.startswith("module."):
        key = key.removeprefix("module.")
    return key


def _read_state(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".safetensors"):
        source = _read_safetensors(source)
    elif isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(source, Mapping) and isinstance(source.get("state_dict"), Mapping):
        source = source["state_dict"]  # a Lightning checkpoint
    if not isinstance(source, Mapping) or not all(isinstance(v, Tensor) for v in source.values()):
        raise TypeError(
            "`source` must be a path to a saved state dict or a mapping of names to tensors, "
            f"got {type(source).__name__}"
        )
    return dict(source)


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
    output (its first tensor, for a tuple or dict such as ``(logits, features)``), so the
    backward signal does not depend on a loss. With unit-scale inputs a
    healthy network keeps both stds within ``[vanishing, exploding]``; flags:
    ``"vanishing activations"``, ``"exploding activations"``, ``"vanishing gradients"``,
    ``"exploding gradients"``, ``"saturating"`` for a layer feeding a tanh or sigmoid with
    outputs of std above ``saturation`` (the units sit on the flat tails), and
    ``"symmetric"`` for a weight matrix whose rows are all equal (a constant
    initialisation: its units can never differ). ``.grad``, the RNG and BatchNorm
    statistics are left as they were, and compiled submodules run eagerly, compiling
    nothing.

    Args:
        model: the network.
        inputs: the model's input (a tensor, or a tuple of positional inputs).
        vanishing: std below which a signal counts as vanished.
        exploding: std above which a signal counts as exploded.
        saturation: std of the input of a tanh or sigmoid above which it saturates.
        seed: seed of the backward signal and of dropout.
    """
    activations = _following_activation(model)
    layers = [(n, m) for n, m in model.named_modules() if weight_blocks(m)]
    outputs: dict[str, Tensor | None] = {}
    handles = [  # a recurrent or attention layer's output is a tuple: its first tensor
        module.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, first_tensor(out))
        )
        for name, module in layers
    ]
    buffers = [b.clone() for b in model.buffers()]
    try:
        with forked_rng(device_of(model), seed), torch.enable_grad(), compiled_run_eagerly():
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            result = first_tensor(model(*args))  # (logits, features), a dict: the first
            if result is None:
                raise TypeError("signal_report: the model's output holds no tensor")
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
        if _has_identical_units(module):
            flags.append("symmetric")
        report.append(LayerSignal(uncompiled_name(name), act, grad_std, flags))
    return SignalReport(report)


def _has_identical_units(module: nn.Module) -> bool:
    """Whether one of the module's weight matrices (a gate's, for a recurrent layer) has all
    its rows equal."""
    for parameter, blocks in weight_blocks(module):
        weight = getattr(module, parameter).detach()
        if weight.dim() < 2 or weight.shape[0] <= blocks:
            continue
        if any(bool((block == block[:1]).all()) for block in weight.chunk(blocks)):
            return True
    return False


def _output_variance(model: nn.Module, args: tuple[Any, ...], layer: nn.Module) -> float | None:
    """The variance of ``layer``'s output when ``model`` runs on ``args`` (its first tensor,
    for a tuple); ``None`` when the pass does not call ``layer``."""
    captured: list[Tensor | None] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(first_tensor(out)))
    try:
        model(*args)
    finally:
        handle.remove()
    return float(captured[0].var()) if captured and captured[0] is not None else None


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
    rescalings each), the model running in its current mode. A layer whose weight the pass
    uses without calling it (``nn.MultiheadAttention``'s ``out_proj``) stays orthogonal,
    with a warning. BatchNorm statistics and the RNG are left as they were, and compiled
    submodules run eagerly, compiling nothing.

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
    uncalled = []
    try:
        with torch.no_grad(), forked_rng(device_of(model), None), compiled_run_eagerly():
            for name, module in weighted:
                variance = _output_variance(model, args, module)
                if variance is None:
                    uncalled.append(uncompiled_name(name))
                    continue
                for _ in range(max_iter):
                    if abs(variance - 1) < tol or variance == 0:
                        break
                    rescaled = module.weight / math.sqrt(variance)
                    if not store_weight(module, "weight", rescaled, name):
                        break
                    variance = _output_variance(model, args, module)
                variances[uncompiled_name(name)] = variance
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    if uncalled:
        warnings.warn(
            f"lsuv: {', '.join(uncalled)} left orthogonal, not rescaled: the forward pass uses "
            "their weight without calling them (as nn.MultiheadAttention does its out_proj), "
            "so their output cannot be seen",
            stacklevel=2,
        )
    return variances
