"""Run one shard (a layer range) of a model: embed on the first shard, layer slices, head on the last.

This is the only place that knows how a call is cut into bucket-shaped chunks and how the KV cache moves.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from exo_rknpu.backends.base import Backend, Runner, require_support
from exo_rknpu.errors import TensorContractError
from exo_rknpu.model.loader import ShardSource
from exo_rknpu.model.weights import LeftOut, ShardWeights
from exo_rknpu.runtime.cache import BatchState, KVCache, KVPool, RequestCache, RowsState
from exo_rknpu.runtime.inputs import RotaryTable
from exo_rknpu.runtime.requests import RequestLimits, RequestStore
from exo_rknpu.slices.graph import slice_weights
from exo_rknpu.slices.spec import PARTS, Buckets, SliceSpec, npu_kv_layout, plan_slices, state_name


log = logging.getLogger(__name__)

# Pooled caches that grow (backends whose attention reads the whole capacity: numpy, onnxruntime's split form) grow
# by at least this many positions, and by at least a quarter of their capacity (KVPool.reserve: a growth copies
# every request's rows): few distinct shapes, and attention reads little past the furthest request's position
KV_POOL_STEP = 32
# (spec, inputs, outputs) of every slice call; an attention slice's outputs lack k_new/v_new where its runner wrote
# them into the cache itself (Runner.run's cache_in_place)
SliceObserver = Callable[[SliceSpec, dict[str, np.ndarray], dict[str, np.ndarray]], None]
HIDDEN_DTYPES = (np.float16, np.float32)


@dataclass
class ShardStats:
    """Cumulative time per slice name (seconds) and call counts: what `bench` reports."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim). After a few large frees glibc raises its mmap
    threshold, so the released weights would otherwise stay resident as free heap (measured ~100 MB on smollm2)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return
    libc.malloc_trim(0)


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # linux/mman.h; MADV_COLLAPSE since Linux 6.1


def back_with_huge_pages() -> int:
    """Move every fully resident private anonymous mapping of this process (the weights onnxruntime packed while
    its sessions opened) onto 2 MiB pages, now, with MADV_COLLAPSE; returns the bytes moved. A decode step reads
    every packed weight once, and on 4 KiB pages its time goes partly to TLB misses: measured 7.1 against 7.9
    tokens per CPU second on the 1B Q4_0 file at 1 thread (docs/performance.md). Earlier starts got huge pages by
    accident: the packed weights reused heap that numpy had marked MADV_HUGEPAGE for the compact weights the loader
    built and freed, which a start that finds its slices prepared never builds. Only whole resident mappings are
    moved, so no page is added (a pool reserved for KV caches, untouched yet, stays as it is). A mapping is marked
    MADV_HUGEPAGE (kept huge from then on) only once its collapse succeeded: where the kernel or the C library
    refuses (not Linux, an older kernel, huge pages off, no free huge page) nothing changes but the speed."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    moved = 0
    for start, end in _resident_anonymous(lines):
        a, b = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if b - a >= HUGE_PAGE and libc.madvise(a, b - a, _MADV_COLLAPSE) == 0:
            libc.madvise(a, b - a, _MADV_HUGEPAGE)
            moved += b - a
    return moved


def _resident_anonymous(smaps: list[str]) -> list[tuple[int, int]]:
    """[start, end) of every private writable anonymous mapping (the heap included) whose pages are all resident,
    from /proc/self/smaps' lines."""
    out, current = [], None
    for line in smaps:
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            anonymous = head[1].startswith("rw") and head[1].endswith("p") and head[4] == "0" and (len(head) == 5 or head[5] == "[heap]")
            current = (lo, hi) if anonymous else None
        elif current is not None and head[0] == "Rss:":
            if int(head[1]) * 1024 == current[1] - current[0]:
                out.append(current)
            current = None
    return out


