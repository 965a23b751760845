"""The numpy backend: evaluates slices/graph.py eagerly. Slow and readable; it shares slices/graph.py with the
onnx export, so it is not an independent check of the maths (transformers is: tests/ort/test_against_transformers.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.graph import NumpyOps, run_slice, slice_weights
from exo_rknpu.backends.base import declared_support
from exo_rknpu.slices.spec import PLACEMENT_BLOCKS, Buckets, SliceSpec

if TYPE_CHECKING:  # annotations only: the loader is not imported with the backend
    from exo_rknpu.model.loader import ShardSource


class NumpyRunner:
    def __init__(self, spec: SliceSpec, weights: ShardWeights) -> None:
        # keep only this slice's tensors, so the shard's other weights can be released after prepare
        self.spec, self.weights, self.ops = spec, slice_weights(spec, weights), NumpyOps()

    def run(self, inputs: dict[str, np.ndarray], cache_in_place: bool = False) -> dict[str, np.ndarray]:
        out = run_slice(self.ops, self.spec, self.weights, inputs)
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}

    def open(self) -> None:
        pass  # nothing to take: it runs from its weights

    def close(self) -> None:
        pass


class NumpyBackend:
    name = "numpy"
    processor = "cpu"
    kv_layout = "seq"  # see slices/spec.py
    static_shapes = False
    layers_per_slice: int | None = None  # the whole shard in one graph: fewest calls
    needs_layer_weights = True  # evaluates the slices from the weights
    float_weights = False  # widens compact weights on the fly
    batches = True  # NumpyOps broadcast over a leading batch dim
    max_slice_bytes = None
    blocks = frozenset(PLACEMENT_BLOCKS)  # every block, whole layers or parts of one, any shape

    def supports(self, spec: SliceSpec) -> bool:
        return declared_support(self.blocks, spec)

    def reads_written_cache(self, spec: SliceSpec, args: ModelArgs) -> bool:
        return False  # NumpyOps.attention masks over the whole capacity

    def find_prepared(self, spec: SliceSpec, source: ShardSource, buckets: Buckets) -> None:
        return None  # it keeps nothing prepared: its runners are the weights

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> NumpyRunner:
        return NumpyRunner(spec, weights)
