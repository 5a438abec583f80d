"""Choosing the parameters a measurement is taken over."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

ParamFilter = str | Sequence[str] | None

# torch.compile holds the module it compiles as ``_orig_mod``: a segment of every name below.
_COMPILED = re.compile(r"(?:^|(?<=\.))_orig_mod\.")


def uncompiled_name(name: str) -> str:
    """``name`` without the ``_orig_mod.`` segments that ``torch.compile`` adds to it."""
    return _COMPILED.sub("", name)


def select_parameters(
    model: nn.Module, params: ParamFilter = None
) -> list[tuple[str, nn.Parameter]]:
    """Return the ``(name, parameter)`` pairs selected by ``params``, in model order.

    Args:
        model: the module.
        params: ``None`` for every parameter with ``requires_grad``; otherwise a regular
            expression or a list of them, matched with ``re.search`` against parameter
            names (``"fc2"``, ``r"^encoder\\."``, ``["weight$"]``), every name a parameter
            is reachable under (a block also held as ``self.backbone``); it is returned by
            its first. Frozen parameters are never selected.

    Raises:
        TypeError: if ``params`` is neither ``None``, a string nor a sequence of strings.
        ValueError: if a pattern is invalid or nothing trainable is selected.
    """
    patterns = _compile(params)
    selected = [
        (name, p)
        for name, p, aliases in named_once(model)
        if p.requires_grad
        and (patterns is None or any(pat.search(n) for n in aliases for pat in patterns))
    ]
    if not selected:
        what = (
            "the model has no parameter with requires_grad"
            if params is None
            else (f"`params`={params!r} matches no trainable parameter")
        )
        raise ValueError(f"no parameters selected: {what}")
    return selected


def check_params(params: ParamFilter) -> None:
    """Validate a parameter filter before there is a model: its type and its patterns.

    Raises:
        TypeError: if ``params`` is neither ``None``, a string nor a sequence of strings.
        ValueError: if a pattern is not a valid regular expression.
    """
    _compile(params)


def check_matches(model: nn.Module, params: ParamFilter) -> None:
    """Raise when ``params`` names no parameter of ``model`` at all, a typo. Frozen
    parameters count: progressive fine-tuning unfreezes them later.

    Raises:
        ValueError: if no parameter name matches a pattern.
    """
    patterns = _compile(params)
    known = names_by_identity(model.named_parameters(remove_duplicate=False))
    names = [name for aliases in known.values() for name in aliases]
    if patterns is not None and not any(pat.search(n) for n in names for pat in patterns):
        raise ValueError(f"`params`={params!r} matches no parameter name of the model")


def names_by_identity(named: Iterable[tuple[str, object]]) -> dict[int, list[str]]:
    """Every name of each object (by ``id``) in ``named``, e.g. ``named_modules(
    remove_duplicate=False)``: a block also held as ``self.backbone`` has two, and one
    below a compiled module (``self.net = torch.compile(net)``) is also known without
    its ``_orig_mod.``, as the user names it."""
    names: dict[int, list[str]] = {}
    for name, value in named:
        every = names.setdefault(id(value), [])
        every += [n for n in dict.fromkeys((name, uncompiled_name(name))) if n not in every]
    return names


def named_once(model: nn.Module) -> list[tuple[str, nn.Parameter, list[str]]]:
    """Each parameter once, in model order, by its first name, with all its names."""
    aliases = names_by_identity(model.named_parameters(remove_duplicate=False))
    return [(name, p, aliases[id(p)]) for name, p in model.named_parameters()]


def real_view(tensor: Tensor) -> Tensor:
    """A complex tensor as its real coordinates, ``(re, im)`` along a last dimension of 2
    (``torch.view_as_real``); a real tensor as itself.

    Curvature is measured over real coordinates: a complex parameter counts as two real
    ones, as Adam's update and the gradient of a real loss already treat it.
    """
    return torch.view_as_real(tensor.resolve_conj()) if tensor.is_complex() else tensor


def _compile(params: ParamFilter) -> list[re.Pattern[str]] | None:
    if params is None:
        return None
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, Sequence) or not all(isinstance(p, str) for p in params):
        raise TypeError(
            "`params` must be None, a regular expression or a list of them, "
            f"got {type(params).__name__}"
        )
    try:
        return [re.compile(p) for p in params]
    except re.error as err:
        raise ValueError(f"`params` holds an invalid regular expression: {err}") from None
