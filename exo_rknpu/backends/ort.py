"""The onnx backend: onnxruntime on the CPU, running the ONNX graphs built by slices/onnx_export.py.

Linear weights arrive compact (QTensor) and run through onnxruntime's weight-only kernel MatMulNBits; the proto
holds the graph only, and weights are handed over as OrtValues (`add_external_initializers`), so no protobuf size
limit applies. onnxruntime packs each weight into its kernel's layout when the session is created; the shard then
drops its own copy (ShardRunner releases the weights after prepare), so the packed copy is the one that stays.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exo_rknpu.backends.numpy_ref import NumpyRunner
from exo_rknpu.backends.prepared import CacheVersion, PreparedCache, prepared_key
from exo_rknpu.config import Paths, usable_cpus
from exo_rknpu.errors import BackendUnavailableError
from exo_rknpu.model.base import ModelArgs
from exo_rknpu.native.build import library as native_library, source_dir as native_sources
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.artifacts import exporter_version, slice_digest, spec_dict
from exo_rknpu.model.rope import cos_sin
from exo_rknpu.backends.base import declared_support
from exo_rknpu.slices.spec import PLACEMENT_BLOCKS, Buckets, SliceSpec, per_layer_cache_names, slice_kernels

if TYPE_CHECKING:  # annotations only: the loader is not imported with the backend
    from exo_rknpu.model.loader import ShardSource
    from exo_rknpu.model.weights import SourceStamp

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - onnxruntime is a dependency, but say so plainly if it is missing
    ort = None
    _IMPORT_ERROR = e

# A batched call of fewer rows than this, on a slice whose weights multiply float32 activations (--weights auto:
# MatMulNBits accuracy level 1, QTensor.kernel "fp32"), runs as one call per row. onnxruntime 1.32 has a one-row kernel for those weights
# that reads the 4-bit codes directly; from two rows on it widens the weights to float32 tile by tile and runs SGEMM
# (SQ4BitBlkDequantBForSgemm_CompFp32), a fixed cost that only larger batches repay. Measured (CPU time, 1 thread,
# docs/perf/batch_profile.py; MatMulNBits time of a batched step as a multiple of the lone step's): 1B shape Q4_0
# layers 2.37x at 2 rows, 2.59x at 4, 3.10x at 8, its head 1.95x, 2.09x, 2.39x; smollm2 layers 2.73x at 2, head
# 2.12x. So 2 rows cost more than two lone calls, 3 rows already less than three. Other weights (int8 activations,
# float32, the native kernel: each row's result is its lone result, and several rows share one read of the weights)
# batch from 2 rows on.
ROWS_APART = 3


class OrtRunner:
    """A session, or a prepared model file whose session opens when the shard calls `open` (or on the first call).

    Opening late matters for memory: by then the shard has released its own copy of the weights (ShardRunner
    drops each slice's layers after prepare), so onnxruntime's packed copy is never made next to it. Opening every
    session before any runs matters too: onnxruntime packs a session's 4-bit codes while the mapped codes it reads
    are resident, and a session that has run keeps the scales it read from its mapped file resident; opened one by
    one on first use, the last session's packing added its codes on top of every earlier slice's scales (the peak
    of `generate` on the 1B Q8_0 file: 1561 MiB, against 1470 opened together; docs/performance.md).

    In the "gqa" form (slices/onnx_export.py) each layer's GroupQueryAttention writes its new keys and values
    straight into the request's cache: the runner binds present_k.i to the memory of past_k.i (IO binding, by
    address, rebound only when the cache array changes), so a step copies no cache and allocates nothing but the
    layer state it returns. The slice's public contract is unchanged: it takes cos/sin/mask/past_k/past_v and returns
    k_new/v_new (the rows just written), except to a caller that hands over its cache itself (`run(...,
    cache_in_place=True)`, as the shard does): the rows are there already, and gathering them for the caller to
    scatter back was ~1 ms of a batched step of 8 requests on the 1B shape (docs/performance.md).

    A batched call (a decode step of B requests) with fewer than `rows_apart` rows runs as one call per row: see
    ROWS_APART. Each row's call is then the lone call, bit for bit.
    """

    def __init__(self, session: "ort.InferenceSession | Path", n_cache_layers: int, threads: int = 1,
                 form: str = "split", rotary: tuple[np.ndarray, np.ndarray] | None = None,
                 rows_apart: int = 0, custom_ops: Path | None = None, keep: object = None,
                 positions: "MaskPositions | None" = None) -> None:
        """custom_ops: the native library, registered with the session when it opens (a graph with QMatMul);
        keep: what the session's in-memory initializers point into (held as long as the runner);
        positions: the gqa form's reader of masks, shared by the backend's runners (MaskPositions)."""
        self.session: ort.InferenceSession | None = None
        self.model_file = session if isinstance(session, Path) else None
        self.output_names: list[str] = []
        self._state_inputs: tuple[str, ...] = ()  # the layer-state inputs [B, S, width] (`_run_options` reads S)
        if not isinstance(session, Path):
            self._adopt(session)
        self.threads = threads
        self.n_cache_layers = n_cache_layers
        self.cache_names = {name: per_layer_cache_names(name, n_cache_layers) for name in ("past_k", "past_v")}
        self.form = form
        self.rotary = rotary  # the gqa form's cos/sin tables [P, hd/2] by position
        self._binding: ort.IOBinding | None = None
        self._bound: dict[str, tuple] = {}  # gqa: what each cache input/output is bound to (address, shape)
        self._state_outputs: list[tuple[str, int]] = []  # gqa: the layer-state outputs [B,S,width]
        self._lock = threading.Lock()  # one IO binding per runner: one call at a time
        # onnxruntime's CPU arena keeps the largest workspace a call needed: MatMulNBits over more than one position
        # widens the weights to float32 tiles (MLAS SQ4BitGemm_CompFp32), and a 32-token prefill left 119 MiB in the
        # arenas of the 1B Q8_0 file for good. A call of several positions hands its arena's free chunks back when it
        # ends; one-position (decode) calls keep theirs, so a step allocates nothing new.
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.rows_apart = rows_apart
        self.custom_ops = custom_ops
        self._keep = keep
        self.positions = positions if positions is not None else MaskPositions()

    def _open(self) -> "ort.InferenceSession":
        if self.session is None:
            if self.model_file is None:
                raise RuntimeError("this onnx runner is closed")
            # onnxruntime maps weights.bin and packs each weight for its kernel
            return self._adopt(ort.InferenceSession(str(self.model_file), session_options(self.threads, self.custom_ops),
                                                    providers=["CPUExecutionProvider"]))
        return self.session

    def _adopt(self, session: "ort.InferenceSession") -> "ort.InferenceSession":
        """Run `session` from now on; what the calls read of its signature is read here, once."""
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]
        self._state_inputs = tuple(i.name for i in session.get_inputs() if len(i.shape) == 3)
        return session

    def open(self) -> None:
        self._open()

    def run(self, inputs: dict[str, np.ndarray], cache_in_place: bool = False) -> dict[str, np.ndarray]:
        rows = batch_rows(inputs)
        if 1 < rows < self.rows_apart:
            return join_rows([self._run_call(row_of(inputs, b), cache_in_place) for b in range(rows)])
        return self._run_call(inputs, cache_in_place)

    def _run_call(self, inputs: dict[str, np.ndarray], cache_in_place: bool) -> dict[str, np.ndarray]:
        session = self._open()
        if self.form == "gqa" and self.n_cache_layers:
            with self._lock:
                return self._run_gqa(session, inputs, cache_in_place)
        if self.n_cache_layers:
            inputs = dict(inputs)
            for name, names in self.cache_names.items():
                # [n,kv,C,hd], or [n,B,kv,C,hd] for a batch of requests: layer i is a contiguous view, not copied
                stacked = inputs.pop(name)
                inputs.update({n: stacked[i] if stacked.ndim == 5 else stacked[i : i + 1] for i, n in enumerate(names)})
        return dict(zip(self.output_names, session.run(None, inputs, self._run_options(inputs))))

    def _run_gqa(self, session: "ort.InferenceSession", inputs: dict[str, np.ndarray],
                 cache_in_place: bool) -> dict[str, np.ndarray]:
        """One call of the gqa form: positions from the mask, caches extended in place when they hold the new rows;
        k_new/v_new returned unless those caches are the caller's own (`cache_in_place`)."""
        caches = {name: inputs[name] if inputs[name].ndim == 5 else inputs[name][:, None] for name in self.cache_names}
        n, b, _, capacity, _ = caches["past_k"].shape
        seq = inputs["mask"].shape[2]
        past, seqlens, total_length = self.positions(inputs["mask"], capacity)
        total = int(total_length)
        io = self._io(session)
        state = {k: v for k, v in inputs.items() if k not in ("cos", "sin", "mask", "past_k", "past_v")}
        for name, arr in state.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        io.bind_cpu_input("seqlens_k", seqlens)
        io.bind_cpu_input("total_sequence_length", total_length)
        grown = total > capacity  # a padded chunk running past the bucket: in place in a grown copy, this call only
        for name, stacked in caches.items():
            if grown:
                copy = np.zeros((n, b, stacked.shape[2], total, stacked.shape[4]), np.float32)
                copy[:, :, :, :capacity] = stacked
                caches[name] = stacked = copy
            self._bind_cache(io, self.cache_names[name], stacked)
        outputs = {name: np.empty((b, seq, width), np.float32) for name, width in self._state_outputs}
        for name, arr in outputs.items():  # ours, not onnxruntime's (it would reuse one buffer for every call)
            io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        session.run_with_iobinding(io, self._run_options(inputs))
        if cache_in_place and not grown:  # the caller's cache holds the new rows already
            return outputs
        for name, out in (("past_k", "k_new"), ("past_v", "v_new")):
            outputs[out] = written_rows(caches[name], past, seq, batched=inputs[name].ndim == 5)
        return outputs

    def _run_options(self, inputs: dict[str, np.ndarray]) -> "ort.RunOptions | None":
        """Arena shrinkage for a call of more than one position (its layer-state inputs [B, S, width] have S > 1)."""
        return self._shrink if any(inputs[name].shape[1] > 1 for name in self._state_inputs if name in inputs) else None

    def _io(self, session: "ort.InferenceSession") -> "ort.IOBinding":
        if self._binding is None:
            self._binding = session.io_binding()
            self._state_outputs = [(o.name, o.shape[2]) for o in session.get_outputs() if not o.name.startswith("present_")]
            assert self.rotary is not None, "the gqa form needs its rotary tables"
            for name, table in zip(("cos_cache", "sin_cache"), self.rotary):
                self._binding.bind_cpu_input(name, table)
        return self._binding

    def _bind_cache(self, io: "ort.IOBinding", names: list[str], stacked: np.ndarray) -> None:
        """Bind layer i of `stacked` [n,B,kv,C,hd] as input names[i] and as its present_* output: the same memory,
        which GroupQueryAttention then extends in place. By address, rebound only when the array changed."""
        assert stacked[0].flags.c_contiguous and stacked.dtype == np.float32, "caches are contiguous float32 per layer"
        whole = (stacked.__array_interface__["data"][0], stacked.shape, stacked.strides)
        if self._bound.get(names[0] + "*") == whole:  # the same array as the last call: every layer is bound already
            return
        shape, step = list(stacked.shape[1:]), stacked.strides[0]
        self._bound[names[0] + "*"] = whole
        for i, name in enumerate(names):
            key = (whole[0] + i * step, *shape)
            if self._bound.get(name) != key:
                io.bind_input(name, "cpu", 0, np.float32, shape, key[0])
                io.bind_output(name.replace("past_", "present_", 1), "cpu", 0, np.float32, shape, key[0])
                self._bound[name] = key

    def close(self) -> None:
        self.session = self.model_file = self._binding = self._keep = None
        self._bound.clear()


