"""How close a greedy run is to flipping, on this CPU: the prompt plus its greedy tokens run as one prefill at
--weights auto and fp32 (the same real-number model for GGUF Q4_0/Q4_1/Q8_0 files, summed in another order by
other kernels), then the narrowest top-2 logit margin along the path and the largest logit difference between the
two forms. A summation-order change moves logits by about the latter; it flips a greedy token only where a margin
is smaller (docs/design.md#weights).

    python docs/perf/greedy_margins.py MODEL "PROMPT" ID,ID,...     # ids: the greedy tokens (generate --json)
"""
import sys

import numpy as np

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_tokenizer
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets

model, prompt_text, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
src = resolve_model(model)
n = load_args(src).num_hidden_layers
prompt = load_tokenizer(src).encode(prompt_text)
seq = prompt + ids
logits = {}
for w in ("auto", "fp32"):
    ring = LocalRing([open_shard(src, LayerRange.full(n), "onnx", Buckets(seq=(1, 64), context=(128,)), weights=w,
                                 backend_options={"threads": 1, "use_cache": False})])
    logits[w] = ring.forward("r", np.array([seq]), logits="all")[0]
positions = range(len(prompt) - 1, len(seq) - 1)
for w, lg in logits.items():
    top2 = np.sort(lg[list(positions)], axis=-1)[:, -2:]
    on_path = all(int(np.argmax(lg[p])) == seq[p + 1] for p in positions)
    print(f"{w}: narrowest top-2 margin {float(np.min(top2[:, 1] - top2[:, 0])):.4f}; argmax follows the given ids: {on_path}")
print(f"largest |auto - fp32| logit difference {float(np.max(np.abs(logits['auto'] - logits['fp32']))):.2e}")
