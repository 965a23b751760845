"""The one way the launcher replaces a method of exo's classes (exo is changed in memory only, never edited)."""

from __future__ import annotations

from typing import Any, Callable


def replace_methods(cls: Any, *functions: Callable[..., Any]) -> None:
    """Set each function on `cls` under its own name: the method of exo's it replaces (the function's name is the
    method's, so a replacement cannot land under another name)."""
    for f in functions:
        if not hasattr(cls, f.__name__):
            raise AttributeError(f"{cls.__name__} has no method {f.__name__} to replace (another exo version?)")
        setattr(cls, f.__name__, f)


def add_methods(cls: Any, *functions: Callable[..., Any]) -> None:
    """Give `cls` methods exo's class lacks (each under its own name); one it already has is an error."""
    for f in functions:
        if hasattr(cls, f.__name__):
            raise AttributeError(f"{cls.__name__} already has {f.__name__}: replace_methods is for exo's own methods")
        setattr(cls, f.__name__, f)
