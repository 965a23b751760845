"""What `exo-rknpu bench` is asked to measure, checked before anything heavy happens (one-line errors)."""

from __future__ import annotations

from dataclasses import dataclass

from exo_rknpu.backends.base import BACKENDS, backends_taking, option_names
from exo_rknpu.config import usable_cpus
from exo_rknpu.errors import BenchError
from exo_rknpu.model.quant import DEFAULT_WEIGHTS, WEIGHT_MODES

# Peers `--compare` knows, by the name the user types.
PEERS = ("transformers", "llama.cpp")
COMPILED_DTYPES = ("fp16", "w8a8")


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark: our runtime on one backend/split/weights form, optionally against peers, `repeat` rounds."""

    model: str = "smollm2-135m"
    backend: str = "onnx"
    split: str | None = None
    weights: str = DEFAULT_WEIGHTS
    prompt_tokens: int = 128
    gen_tokens: int = 64
    threads: int | None = None  # None: usable_cpus()
    repeat: int = 3
    compare: tuple[str, ...] = ()
    backend_dtype: str | None = None
    max_context: int | None = None
    layers_per_slice: int | None = None
    timeout_s: float = 900.0
    placement: str | None = None  # a placement plan (runtime/placement.py), inline or a .toml path
    # requests in flight at once (in process): with placement pipelined vs serial; without, batched decode steps of
    # 1, 2, 4 .. N requests vs one after another
    concurrency: int | None = None
    emulate: bool = False  # with placement: NPU devices may run on the CPU where the NPU cannot run (else refused)

    @property
    def n_threads(self) -> int:
        return self.threads or usable_cpus()


def parse_compare(text: str | None) -> tuple[str, ...]:
    """"transformers,llama.cpp" -> ("transformers", "llama.cpp"); unknown names are refused."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise BenchError(f"--compare {text!r}: unknown peer {', '.join(unknown) or '(none)'}; known peers: {', '.join(PEERS)}")
    return names


def validate(o: BenchOptions) -> None:
    """Refuse options that cannot be measured, without touching the model. Model-dependent limits (split,
    context) are checked by the harness right after reading the model's config."""
    if o.backend not in BACKENDS:
        raise BenchError(f"unknown backend {o.backend!r}; known backends: {', '.join(sorted(BACKENDS))}")
    if o.weights not in WEIGHT_MODES:
        raise BenchError(f"unknown --weights {o.weights!r}; choose one of: {', '.join(WEIGHT_MODES)}")
    if o.backend_dtype is not None:
        if o.backend_dtype not in COMPILED_DTYPES:
            raise BenchError(f"unknown --backend-dtype {o.backend_dtype!r}; choose one of: {', '.join(COMPILED_DTYPES)}")
        if "dtype" not in option_names(o.backend):  # the rule of rknn/options.py: the backends taking a dtype
            raise BenchError(f"--backend-dtype applies to {' and '.join(backends_taking('dtype'))}, not {o.backend}")
    for name, value, high in (("--prompt-tokens", o.prompt_tokens, 1 << 20), ("--gen-tokens", o.gen_tokens, 1 << 20),
                              ("--threads", o.threads, 1024), ("--repeat", o.repeat, 1000),
                              ("--max-context", o.max_context, 1 << 24), ("--layers-per-slice", o.layers_per_slice, 4096)):
        optional = name in ("--threads", "--max-context", "--layers-per-slice")
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise BenchError(f"{name} must be an integer from 1 to {high}, got {value!r}")
    if o.emulate and o.placement is None:
        raise BenchError("--emulate runs a placement's NPU devices on the CPU; add --placement PLAN")
    if o.concurrency is not None:
        if isinstance(o.concurrency, bool) or not isinstance(o.concurrency, int) or not 1 <= o.concurrency <= 64:
            raise BenchError(f"--concurrency must be an integer from 1 to 64 (requests in flight at once), got {o.concurrency!r}")
        if o.placement is not None and o.concurrency < 2:
            raise BenchError("--concurrency with --placement pipelines requests over devices: give 2 to 64")
        if o.compare:
            raise BenchError("--concurrency compares batched or pipelined with one-at-a-time runs of our runtime; "
                             "drop --compare")
    if not o.timeout_s > 0:
        raise BenchError(f"--timeout must be > 0 seconds, got {o.timeout_s}")
    unknown = [p for p in o.compare if p not in PEERS]
    if unknown:
        raise BenchError(f"unknown peer {', '.join(unknown)}; known peers: {', '.join(PEERS)}")