@dataclass
class Chunk:
    """One bucket-shaped piece of a call on its way through a shard's slices (or one step of a batch of requests:
    cache is a BatchState, pos one position per request)."""

    cache: RequestCache | BatchState | RowsState
    pos: int | list[int]  # position of its first token
    real: int  # tokens in it (the rest of the bucket is padding)
    capacity: int  # context bucket of every cache it touches
    st: dict[str, np.ndarray]  # layer state between slices ("x": hidden [1,bucket,H]; "ids" before the embedding)
    common: dict[str, np.ndarray]  # cos, sin, mask

    def output(self) -> np.ndarray:
        return self.st["x"][:, : self.real]


@dataclass
class BatchStep:
    """One admitted decode step of a live request for a batch (ShardRunner.admit_step): nothing has moved yet."""

    request_id: str
    cache: RequestCache
    x: np.ndarray  # one token id [1,1] (first shard) or one hidden state [1,1,H], checked


@dataclass
class ShardCall:
    """One admitted call of a request on a shard (ShardRunner.begin): its chunks, the head, then commit or rollback.

    A driver runs every chunk through the body slices in order (`run`, possibly one device stage at a time, as
    runtime/stages.py does), takes the head's logits (`head`, last shard), and ends the call with `commit()` on
    success or `rollback()` on any error. Until commit, the request's cache position has not moved, so a rolled
    back call leaves the request exactly as it was (and forgets a request the call admitted).
    """

    runner: "ShardRunner"
    request_id: str
    cache: RequestCache
    at: int  # the request's position when the call began
    started: bool  # this call admitted the request
    chunks: list[Chunk]
    logits: Literal["all", "last"] = "all"

    @property
    def tokens(self) -> int:
        return sum(c.real for c in self.chunks)

    def run(self, chunk: Chunk, specs: list[SliceSpec] | None = None) -> None:
        """Run `chunk` through `specs` (consecutive body slices; default: all of them)."""
        self.runner.run_steps(chunk, self.runner.body_specs if specs is None else specs)

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [1,seq,V] of hidden states [1,seq,H] (the last shard's head, in bucket-shaped pieces)."""
        return self.runner.head(hidden)

    def result(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The call's answer from its chunks' outputs, in order: hidden states, or (last shard) the head's logits
        of every row or of the last one (`logits`)."""
        out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)
        if self.runner.layer_range.is_last:
            out = self.head(out if self.logits == "all" else out[:, -1:])
        return out

    def commit(self) -> None:
        """The call succeeded: its tokens join the request's context."""
        assert self.cache.pos == self.at, f"request {self.request_id} moved during its call"
        self.cache.advance(self.tokens)

    def rollback(self) -> None:
        """The call failed: nothing it wrote counts (the cache forgets positions from `at` on), and a request it
        admitted is forgotten."""
        self.cache.rollback(self.at)
        if self.started:
            self.runner.requests.drop(self.request_id)


def check_covers(specs: list[SliceSpec], lr) -> None:
    """Slices of a shard must run every part of every layer of its range once, in order (a placement's cut)."""
    want = [(i, p) for i in range(lr.start, lr.stop) for p in PARTS]
    got = [(i, p) for s in specs if s.kind == "layers" for i in range(s.start, s.stop) for p in s.parts]
    if got != want:
        raise ValueError(f"slices {[s.name for s in specs]} do not cover layers {lr.start}-{lr.stop - 1} part by part in order")


def left_out(specs: list[SliceSpec], found: Mapping[str, Runner]) -> LeftOut:
    """What the loader need not build when the slices named in `found` are served prepared: every layer whose every
    slice is found (a placement may cut one layer into several slices), and the head if its slice is."""
    layers = {i for s in specs if s.kind == "layers" for i in range(s.start, s.stop)}
    needed = {i for s in specs if s.kind == "layers" and s.name not in found for i in range(s.start, s.stop)}
    return LeftOut(frozenset(layers - needed), head=any(s.kind == "head" and s.name in found for s in specs))


class ShardRunner:
    """Layers [start, stop) of a model, its slices prepared on their backends, with per-request KV caches.

    Either one `backend` runs every slice (cut by `layers_per_slice`, or as `specs` lists them), or `placed` names
    each slice with its device and that device's backend instance (what runtime/placement.py's `open_plan` passes
    for a resolved plan).
    """

    def __init__(
        self,
        weights: ShardWeights | ShardSource,
        backend: Backend | None = None,
        buckets: Buckets = Buckets(),
        layers_per_slice: int | None = None,
        limits: RequestLimits = RequestLimits(),
        on_slice: SliceObserver | None = None,
        progress: Callable[[str], None] | None = None,
        release_weights: bool = False,
        specs: list[SliceSpec] | None = None,
        placed: Sequence[tuple[SliceSpec, str, Backend]] | None = None,
    ) -> None:
        """`weights`: the shard's weights, or its ShardSource (what open_plan passes): then each backend is asked
        first for the slices it prepared earlier from those sources (`Backend.find_prepared`), and only what no found
        slice covers is loaded (the embedding, at least), with `progress`; the runner owns what it loads.
        `release_weights`: `weights` belongs to this runner; each slice's layers are dropped from it once that
        slice is prepared (open_plan sets it; callers that reuse a ShardWeights leave it off)."""
        self.args, self.buckets = weights.args, buckets
        lr = weights.layer_range
        self.layer_range = lr
        if placed is None:
            assert backend is not None, "a ShardRunner needs a backend or its placed slices"
            cut = specs if specs is not None else plan_slices(lr.start, lr.stop, lr.is_first, lr.is_last, layers_per_slice)
            placed = [(s, "default", backend) for s in cut]
        else:
            assert backend is None and specs is None, "placed slices come with their devices' backends"
        self.backends: dict[str, Backend] = {}
        self.devices: dict[str, str] = {}  # slice name -> device name (runtime/stages.py runs one stage per device)
        self.specs: list[SliceSpec] = []
        for s, device, b in placed:
            self.backends[s.name], self.devices[s.name] = b, device
            # the backend chooses how its layer slices lay out the KV cache (the NPU wants it transposed)
            layout = npu_kv_layout(weights.args) if b.kv_layout == "npu" else b.kv_layout
            self.specs.append(replace(s, kv_layout=layout) if s.kind == "layers" else s)
        check_covers(self.specs, lr)
        # backends compiled with batch buckets (the NPU form): a decode step of several requests is one call per
        # slice, each request's cache handed over as it is; other static shards are prepared without batch buckets
        self.rows_batch = (bool(buckets.batch) and all(b.batches for b in self.backends.values())
                           and all(s.kv_layout == "npu" for s in self.layer_specs))
        self._asked_batch = bool(buckets.batch)
        if not self.rows_batch:
            buckets = replace(buckets, batch=())
        self.buckets = buckets
        # attention slice name -> its cache's index in RequestCache.caches
        self.cache_index = {s.name: i for i, s in enumerate(s for s in self.layer_specs if s.has_attention)}
        self.runners: dict[str, Runner] = {}
        found: dict[str, Runner] = {}
        if isinstance(weights, ShardSource):
            weights, found = self._find_and_load(weights, buckets, progress)
        self.fingerprint = weights.fingerprint
        self._prepare(weights, buckets, release_weights, progress, found)
        if release_weights:
            return_freed_memory()
        for runner in self.runners.values():  # every slice prepared and its weights let go of: before any call
            runner.open()
        back_with_huge_pages()
        self.rotary = RotaryTable(self.args, buckets.max_context + buckets.seq[-1])
        self.requests = RequestStore(limits, reserve_bytes=self.request_reserve_bytes)
        try:  # a reservation the OS refuses (UsageError) closes what is open
            self.pool = self._kv_pool(limits)
        except BaseException:
            self.close()
            raise
        self.on_slice = on_slice
        self.stats = ShardStats()

    def _kv_pool(self, limits: RequestLimits) -> KVPool | None:
        """The pool every request's caches live in on backends that batch (a batched step reads them in place); None
        elsewhere (a static-shape backend batches through its compiled batch buckets only: `rows_batch`)."""
        can_batch = (all(b.batches and not b.static_shapes for b in self.backends.values())
                     and all(s.kv_layout == "seq" for s in self.layer_specs))
        if not can_batch:
            return None
        attention = [s for s in self.layer_specs if s.has_attention]
        # attention that reads only the written positions costs the same over a reserved largest context: the pool
        # then never grows (never copies); else it grows with the requests
        reads_written = all(self.backends[s.name].reads_written_cache(s, self.args) for s in attention)
        return KVPool([s.n_layers for s in attention], self.args.num_key_value_heads, self.args.head_dim,
                      self.buckets.max_context, KV_POOL_STEP, self.pool_slots(limits) if reads_written else 0)

    def _find_and_load(self, source: ShardSource, buckets: Buckets, progress: Callable[[str], None] | None
                       ) -> tuple[ShardWeights, dict[str, Runner]]:
        """The slices each backend finds prepared from `source` (by name), and the shard's weights without what they
        cover."""
        found: dict[str, Runner] = {}
        for s in self.specs:
            runner = self.backends[s.name].find_prepared(s, source, buckets)
            if runner is not None:
                found[s.name] = runner
        try:
            return source.load(left_out(self.specs, found), progress), found
        except BaseException:
            for r in found.values():
                r.close()
            raise

    def _prepare(self, weights: ShardWeights, buckets: Buckets, release_weights: bool,
                 progress: Callable[[str], None] | None, found: Mapping[str, Runner]) -> None:
        """Prepare every slice on its backend, in order, but those `found` prepared already (closing every runner if
        one fails)."""
        try:
            for n, s in enumerate(self.specs):
                require_support(self.backends[s.name], s)
                t = time.monotonic()
                if s.name in found:
                    self.runners[s.name] = found[s.name]
                elif release_weights and s.kind == "layers":
                    # the backend gets this slice's layers on their own and the shard lets go of them: a runner
                    # that keeps them (numpy, a simulator building lazily) holds them, one that does not (onnx)
                    # frees them, so the next slice never sees two copies. A layer cut by a placement plan is let
                    # go of at its last slice (the earlier ones share its tensors).
                    part = slice_weights(s, weights)
                    if s.whole or s.parts[-1] == PARTS[-1]:
                        for i in range(s.start, s.stop):
                            weights.layers.pop(i, None)
                    self.runners[s.name] = self.backends[s.name].prepare(s, part, buckets)
                    del part
                else:
                    self.runners[s.name] = self.backends[s.name].prepare(s, weights, buckets)
                    if release_weights and s.kind == "head":  # likewise: its runner keeps what it needs
                        weights.lm_head = weights.final_norm = None
                if progress is not None and (time.monotonic() - t > 1.0 or n == len(self.specs) - 1):
                    progress(f"prepared slice {s.name} on {self.backends[s.name].name} ({n + 1}/{len(self.specs)})")
        except BaseException:
            for name, r in found.items():
                if name not in self.runners:
                    r.close()
            self.close()
            raise

    @property
    def layer_specs(self) -> list[SliceSpec]:
        return [s for s in self.specs if s.kind == "layers"]

    @property
    def body_specs(self) -> list[SliceSpec]:
        """Every slice a chunk passes through before the head: the embedding (first shard) and the layer slices."""
        return [s for s in self.specs if s.kind != "head"]

    # -- public -------------------------------------------------------------------------------
    def forward(self, request_id: str, x: np.ndarray, logits: Literal["all", "last"] = "all",
                start: bool | None = None) -> np.ndarray:
        """Token ids [1,seq] (first shard) or hidden states [1,seq,H] -> hidden states [1,seq,H] float32, or
        logits [1,seq,V] (last shard; [1,1,V] with logits="last"). Advances the request's position by seq.

        start: True = a new request (admitted, or CapacityError); False = a live request (RequestStateError if
        this shard holds no cache for it, instead of silently starting again at position 0); None = either.
        On any error the request's position is left where it was, so a retry or the next request is unaffected.
        """
        call = self.begin(request_id, x, logits, start)
        try:
            outputs = []
            for chunk in call.chunks:
                call.run(chunk)
                outputs.append(chunk.output())
            out = call.result(outputs)
        except BaseException:
            call.rollback()
            raise
        call.commit()
        return out

    def begin(self, request_id: str, x: np.ndarray, logits: Literal["all", "last"] = "all",
              start: bool | None = None) -> ShardCall:
        """Check and admit one call, before anything runs, and cut it into bucket-shaped chunks.

        Refusals come first and change nothing: a malformed input (TensorContractError), a new request that does
        not fit (CapacityError), a live one this shard holds no cache for (RequestStateError), a context too long
        for the largest bucket (ContextOverflowError). `start` is as in `forward`.
        """
        x = self.check_input(x)
        seq = x.shape[1]
        if start is None:
            start = request_id not in self.requests
        at = 0 if start else self.requests.get(request_id).pos
        self.buckets.context_for(at + seq)
        cache = self.requests.admit(request_id) if start else self.requests.get(request_id)
        try:
            capacity = None
            if self.pool is not None:  # the pool grows once for the whole call: every chunk sees one capacity
                if start:
                    self.pool.acquire(cache)
                capacity = self.pool.reserve(at + seq)
            chunks, done = [], 0
            for real, bucket in self.buckets.chunks(seq):
                chunks.append(self._chunk(cache, x[:, done : done + real], at + done, real, bucket, capacity))
                done += real
        except BaseException:
            if start:
                self.requests.drop(request_id)
            raise
        return ShardCall(self, request_id, cache, at, start, chunks, logits)

    @property
    def batches(self) -> bool:
        """Whether this shard runs a batch of requests' steps in one call: every slice's backend batches
        (Backend.batches), on the "seq" cache layout with the requests' caches in one KVPool, or on the NPU form
        with batch buckets (Buckets.batch) and each request's own cache."""
        return self.pool is not None or self.rows_batch

    @property
    def unbatched_reason(self) -> str | None:
        """Why this shard runs several requests' decode steps one call after another (None: it batches them)."""
        if self.batches:
            return None
        static = sorted({b.name for b in self.backends.values() if b.static_shapes})
        without = sorted({b.name for b in self.backends.values() if b.static_shapes and not b.batches})
        if without:
            return f"backend {', '.join(without)} has no batch graphs in this form (w8a8 builds none)"
        if static and any(s.kv_layout == "seq" for s in self.layer_specs):
            return "its layers keep the \"seq\" cache form (per-head q/k norms, e.g. qwen3), which has no batch graph"
        if static and not self._asked_batch:
            return f"backend {', '.join(static)} was opened without batch buckets"
        return "its requests' caches are not pooled (per-device pipelining, runtime/stages.py)"

    def unpool(self) -> None:
        """Give each request its own cache arrays instead of a pool slot (and run batched steps one call after
        another): for drivers that run several requests' calls at once from different threads
        (runtime/stages.py), where the pool's growth would move a cache under a running call. Before any request."""
        if len(self.requests):
            raise RuntimeError("unpool() must come before any request is live on the shard")
        self.pool, self.rows_batch = None, False

    def forward_batch(self, calls: list[tuple[str, np.ndarray]], logits: Literal["all", "last"] = "all") -> list[np.ndarray]:
        """One decode step of several live requests at once: each call is (request_id, one token id [1,1] or one
        hidden state [1,1,H]); returns what `forward` would return for each, in order.

        The requests' steps run as one batch through every slice (every weight read once for all of them), each
        row with its own position, mask and KV cache, so each output equals that request's lone step up to
        float32 summation order. Backends that do not batch run the calls one after another. Admission is all or
        nothing: each call is admitted once (`admit_step`), and one it refuses (not live here, context full,
        malformed), or a request twice, raises before any request moves. The step commits every call on success
        and moves none on an error.
        """
        if len({rid for rid, _ in calls}) != len(calls):  # before admission: its errors name one request
            raise TensorContractError("a batch holds one step per request; a request id appears twice")
        return self.run_batch([self.admit_step(rid, x) for rid, x in calls], logits)

    def admit_step(self, request_id: str, x: np.ndarray) -> BatchStep:
        """Check one decode step of a live request for a batch, changing nothing: a malformed input or not one
        token (TensorContractError), a request this shard holds no cache for (RequestStateError), a full context
        (ContextOverflowError)."""
        x = self.check_input(x)
        if x.shape[1] != 1:
            raise TensorContractError("a batched step takes exactly one token (or hidden state) per request")
        cache = self.requests.get(request_id)
        self.buckets.context_for(cache.pos + 1)
        return BatchStep(request_id, cache, x)

    def run_batch(self, steps: list[BatchStep], logits: Literal["all", "last"] = "all") -> list[np.ndarray]:
        """Run admitted steps (`admit_step`, distinct requests) as one batch; outputs in the order of `steps`.
        On an error no request moves (rows a failed step wrote lie past its position: never read, overwritten)."""
        if len({s.request_id for s in steps}) != len(steps):
            raise TensorContractError("a batch holds one step per request; a request id appears twice")
        if self.rows_batch:
            return self._run_rows(steps, logits)
        if self.pool is None:
            return [self.forward(s.request_id, s.x, logits, start=False) for s in steps]
        # in slot order: requests in consecutive slots are read from the pool in place
        order = sorted(range(len(steps)), key=lambda i: steps[i].cache.slot)
        chunk = self._batch_chunk([steps[i] for i in order])
        self.run_steps(chunk, self.body_specs)
        out = chunk.st["x"]
        if self.layer_range.is_last:
            out = self._run(self.specs[-1], {"hidden": out})["logits"]  # one row per request: "all" = "last"
        for i in order:
            steps[i].cache.advance(1)
        rows = [0] * len(steps)
        for row, i in enumerate(order):
            rows[i] = row
        return [out[r : r + 1] for r in rows]

    def _batch_chunk(self, steps: list[BatchStep]) -> Chunk:
        """The batched chunk of one decode step: row b is step b at its own position, with its request's mask
        (RequestCache.mask) hiding the pool rows it has not written; the pool holds the furthest position."""
        assert self.pool is not None
        positions = [s.cache.pos for s in steps]
        self.pool.reserve(max(positions) + 1)
        state = BatchState(self.pool, [s.cache for s in steps], max(positions) + 1)
        st, common = self._step_rows(steps, positions, state.capacity, row_axis=0, rope_axis=0)
        return Chunk(state, positions, 1, state.capacity, st, common)

    def _run_rows(self, steps: list[BatchStep], logits: Literal["all", "last"]) -> list[np.ndarray]:
        """run_batch on backends with batch buckets: groups of at most the largest batch bucket, each padded to its
        bucket by repeating its last step (read only, its outputs dropped); a lone step runs as itself. Requests
        advance only when every group succeeded."""
        out: list[np.ndarray] = []
        top = self.buckets.batch[-1]
        for i in range(0, len(steps), top):
            group = steps[i : i + top]
            if len(group) == 1:
                s = group[0]
                call = self.begin(s.request_id, s.x, logits, start=False)
                call.run(call.chunks[0])
                out.append(call.result([call.chunks[0].output()]))  # committed below with the others
                continue
            rows = group + [group[-1]] * (self.buckets.batch_for(len(group)) - len(group))
            chunk = self._rows_chunk(rows, len(group))
            self.run_steps(chunk, self.body_specs)
            x = chunk.st["x"]
            if self.layer_range.is_last:
                x = self._run(self.specs[-1], {"hidden": x})["logits"]  # one row per request: "all" = "last"
            out += [x[:, b : b + 1] for b in range(len(group))]
        for s in steps:
            s.cache.advance(1)
        return out

    def _rows_chunk(self, rows: list[BatchStep], real: int) -> Chunk:
        """The chunk of a decode batch on backends with batch buckets: row b is rows[b]'s step at its own position
        ([1, B, H] state, cos/sin [1, 1, B, hd], each request's mask row [B, 1, 1, C+1]), every cache at the context
        bucket of the furthest request (a cache never shrinks, so it may be larger)."""
        positions = [s.cache.pos for s in rows]
        capacity = max([self.buckets.context_for(max(positions) + 1)] + [c.capacity for s in rows for c in s.cache.caches])
        st, common = self._step_rows(rows, positions, capacity, row_axis=1, rope_axis=2)
        return Chunk(RowsState([s.cache for s in rows], real), positions, 1, capacity, st, common)

    def _step_rows(self, steps: list[BatchStep], positions: list[int], capacity: int, row_axis: int,
                   rope_axis: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A decode batch's inputs, row b = steps[b] at positions[b]: the state (ids or x, rows along `row_axis`)
        and cos/sin (rows along `rope_axis`) as the batch's slices take them, each request's mask row over
        `capacity` positions."""
        rotary = [self.rotary(p, 1) for p in positions]
        mask = np.concatenate([s.cache.mask(p, 1, capacity) for s, p in zip(steps, positions)])
        mask.flags.writeable = False  # as RequestCache.mask's: read by every slice of the step, never changed
        common = {"cos": np.concatenate([r["cos"] for r in rotary], axis=rope_axis),
                  "sin": np.concatenate([r["sin"] for r in rotary], axis=rope_axis), "mask": mask}
        key = "ids" if self.layer_range.is_first else "x"
        return {key: np.concatenate([s.x for s in steps], axis=row_axis)}, common

    @property
    def request_reserve_bytes(self) -> int:
        """KV memory one request can grow to on this shard: its caches at the largest context bucket."""
        a, ctx = self.args, self.buckets.max_context
        return sum(2 * s.n_layers * a.num_key_value_heads * ctx * a.head_dim * (2 if s.kv_layout == "npu" else 4)
                   for s in self.layer_specs)

    def pool_slots(self, limits: RequestLimits) -> int:
        """Requests the admission bounds let live at once on this shard, each at the largest context: the slots a
        reserved KV pool maps (RequestStore.admit refuses the next one)."""
        one = self.request_reserve_bytes
        return min(limits.max_requests, limits.max_bytes // one) if one else limits.max_requests

    def drop(self, request_id: str) -> None:
        """Forget a request's cache."""
        self.requests.drop(request_id)

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        self.runners.clear()
        if hasattr(self, "requests"):
            self.requests.clear()

    # -- internals ----------------------------------------------------------------------------
    def check_input(self, x: np.ndarray) -> np.ndarray:
        """`x` as this shard takes it (int64 token ids or float32 hidden states), or TensorContractError."""
        lr, a = self.layer_range, self.args
        x = np.asarray(x)
        if lr.is_first:
            if not np.issubdtype(x.dtype, np.integer):
                raise TensorContractError(
                    f"shard {lr} is the first shard and takes token ids (integers) of shape (1, seq); "
                    f"got {x.dtype} {x.shape}"
                )
            if x.ndim == 1:
                x = x[None]
            if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] == 0:
                raise TensorContractError(f"token ids must have shape (1, seq) with seq >= 1; got {x.shape}")
            if x.min() < 0 or x.max() >= a.vocab_size:
                raise TensorContractError(f"token id out of range [0, {a.vocab_size}): min {x.min()}, max {x.max()}")
            return x.astype(np.int64)
        if np.issubdtype(x.dtype, np.integer):
            raise TensorContractError(
                f"shard {lr} does not start at layer 0, so it takes hidden states (1, seq, {a.hidden_size}) "
                f"as float16/float32, not token ids ({x.dtype} {x.shape}); token ids go to the first shard"
            )
        if x.dtype not in HIDDEN_DTYPES:
            raise TensorContractError(f"hidden states must be float16 or float32; got {x.dtype} (bfloat16 is not accepted)")
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] == 0 or x.shape[2] != a.hidden_size:
            raise TensorContractError(
                f"hidden states must have shape (1, seq, {a.hidden_size}) for this model; got {x.shape}"
            )
        return x.astype(np.float32)  # copies: arrays from the wire are read-only

    def _run(self, spec: SliceSpec, inputs: dict[str, np.ndarray], cache_in_place: bool = False) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        outputs = self.runners[spec.name].run(inputs, cache_in_place=cache_in_place)
        self.stats.add(spec.name, time.perf_counter() - t)
        if self.on_slice is not None:
            self.on_slice(spec, inputs, outputs)
        return outputs

    def _chunk(self, cache: RequestCache, x: np.ndarray, pos: int, real: int, bucket: int,
               capacity: int | None) -> Chunk:
        """A bucket-shaped chunk of `real` tokens starting at position `pos`, its past `capacity` positions long
        (None: the context bucket it needs); allocates the request's own caches on its first chunk."""
        a = self.args
        pad = bucket - real
        if capacity is None:  # a cache never shrinks (a batch may have grown it past this call's bucket)
            capacity = max([self.buckets.context_for(pos + real)] + [c.capacity for c in cache.caches])
        if not cache.caches:
            cache.caches = [KVCache.empty(s.n_layers, a.num_key_value_heads, capacity, a.head_dim, s.kv_layout)
                            for s in self.layer_specs if s.has_attention]
        if self.layer_range.is_first:
            st = {"ids": np.pad(x, ((0, 0), (0, pad))) if pad else x}
        else:
            st = {"x": np.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x}
        # rotary tables and mask: the same for every attention slice of the chunk
        common = {**self.rotary(pos, bucket), "mask": cache.mask(pos, bucket, capacity)}
        return Chunk(cache, pos, real, capacity, st, common)

    def run_steps(self, chunk: Chunk, specs: list[SliceSpec]) -> None:
        """Run `specs` (consecutive body slices) on `chunk`: layer state passes between slices on the host and each
        attention slice reads and extends its own cache."""
        st = chunk.st
        for spec in specs:
            if spec.kind == "embed":
                st["x"] = self._run(spec, {"token_ids": st.pop("ids")})["hidden"]
                continue
            inputs = {state_name(k): st[k] for k in spec.state_inputs()}
            cache = None
            if spec.has_attention:
                cache = chunk.cache.caches[self.cache_index[spec.name]]
                cache.grow(chunk.capacity)
                inputs.update(chunk.common)
                inputs["past_k"], inputs["past_v"] = cache.keys, cache.values
            out = self._run(spec, inputs, cache is not None and cache.in_place)
            if cache is not None and "k_new" in out:  # (left out: the runner wrote them into the cache itself)
                cache.write(chunk.pos, out["k_new"], out["v_new"], chunk.real)
            st.update({k: out[state_name(k, output=True)] for k in spec.state_outputs()})

    def head(self, h: np.ndarray) -> np.ndarray:
        """The head slice over hidden states [1,seq,H], in bucket-shaped pieces: logits [1,seq,V]."""
        head, out, done = self.specs[-1], [], 0
        for real, bucket in self.buckets.chunks(h.shape[1]):
            chunk = h[:, done : done + real]
            done += real
            if bucket > real:
                chunk = np.pad(chunk, ((0, 0), (0, bucket - real), (0, 0)))
            out.append(self._run(head, {"hidden": chunk})["logits"][:, :real])
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1)
