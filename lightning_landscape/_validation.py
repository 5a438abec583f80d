"""Argument checks that name the argument and what is allowed."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import torch


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_callable(name: str, value: Any, call: str) -> Any:
    """Return ``value`` if it is ``None`` or callable; ``call`` shows how it is called."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be callable as {call}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool`` (a string such as ``"false"`` would be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value


#: What a monitor's ``name`` may hold: it becomes one level of its metric tags.
NAME_PATTERN = r"[\w.-]+"


def check_name(name: str, value: Any) -> str | None:
    """Return ``value`` if it is ``None`` or a non-empty run of letters, digits, ``_``,
    ``.`` and ``-``."""
    if value is not None and not (isinstance(value, str) and re.fullmatch(NAME_PATTERN, value)):
        raise ValueError(
            f"`{name}` must be None or letters, digits, '_', '.' and '-' (it becomes part of "
            f"the metric names), got {value!r}"
        )
    return value


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite real number greater than zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Collection[str]) -> str:
    """Return ``value`` if it is one of ``allowed``."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def check_device(name: str, value: Any) -> str | None:
    """Return ``value`` if it is ``None`` or a string naming a torch device (``"cpu"``)."""
    if value is None:
        return None
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`{name}` must be None or a device such as 'cpu', got {value!r}") from err
    return value
