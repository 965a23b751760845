"""OpenAI's `stop`: generation ends at the first occurrence of any stop string, and the answer's text ends just
before it (exo-free). The node that samples stops generating; the API node cuts the text and, when streaming, holds
back the end of the text that could still become a stop string."""

from __future__ import annotations

from typing import Callable, Sequence

TAIL_SLACK = 8  # tokens beyond the longest stop string's length in characters (tokens may decode to nothing)


def stop_index(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def tail_text(decode: Callable[[list[int]], str], tokens: Sequence[int], stops: Sequence[str]) -> str:
    """The text of the last tokens, enough of them to hold any stop string that the last token completed."""
    n = max(len(s) for s in stops) + TAIL_SLACK
    return decode(list(tokens[-n:]))


def visible_text(text: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """(the part of `text` that may be shown now, whether a stop string was reached). Unless `final`, an end of
    the text that is the beginning of a stop string is held back: the next token may complete it."""
    i = stop_index(text, stops)
    if i >= 0:
        return text[:i], True
    if final:
        return text, False
    hold = max((k for s in stops for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False
