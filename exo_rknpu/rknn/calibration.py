"""Real activations for verification and w8a8 calibration: run the model on the CPU (numpy backend) over a
text and record the inputs every slice receives, at every shape bucket.

Captures happen at the smallest context bucket that holds the text; `repad` moves a capture to a larger
context bucket exactly (zero cache rows that the mask hides), so every (seq, ctx) bucket gets real data.
"""

from __future__ import annotations

import hashlib

import numpy as np

from exo_rknpu.backends.base import get_backend
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.slices.spec import MASK_VALUE, Buckets, SliceSpec

from exo_rknpu.slices.calibration_text import CALIBRATION_TEXT, HELDOUT_TEXT  # noqa: F401  (re-exported)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def repad(inputs: dict[str, np.ndarray], ctx: int) -> dict[str, np.ndarray]:
    """The same layer-slice call at a larger context bucket: extra cache rows are zero and masked out."""
    old = inputs["past_k"].shape[2]
    if ctx == old:
        return inputs
    if ctx < old:
        raise ValueError(f"cannot shrink a capture from context {old} to {ctx}")
    out = dict(inputs)
    for k in ("past_k", "past_v"):
        a = inputs[k]
        out[k] = np.concatenate([a, np.zeros(a.shape[:2] + (ctx - old,) + a.shape[3:], a.dtype)], axis=2)
    m = inputs["mask"]
    seq = m.shape[2]
    pad = np.full(m.shape[:3] + (ctx - old,), MASK_VALUE, m.dtype)
    out["mask"] = np.concatenate([m[..., :old], pad, m[..., old:]], axis=3)
    assert out["mask"].shape[3] == ctx + seq
    return out


def capture(full: ShardWeights, targets: list[SliceSpec], buckets: Buckets, token_ids: list[int],
            per_bucket: int = 4, decode_samples: int | None = None,
            cut: list[SliceSpec] | None = None) -> dict[str, dict[int, list[dict[str, np.ndarray]]]]:
    """Run `full` (layers 0..stop of the model, numpy backend) over `token_ids` once per seq bucket, feeding
    exactly that many tokens per call, and keep up to `per_bucket` input sets per (slice, seq) (`decode_samples`
    for seq 1, default `per_bucket`). `cut`: the slices of a placement plan; its layers are run as that plan cuts
    them (others one graph per layer).

    Returns {slice name: {seq: [inputs, ...]}} at the smallest context bucket.
    """
    want = {s.name for s in targets}
    got: dict[str, dict[int, list[dict[str, np.ndarray]]]] = {n: {} for n in want}

    recording = [True]  # off during the decode capture's history prefill (a padded call, not a sample)

    def observe(spec: SliceSpec, inputs: dict[str, np.ndarray], _outputs: dict[str, np.ndarray]) -> None:
        if spec.name not in want or not recording[0]:
            return
        first = next(iter(inputs.values()))
        seq = first.shape[1]
        lst = got[spec.name].setdefault(seq, [])
        if len(lst) < ((decode_samples or per_bucket) if seq == 1 else per_bucket):
            lst.append({k: np.array(v, copy=True) for k, v in inputs.items()})  # the runtime reuses cache arrays

    specs = None
    if cut is not None:
        split = {s.start: [c for c in cut if c.kind == "layers" and c.start == s.start] for s in cut if s.kind == "layers" and not s.whole}
        lr = full.layer_range
        specs = ([SliceSpec("embed")] if lr.is_first else []) + [
            c for i in range(lr.start, lr.stop) for c in split.get(i, [SliceSpec("layers", i, i + 1)])
        ] + ([SliceSpec("head")] if lr.is_last else [])
    runner = ShardRunner(full, get_backend("numpy"), buckets=buckets, layers_per_slice=1, on_slice=observe, specs=specs)
    try:
        ids = np.asarray(token_ids, np.int64)[None]
        max_tokens = buckets.context[0]
        for seq in buckets.seq:
            rid = f"calib-{seq}"
            pos = 0
            want_n = (decode_samples or per_bucket) if seq == 1 else per_bucket
            if seq == 1 and want_n > 1:
                # decode: the first step is position 0 (the first token carries the model's largest activations, and
                # without it in the ranges a decode run from the start clips them: measured 75 % agreement on
                # smollm2), then a short prefill so the other captured steps attend to a real history
                runner.forward(rid, ids[:, :1])
                pre = max(1, min(16, ids.shape[1] - want_n))
                recording[0] = False
                runner.forward(rid, ids[:, 1:pre])
                recording[0] = True
                pos = pre
            while pos + seq <= min(ids.shape[1], max_tokens) and len(got[targets[0].name].get(seq, [])) < want_n:
                runner.forward(rid, ids[:, pos : pos + seq])
                pos += seq
            runner.drop(rid)
    finally:
        runner.close()
    return got
