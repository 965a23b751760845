"""The exact logits of one forward pass, as sha256 digests, for comparing CPUs bit for bit
(scripts/arm64-emulation.sh runs it on x86 and on the emulated Cortex-A76): the prompt plus the given ids run as one
prefill on the onnx backend at --weights WEIGHTS (default native, which promises the same bits on every CPU), then
prints the native library's code path (exo_isa()), the digest of the last position's logits and of every position's.
ISA pins a narrower build of the native kernel (exo_rknpu.native.build: avx2, scalar, ...; default: this CPU's);
OUT.npy keeps the logits (float32, positions x vocabulary) for a comparison beyond the digests.

    python docs/perf/logits_digest.py MODEL "PROMPT" ID,ID,... [WEIGHTS [ISA [OUT.npy]]]   # ids: generate --json's
"""
import hashlib
import sys

import numpy as np

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_tokenizer
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.native.kernel import load
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets

model, prompt_text, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",") if x]
weights = sys.argv[4] if len(sys.argv) > 4 else "native"
isa = sys.argv[5] if len(sys.argv) > 5 else "native"
out = sys.argv[6] if len(sys.argv) > 6 else None
src = resolve_model(model)
n = load_args(src).num_hidden_layers
seq = load_tokenizer(src).encode(prompt_text) + ids
ring = LocalRing([open_shard(src, LayerRange.full(n), "onnx", Buckets(seq=(1, 64), context=(128,)), weights=weights,
                             backend_options={"use_cache": False, "native_isa": isa})])
logits = np.ascontiguousarray(ring.forward("r", np.array([seq]), logits="all")[0], dtype=np.float32)
if out:
    np.save(out, logits)
print(f"isa {load(isa).isa}; {weights} logits {logits.shape}: last {hashlib.sha256(logits[-1].tobytes()).hexdigest()[:16]}"
      f" all {hashlib.sha256(logits.tobytes()).hexdigest()[:16]}")
