"""CPU time per decode step, ours (default weights, onnx) and llama.cpp (llama-cpp-python), one thread each, alternating
in one process: `time.process_time` per greedy step after a 32-token prompt, so the shared machine's load moves it
little (wall-clock tok/s on a busy 2-core machine mostly measures the other jobs).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/perf/cpu_vs_llama.py MODEL GEN ROUNDS

MODEL is an alias or a .gguf; GEN steps per round; ROUNDS alternate which contender goes first. The `exo-rknpu`
program sets that tunable itself (cli/main.py); this script does not go through it, so set it to measure what the
program runs -- and know that it moves llama.cpp too where llama.cpp repacks weights into its own memory (Q4_0).
"""
import sys, time, os
import numpy as np
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.runtime.sampling import Sampler
from llama_cpp import Llama

model, gen, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
src = resolve_model(model)
args = load_args(src)
sh = open_shard(src, LayerRange.full(args.num_hidden_layers), "onnx", backend_options={"threads": 1})
gguf = str(src.path)  # llama.cpp reads the same file
llm = Llama(model_path=gguf, n_threads=1, n_threads_batch=1, n_ctx=256, verbose=False, logits_all=False)
prompt = list(range(100, 132))
ours, theirs = [], []
def run_ours():
    s = Sampler(); tok = s(sh.forward("p", np.asarray([prompt], np.int64), "last")); out = [tok]
    t = time.process_time()
    for _ in range(gen):
        tok = s(sh.forward("p", np.asarray([[tok]], np.int64), "last")); out.append(tok)
    ours.append((time.process_time() - t) / gen * 1000); sh.drop("p"); return out
def run_llama():
    llm.reset(); llm.eval(prompt); tok = int(np.argmax(llm.scores[llm.n_tokens - 1])); out = [tok]
    t = time.process_time()
    for _ in range(gen):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1])); out.append(tok)
    theirs.append((time.process_time() - t) / gen * 1000); return out
loads = []
for r in range(rounds):
    loads.append(os.getloadavg()[0])
    a, b = (run_ours, run_llama) if r % 2 == 0 else (run_llama, run_ours)
    a(); b()
o, l = np.median(ours), np.median(theirs)
print(f"{model}: load {min(loads):.1f}-{max(loads):.1f}; ours {o:.1f} ms/step {sorted(round(v,1) for v in ours)}; "
      f"llama.cpp {l:.1f} ms/step {sorted(round(v,1) for v in theirs)}; CPU ratio (llama/ours) {l/o:.2f}x")
