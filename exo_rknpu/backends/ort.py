"""The onnx backend: onnxruntime on the CPU, running the ONNX graphs built by slices/onnx_export.py."""

from __future__ import annotations

import os

import numpy as np

from exo_rknpu.errors import BackendUnavailableError
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.onnx_export import build_onnx, per_layer_cache_names
from exo_rknpu.slices.spec import Buckets, SliceSpec

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - onnxruntime is a dependency, but say so plainly if it is missing
    ort = None
    _IMPORT_ERROR = e


class OrtRunner:
    def __init__(self, session: "ort.InferenceSession", n_cache_layers: int) -> None:
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]
        self.n_cache_layers = n_cache_layers

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.n_cache_layers:
            inputs = dict(inputs)
            for name in ("past_k", "past_v"):
                stacked = inputs.pop(name)  # [n,kv,C,hd]: stacked[i] is a contiguous view, handed over without a copy
                inputs.update({n: stacked[i : i + 1] for i, n in enumerate(per_layer_cache_names(name, self.n_cache_layers))})
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class OrtBackend:
    """One session per slice with symbolic S/C dims, so every bucket shares one graph and one copy of weights."""

    name = "onnx"
    kv_layout = "seq"  # see slices/spec.py
    static_shapes = False
    layers_per_slice: int | None = None  # the whole shard in one graph: fewest calls
    needs_layer_weights = True  # builds its graphs from the weights

    def __init__(self, threads: int | None = None) -> None:
        if ort is None:
            raise BackendUnavailableError(f"onnxruntime is not installed ({_IMPORT_ERROR}); pip install onnxruntime")
        self.threads = threads or (os.cpu_count() or 1)

    def supports(self, spec: SliceSpec) -> bool:
        return spec.blocks == ("attn", "mlp")

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> OrtRunner:
        # the split form avoids copying the cache; a transposed ("dim") cache is written in the NPU's sdpa form
        form = "split" if spec.kv_layout == "seq" else "sdpa"
        model = build_onnx(spec, weights, attention_form=form, per_layer_cache=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return OrtRunner(session, spec.n_layers)
