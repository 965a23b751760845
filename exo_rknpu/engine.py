"""The async engine core behind the exo adapter: one loaded shard, per-request caches, one worker thread.

Nothing here imports exo. `exo_rknpu/exo/` converts exo's Shard into (model_id, LayerRange) and calls
`ShardEngine.ensure` / `ShardEngine.forward`; everything blocking (loading weights, preparing slices, running
them) happens on a dedicated single-thread executor, so the asyncio loop that serves gRPC health checks and
the HTTP API never waits on numpy, onnxruntime or the NPU.

Ordering guarantee: every blocking job goes through the same single-thread executor in submission order, so a
shard's runner is closed only after every forward that was submitted against it has finished.

Request lifecycle: a request is admitted on its first forward (or refused with CapacityError) and ends when the
caller releases it (finished, cancelled, failed), when it sits idle past RequestLimits.idle_seconds, or when the
shard changes. An ended request id is remembered with the reason, and any later step for it raises
RequestStateError naming that reason: a request never silently starts again at position 0.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from exo_rknpu.errors import (
    ArtifactError,
    BackendUnavailableError,
    ExoRknpuError,
    RequestStateError,
    ShardTooLargeError,
    TensorContractError,
    ToolkitMissingError,
    name_model,
)
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.quant import DEFAULT_WEIGHTS, check_mode
from exo_rknpu.model.tokenizer import Tokenizer
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.runtime.requests import RequestLimits, RequestLog
from exo_rknpu.runtime.shard import BatchStep, ShardRunner

if TYPE_CHECKING:  # the loader is imported where a shard loads
    from exo_rknpu.model.loader import ModelHeader

log = logging.getLogger(__name__)

T = TypeVar("T")
HiddenDtype = Literal["float32", "float16"]
HIDDEN_DTYPES: tuple[str, ...] = ("float32", "float16")

# (model_id, layer_range) -> where the model's files are (may download; async so exo's downloader fits).
SourceProvider = Callable[[str, LayerRange], Awaitable[ModelSource]]


@dataclass(frozen=True)
class EngineConfig:
    """How shards are run.

    hidden_dtype: dtype of the hidden states handed to the next node. float32 (default) keeps a neighbour
    bit-identical to an unsplit run on the same backend; float16 halves the bytes on the wire.
    logits: "all" returns (1, seq, vocab) as exo's engines do; "last" returns only (1, 1, vocab) (less work
    on long prompts; exo samples only the last row anyway).
    """

    backend: str = "onnx"
    hidden_dtype: HiddenDtype = "float32"
    limits: RequestLimits = RequestLimits()
    max_context: int | None = None
    layers_per_slice: int | None = None
    logits: Literal["all", "last"] = "all"
    backend_options: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # who is speaking in error messages (exo: the node id)
    weights: str = DEFAULT_WEIGHTS  # form of linear weights: auto | int4 | int8 | fp32 | native (model/quant.py)
    placement: str | None = None  # a placement plan (runtime/placement.py); each shard applies its own part
    emulate: bool = False  # the plan's NPU devices may run on the CPU backend where the NPU cannot run (else refused)
    # bytes a shard may keep on this node (weights + KV budget, `Holding.total`); a shard that needs more is refused
    # before its weights load (None: no check)
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype must be one of {HIDDEN_DTYPES}, got {self.hidden_dtype!r}")
        if self.logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {self.logits!r}")
        check_mode(self.weights)
        if self.placement is not None:
            from exo_rknpu.runtime.placement import PlacementPlan

            PlacementPlan.load(self.placement)  # a malformed plan fails here, before any model is loaded


@dataclass(frozen=True)
class ShardKey:
    model_id: str
    layer_range: LayerRange

    def __str__(self) -> str:
        return f"{self.model_id} layers {self.layer_range} of {self.layer_range.n_layers}"


@dataclass
class LoadedShard:
    key: ShardKey
    source: ModelSource
    args: ModelArgs
    runner: ShardRunner
    tokenizer: Tokenizer


def compile_hint(model: str, layer_range: LayerRange) -> str:
    return f"exo-rknpu compile --model {model} --layers {layer_range}"


def _model_ref(src: ModelSource | None) -> str | None:
    """How `exo-rknpu compile --model` should name this model: its alias if it has one, else its path."""
    if src is None:
        return None
    from exo_rknpu.model.zoo import ZOO

    return src.name if src.name in ZOO else str(src.path)


def open_runner(header: ModelHeader, layer_range: LayerRange, config: EngineConfig) -> ShardRunner:
    """Default loader: only `layer_range`'s weights, prepared as the configured backend and placement say (blocking).
    `header`: the model's, read once by the load (load_header)."""
    from exo_rknpu.runtime.placement import PlacementPlan, default_buckets, open_plan, plan_shards

    args = header.args
    plan, = plan_shards(PlacementPlan.load(config.placement) if config.placement else None, args, [layer_range],
                        config.backend, default_buckets(args, config.max_context),
                        layers_per_slice=config.layers_per_slice, weights=config.weights,
                        npu_dtype=config.backend_options.get("dtype", "fp16"), emulate=config.emulate)
    return open_plan(header, plan, config.limits, backend_options=config.backend_options,
                     progress=lambda msg: log.info("%s", msg))


