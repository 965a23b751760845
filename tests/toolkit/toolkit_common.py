"""Shared by the toolkit tests: the skip marks (the reason names the command to run), the buckets they compile and
greedy decoding through a ring."""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.rknn import toolkit
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.slices.spec import Buckets

_status = toolkit.status()
NEEDS_TOOLKIT = [pytest.mark.toolkit,
                 pytest.mark.skipif(not _status.ok, reason=f"rknn-toolkit2 environment missing ({_status.problem})")]
BUCKETS = Buckets(seq=(1, 16), context=(64, 128))


def greedy(ring: LocalRing, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits of every step (prefill 7 tokens crosses to seq bucket 16, then decode)."""
    toks, logits = [], []
    x = np.asarray([prompt], np.int64)
    for _ in range(n):
        lg = ring.forward("r", x)
        logits.append(lg[0, -1])
        toks.append(int(lg[0, -1].argmax()))
        x = np.asarray([[toks[-1]]], np.int64)
    ring.drop("r")
    return toks, logits
