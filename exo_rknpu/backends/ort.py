"""The onnx backend: onnxruntime on the CPU, running the ONNX graphs built by slices/onnx_export.py.

Linear weights arrive compact (QTensor) and run through onnxruntime's weight-only kernel MatMulNBits; the proto
holds the graph only, and weights are handed over as OrtValues (`add_external_initializers`), so no protobuf size
limit applies. onnxruntime packs each weight into its kernel's layout when the session is created; the shard then
drops its own copy (ShardRunner releases the weights after prepare), so the packed copy is the one that stays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exo_rknpu.backends.numpy_ref import NumpyRunner
from exo_rknpu.backends.prepared import PreparedCache, prepared_key
from exo_rknpu.config import Paths, usable_cpus
from exo_rknpu.errors import BackendUnavailableError
from exo_rknpu.model.quant import QTensor
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.artifacts import exporter_version, slice_digest, spec_dict
from exo_rknpu.slices.onnx_export import ACCURACY_FP32, ACCURACY_INT8, build_onnx_compact, per_layer_cache_names
from exo_rknpu.backends.base import declared_support
from exo_rknpu.slices.spec import PLACEMENT_BLOCKS, Buckets, SliceSpec

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - onnxruntime is a dependency, but say so plainly if it is missing
    ort = None
    _IMPORT_ERROR = e


class OrtRunner:
    """A session, or a prepared model file whose session opens on the first call.

    Opening late matters for memory: by then the shard has released its own copy of the weights (ShardRunner
    drops each slice's layers after prepare), so onnxruntime's packed copy is never made next to it.
    """

    def __init__(self, session: "ort.InferenceSession | Path", n_cache_layers: int, threads: int = 1) -> None:
        self.session: ort.InferenceSession | None = session if not isinstance(session, Path) else None
        self.model_file = session if isinstance(session, Path) else None
        self.output_names = [] if self.session is None else [o.name for o in self.session.get_outputs()]
        self.threads = threads
        self.n_cache_layers = n_cache_layers
        self.cache_names = {name: per_layer_cache_names(name, n_cache_layers) for name in ("past_k", "past_v")}

    def _open(self) -> "ort.InferenceSession":
        if self.session is None:
            if self.model_file is None:
                raise RuntimeError("this onnx runner is closed")
            # onnxruntime maps weights.bin and packs each weight for its kernel
            self.session = ort.InferenceSession(str(self.model_file), session_options(self.threads),
                                                providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self.session.get_outputs()]
        return self.session

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._open()
        if self.n_cache_layers:
            inputs = dict(inputs)
            for name, names in self.cache_names.items():
                # [n,kv,C,hd], or [n,B,kv,C,hd] for a batch of requests: layer i is a contiguous view, not copied
                stacked = inputs.pop(name)
                inputs.update({n: stacked[i] if stacked.ndim == 5 else stacked[i : i + 1] for i, n in enumerate(names)})
        return dict(zip(self.output_names, session.run(None, inputs)))

    def close(self) -> None:
        self.session = self.model_file = None


def _slice_tensors(spec: SliceSpec, weights: ShardWeights) -> list:
    if spec.kind == "layers":
        return [w for i in range(spec.start, spec.stop) for w in weights.layers[i].arrays().values()]
    return [weights.lm_head if spec.kind == "head" else weights.embed_tokens]


def session_options(threads: int) -> "ort.SessionOptions":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting between ops: a decode step is ~1000 tiny ops, and spinning workers steal the cores that the
    # other threads (and other processes of the ring) need; measured 6x slower decode with spinning on a busy host
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtBackend:
    """One session per layer slice with symbolic S/C dims, so every bucket shares one graph and one copy of weights.

    The embedding is looked up on the host from its compact rows (only the gathered rows are widened).
    """

    name = "onnx"
    processor = "cpu"
    kv_layout = "seq"  # see slices/spec.py
    static_shapes = False
    layers_per_slice: int | None = None  # chosen from max_slice_bytes by open_shard
    needs_layer_weights = True  # builds its graphs from the weights
    float_weights = False
    batches = True  # its graphs take a batch dim (slices/onnx_export.py OnnxOps.batch)
    # Layers per session are chosen so that one slice holds at most this many bytes of weights: while a slice is
    # prepared its compact weights and their onnx form (split8 copies) are in memory together, so this bounds the
    # load peak; sessions (which map the prepared weights and pack them one tensor at a time) open after every slice
    # is prepared. Fewer sessions cost less: each keeps its own arena of activations (measured ~5 MiB per session
    # on the 1B shape) and its own call per token.
    max_slice_bytes = 256 << 20
    blocks = frozenset(PLACEMENT_BLOCKS)  # every block, whole layers or parts of one, any shape

    def __init__(self, threads: int | None = None, cache_dir: Path | None = None, use_cache: bool = True) -> None:
        if ort is None:
            raise BackendUnavailableError(f"onnxruntime is not installed ({_IMPORT_ERROR}); pip install onnxruntime")
        self.threads = threads or usable_cpus()  # inter-op stays 1: the graph is a chain
        # prepared slices are kept on disk (backends/prepared.py) and mapped on the next start
        self.cache = PreparedCache(cache_dir or Paths.from_env().prepared) if use_cache else None

    def supports(self, spec: SliceSpec) -> bool:
        return declared_support(self.blocks, spec)

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> OrtRunner | NumpyRunner:
        if spec.kind == "embed":
            return NumpyRunner(spec, weights)  # a row gather: nothing for a session to do
        # the split form avoids copying the cache; a transposed ("dim") cache is written in the NPU's sdpa form
        form = "split" if spec.kv_layout == "seq" else "sdpa"
        opts = session_options(self.threads)
        model_file = None
        # float32 slices (--weights fp32, the reference) are not written to disk: they would be 8x the compact size
        cache = self.cache if any(isinstance(w, QTensor) for w in _slice_tensors(spec, weights)) else None
        if cache is not None:
            key = prepared_key(weights=slice_digest(spec, weights), slice=spec_dict(spec), form=form,
                               exporter=exporter_version(), accuracy=[ACCURACY_INT8, ACCURACY_FP32], onnxruntime=ort.__version__)
            model_file = cache.lookup(key)
        if model_file is None:
            model, external = build_onnx_compact(spec, weights, attention_form=form, per_layer_cache=True)
            if cache is None:
                if external:
                    opts.add_external_initializers(list(external), [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()])
                session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                return OrtRunner(session, spec.cache_layers)
            model_file = cache.store(key, model, external)
        return OrtRunner(model_file, spec.cache_layers, self.threads)
