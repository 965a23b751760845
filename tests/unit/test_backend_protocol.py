"""Every registered backend declares every attribute of the `Backend` protocol (the runtime reads them)."""

from __future__ import annotations

import importlib
import typing

import pytest

from exo_rknpu.backends.base import BACKENDS, Backend
from exo_rknpu.slices.spec import PLACEMENT_BLOCKS, KVLayout


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_class_declares_every_protocol_attribute(name):
    info = BACKENDS[name]
    try:
        cls = getattr(importlib.import_module(info.module), info.cls)
    except ImportError as e:
        pytest.skip(f"backend {name!r} cannot be imported here: {e}")
    attributes = typing.get_type_hints(Backend)
    assert set(attributes) >= {"name", "static_shapes", "kv_layout", "layers_per_slice", "blocks"}
    for attr in attributes:
        assert hasattr(cls, attr), f"{info.cls} lacks {attr!r}"
    for method in ("supports", "reads_written_cache", "find_prepared", "prepare"):
        assert callable(getattr(cls, method, None)), f"{info.cls} lacks {method}()"
    assert cls.name == name and cls.kv_layout in typing.get_args(KVLayout)
    assert cls.layers_per_slice is None or cls.layers_per_slice >= 1
    assert cls.blocks <= set(PLACEMENT_BLOCKS) and {"attention", "projections", "mlp", "norm"} <= cls.blocks