@dataclass(frozen=True)
class Holding:
    """The bytes a shard keeps on this node: by the placement plan's estimates (runtime/placement.py spec_bytes at
    bytes_per_weight, what `explain` prints), or on the npu backend from the compiled slices' manifests
    (NpuBackend.resident_bytes: .rknn bytes and internal memory per slice, the host embedding, the KV cache)."""

    layers: tuple[int, ...]  # each decoder layer of the range, in order
    embed: int  # the embedding (first shard)
    head: int  # the final norm and head (last shard)
    kv: int  # the KV-cache budget
    source: str  # "manifests" | "plan"

    @property
    def total(self) -> int:
        return sum(self.layers) + self.embed + self.head + self.kv


def holding(args: ModelArgs, layer_range: LayerRange, config: EngineConfig, fingerprint: str | None = None) -> Holding:
    """What a shard of `layer_range` keeps on this node under `config`, known before anything loads. The npu
    backend's figure comes from the manifests when `fingerprint` is given and the range is compiled; otherwise
    (or on any other backend) from the plan the shard would open with."""
    from exo_rknpu.runtime.placement import PlacementPlan, default_buckets, plan_shards

    buckets = default_buckets(args, config.max_context)
    if config.backend == "npu" and fingerprint is not None and config.placement is None:
        from exo_rknpu.rknn.npu import NpuBackend
        from exo_rknpu.slices.spec import SliceSpec

        opts = {k: v for k, v in config.backend_options.items() if k in ("dtype", "platform", "cache_dir")}
        try:
            m = NpuBackend(check_board=False, **opts).resident_bytes(
                fingerprint, args, layer_range, buckets.max_context, config.limits.max_requests, config.limits.max_bytes)
        except ArtifactError:
            pass  # not compiled: the plan's estimate (opening the shard will name the compile command)
        else:
            layer = [m.slice_bytes(SliceSpec("layers", i, i + 1).name) for i in layer_range.layers]
            head = m.slice_bytes("head") if "head" in m.rknn_bytes else 0
            return Holding(tuple(layer), m.embed_bytes, head, m.kv_bytes, "manifests")
    plan, = plan_shards(PlacementPlan.load(config.placement) if config.placement else None, args, [layer_range],
                        config.backend, buckets, layers_per_slice=config.layers_per_slice, weights=config.weights,
                        npu_dtype=config.backend_options.get("dtype", "fp16"), emulate=config.emulate)
    per_layer = dict.fromkeys(layer_range.layers, 0)
    for s in plan.slices:
        for i in range(s.spec.start, s.spec.stop):
            per_layer[i] += s.weight_bytes // s.spec.n_layers
    ends = {k: sum(s.weight_bytes for s in plan.slices if s.spec.kind == k) for k in ("embed", "head")}
    return Holding(tuple(per_layer.values()), ends["embed"], ends["head"], config.limits.max_bytes, "plan")


