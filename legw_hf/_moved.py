"""Old module names kept for one release after a move."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_moved_module(old: str, new: str) -> None:
    """Make the module ``old`` the module ``new`` (the same object, private names included), warning whoever
    imported the old name with a ``DeprecationWarning``."""
    warnings.warn(f"{old} moved to {new}; the old name goes in the next release", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
