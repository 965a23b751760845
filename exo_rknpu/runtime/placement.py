"""Which backend runs which slice.

`ShardRunner` takes one backend or a callable `SliceSpec -> Backend`; the helpers here build such callables.
"""

from __future__ import annotations

from typing import Callable

from exo_rknpu.backends.base import Backend
from exo_rknpu.slices.spec import SliceSpec


def fallback_placement(primary: Backend, fallback: Backend) -> Callable[[SliceSpec], Backend]:
    """`primary` for every slice it supports, `fallback` for the rest (e.g. the embedding lookup of npu/rknn-sim
    goes to onnx on the host CPU)."""

    def place(spec: SliceSpec) -> Backend:
        return primary if primary.supports(spec) else fallback

    place.primary, place.fallback = primary, fallback  # type: ignore[attr-defined]
    return place
