"""Tests of the exo adapter. Those that need legacy exo use the `exo` fixture / marker and skip without it."""

from __future__ import annotations

import pytest

from exo_rknpu.exo import exo_importable

EXO_OK, EXO_WHY = exo_importable()
needs_exo = pytest.mark.skipif(not EXO_OK, reason=EXO_WHY or "legacy exo is not importable")
