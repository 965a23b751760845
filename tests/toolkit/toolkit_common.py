"""Shared by the toolkit tests: the skip marks (the reason names the command to run) and the buckets they compile."""

from __future__ import annotations

import pytest

from exo_rknpu.compiler import toolkit
from exo_rknpu.slices.spec import Buckets

_status = toolkit.status()
NEEDS_TOOLKIT = [pytest.mark.toolkit,
                 pytest.mark.skipif(not _status.ok, reason=f"rknn-toolkit2 environment missing ({_status.problem})")]
BUCKETS = Buckets(seq=(1, 16), context=(64, 128))
