"""Argument parsing shared by the subcommands: one-line errors and typed, range-checked option values.

Every check here is cheap (no model, no runtime): bad input is refused before anything heavy happens.
Checks that need the model's own limits (its context length) are made from its config, before its weights load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `exo-rknpu: error: ...`, instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"exo-rknpu: error: {message} (see: {self.prog} --help)\n")


def _number(kind: type, name: str, ok: Callable[[float], bool]) -> Callable[[str], int | float]:
    """An argparse `type` that parses `kind` and refuses values for which `ok` is false, naming what is allowed."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                             f"expected {name}") from None
        if not ok(value) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {name}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: 0 < v < float("inf"))
non_negative_float = _number(float, "a finite number >= 0", lambda v: 0 <= v < float("inf"))
probability = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)

unit_interval = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
