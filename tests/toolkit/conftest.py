"""Fixtures of the toolkit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import make_tiny_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 4-layer tiny llama, one per test module."""
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "m", n_layers=4)
