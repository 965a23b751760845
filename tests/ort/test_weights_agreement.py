"""Teacher-forced top-1 agreement of the compact CPU paths with float32 on the bundled smollm2-135m, over a
held-out text (tests/data/heldout.txt, written for this test; nothing was tuned on it). Prints the table that
docs/design.md quotes; run with -s to see it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_tokenizer
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets

pytestmark = pytest.mark.slow

TEXT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"
MIN_AGREEMENT = {"auto": 0.90, "int8": 0.90, "int4": 0.50}


def test_int8_and_int4_agree_with_float32_on_held_out_text():
    src = resolve_model("smollm2-135m")
    ids = load_tokenizer(src).encode(TEXT.read_text())
    buckets = Buckets(seq=(1, 16, 64), context=(512,))
    predictions = {}
    for mode in ("fp32", *MIN_AGREEMENT):
        runner = open_shard(src, LayerRange.full(30), "onnx", buckets, weights=mode)
        predictions[mode] = runner.forward("text", np.array([ids]), logits="all")[0, :-1].argmax(-1)
        runner.close()
    agreement = {m: float(np.mean(p == predictions["fp32"])) for m, p in predictions.items() if m != "fp32"}
    print(f"\nteacher-forced top-1 agreement with fp32 over {len(ids)} tokens: "
          + ", ".join(f"{m} {a:.1%}" for m, a in agreement.items()))
    for mode, least in MIN_AGREEMENT.items():
        assert agreement[mode] >= least, (mode, agreement)