def batch_rows(inputs: dict[str, np.ndarray]) -> int:
    """Requests in a call: a batched decode step's inputs hold one row per request on axis 0, its caches
    [n,B,kv,C,hd] on axis 1; a lone call's are 1 and [n,kv,C,hd]."""
    caches = inputs.get("past_k")
    if caches is not None:
        return caches.shape[1] if caches.ndim == 5 else 1
    return min((a.shape[0] for a in inputs.values() if a.ndim), default=1)


def row_of(inputs: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """Row b of a batched call's inputs, still batched (B = 1): views, nothing copied."""
    return {k: v[:, b : b + 1] if k in ("past_k", "past_v") else v[b : b + 1] for k, v in inputs.items()}


def join_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The outputs of one call per row as the batched call returns them: rows on axis 0, the new cache rows
    k_new/v_new [n*B,kv,S,hd] layer-major."""
    out = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if name in ("k_new", "v_new"):
            out[name] = np.stack(arrays, axis=1).reshape(-1, *arrays[0].shape[1:])
        else:
            out[name] = np.concatenate(arrays, axis=0)
    return out


class MaskPositions:
    """The gqa form's reading of a call's mask: each request's cached positions (`cached_positions`), its
    seqlens_k and total_sequence_length inputs; the last mask's are kept. Every attention slice of a step gets the
    same mask array (the shard's chunk), so a step of 8 slices reads it once instead of 8 times (each reading is a
    few numpy calls, ~50 us apiece between products that leave the caches cold: ~0.4 ms of a step of 8 requests on
    the 1B shape, docs/performance.md). Only a mask that cannot change is recognised by identity: a read-only array
    owning its memory (the shard's are: RequestCache.mask, ShardRunner._step_rows); others are read every call.
    One per backend, shared by its runners; a call reads `_last` once, so calls from several threads are safe."""

    def __init__(self) -> None:
        self._last: tuple | None = None  # (mask, capacity, past, seqlens_k, total_sequence_length)

    def __call__(self, mask: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(past [B] int, seqlens_k [B] int32, total_sequence_length int32 scalar) of `mask` [B,1,S,C+S]."""
        last = self._last
        if last is not None and last[0] is mask and last[1] == capacity:
            return last[2], last[3], last[4]
        seq = mask.shape[2]
        past = cached_positions(mask, capacity)
        seqlens, total = (past + (seq - 1)).astype(np.int32), np.array(int(past.max()) + seq, np.int32)
        if not mask.flags.writeable and mask.base is None:
            self._last = (mask, capacity, past, seqlens, total)
        return past, seqlens, total


def cached_positions(mask: np.ndarray, capacity: int) -> np.ndarray:
    """Cached positions each request of a call attends to, from its mask [B,1,S,C+S]: the runtime's masks
    (RequestCache.mask) show a prefix of the cache, causal over the new rows. Other masks are refused."""
    visible = mask[:, 0, 0, :capacity] == 0
    past = visible.sum(axis=-1)
    if not np.array_equal(visible, np.arange(capacity) < past[:, None]):
        raise ValueError("the gqa attention form takes masks that show a prefix of the cache (RequestCache.mask)")
    return past


def written_rows(cache: np.ndarray, past: np.ndarray, seq: int, batched: bool) -> np.ndarray:
    """The rows a call wrote into `cache` [n,B,kv,T,hd] at each request's positions past..past+seq, as a slice
    returns k_new: [n,kv,seq,hd] (one request) or [n*B,kv,seq,hd] layer-major (a batch)."""
    if not batched:
        return cache[:, 0, :, past[0] : past[0] + seq]
    n, b, kv, _, hd = cache.shape
    # one gather for every row: advanced indices on axes 1 and 3 (split by a slice) put their dims [B, seq] first
    rows = cache[:, np.arange(b)[:, None], :, past[:, None] + np.arange(seq)]  # [B, seq, n, kv, hd]
    return rows.transpose(2, 0, 3, 1, 4).reshape(n * b, kv, seq, hd)


def gqa_supported(args: ModelArgs) -> bool:
    """Whether onnxruntime's GroupQueryAttention takes this model's heads with rope inside it (its CPU kernel wants
    head_dim a multiple of 16 and whole groups of query heads per kv head)."""
    return args.head_dim % 16 == 0 and args.num_attention_heads % args.num_key_value_heads == 0


def native_layout() -> str:
    """Identity of the native kernel's packed layout, for the prepared-slice key: the source of its one writer
    (exo_rknpu/native/pack.py; the library that reads it is rebuilt from its own sources, build.py)."""
    return hashlib.sha256((native_sources() / "pack.py").read_bytes()).hexdigest()[:16]


def session_options(threads: int, custom_ops: Path | None = None) -> "ort.SessionOptions":
    """Our session options: `threads` intra-op threads, no spinning, and `custom_ops` (the native library, whose
    QMatMul runs --weights native) registered when given."""
    opts = ort.SessionOptions()
    if custom_ops is not None:
        opts.register_custom_ops_library(str(custom_ops))
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
    # on the 1B shape) and its own call per token. Counted at placement's bytes per weight (auto at its largest
    # form, quant.AUTO_MAX_BYTES_PER_WEIGHT): 2 layers of the Llama-3.2-1B shape per slice; 3 (at 256 MiB) raised the
    # first start's peak on its bf16 folder from 1440 to 1523 MiB.
    max_slice_bytes = 192 << 20
    blocks = frozenset(PLACEMENT_BLOCKS)  # every block, whole layers or parts of one, any shape

    def __init__(self, threads: int | None = None, cache_dir: Path | None = None, use_cache: bool = True,
                 fused_attention: bool = True, native_isa: str = "native") -> None:
        """fused_attention False keeps the "split" attention form (the reference for the fused one in tests);
        native_isa: the build of the native kernel that runs QMatMul (exo_rknpu.native.build.library: "native" for
        this CPU; tests pin narrower ones to show the answers do not depend on it)."""
        if ort is None:
            raise BackendUnavailableError(f"onnxruntime is not installed ({_IMPORT_ERROR}); pip install onnxruntime")
        self.threads = threads or usable_cpus()  # inter-op stays 1: the graph is a chain
        # prepared slices are kept on disk (backends/prepared.py) and mapped on the next start; what no start of
        # this version can use is pruned here, before any slice is looked up (at most once a day: one stat mostly)
        self.cache = None
        if use_cache:
            version = CacheVersion(exporter_version(), ort.__version__, native_layout())
            self.cache = PreparedCache(cache_dir or Paths.from_env().prepared, version)
            self.cache.prune_if_due()
        self.fused_attention = fused_attention
        self.native_isa = native_isa
        self._tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._positions = MaskPositions()  # shared by the runners: a step's slices read its mask once

    def supports(self, spec: SliceSpec) -> bool:
        return declared_support(self.blocks, spec)

    def reads_written_cache(self, spec: SliceSpec, args: ModelArgs) -> bool:
        """The gqa form does (GroupQueryAttention and the native Attention op attend over each request's seqlens_k + 1
        positions, in place: backends/ort.py OrtRunner); the split form attends over the whole capacity."""
        return self.attention_form(spec, args) == "gqa"

    def find_prepared(self, spec: SliceSpec, source: ShardSource, buckets: Buckets) -> OrtRunner | None:
        """The runner of a slice prepared earlier from `source`'s files and mode (found by its source key,
        backends/prepared.py), or None: then `prepare` builds it from the weights. The embedding is never found
        (it is a host-side lookup of the loaded table)."""
        if self.cache is None or spec.kind == "embed":
            return None
        form = self.attention_form(spec, source.args)
        found = self.cache.recall(self._source_key(spec, form, source.stamp))
        facts = {} if found is None else found.facts
        if found is None or not isinstance(facts.get("rows_apart"), int) or not isinstance(facts.get("native"), bool):
            return None  # (nothing filed, or a record of another format)
        rotary = self._rotary_tables(source.args, buckets) if form == "gqa" else None
        custom_ops = native_library(self.native_isa) if facts["native"] else None
        return OrtRunner(found.model_file, spec.cache_layers, self.threads, form, rotary, facts["rows_apart"], custom_ops,
                         positions=self._positions)

    def _key_parts(self, spec: SliceSpec, form: str) -> dict[str, object]:
        """The parts of a prepared slice's key that do not depend on its weights (`prepare`'s full key adds the
        weights digest and the native layout if its weights run on the native kernel; `_source_key` the stamp)."""
        # the exporter's version covers its sources, MatMulNBits' accuracy levels (onnx_export.py) included
        return {"slice": spec_dict(spec), "form": form, "exporter": exporter_version(), "onnxruntime": ort.__version__}

    def _source_key(self, spec: SliceSpec, form: str, stamp: SourceStamp) -> str:
        """The key a prepared slice is filed under by its sources (backends/prepared.py): the stamp instead of the
        weights digest, and the native layout always (whether the slice runs natively is known from its weights)."""
        return prepared_key(source=stamp.parts(), native=native_layout(), **self._key_parts(spec, form))

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> OrtRunner | NumpyRunner:
        if spec.kind == "embed":
            return NumpyRunner(spec, weights)  # a row gather: nothing for a session to do
        form = self.attention_form(spec, weights.args)
        rotary = self._rotary_tables(weights.args, buckets) if form == "gqa" else None
        kernels = slice_kernels(spec, weights)
        rows_apart = ROWS_APART if "fp32" in kernels else 0
        custom_ops = native_library(self.native_isa) if "native" in kernels else None
        opts = session_options(self.threads, custom_ops)
        model_file = None
        # float32 slices (--weights fp32, the reference) are not written to disk: they would be 8x the compact size
        cache = self.cache if kernels else None
        if cache is not None:
            key = prepared_key(weights=slice_digest(spec, weights), native=native_layout() if custom_ops else None,
                               **self._key_parts(spec, form))
            model_file = cache.lookup(key)
        if model_file is None:
            # onnx is imported only to build a slice: a prepared one opens without it (~15 MiB resident and a
            # second of start-up less)
            from exo_rknpu.slices.onnx_export import build_onnx_compact, materialize

            model, external = build_onnx_compact(spec, weights, attention_form=form)
            if cache is None:
                external = {name: materialize(a) for name, a in external.items()}
                if external:
                    opts.add_external_initializers(list(external), [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()])
                session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                # the packed native weights are used in place (no kernel copy), so they live as long as the session
                return OrtRunner(session, spec.cache_layers, form=form, rotary=rotary, rows_apart=rows_apart,
                                 custom_ops=custom_ops, keep=external if custom_ops else None, positions=self._positions)
            model_file = cache.store(key, model, external, native=custom_ops is not None)
        if cache is not None and weights.stamp is not None:  # weights straight from their sources: found by them next
            cache.remember(self._source_key(spec, form, weights.stamp), key,
                           {"rows_apart": rows_apart, "native": custom_ops is not None})
        return OrtRunner(model_file, spec.cache_layers, self.threads, form, rotary, rows_apart, custom_ops,
                         positions=self._positions)

    def attention_form(self, spec: SliceSpec, args: ModelArgs) -> str:
        """How a slice's attention is written (slices/onnx_export.py ATTENTION_FORMS): GroupQueryAttention extending
        the cache in place where onnxruntime's kernel takes the model's heads; else the split form, which does not
        copy the cache either but attends over the whole bucket."""
        return "gqa" if self.fused_attention and spec.has_attention and gqa_supported(args) else "split"

    def _rotary_tables(self, args: ModelArgs, buckets: Buckets) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin [P, hd/2] for every position a call can reach (the gqa form's tables), one pair per model."""
        positions = buckets.max_context + buckets.seq[-1]
        key = (args, positions)
        if key not in self._tables:
            cos, sin = cos_sin(args, np.arange(positions))
            half = args.head_dim // 2
            self._tables[key] = tuple(np.ascontiguousarray(t[0, 0, :, :half]) for t in (cos, sin))  # type: ignore[assignment]
        return self._tables[key]
