"""Import the example scripts (they are projects to copy, not a package) and run them briefly."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def import_example(name: str) -> Any:
    """The module ``examples/<name>.py``."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


def run_example(name: str, out, *args: str) -> Any:
    """``examples/<name>.py``'s ``main`` on the given flags, logging below ``out``."""
    return import_example(name).main(["--out", str(out), *args])