def check_fits(header: ModelHeader, key: ShardKey, config: EngineConfig) -> None:
    """Refuse (one line, before any weight loads) a shard that would keep more than `config.memory_bytes`."""
    if config.memory_bytes is None:
        return
    from exo_rknpu.model.loader import source_fingerprint

    fingerprint = source_fingerprint(header) if config.backend == "npu" else None
    need = holding(header.args, key.layer_range, config, fingerprint)
    if need.total > config.memory_bytes:
        mb = 1 << 20
        raise ShardTooLargeError(
            f"this shard needs {need.total // mb} MB here ({(need.total - need.kv) // mb} MB of weights "
            f"by the {need.source}, {need.kv // mb} MB KV budget), more than the {config.memory_bytes // mb} MB this "
            f"node has: the ring's reported memory is too small for this model; add memory or nodes to the ring, use "
            f"compact weights (--weights int4) or a smaller --max-kv-mb")


def check_npu(config: EngineConfig) -> None:
    """Refuse at start (one line, with the reason) what would fail at the first shard: the npu backend, or a plan
    naming NPU devices without --emulate, on a machine where the NPU cannot run."""
    from exo_rknpu.runtime.placement import PlacementPlan, check_plan_here, npu_problems

    if config.backend == "npu":
        problems = npu_problems()
        if problems:
            raise BackendUnavailableError("the npu backend cannot run here: " + "; ".join(problems))
    if config.placement:
        check_plan_here(PlacementPlan.load(config.placement), config.backend, config.emulate)


def _load_blocking(src: ModelSource, key: ShardKey, config: EngineConfig,
                   runner_factory: Callable[[ModelHeader, LayerRange, EngineConfig], ShardRunner],
                   tokenizers: dict[str, Tokenizer]) -> LoadedShard:
    from exo_rknpu.model.loader import load_header, load_tokenizer

    header = load_header(src)  # parsed once for the whole load: the tokenizer and the runner read it from here
    args = header.args
    if args.num_hidden_layers != key.layer_range.n_layers:
        raise ExoRknpuError(
            f"{key.model_id}: the ring believes the model has {key.layer_range.n_layers} layers, but {src.path} "
            f"has {args.num_hidden_layers}; the model card is wrong"
        )
    check_fits(header, key, config)
    tok = tokenizers.get(key.model_id) or load_tokenizer(header)
    runner = runner_factory(header, key.layer_range, config)
    return LoadedShard(key=key, source=src, args=args, runner=runner, tokenizer=tok)


def _raise(e: BaseException) -> np.ndarray:
    raise e


@dataclass
class _Step:
    """One forward call waiting for the engine's worker (ShardEngine._step_batched)."""

    loaded: LoadedShard
    request_id: str
    x: np.ndarray
    start: bool | None
    future: "asyncio.Future[np.ndarray] | None" = None

    def settle(self, compute: Callable[[], np.ndarray]) -> None:
        """Worker thread: hand the result of `compute()` (or what it raised) to the waiting caller."""
        try:
            out = compute()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            self._deliver(None, e)
        else:
            self._deliver(out, None)

    def admit(self) -> BatchStep | None:
        """Worker thread: admit the step for a batch (ShardRunner.admit_step); if refused, the caller gets the
        error and this returns None."""
        try:
            return self.loaded.runner.admit_step(self.request_id, self.x)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            self._deliver(None, e)
            return None

    def _deliver(self, out: np.ndarray | None, error: BaseException | None) -> None:
        fut = self.future
        assert fut is not None

        def done() -> None:
            if not fut.done():  # the caller may have been cancelled meanwhile
                fut.set_exception(error) if error is not None else fut.set_result(out)

        fut.get_loop().call_soon_threadsafe(done)


