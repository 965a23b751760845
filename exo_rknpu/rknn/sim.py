"""Backend `rknn-sim`: slices run in the rknn-toolkit2 simulator, through a long-lived worker in the toolkit venv.

The simulator cannot run a .rknn loaded from disk, so each slice is built in the worker with the compiler's own
recipe (rknn/venv/worker.py::build_rknn) and then `init_runtime()` + `inference` serve every call:

- fp16: one build per slice from the symbolic ONNX with `dynamic_input` listing every bucket shape, as
  `exo-rknpu compile` does (built in prepare());
- w8a8: one static build per (seq, ctx) bucket under a w8a8 recipe (slices/recipe.py::QuantRecipe), through the
  caller's `recipe_build` (rknn/recipe.py::RecipeBuild, which needs the runtime, a layer above the backends):
  the same smoothed/rotated build weights, calibration activations, hybrid policy and fp16-kept slices as
  `exo-rknpu compile --dtype w8a8`. Built on first use of the bucket (each bucket is an independent file in the compiler too), so a run pays only for the shapes it uses.

Inputs and outputs go through rknn/io.py, the same marshalling as the board's `npu` backend. The
embedding stays on the host (`supports` says no), like `npu`: the planner (runtime/placement.py::resolve) places
it on the host CPU.

The worker exits when its stdin closes or this process dies; a worker that dies or stops answering raises
SimulatorWorkerError (with the tail of its log) instead of hanging. Nothing here imports rknn.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from exo_rknpu.rknn import io as rknn_io
from exo_rknpu.rknn import toolkit
from exo_rknpu.rknn.compile import BuildJob, export_graph, quantize
from exo_rknpu.rknn.venv.sim_server import _LEN
from exo_rknpu.config import Paths
from exo_rknpu.errors import BackendUnavailableError, CompileError, UnsupportedSliceError
from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.backends.base import declared_support
from exo_rknpu.slices.recipe import QuantRecipe
from exo_rknpu.slices.spec import (PLACEMENT_BLOCKS, Buckets, SliceSpec, bucket_shapes, shape_key, to_npu_batch_inputs,
                                   to_npu_inputs)

if TYPE_CHECKING:  # annotations only: the loader is not imported with the backend
    from exo_rknpu.model.loader import ShardSource

DTYPES = ("fp16", "w8a8")


class SimulatorWorkerError(BackendUnavailableError):
    """The simulator worker process died, timed out, or could not start."""


class RecipeSource(Protocol):
    """A w8a8 recipe bound to a model (rknn/recipe.py::RecipeBuild): what a w8a8 slice is built from."""

    recipe: QuantRecipe

    def build_weights(self, spec: SliceSpec, weights: ShardWeights) -> ShardWeights: ...
    def calibration(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets, seq: int, ctx: int | None) -> list: ...
    def runtime_weights(self) -> ShardWeights: ...


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class SimWorker:
    """One `python -m exo_rknpu.rknn.venv.sim_server` process and its request/response pipe."""

    def __init__(self, python: Path, workdir: Path, start_timeout: float = 180.0) -> None:
        self.workdir = workdir
        self.log_path = workdir / "worker.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(toolkit.worker_argv(python, "--serve"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=toolkit.worker_env(), cwd=str(workdir), bufsize=0)
        self._finalizer = weakref.finalize(self, _kill, self.proc)
        self._lock = threading.Lock()
        self._buf = bytearray()
        hello, _ = self._read(time.monotonic() + start_timeout, "start-up")
        self.pid = int(hello["pid"])

    # -- framing (the worker side is rknn/venv/sim_server.py send/recv) ---------------------------------------------
    def _fail(self, what: str) -> SimulatorWorkerError:
        _kill(self.proc)
        code = self.proc.returncode
        how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}")
        try:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            tail = ""
        return SimulatorWorkerError(f"the rknn-sim worker (pid {self.proc.pid}) {what}; it {how}. "
                                    f"Last lines of {self.log_path}:\n{tail}")

    def _read_exact(self, n: int, deadline: float, what: str) -> bytes:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"did not answer {what} in time (timeout); the simulator may be stuck")
            ready, _, _ = select.select([fd], [], [], min(left, 5.0))
            if not ready:
                continue
            chunk = os.read(fd, max(1 << 16, n - len(self._buf)))
            if not chunk:
                raise self._fail(f"died during {what}")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _read(self, deadline: float, what: str) -> tuple[dict[str, Any], list[np.ndarray]]:
        size = _LEN.unpack(self._read_exact(_LEN.size, deadline, what))[0]
        header = json.loads(self._read_exact(size, deadline, what))
        arrays = []
        for spec in header.get("arrays", []):
            dt = np.dtype(spec["dtype"])
            raw = self._read_exact(int(np.prod(spec["shape"], dtype=np.int64)) * dt.itemsize, deadline, what)
            arrays.append(np.frombuffer(raw, dt).reshape(spec["shape"]))
        return header, arrays

    def request(self, header: dict[str, Any], arrays: list[np.ndarray] | None = None, timeout: float = 300.0,
                what: str | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
        what = what or header.get("op", "a request")
        arrays = [np.ascontiguousarray(a) for a in (arrays or [])]
        head = dict(header, arrays=[{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays])
        body = json.dumps(head).encode()
        with self._lock:
            if self.proc.poll() is not None:
                raise self._fail(f"is not running (before {what})")
            try:
                self.proc.stdin.write(_LEN.pack(len(body)) + body)  # type: ignore[union-attr]
                for a in arrays:
                    self.proc.stdin.write(memoryview(a).cast("B"))  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                raise self._fail(f"died before {what}") from None
            return self._read(time.monotonic() + timeout, what)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                with self._lock:
                    body = json.dumps({"op": "exit"}).encode()
                    self.proc.stdin.write(_LEN.pack(len(body)) + body)  # type: ignore[union-attr]
                    self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self._finalizer()
        self._log.close()


class SimRunner:
    """One slice: a built model per shape set in the worker (fp16: one for all; w8a8: one per bucket, lazily)."""

    def __init__(self, backend: "RknnSimBackend", spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> None:
        self.backend, self.spec, self.weights, self.buckets = backend, spec, weights, buckets
        every = bucket_shapes(spec, weights.args, buckets)
        self.shapes = {shape_key(sh["inputs"]): sh for sh in every}
        self.input_names = frozenset(n for sh in every for n in sh["inputs"])
        self.models: dict[tuple, str] = {}  # input-shape key -> model id in the worker
        self.io: dict[tuple, dict] = {}  # input-shape key -> what the built model records for each input
        self.build_info: dict[str, dict[str, Any]] = {}
        backend._open_runners += 1
        self._closed = False
        try:
            if backend.dtype == "fp16":  # one build per graph: batch 1 (every seq bucket), then each batch bucket
                for b in sorted({sh.get("batch", 1) for sh in every}):
                    self._build([sh for sh in every if sh.get("batch", 1) == b])
        except BaseException:
            self.close()
            raise

    def _build(self, group: list[dict[str, Any]]) -> None:
        be, spec = self.backend, self.spec
        first = group[0]
        tag = f"{spec.name}" + (f".b{first['batch']}" if "batch" in first else "") + (
            "" if len(group) > 1 else f".s{first['seq']}" + (f".c{first['ctx']}" if first["ctx"] else ""))
        names = tuple(first["inputs"])  # graph order (a batch graph has its own inputs)
        work = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=be.workdir))
        src = work / f"{tag}.onnx"
        rb = be.recipe_build
        # a w8a8 backend builds every slice from the recipe's weights; the recipe may keep a slice in fp16
        weights = rb.build_weights(spec, self.weights) if rb is not None else self.weights
        dtype = rb.recipe.slice_dtype(spec.name) if rb is not None else be.dtype
        # the compiler's recipe (rknn/compile.py): fp16 one symbolic graph + dynamic_input listing every bucket
        dyn = export_graph(spec, weights, group, self.buckets, src, names)
        b = BuildJob(f"{spec.name}/{tag}", spec.kind, str(src), str(work / "build.log"), str(work / "wd"), be.platform,
                     dtype, list(names), dyn, outputs=list(first["outputs"]))
        if dtype == "w8a8":
            assert rb is not None
            sh = group[0]
            quantize(b, rb.recipe, rb.calibration(spec, self.weights, self.buckets, sh["seq"], sh["ctx"]), work, "", sh["seq"])
        mid = f"{tag}-{uuid.uuid4().hex[:6]}"
        t = time.monotonic()
        res, _ = be.worker().request({"op": "build", "id": mid, "build": b.to_dict()}, timeout=be.build_timeout,
                                     what=f"the build of {tag}")
        if not res.get("ok"):
            try:
                tail = "\n".join(Path(b.log).read_text(errors="replace").splitlines()[-12:])
            except OSError:
                tail = ""
            raise CompileError(f"rknn-sim: building {tag} ({be.dtype}) failed: {res.get('error')}\n{tail}")
        res["seconds"] = time.monotonic() - t
        self.build_info[tag] = res
        be.builds.append({"name": tag, **{k: v for k, v in res.items() if k != "arrays"}})
        if not be.keep_files:
            shutil.rmtree(work / "wd", ignore_errors=True)
            src.unlink(missing_ok=True)
        for sh in group:
            self.models[shape_key(sh["inputs"])] = mid
            self.io[shape_key(sh["inputs"])] = res["io"]["inputs"]

    def run(self, inputs: dict[str, Any], cache_in_place: bool = False) -> dict[str, np.ndarray]:
        """One call: inputs as the runtime gives them (runtime/shard.py; a decode batch's caches as sequences).
        It writes nothing into its inputs (cache_in_place is not used): k_new/v_new are always returned."""
        if self.spec.has_attention and self.spec.kv_layout == "npu":
            batched = isinstance(inputs["past_k"], (list, tuple))
            inputs = (to_npu_batch_inputs if batched else to_npu_inputs)(self.spec, self.weights.args, inputs)
        given = {n: np.shape(v) for n, v in inputs.items() if n in self.input_names}
        key = shape_key(given)
        sh = self.shapes.get(key)
        if sh is None:
            raise UnsupportedSliceError(f"rknn-sim slice {self.spec.name} was prepared for bucket shapes "
                                        f"{[sh['inputs'] for sh in self.shapes.values()]}, not {given}")
        if key not in self.models:
            self._build([sh])
        arrays, fmt = rknn_io.pack_inputs(self.spec.kind, inputs, sh["inputs"], io=self.io[key])
        head, outs = self.backend.worker().request({"op": "run", "id": self.models[key], "data_format": fmt}, arrays,
                                                   timeout=self.backend.run_timeout, what=f"inference of {self.spec.name}")
        if not head.get("ok"):
            raise SimulatorWorkerError(f"rknn-sim: inference of {self.spec.name} failed in the simulator: {head.get('error')} "
                                       f"(see {self.backend.workdir}/worker.log)")
        return rknn_io.unpack_outputs(self.spec.kind, outs, sh["outputs"])

    def open(self) -> None:
        pass  # its models are built in the simulator's worker on first use

    def close(self) -> None:
        w = self.backend._worker
        if w is not None and w.alive():
            for mid in set(self.models.values()):
                try:
                    w.request({"op": "release", "id": mid}, timeout=60)
                except SimulatorWorkerError:
                    break
        self.models.clear()
        if not self._closed:
            self._closed = True
            self.backend._runner_closed()


class RknnSimBackend:
    """rknn-toolkit2 simulator (x86 or aarch64 host with the toolkit venv): numerics of compiled slices, no board.

    dtype: "fp16" or "w8a8". w8a8 needs `recipe_build`, a w8a8 recipe bound to the model
    (rknn/recipe.py::RecipeBuild(model, recipe)): build weights (smoothing/rotation), calibration activations,
    hybrid policy, range algorithm and fp16-kept slices, exactly as `exo-rknpu compile --dtype w8a8` uses them.
    """

    name = "rknn-sim"
    processor = "npu"
    kv_layout = "npu"  # the npu backend's form (slices/npu_form.py), so the simulator runs what the board runs
    static_shapes = True
    float_weights = True  # compiled from the float32 graph; --weights auto loads fp32 so digests match compile's
    batches = True  # fp16: batch buckets are built (Buckets.batch, slices/npu_form.py); w8a8: not (set in __init__)
    max_slice_bytes = None
    layers_per_slice = 1  # like the compiler and the npu backend: one graph per decoder layer
    # Unlike npu: the simulator cannot run a .rknn loaded from disk (init_runtime refuses a load_rknn model without a
    # target, docs/compiler.md), so every slice is rebuilt here from the weights.
    needs_layer_weights = True
    # every block but the embedding (a row gather over the vocabulary table stays on the host); static shapes
    blocks = frozenset(PLACEMENT_BLOCKS) - {"embedding"}

    def __init__(self, dtype: str = "fp16", platform: str = "rk3588", recipe_build: RecipeSource | None = None,
                 paths: Paths | None = None, python: str | Path | None = None, build_timeout: float = 1800.0,
                 run_timeout: float = 300.0, start_timeout: float = 180.0, workdir: str | Path | None = None,
                 keep_files: bool = False) -> None:
        if dtype not in DTYPES:
            raise BackendUnavailableError(f"rknn-sim: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if platform != "rk3588":
            raise BackendUnavailableError(f"rknn-sim: unsupported platform {platform!r}; supported: rk3588")
        self.python = Path(python) if python else toolkit.require(paths)[0]  # ToolkitMissingError names the install command
        self.dtype, self.platform = dtype, platform
        self.batches = dtype == "fp16"  # w8a8 builds are static and calibrated per bucket: no batch graphs
        self.recipe_build = recipe_build if dtype == "w8a8" else None  # fp16 builds use the original weights
        if dtype == "w8a8" and recipe_build is None:
            raise BackendUnavailableError(
                "rknn-sim w8a8 needs a recipe bound to the model: pass recipe_build=rknn.recipe.RecipeBuild(model) "
                "(`exo-rknpu generate --backend rknn-sim --backend-dtype w8a8` does)")
        self.build_timeout, self.run_timeout, self.start_timeout = build_timeout, run_timeout, start_timeout
        self.keep_files = keep_files
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="exo-rknpu-sim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._own_workdir and not keep_files:
            weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        self._worker: SimWorker | None = None
        self._wlock = threading.Lock()
        self.builds: list[dict[str, Any]] = []  # one entry per build: name, build_s, init_s, seconds, quant_policy
        self._open_runners = 0

    # -- worker ---------------------------------------------------------------------------------------------
    def worker(self) -> SimWorker:
        """The running worker (started on first use). A dead worker is not restarted: its models are gone."""
        with self._wlock:
            if self._worker is None:
                self._worker = SimWorker(self.python, self.workdir, self.start_timeout)
            return self._worker

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    def close(self) -> None:
        """Stop the worker and delete its scratch files (models built in it are lost; a later prepare starts anew)."""
        with self._wlock:
            w, self._worker = self._worker, None
        if w is not None:
            w.close()
        if self._own_workdir and not self.keep_files:
            for p in self.workdir.iterdir() if self.workdir.exists() else []:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _runner_closed(self) -> None:
        self._open_runners -= 1
        if self._open_runners <= 0:  # ShardRunner.close() closes runners, not backends: the last one stops the worker
            self.close()

    # -- Backend --------------------------------------------------------------------------------------------
    def supports(self, spec: SliceSpec) -> bool:
        return declared_support(self.blocks, spec)

    def reads_written_cache(self, spec: SliceSpec, args: ModelArgs) -> bool:
        return False  # its graphs attend over their compiled context bucket (static shapes: never pooled)

    def find_prepared(self, spec: SliceSpec, source: ShardSource, buckets: Buckets) -> None:
        return None  # it builds from the weights (or the compiled files `prepare` finds)

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> SimRunner:
        if not self.supports(spec):
            raise UnsupportedSliceError(f"rknn-sim does not run slice {spec.name!r} (the embedding stays on the host)")
        if self.dtype == "w8a8" and spec.kind == "layers" and spec.n_layers != 1:
            raise UnsupportedSliceError(f"rknn-sim w8a8 calibrates one decoder layer per slice; got {spec.name}: "
                                        f"use --layers-per-slice 1")
        rb = self.recipe_build
        if rb is not None and rb.recipe.rotation:
            # a rotated recipe changes the hidden state's basis: the host must run the recipe's (rotated) embedding
            mine = rb.runtime_weights()
            same = (np.array_equal(weights.layers[spec.start].o_proj, mine.layers[spec.start].o_proj) if spec.kind == "layers"
                    else weights.lm_head is not None and np.array_equal(weights.lm_head, mine.lm_head))
            if not same:
                raise UnsupportedSliceError(f"rknn-sim: the recipe rotates the residual stream ({rb.recipe.rotation}), so the "
                                            f"whole model must run its recipe_build.runtime_weights(); {spec.name} got other weights")
        return SimRunner(self, spec, weights, buckets)

