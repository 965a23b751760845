"""One benchmark run of one contender, in a process of its own: `python -m exo_rknpu.bench.worker < job.json`.

The process loads the model, runs one prefill of the given prompt ids and exactly `gen_tokens` greedy decode
steps (end-of-sequence ignored, as llama-bench does), then prints one JSON line (`RunFigures`) as the last line
of stdout. A process per run makes the peak resident memory that contender's alone: it is read from the kernel's
high-water mark of this process's address space (VmHWM), which a fresh `exec` starts from zero.

Exit status: 0 measured; 3 a library the contender needs is not installed (the JSON line says which); anything
else failed (stderr says why). Peers' libraries (torch, transformers, llama_cpp) are imported only here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exo_rknpu.errors import ExoRknpuError
from exo_rknpu.model.quant import DEFAULT_WEIGHTS

OURS = "exo-rknpu"
EXIT_MISSING = 3


@dataclass
class Job:
    """What to run; serialised as JSON on the worker's stdin."""

    contender: str  # OURS | "transformers" | "llama.cpp"
    model_path: str
    model_format: str  # "hf" | "gguf"
    prompt_ids: list[int]
    gen_tokens: int
    threads: int
    backend: str = "onnx"
    split: list[str] = field(default_factory=list)  # layer ranges as text, e.g. ["0-9", "10-29"]; [] = one shard
    weights: str = DEFAULT_WEIGHTS
    backend_dtype: str | None = None
    max_context: int | None = None
    layers_per_slice: int | None = None
    count_bytes: bool = True  # also count the weight bytes a decode step reads (ours: loads the weights again)
    placement: str | None = None  # ours: a placement plan (runtime/placement.py), inline or a .toml path
    emulate: bool = False  # ours: the plan's NPU devices may run on the CPU (--emulate)


@dataclass
class RunFigures:
    """What one run measured. ttft_s = prompt in -> first token out (load excluded); load_s = worker start
    (library imports included) -> model ready; decode figures cover the gen_tokens steps after the first token."""

    load_s: float
    ttft_s: float
    prefill_tok_s: float
    decode_s: float
    decode_tok_s: float
    peak_rss_mb: float
    weight_bytes_per_token: int | None
    token_ids: list[int]


