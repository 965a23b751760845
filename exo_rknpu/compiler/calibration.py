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
from exo_rknpu.slices.spec import MASK_VALUE, Buckets, SliceSpec, to_kv_layout

# Calibration text (never used to measure accuracy). Plain prose on mixed topics.
CALIBRATION_TEXT = (
    "The river had been rising for three days when the village council finally met in the old school hall. "
    "Maria, who kept the records, read out the figures: the water was two metres above its usual level, and "
    "the forecast promised more rain from the mountains. Some farmers wanted to open the sluice gates at once; "
    "others feared that the lower fields, already planted with barley, would be ruined. In the end they agreed "
    "to move the animals to higher ground and to watch the bridge through the night.\n\n"
    "A compiler translates a program written in one language into another, usually lower-level, language. "
    "Modern compilers work in stages: the front end parses the source text and checks its types, the middle "
    "end rewrites an intermediate representation to make it faster, and the back end chooses machine "
    "instructions and assigns registers. Each stage can be tested on its own, which is why large compilers "
    "remain maintainable despite their size.\n\n"
    "To bake a simple loaf, mix 500 grams of flour with 10 grams of salt, 7 grams of dried yeast and 350 "
    "millilitres of warm water. Knead the dough for ten minutes, let it rise for an hour, shape it, and bake it "
    "at 220 degrees Celsius for about 35 minutes, until the crust is brown and the loaf sounds hollow. "
    "Questions people often ask: Why did the bread not rise? Was the water too hot? How long should it rest?"
)

# Held-out text for end-to-end agreement measurements (never used for calibration).
HELDOUT_TEXT = (
    "The lighthouse keeper wrote in his log every evening, even when nothing had happened. On the fourth of "
    "November he noted a ship far to the west, a strong wind from the south, and a flock of geese flying low "
    "over the water. His daughter, who was learning to read, liked to copy the entries into her own notebook, "
    "changing the words she did not understand into drawings of boats and birds.\n\n"
    "Photosynthesis is the process by which plants, algae and some bacteria turn light into chemical energy. "
    "Chlorophyll absorbs mostly blue and red light and reflects green, which is why leaves look green to us. "
    "The light reactions split water and release oxygen; the Calvin cycle then uses the energy stored in ATP "
    "and NADPH to fix carbon dioxide into sugars that the plant uses to grow.\n\n"
    "When you plan a trip by train across Europe, check whether you need seat reservations, because many "
    "high-speed and night trains require them even with a rail pass. Travel light, keep a paper copy of your "
    "tickets, and leave at least an hour between connections at large stations. A good map and a little "
    "patience make most problems easy to solve, and the views from the window are usually worth the delays."
)


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
            per_bucket: int = 4) -> dict[str, dict[int, list[dict[str, np.ndarray]]]]:
    """Run `full` (layers 0..stop of the model, numpy backend) over `token_ids` once per seq bucket, feeding
    exactly that many tokens per call, and keep up to `per_bucket` input sets per (slice, seq).

    Returns {slice name: {seq: [inputs, ...]}} at the smallest context bucket.
    """
    want = {s.name for s in targets}
    got: dict[str, dict[int, list[dict[str, np.ndarray]]]] = {n: {} for n in want}

    def observe(spec: SliceSpec, inputs: dict[str, np.ndarray], _outputs: dict[str, np.ndarray]) -> None:
        if spec.name not in want:
            return
        first = next(iter(inputs.values()))
        seq = first.shape[1]
        lst = got[spec.name].setdefault(seq, [])
        if len(lst) < per_bucket:
            lst.append({k: np.array(v, copy=True) for k, v in inputs.items()})  # the runtime reuses cache arrays

    runner = ShardRunner(full, get_backend("numpy"), buckets=buckets, layers_per_slice=1, on_slice=observe)
    try:
        ids = np.asarray(token_ids, np.int64)[None]
        max_tokens = buckets.context[0]
        for seq in buckets.seq:
            # seq 1 is decode: a short prefill first, so the captured steps attend to a real history
            rid = f"calib-{seq}"
            pos = 0
            if seq == 1:
                pre = min(16, ids.shape[1] - per_bucket)
                runner.forward(rid, ids[:, :pre])
                pos = pre
            while pos + seq <= min(ids.shape[1], max_tokens) and len(got[targets[0].name].get(seq, [])) < per_bucket:
                runner.forward(rid, ids[:, pos : pos + seq])
                pos += seq
            runner.drop(rid)
    finally:
        runner.close()
    return got


class ModelCalibration:
    """Calibration activations for backends that quantize (rknn-sim w8a8), as the compiler captures them.

    A callable `(spec, weights, buckets, seq, ctx) -> [inputs, ...]`: on first use it runs the whole model
    (numpy, CPU) over `text` for `buckets` — the same `capture` as `exo-rknpu compile --dtype w8a8` — and hands out
    the samples of one slice at one bucket (repadded to `ctx`). Lives here, above the backends, because capture
    needs the runtime; the backend only receives the callable.
    """

    def __init__(self, model, text: str = CALIBRATION_TEXT) -> None:
        self.model, self.text = model, text
        self._got: dict[tuple, dict[str, dict[int, list[dict[str, np.ndarray]]]]] = {}

    def __call__(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets, seq: int, ctx: int | None) -> list[dict[str, np.ndarray]]:
        from exo_rknpu.model.base import LayerRange
        from exo_rknpu.model.loader import load_shard, load_tokenizer, resolve_model
        from exo_rknpu.slices.spec import plan_slices

        key = (buckets.seq, buckets.context)
        if key not in self._got:
            src = resolve_model(self.model) if isinstance(self.model, str) else self.model
            n = weights.args.num_hidden_layers
            full = load_shard(src, LayerRange(0, n, n), weights="fp32")
            if full.fingerprint != weights.fingerprint:
                raise ValueError(f"calibration model {self.model!r} is not the model being run "
                                 f"(fingerprint {full.fingerprint[:12]}… vs {weights.fingerprint[:12]}…)")
            targets = [s for s in plan_slices(0, n, True, True, 1) if s.kind != "embed"]
            self._got[key] = capture(full, targets, buckets, load_tokenizer(src).encode(self.text))
        got = self._got[key].get(spec.name, {}).get(seq, [])
        return [to_kv_layout(repad(s, ctx), spec.kv_layout) if (spec.kind == "layers" and ctx) else s for s in got]
