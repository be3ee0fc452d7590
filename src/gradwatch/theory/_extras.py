"""Optional dependencies, imported only when a feature needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import an optional module, or say which gradwatch extra installs it.

    Args:
        module: Dotted module name, e.g. ``"scipy.optimize"``.
        extra: The extra that provides it, e.g. ``"theory"``.

    Returns:
        The imported module.

    Raises:
        ImportError: With the ``pip install 'gradwatch[extra]'`` line to run.

    Example:
        >>> require("math", "theory").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        raise ImportError(
            f"{top} is needed here but is not installed: pip install 'gradwatch[{extra}]'"
        ) from err