class MissingLibrary(Exception):
    """A library this contender needs is not importable here."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: VmHWM (this address space only; ru_maxrss would also carry
    the parent's peak across the fork+exec that started us)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def require(*modules: str, why: str = "") -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingLibrary(f"{', '.join(missing)} not installed{why}")


def _figures(t0: float, t_ready: float, ttft: float, steps: list[float], n_prompt: int, ids: list[int],
             bytes_per_token: int | None) -> RunFigures:
    decode = sum(steps)
    return RunFigures(
        load_s=t_ready - t0,
        ttft_s=ttft,
        prefill_tok_s=n_prompt / ttft if ttft > 0 else 0.0,
        decode_s=decode,
        decode_tok_s=len(steps) / decode if decode > 0 else 0.0,
        peak_rss_mb=peak_rss_mb(),
        weight_bytes_per_token=bytes_per_token,
        token_ids=ids,
    )


# -- our runtime ---------------------------------------------------------------------------------------------
def shard_bytes_per_token(weights) -> int:
    """Weight bytes one decode step reads from a shard's `ShardWeights`: every layer tensor, the final norm and
    the head (the whole embedding matrix when tied), plus one embedding row for the lookup."""
    n = sum(lw.nbytes for lw in weights.layers.values())
    for a in (weights.final_norm, weights.lm_head):
        if a is not None:
            n += a.nbytes
    emb = weights.embed_tokens
    if emb is not None and emb is not weights.lm_head:
        n += emb.nbytes // emb.shape[0]
    return int(n)


def run_ours(job: Job, t0: float) -> RunFigures:
    import uuid

    from exo_rknpu.model.base import LayerRange, parse_split
    from exo_rknpu.model.loader import load_header
    from exo_rknpu.model.zoo import ModelSource
    from exo_rknpu.rknn.options import backend_options
    from exo_rknpu.runtime.pipeline import LocalRing, Timings
    from exo_rknpu.runtime.placement import PlacementPlan, default_buckets, open_plan, plan_shards
    from exo_rknpu.runtime.sampling import Sampler
    from exo_rknpu.backends.base import option_names

    src = ModelSource(Path(job.model_path).name, Path(job.model_path), job.model_format)  # type: ignore[arg-type]
    header = load_header(src)
    margs = header.args
    n = margs.num_hidden_layers
    ranges = parse_split(",".join(job.split), n) if job.split else [LayerRange.full(n)]
    # --threads is every contender's CPU thread count: it goes to our backend when that one takes threads
    threads = job.threads if "threads" in option_names(job.backend) else None
    opts = backend_options(job.backend, dtype=job.backend_dtype, threads=threads, model=src)
    rules = PlacementPlan.load(job.placement) if job.placement is not None else None
    buckets = default_buckets(margs, job.max_context)
    plans = plan_shards(rules, margs, ranges, job.backend, buckets, layers_per_slice=job.layers_per_slice,
                        weights=job.weights, npu_dtype=job.backend_dtype or "fp16", emulate=job.emulate)
    ring = LocalRing([open_plan(header, p, backend_options=opts) for p in plans])
    t_ready = time.perf_counter()
    timings = Timings()
    try:
        # no stop ids: exactly gen_tokens decode steps after the first token
        ids = list(ring.generate(uuid.uuid4().hex, job.prompt_ids, job.gen_tokens + 1, Sampler(), frozenset(), timings))
        out = _figures(t0, t_ready, timings.prefill_s, timings.decode_s, len(job.prompt_ids), ids, None)
    finally:
        ring.close()
    if job.count_bytes:  # after the RSS reading: the runner keeps no ShardWeights, so load them once more
        out.weight_bytes_per_token = ours_bytes_per_token(src, plans)
    return out


def ours_bytes_per_token(src, plans) -> int | None:
    """Decode-step weight bytes of our shards in the form their plans load (None when a plan runs its layers from
    compiled files and holds no layer weights)."""
    from exo_rknpu.model.loader import load_shard

    if not all(p.needs_layer_weights for p in plans):
        return None
    return sum(shard_bytes_per_token(load_shard(src, p.layer_range, p.weights)) for p in plans)


# -- Hugging Face transformers (torch, CPU, fp32) ---------------------------------------------------------------
def run_transformers(job: Job, t0: float) -> RunFigures:
    gguf = job.model_format == "gguf"
    require("torch", "transformers")
    if gguf:
        require("accelerate", why=" (transformers needs it to load a GGUF file)")
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job.threads)
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(str(Path(job.model_path).parent), gguf_file=Path(job.model_path).name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32)
    model.eval()
    t_ready = time.perf_counter()
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(input_ids=torch.tensor([job.prompt_ids]), use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t
        ids, steps = [tok], []
        for _ in range(job.gen_tokens):
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            steps.append(time.perf_counter() - t)
            ids.append(tok)
    result = _figures(t0, t_ready, ttft, steps, len(job.prompt_ids), ids, None)
    params = list(model.parameters())  # shared (tied) parameters appear once
    n = sum(p.numel() * p.element_size() for p in params)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():  # untied: the lookup reads one row, not the matrix
        n -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    result.weight_bytes_per_token = int(n)
    return result


# -- llama.cpp (llama-cpp-python) -------------------------------------------------------------------------------
def gguf_bytes_per_token(path: str) -> int:
    """Weight bytes llama.cpp reads per decode step from a GGUF, as stored: every tensor except the embedding
    (one row of it), or every tensor when the head is tied to the embedding (no output.weight)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    n = sum(int(t.n_bytes) for t in tensors.values())
    emb = tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in tensors:
        rows = int(emb.shape[-1])  # GGUF shapes are innermost-first: [hidden, vocab]
        n -= int(emb.n_bytes) - int(emb.n_bytes) // rows
    return n


def run_llama_cpp(job: Job, t0: float) -> RunFigures:
    if job.model_format != "gguf":
        raise MissingLibrary("llama.cpp runs GGUF files only; this model is a Hugging Face folder")
    require("llama_cpp", why=" (pip install 'exo-rknpu[llamacpp]' builds it)")
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=job.model_path, n_ctx=len(job.prompt_ids) + job.gen_tokens + 1,
                          n_threads=job.threads, n_threads_batch=job.threads, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token(tokens: list[int]) -> int:
        llm.eval(tokens)
        # Llama.eval keeps no logits unless logits_all; read the last position's row from the context
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    t_ready = time.perf_counter()
    t = time.perf_counter()
    tok = next_token(job.prompt_ids)
    ttft = time.perf_counter() - t
    ids, steps = [tok], []
    for _ in range(job.gen_tokens):
        t = time.perf_counter()
        tok = next_token([tok])
        steps.append(time.perf_counter() - t)
        ids.append(tok)
    result = _figures(t0, t_ready, ttft, steps, len(job.prompt_ids), ids, None)
    llm.close()
    result.weight_bytes_per_token = gguf_bytes_per_token(job.model_path)  # after the RSS reading: it maps the file
    return result


CONTENDERS = {OURS: run_ours, "transformers": run_transformers, "llama.cpp": run_llama_cpp}


def main() -> int:
    t0 = time.perf_counter()
    job = Job(**json.loads(sys.stdin.read()))
    try:
        figures = CONTENDERS[job.contender](job, t0)
    except MissingLibrary as e:
        print(json.dumps({"missing": str(e)}))
        return EXIT_MISSING
    except ExoRknpuError as e:  # our own errors are one line already; anything else keeps its traceback
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
