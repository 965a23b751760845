"""Greedy tokens and logits of a model under --weights auto / int4 / fp32 on this CPU: run it on two machines and
compare the outputs (docs/performance.md, "Same answers on every CPU"). Here: x86-64 natively (earlier sessions' was
AVX2-only; this session's has AVX-512 and AMX), an AVX2-only x86-64 as `qemu-x86_64-static -cpu Haswell-noTSX
PYTHON docs/perf/isa_check.py ...`, and aarch64 as a Cortex-A76 under qemu-user in the root
scripts/arm64-emulation.sh makes.

    python docs/perf/isa_check.py MODEL.gguf OUT_PREFIX     # writes OUT_PREFIX.json and OUT_PREFIX-<weights>.npy
"""
import json, platform, sys
import numpy as np
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.sampling import Sampler
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets

model, out = sys.argv[1], sys.argv[2]
src = resolve_model(model)
n = load_args(src).num_hidden_layers
prompt = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]
res = {"machine": platform.machine()}
for w in ("auto", "int4", "fp32"):
    mk = lambda: LocalRing([open_shard(src, LayerRange.full(n), "onnx", Buckets(seq=(1, 16), context=(64,)), weights=w,
                                       backend_options={"threads": 1, "use_cache": False})])
    logits = mk().forward("r", np.array([prompt]), logits="all")
    toks = list(mk().generate("g", prompt, 24, Sampler()))
    np.save(f"{out}-{w}.npy", logits)
    res[w] = toks
    print(w, toks, flush=True)
json.dump(res, open(f"{out}.json", "w"))
