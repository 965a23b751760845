"""The backend interface and the name registry.

A backend answers capability questions (`supports`, like ggml's supports_op) and turns a slice plus its
weights into a `Runner`. Runners are called with the named inputs of slices/spec.py and return the named
outputs. Heavy runtimes (onnxruntime, rknnlite) are imported inside their own module, only when chosen.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from exo_rknpu.errors import BackendUnavailableError, UnsupportedSliceError
from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.spec import Buckets, KVLayout, SliceSpec

if TYPE_CHECKING:  # annotations only: the loader is not imported with the backend
    from exo_rknpu.model.loader import ShardSource


class Runner(Protocol):
    """A prepared slice."""

    def run(self, inputs: dict[str, np.ndarray], cache_in_place: bool = False) -> dict[str, np.ndarray]:
        """Inputs as named in slices/spec.py (float32, token ids int64), shapes from one bucket.

        An attention slice returns its new cache rows as k_new/v_new, which the caller stores. cache_in_place: the
        past_k/past_v handed over are the caller's cache itself (views, not copies; ShardRunner says so when they
        are), which keeps what a call writes into them: a runner that wrote its new rows there at each request's
        position may then leave k_new/v_new out (the onnx "gqa" form does; a step of 8 requests then gathers and
        scatters no cache rows). Runners that do not write into their inputs ignore it."""
        ...

    def open(self) -> None:
        """Take now what the first call would take (onnx: its session). ShardRunner calls it on every runner once
        each slice is prepared and the shard has let go of their weights, before any call."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Something that can run slices."""

    name: str
    processor: Literal["cpu", "npu"]  # what its slices compute on (rknn-sim: the NPU's compiled graphs, simulated)
    static_shapes: bool  # True: may only be called with bucket shapes it was prepared for
    # Read by the runtime (runtime/shard.py, runtime/placement.py); docs/backends.md lists them.
    kv_layout: KVLayout  # how its layer slices take the KV cache: "seq" [n, kv, C, hd] or "npu" (float16 NPU form)
    layers_per_slice: int | None  # layers per graph when the user does not say (None: the whole shard in one graph)
    # False: prepare() runs layer and head slices from compiled files and never reads weights.layers,
    # final_norm or lm_head, so the loader leaves them out (load_shard(layers=False)). Default True.
    needs_layer_weights: bool
    float_weights: bool  # True: builds from float32 weights (a compiler's input); --weights auto loads fp32 for it
    max_slice_bytes: int | None  # with layers_per_slice None: layers per slice keep each slice's weights under this
    # True: its runners take a batch of B requests' single-token steps in one call (ShardRunner.forward_batch):
    # inputs with a leading dim B, caches [n_layers, B, kv, C, hd], k_new/v_new [n_layers*B, ...] layer-major.
    # False: the steps run one after another.
    batches: bool
    # Read by the placement planner (runtime/placement.py) before anything loads:
    blocks: frozenset[str]  # placement blocks it can run (slices/spec.py PLACEMENT_BLOCKS); `supports` agrees

    def supports(self, spec: SliceSpec) -> bool:
        """Can this backend run this slice at all? Whole layers or a run of one layer's parts (SliceSpec.parts),
        the embedding, the head; every block the slice computes must be in `blocks` (see `declared_support`)."""
        ...

    def reads_written_cache(self, spec: SliceSpec, args: ModelArgs) -> bool:
        """Whether attention slice `spec` reads only the cache positions each request has written, so its cost does
        not grow with the cache's capacity: then the shard's KV pool reserves the largest context up front and never
        grows (runtime/cache.py KVPool). False: it attends over the whole capacity (masked), and the pool grows with
        its requests (a reserved one would make every step attend over the largest context)."""
        ...

    def find_prepared(self, spec: SliceSpec, source: ShardSource, buckets: Buckets) -> Runner | None:
        """What runs `spec`, found from a slice it prepared earlier from `source`'s files and weights mode, before
        any weight is loaded; or None (then ShardRunner loads the slice's weights and calls `prepare`). The onnx
        backend's prepared-slice cache answers it; the others answer None."""
        ...

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> Runner:
        """Build (or load) what runs `spec` for every bucket in `buckets`."""
        ...


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str
    cls: str
    summary: str


# name -> where it lives; imported on demand so `import exo_rknpu` never needs a runtime.
BACKENDS: dict[str, BackendInfo] = {
    "numpy": BackendInfo("numpy", "exo_rknpu.backends.numpy_ref", "NumpyBackend", "plain numpy reference (widens compact weights on the fly)"),
    "onnx": BackendInfo("onnx", "exo_rknpu.backends.ort", "OrtBackend", "onnxruntime on the CPU (MatMulNBits int4/int8 weights)"),
    "npu": BackendInfo("npu", "exo_rknpu.rknn.npu", "NpuBackend", "RK3588 NPU via rknn-toolkit-lite2 (board only)"),
    "rknn-sim": BackendInfo("rknn-sim", "exo_rknpu.rknn.sim", "RknnSimBackend", "rknn-toolkit2 simulator (toolkit venv)"),
}


def get_backend(name: str, **options) -> Backend:
    """Instantiate a backend by name; unknown names list the known ones."""
    return backend_class(name)(**options)


def declared_support(blocks: frozenset[str], spec: SliceSpec) -> bool:
    """A slice is supported when every placement block it computes is one the backend declares."""
    return spec.placement_blocks <= blocks


def backend_class(name: str) -> type:
    """The class of a registered backend (its declared attributes, read before anything is instantiated)."""
    info = BACKENDS.get(name)
    if info is None:
        raise BackendUnavailableError(f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    try:
        module = importlib.import_module(info.module)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported here: {e}") from e
    return getattr(module, info.cls)


def option_names(name: str) -> set[str]:
    """The keyword options a registered backend takes (its constructor's parameters)."""
    return set(inspect.signature(backend_class(name).__init__).parameters) - {"self", "args", "kwargs"}


def backends_taking(option: str) -> list[str]:
    """The registered backends that take keyword option `option` (e.g. dtype: the compiled ones), sorted."""
    return [n for n in sorted(BACKENDS) if option in option_names(n)]


def require_support(backend: Backend, spec: SliceSpec) -> None:
    if not backend.supports(spec):
        raise UnsupportedSliceError(f"backend {backend.name!r} does not support slice {spec.name!r}")