class ShardEngine:
    """Holds at most one loaded shard; loads, swaps and runs it off the event loop."""

    def __init__(
        self,
        config: EngineConfig,
        source_provider: SourceProvider,
        runner_factory: Callable[[ModelHeader, LayerRange, EngineConfig], ShardRunner] = open_runner,
    ) -> None:
        self.config = config
        self.source_provider = source_provider
        self.runner_factory = runner_factory
        self.current: LoadedShard | None = None
        self.loads = 0  # number of shard loads done (tests check idempotence with it)
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exo-rknpu-engine")
        self._tokenizers: dict[str, Tokenizer] = {}
        self.lifecycle = RequestLog()  # announced / ended / failed requests: the one record of them on this node
        self._closed = False
        # one-token steps waiting for the worker, run by one batch job (see _step_batched); guarded by _steps_lock
        self._steps: list[_Step] = []
        self._steps_job = False  # a batch job is submitted and has not yet taken the waiting steps
        self._steps_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine's single worker thread (submitted before this coroutine yields)."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _prefix(self, key: ShardKey) -> str:
        who = f"[{self.config.label}] " if self.config.label else ""
        return f"{who}{key} on backend {self.config.backend!r}: "

    def _wrap(self, e: ExoRknpuError, key: ShardKey, model_ref: str | None = None) -> ExoRknpuError:
        """Same exception type, with which node / model / layers / backend in front, and a hint where one helps."""
        msg = name_model(f"{self._prefix(key)}{e}", model_ref)
        if isinstance(e, TensorContractError) and not key.layer_range.is_first:
            msg += (f" (hidden states come from the node that runs layers 0-{key.layer_range.start - 1}; "
                    f"check that every node serves the same model and sends float16/float32)")
        if (self.config.backend == "npu" and isinstance(e, (ArtifactError, ToolkitMissingError, BackendUnavailableError))
                and "exo-rknpu compile" not in msg):
            msg += f"; compile the slices with: {compile_hint(model_ref or key.model_id, key.layer_range)}"
        try:
            wrapped = type(e)(msg)
        except Exception:  # an exception type with a different constructor
            wrapped = ExoRknpuError(msg)
        wrapped.__cause__ = e
        return wrapped

    # ------------------------------------------------------------------ shards

    async def ensure(self, model_id: str, layer_range: LayerRange) -> LoadedShard:
        """Load `layer_range` of `model_id` unless it is already loaded. Safe under concurrent calls.

        A change of shard releases the old runner (and with it every request's KV cache) before the new
        weights are loaded, so a board never holds both.
        """
        key = ShardKey(model_id, layer_range)
        cur = self.current
        if cur is not None and cur.key == key:
            return cur
        async with self._lock:
            cur = self.current
            if cur is not None and cur.key == key:
                return cur
            if cur is not None:
                self.current = None
                log.info("releasing %s to load %s", cur.key, key)
                await self.run_blocking(self._close_runner, cur, f"this node's shard changed from {cur.key} to {key}")
                if cur.key.model_id != model_id:
                    self._tokenizers.pop(cur.key.model_id, None)
            src: ModelSource | None = None
            try:
                src = await self.source_provider(model_id, layer_range)
                loaded = await self.run_blocking(_load_blocking, src, key, self.config, self.runner_factory,
                                                 self._tokenizers)
            except ExoRknpuError as e:
                raise self._wrap(e, key, _model_ref(src)) from e
            self._tokenizers[model_id] = loaded.tokenizer
            self.current = loaded
            self.loads += 1
            log.info("loaded %s from %s", key, src.path)
            if not loaded.runner.batches:  # documented (docs/compiler.md, "Batch buckets"), and said once per load
                log.warning("%s runs concurrent requests' decode steps one after another: %s", key,
                            loaded.runner.unbatched_reason)
            return loaded

    async def forward(self, request_id: str, model_id: str, layer_range: LayerRange, x: np.ndarray,
                      start: bool | None = None) -> np.ndarray:
        """Token ids (1, seq) on the first shard, hidden states (1, seq, H) elsewhere -> hidden states in the
        configured dtype, or float32 logits on the last shard. The request's KV cache advances by seq.

        start: True = a new request, False = a live one, None = whichever it is (see ShardRunner.forward)."""
        loaded = await self.ensure(model_id, layer_range)
        try:
            # Submitted right after ensure() returned, with no await in between: no swap can slip in.
            if start is not True and np.shape(x)[1:2] == (1,) and loaded.runner.batches:
                out = await self._step_batched(_Step(loaded, request_id, x, start))
            else:
                out = await self.run_blocking(self._forward_job, loaded, request_id, x, start)
        except ExoRknpuError as e:
            raise self._wrap(e, loaded.key) from e
        if not layer_range.is_last and self.config.hidden_dtype == "float16":
            out = out.astype(np.float16)
        return np.ascontiguousarray(out)

    def _forward_job(self, loaded: LoadedShard, request_id: str, x: np.ndarray, start: bool | None) -> np.ndarray:
        """Worker thread: refuse an ended request, release abandoned ones, then run the step."""
        reason = self.lifecycle.why_ended(request_id)
        if reason is not None:
            raise RequestStateError(f"request {request_id} has ended on this node ({reason}); it cannot continue")
        requests = loaded.runner.requests
        if request_id not in requests:
            for rid in requests.idle():
                self._end(loaded, rid, f"idle for more than {requests.limits.idle_seconds:g} s, abandoned")
        return loaded.runner.forward(request_id, x, self.config.logits, start)

    async def _step_batched(self, step: "_Step") -> np.ndarray:
        """A one-token step joins the steps already waiting for the worker; one job runs them all as one batch
        (`ShardRunner.forward_batch`: every weight read once for all of them). The job is submitted when the first
        step arrives, so the executor's order still holds: it runs before any later shard change or close."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        step.future = asyncio.get_running_loop().create_future()
        with self._steps_lock:
            self._steps.append(step)
            submit, self._steps_job = not self._steps_job, True
        if submit:
            try:
                self._executor.submit(self._steps_job_run)
            except RuntimeError:  # closed meanwhile: nothing will take the step
                with self._steps_lock:
                    self._steps.remove(step)
                    self._steps_job = False
                raise
        return await step.future

    def _steps_job_run(self) -> None:
        """Worker thread: take every waiting step; the live requests' steps of one shard run as one batch, any
        other (a request's first step, an ended one) runs as `forward` would; each step gets its own result."""
        with self._steps_lock:
            steps, self._steps, self._steps_job = self._steps, [], False
        batch: list[_Step] = []
        for s in steps:
            reason = self.lifecycle.why_ended(s.request_id)
            if s.request_id in s.loaded.runner.requests and reason is None and s.loaded is steps[0].loaded:
                batch.append(s)
            else:
                s.settle(lambda s=s: self._forward_job(s.loaded, s.request_id, s.x, s.start))
        # a step the batch could not admit (its context is full, a malformed input) fails alone; the others run
        # together. Admission (`admit_step`) changes nothing; the batch runs the admitted steps as they are.
        admitted = [(s, s.admit()) for s in batch]
        ok = [(s, step) for s, step in admitted if step is not None]
        if not ok:
            return
        try:
            outs = ok[0][0].loaded.runner.run_batch([step for _, step in ok], self.config.logits)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
            for s, _ in ok:
                s.settle(lambda e=e: _raise(e))
            return
        for (s, _), out in zip(ok, outs):
            s.settle(lambda out=out: out)

    def _end(self, loaded: LoadedShard | None, request_id: str, reason: str) -> None:
        if loaded is not None and request_id in loaded.runner.requests:
            loaded.runner.drop(request_id)
            log.info("released request %s: %s", request_id, reason)
        self.lifecycle.end(request_id, reason)

    def _close_runner(self, loaded: LoadedShard, reason: str) -> None:
        for rid in loaded.runner.requests.ids():
            self._end(loaded, rid, reason)
        loaded.runner.close()

    def release(self, request_id: str, reason: str) -> None:
        """End a request: free its cache now and refuse any later step for it (callable from any thread)."""
        if not self._closed:
            self._executor.submit(self._end, self.current, request_id, reason)

    def live_requests(self) -> int:
        """Requests holding a cache on this node now."""
        cur = self.current
        return len(cur.runner.requests) if cur is not None else 0

    def positions_left(self, request_id: str) -> int | None:
        """How many more tokens the request's cache can take on this node (None if it holds no cache for it)."""
        cur = self.current
        state = cur.runner.requests.peek(request_id) if cur is not None else None
        return None if state is None else cur.runner.buckets.max_context - state.pos

    async def aclose(self) -> None:
        async with self._lock:
            cur, self.current = self.current, None
            if cur is not None:
                await self.run_blocking(self._close_runner, cur, "the engine was closed")
        self.close()

    def close(self) -> None:
        """Release the shard and stop the worker thread (pending jobs finish first)."""
        cur, self.current = self.current, None
        if not self._closed:
            self._closed = True
            if cur is not None:
                self._executor.submit(cur.runner.close)
            self._executor.shutdown(wait=True)
