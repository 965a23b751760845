"""Shared fixtures: tiny random models written to disk once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make tests/tiny_models.py importable everywhere

from tiny_models import make_tiny_hf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """5 layers (odd), GQA 4/2, untied head."""
    return make_tiny_hf(tmp_path_factory.mktemp("tiny_llama"), arch="llama", n_layers=5, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """3 layers, q/k/v biases, tied head."""
    return make_tiny_hf(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", n_layers=3, tied=True, seed=2)
