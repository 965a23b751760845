"""Compile the slices of a layer range to .rknn files, through the content-addressed cache.

fp16: one file per slice covering every (seq, ctx) bucket through rknn's dynamic_input (measured: 3.7x smaller
and faster to build than one file per bucket; see docs/compiler.md).
w8a8: one file per bucket, because hybrid quantization (int8 linear layers, the rest fp16) only produces
static-shape models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np

from exo_rknpu.rknn import io as rknn_io
from exo_rknpu.slices import artifacts as cc
from exo_rknpu.slices import manifest as mf
from exo_rknpu.rknn import toolkit
from exo_rknpu.rknn.buildlog import parse_build_log
from exo_rknpu.rknn.calibration import capture, repad, text_digest
from exo_rknpu.rknn.recipe import RecipeBuild, cache_text
from exo_rknpu.config import Paths
from exo_rknpu.errors import CompileError, UsageError
from exo_rknpu.fileio import sha256_file
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.recipe import DEFAULT_RECIPE, QuantRecipe
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.slices.spec import (NPU_BATCH, Buckets, SliceSpec, bucket_shapes, bucket_tag, compiled_inputs, npu_buckets,
                                   npu_kv_layout, npu_outputs_to_seq, plan_slices, to_kv_layout, to_npu_batch_inputs)

DTYPES = ("fp16", "w8a8")
PLATFORMS = ("rk3588",)
FP16_MIN_COS = 0.9999
EMBED_ON_HOST = True  # the embedding is a table lookup: done on the host CPU, not compiled (see docs)


@dataclass
class SliceResult:
    name: str
    key: str
    status: str  # "built" | "reused"
    folder: str
    files: list[str]
    seconds: float = 0.0
    cpu_ops: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    verify: dict[str, float] = field(default_factory=dict)
    per_bucket: dict[str, dict[str, int]] = field(default_factory=dict)  # "s1c256" -> {"cpu": n, "errors": n}
    verify_per_bucket: dict[str, dict[str, float]] = field(default_factory=dict)  # "b4c256" -> worst figures there

    @property
    def cpu_count(self) -> int:
        """Ops of this slice that run on the CPU, summed over its buckets (CPU-placed ops + fallback warnings)."""
        return sum(b["cpu"] for b in self.per_bucket.values()) if self.per_bucket else len(self.cpu_ops) + len(self.fallbacks)

    @property
    def error_count(self) -> int:
        """Compiler error lines (e.g. REGTASK register-field overflows) over its buckets; the build still finished."""
        return sum(b["errors"] for b in self.per_bucket.values())

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "cpu_count": self.cpu_count, "error_count": self.error_count}


class Progress:
    """One stderr line per slice with its time and the ETA of the rest."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.done, self.stream, self.enabled = total, 0, stream or sys.stderr, enabled
        self.built_times: list[float] = []
        self.remaining_builds = 0

    def start(self, name: str) -> None:
        if self.enabled:
            print(f"[{self.done + 1}/{self.total}] {name} ...", file=self.stream, flush=True)

    def finish(self, name: str, status: str, seconds: float) -> None:
        self.done += 1
        if status == "built":
            self.built_times.append(seconds)
            self.remaining_builds -= 1
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / self.total)
        eta = ""
        if self.built_times and self.remaining_builds > 0:
            eta = f", ETA {self.remaining_builds * sum(self.built_times) / len(self.built_times):.0f} s"
        print(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {name} {status} in {seconds:.1f} s{eta}",
              file=self.stream, flush=True)


def _ort_reference(spec: SliceSpec, ws: ShardWeights, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The slice's reference outputs: the "seq" graph (the CPU backends' form) in onnxruntime, on "seq" inputs."""
    import onnxruntime as ort

    from exo_rknpu.slices.onnx_export import build_onnx

    model = build_onnx(replace(spec, kv_layout="seq"), ws)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, s))) for s in samples]


def _figures(spec: SliceSpec, sample: dict[str, np.ndarray], ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    f = {f"cos_{k}": rknn_io.cosine(got[k], ref[k]) for k in ref}
    f.update({f"maxabs_{k}": float(np.abs(got[k] - ref[k]).max()) for k in ref})
    if "hidden_out" in ref and "hidden" in sample:  # the residual dominates hidden_out; the update itself is the stricter measure
        f["cos_delta"] = rknn_io.cosine(got["hidden_out"] - sample["hidden"], ref["hidden_out"] - sample["hidden"])
    if spec.kind == "head":
        f["top1_agree"] = float(np.mean(got["logits"].argmax(-1) == ref["logits"].argmax(-1)))
    return f


def _merge(figs: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in figs:
        for k, v in f.items():
            worst = max if k.startswith("maxabs") else min
            out[k] = worst(out[k], v) if k in out else v
    return out


# Wall-clock limit per build in a worker job (smollm2's largest slices build in minutes here); a hung toolkit fails.
BUILD_TIMEOUT_S = 1800.0


@dataclass
class BuildJob:
    """One .rknn build the toolkit worker runs (rknn/venv/worker.py reads it as JSON): compile's and rknn-sim's."""

    name: str
    kind: str  # the slice kind (rknn/io.py packs inputs by it)
    onnx: str  # the graph it compiles
    log: str  # the toolkit's verbose output goes here (rknn/buildlog.py reads it)
    workdir: str  # the toolkit's own scratch folder (hybrid quantization writes there)
    platform: str
    dtype: str  # fp16 | w8a8 (a w8a8 recipe may keep a slice fp16)
    inputs: list[str]  # input names in graph order
    dynamic_input: list[list[list[int]]] | None = None  # several shape sets in one file (fp16), else one static shape
    out: str | None = None  # where export_rknn writes the file (compile); rknn-sim keeps the model in its worker
    calib: list[list[str]] = field(default_factory=list)  # w8a8: per calibration sample, one .npy per input
    quant_policy: str | None = None  # w8a8: the recipe's int8 linears (slices/recipe.py POLICIES)
    quantized_algorithm: str | None = None  # w8a8: rknn's activation-range algorithm
    verify: list[list[str]] = field(default_factory=list)  # [inputs .npz, outputs .npz] the simulator runs after export
    out_shapes: list[dict[str, Any]] = field(default_factory=list)  # the output shapes of each verify pair
    outputs: list[str] = field(default_factory=list)  # output names in graph order (rknn-sim reads the built model's io)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_graph(spec: SliceSpec, weights: ShardWeights, group: list[dict[str, Any]], buckets: Buckets, path: Path,
                 names: tuple[str, ...]) -> list[list[list[int]]] | None:
    """Write the ONNX graph one build compiles from: a static graph for one shape set (dynamic_input needs at least
    two), else the symbolic graph (a decode batch graph for a group of one batch bucket); returns the dynamic_input
    listing each set's input shapes (None: static)."""
    from exo_rknpu.slices.npu_form import compiler_onnx
    import onnx

    batch = group[0].get("batch", 1)
    if len(group) == 1:
        sh = group[0]
        onnx.save(compiler_onnx(spec, weights, sh["seq"], sh["ctx"] or buckets.context[0], batch=batch), str(path))
        return None
    onnx.save(compiler_onnx(spec, weights, batch=batch), str(path))
    return [[sh["inputs"][n] for n in names] for sh in group]


def quantize(b: BuildJob, recipe: QuantRecipe, samples: list[dict[str, np.ndarray]], work: Path, prefix: str,
             seq: int) -> None:
    """Make `b` a w8a8 build under `recipe`: its policy, range algorithm, and `samples` as calibration files."""
    if not samples:
        raise CompileError(f"no calibration activations for {b.name.partition('/')[0]} at seq {seq}; "
                           f"the calibration text is too short for this bucket")
    b.quant_policy, b.quantized_algorithm = recipe.policy, recipe.algorithm
    b.calib = []
    for i, s in enumerate(samples):
        paths = []
        for n in b.inputs:
            p = work / f"calib-{prefix}{i}-{n}.npy"
            np.save(p, np.asarray(s[n], np.float32))  # rknn reads calibration data as float32 (the NPU form's are float16)
            paths.append(str(p.resolve()))
        b.calib.append(paths)


def _run_worker(py: Path, job: dict[str, Any], workdir: Path, timeout_per_build: float = BUILD_TIMEOUT_S) -> list[dict[str, Any]]:
    """Run the toolkit worker on `job` ({"builds": [BuildJob dicts], "result": path}); its results, or CompileError
    with the worker's output and the tail of the build log."""
    jp = workdir / "job.json"
    jp.write_text(json.dumps(job))
    timeout = timeout_per_build * max(1, len(job["builds"]))
    try:
        p = subprocess.run(toolkit.worker_argv(py, str(jp)), env=toolkit.worker_env(), cwd=str(workdir),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CompileError(f"RKNN build of {job['builds'][0]['name']} did not finish within {timeout:g} s "
                           f"(the toolkit may be stuck); its log is in {workdir}") from None
    rp = Path(job["result"])
    results = json.loads(rp.read_text())["results"] if rp.exists() else []
    if p.returncode != 0 or not results or not all(r["ok"] for r in results):
        err = next((r.get("error") for r in results if not r["ok"]), None) or f"worker exited with {p.returncode}"
        log_tail = ""
        for b in job["builds"]:
            lp = Path(b["log"])
            if lp.exists():
                log_tail = "\n".join(lp.read_text(errors="replace").splitlines()[-12:])
        raise CompileError(f"RKNN build of {job['builds'][0]['name']} failed: {err}\n{(p.stdout or '')[-2000:]}\n{log_tail}")
    return results


@dataclass(frozen=True)
class SliceJob:
    """One slice to compile: what, in which form, under which key, and how it is checked."""

    spec: SliceSpec
    weights: ShardWeights  # what the manifest digests and verification compares against
    buckets: Buckets
    dtype: str  # fp16 | w8a8
    platform: str
    key: str  # its cache key (compile_range's)
    toolkit_version: str
    samples: dict[int, list[dict[str, np.ndarray]]] | None = None  # captured inputs per seq bucket (w8a8, verify)
    verify: bool = False
    min_cos: float | None = None  # None: FP16_MIN_COS for fp16, no bound for w8a8
    build_weights: ShardWeights | None = None  # w8a8: the recipe's equivalent transform of `weights`, built from
    recipe: QuantRecipe | None = None  # w8a8: decides the build (slices/recipe.py)
    strict: bool = False  # refuse the slice (nothing committed) with any CPU op or compiler error in any bucket

    @property
    def build_dtype(self) -> str:
        """The dtype it is built in: a w8a8 recipe may keep this slice in fp16."""
        return self.recipe.slice_dtype(self.spec.name) if (self.dtype == "w8a8" and self.recipe is not None) else self.dtype

    def file_groups(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """(file name, the bucket shape sets it serves): fp16 one file for every bucket (dynamic_input), and one per
        batch bucket of a slice reading the cache (its decode batch graph, every context: `.b<B>.rknn`); w8a8 one
        static file per bucket (hybrid quantization only produces static shapes; no batch buckets)."""
        shapes = bucket_shapes(self.spec, self.weights.args, self.buckets)
        if self.dtype == "fp16":
            batches = sorted({sh.get("batch", 1) for sh in shapes})
            return [(f"{self.spec.name}" + (f".b{b}" if b > 1 else "") + ".rknn", [sh for sh in shapes if sh.get("batch", 1) == b])
                    for b in batches]
        return [(f"{self.spec.name}.s{sh['seq']}" + (f".c{sh['ctx']}" if sh["ctx"] else "") + ".rknn", [sh]) for sh in shapes]

    def logical_at(self, sh: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        """The captured inputs of bucket `sh` in the "seq" form (the reference graph's), padded to its context."""
        got = (self.samples or {}).get(sh["seq"], [])
        return [repad(s, sh["ctx"]) if self.spec.has_attention else s for s in got]

    def samples_at(self, sh: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        """The captured inputs of bucket `sh` as its compiled graph takes them (slices/spec.py::compiled_inputs)."""
        return [compiled_inputs(self.spec, self.weights.args, s) for s in self.logical_at(sh)]


@dataclass
class SliceReport:
    """What the build logs and the verification say about one compiled slice (the manifest's `build`)."""

    cpu_ops: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    cycles: list[int] = field(default_factory=list)
    internal_kb: float = 0.0
    weight_kb: float = 0.0
    errors: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    per_bucket: dict[str, dict[str, int]] = field(default_factory=dict)  # CPU ops and compiler errors per bucket
    verify_per_bucket: dict[str, dict[str, float]] | None = None
    # w8a8: weight shapes [out, in] of the Convs built int8 (the recipe's policy as the compiler applied it; every
    # file of a slice gets the same policy), None for an fp16 slice
    int8_convs: list[list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("verify_per_bucket", "int8_convs"):
            if d[k] is None:
                d.pop(k)
        return d


def export(job: SliceJob, stage: Path, work: Path) -> list[tuple[BuildJob, list[dict[str, Any]]]]:
    """Write every graph, calibration set and verification input of `job` under `work`; the builds (each with
    the shape sets its file serves) whose files go to `stage`."""
    spec = job.spec
    out: list[tuple[BuildJob, list[dict[str, Any]]]] = []
    for fname, group in job.file_groups():
        names = tuple(group[0]["inputs"])  # graph order (a batch graph has its own inputs)
        src = work / f"{fname[:-5]}.onnx"  # fp16: one graph for the file's several buckets
        dyn = export_graph(spec, job.build_weights or job.weights, group, job.buckets, src, names)
        b = BuildJob(f"{spec.name}/{fname}", spec.kind, str(src), str(work / f"{fname}.log"), str(work / f"wd-{fname}"),
                     job.platform, job.build_dtype, list(names), dyn, out=str(stage / fname))
        if job.build_dtype == "w8a8":
            assert job.recipe is not None
            quantize(b, job.recipe, job.samples_at(group[0]), work, f"{fname}-", group[0]["seq"])
        if job.verify:
            for sh in group:
                for i, (compiled, logical) in enumerate(verify_samples(job, sh)):
                    ip, op, rp = (work / f"v-{fname}-{bucket_tag(sh)}-{i}-{end}.npz" for end in ("in", "out", "ref"))
                    np.savez(ip, **compiled)
                    np.savez(rp, **logical)  # the reference's inputs ("seq" form; a batch's rows stacked on axis 0)
                    b.verify.append([str(ip), str(op)])
                    b.out_shapes.append(sh["outputs"])
        out.append((b, group))
    return out


def verify_samples(job: SliceJob, sh: dict[str, Any]) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """What --verify runs in bucket `sh`: (the compiled graph's inputs, the reference's "seq"-form inputs). A seq
    bucket: up to two captured calls. A decode batch bucket of B: one call whose row b is captured decode step b
    (cycled when fewer were captured), marshalled as the runtime marshals a batch (slices/spec.py
    to_npu_batch_inputs); the reference's inputs are the rows' own, stacked on a leading axis."""
    spec, args = job.spec, job.weights.args
    if "batch" not in sh:
        for s in job.logical_at(sh)[:2]:
            yield compiled_inputs(spec, args, s), s
        return
    steps = job.logical_at({"seq": 1, "ctx": sh["ctx"]})
    if not steps:  # captures follow the seq buckets: without seq 1 there is no decode step to batch
        raise CompileError(f"--verify: no decode step captured for {job.spec.name}'s batch bucket {bucket_tag(sh)}; "
                           f"add seq bucket 1 (--seq 1,...)")
    rows = [steps[b % len(steps)] for b in range(sh["batch"])]
    cache = {k: [to_kv_layout(r, "npu")[k] for r in rows] for k in ("past_k", "past_v")}
    joined = {k: np.concatenate([r[k] for r in rows], axis={"cos": 2, "sin": 2, "mask": 0}.get(k, 1))
              for k in rows[0] if k not in cache}
    yield to_npu_batch_inputs(spec, args, {**joined, **cache}), {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def outputs_per_row(got: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    """A decode batch graph's outputs per request: row b of the layer state ([1, B, width]) and request b's block of
    the new cache rows (stacked request-major: [B*n*kv, ...])."""
    return [{k: v[b * (len(v) // batch):(b + 1) * (len(v) // batch)] if k in ("k_new", "v_new") else v[:, b:b + 1]
             for k, v in got.items()} for b in range(batch)]


def read_logs(exported: list[tuple[BuildJob, list[dict[str, Any]]]], results: list[dict[str, Any]], stage: Path) -> SliceReport:
    """The build logs as one report (CPU ops, fallbacks, cycles, memory, and CPU ops and errors per bucket); the logs
    are kept with the artefact."""
    report = SliceReport()
    log_text = []
    parsed = []
    for b, _ in exported:
        text = Path(b.log).read_text(errors="replace")
        log_text.append(f"===== {b.name}\n{text}")
        r = parse_build_log(text)
        parsed.append(r)
        report.cpu_ops += [x for x in r.cpu_ops if x not in report.cpu_ops]
        report.fallbacks += [x for x in r.fallbacks if x not in report.fallbacks]
        report.cycles += r.cycles
        report.internal_kb = max(report.internal_kb, r.internal_kb or 0.0)
        report.weight_kb = max(report.weight_kb, r.weight_kb or 0.0)
        report.errors += r.errors[:5]
    (stage / "build.log").write_text("\n".join(log_text))
    report.build_seconds = sum(r.get("build_s", 0.0) for r in results)
    report.int8_convs = next((r["int8_convs"] for r in results if "int8_convs" in r), None)
    report.per_bucket = placement_per_bucket(parsed, [group for _, group in exported])
    return report


def placement_per_bucket(reports: list, groups: list[list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """CPU ops (CPU-placed ops + fallback warnings) and compiler error lines of each bucket: each build log's tables
    are matched to its shape sets by their input shapes (a dynamic_input build prints one table per set)."""
    out: dict[str, dict[str, int]] = {}
    for r, group in zip(reports, groups):
        for t in r.per_table:
            sh = next((g for g in group if all(tuple(g["inputs"][n]) == t.inputs[n] for n in t.inputs if n in g["inputs"])),
                      group[0] if len(group) == 1 else None)
            tag = bucket_tag(sh) if sh is not None else f"table{len(out)}"
            prev = out.get(tag, {"cpu": 0, "errors": 0})
            out[tag] = {"cpu": prev["cpu"] + t.cpu_count, "errors": prev["errors"] + len(t.errors)}
    return out


def check_strict(name: str, per_bucket: dict[str, dict[str, int]], where: str) -> None:
    """--strict: CompileError naming the buckets of slice `name` with a CPU op or a compiler error."""
    bad = {k: v for k, v in per_bucket.items() if v["cpu"] or v["errors"]}
    if bad:
        raise CompileError(f"--strict: slice {name} has CPU ops or compiler errors in buckets {bad} ({where})")


def verify(job: SliceJob, builds: list[BuildJob]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The simulator's outputs against onnxruntime's on the same inputs: the worst figures over every sample,
    and per bucket. CompileError when a cosine is below the bound (min_cos; fp16 default FP16_MIN_COS)."""
    spec = job.spec
    figs: list[dict[str, float]] = []
    per_bucket: dict[str, dict[str, float]] = {}
    for b in builds:
        for (ip, op) in b.verify:
            with np.load(ip.replace("-in.npz", "-ref.npz")) as z:  # the "seq" form of the inputs (export wrote both)
                sample = {k: z[k] for k in z.files}
            with np.load(op) as z:
                got = {k: z[k] for k in z.files}
            batch = sample["mask"].shape[0] if "mask_0" in b.inputs else None  # a batch graph: rows stacked
            rows = ([{k: v[r] for k, v in sample.items()} for r in range(batch)] if batch else [sample])
            for sample, out in zip(rows, outputs_per_row(got, batch) if batch else [got]):
                if spec.kind == "layers" and spec.kv_layout == "npu":
                    out = npu_outputs_to_seq(out, job.weights.args)
                f = _figures(spec, sample, _ort_reference(spec, job.weights, [sample])[0], out)
                figs.append(f)
                seq = sample[b.inputs[0]].shape[1] if not batch else 1
                ctx = sample["mask"].shape[3] - seq if spec.has_attention else 0
                tag = f"b{batch}c{ctx}" if batch else f"s{seq}c{ctx}"
                per_bucket[tag] = _merge([per_bucket.get(tag, f), f])
    if not figs:
        raise CompileError(f"--verify: no activations captured for {spec.name}")
    worst = _merge(figs)
    worst["samples"] = float(len(figs))
    threshold = job.min_cos if job.min_cos is not None else (FP16_MIN_COS if job.dtype == "fp16" else None)
    if threshold is not None:
        bad = {k: v for k, v in worst.items() if k.startswith("cos_") and k != "cos_delta" and v < threshold}
        if bad:
            where = [t for t, f in per_bucket.items() if any(f.get(k, 1.0) < threshold for k in bad)]
            raise CompileError(f"slice {spec.name} ({job.dtype}) failed verification in buckets {', '.join(where)}: "
                               + ", ".join(f"{k}={v:.6f}" for k, v in bad.items()) + f" < {threshold}")
    return worst, per_bucket


def recorded_io(spec: SliceSpec, b: BuildJob, group: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, str]]]:
    """What the exported file records for each input and output (dtype, layout): the board hands inputs over so.
    A graph input the compiler dropped shows here (the file records only the inputs it kept): CompileError."""
    assert b.out is not None
    try:
        return rknn_io.read_io(Path(b.out).read_bytes(), b.inputs, list(group[0]["outputs"]))
    except rknn_io.MarshalError as e:
        raise CompileError(f"slice {spec.name}: {Path(b.out).name}: {e} (did the compiler drop an input?)") from None


def make_manifest(job: SliceJob, files: list[dict[str, Any]], report: SliceReport, verified: dict[str, float],
                  seconds: float) -> dict[str, Any]:
    """The manifest committed with the files; its facts re-derive `job.key` (the board checks that)."""
    spec, ws, tk = job.spec, job.weights, job.toolkit_version
    manifest = {
        "format": mf.FORMAT, "key": job.key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "slice": cc.spec_dict(spec), "layers": list(range(spec.start, spec.stop)) if spec.kind == "layers" else [],
        "model_fingerprint": ws.fingerprint, "weights_digest": cc.slice_digest(spec, ws), "model_args": ws.args.to_dict(),
        "dtype": job.dtype, "platform": job.platform, "toolkit_version": tk, "exporter_version": cc.exporter_version(),
        # the oldest board runtime that loads these files: librknnrt refuses files of a newer toolkit ("Invalid
        # RKNN model version"); the npu backend and doctor check it (backends/board.py)
        "librknnrt_min": tk,
        "buckets": job.buckets.describe(),
        "files": files, "build": {"seconds": round(seconds, 2), **report.to_dict()},
        "verify": verified,
    }
    if job.dtype == "w8a8" and job.recipe is not None:
        manifest["quantization"] = quantization_facts(job.recipe, spec.name, job.samples)
    if cc.manifest_key(manifest) != job.key:  # the board re-derives the key from these facts (npu.check_manifest)
        raise CompileError(f"internal: the manifest of {spec.name} does not re-derive its cache key; "
                           f"artifacts.manifest_key is out of step with compile_range's key")
    return manifest


def compile_slice(job: SliceJob, cache: cc.SliceCache, py: Path) -> tuple[Path, dict[str, Any]]:
    """export -> build -> verify -> manifest: build one slice into a staging folder with the toolkit at `py`,
    check it in the simulator, commit it to `cache`. Nothing is committed when a step fails."""
    import shutil

    t0 = time.monotonic()
    stage = cache.staging()
    work = Path(tempfile.mkdtemp(prefix="work-", dir=stage.parent))
    try:
        exported = export(job, stage, work)
        builds = [b for b, _ in exported]
        results = _run_worker(py, {"result": str(work / "result.json"), "builds": [b.to_dict() for b in builds]}, work)
        report = read_logs(exported, results, stage)
        if job.strict:
            check_strict(job.spec.name, report.per_bucket, "nothing was cached; its build.log: compile without --strict")
        verified: dict[str, float] = {}
        if job.verify:
            verified, report.verify_per_bucket = verify(job, builds)
        files = [{"file": Path(b.out).name, "sha256": sha256_file(Path(b.out)), "bytes": Path(b.out).stat().st_size,
                  "shapes": group, "io": recorded_io(job.spec, b, group),
                  # graph order (the manifest is written with sorted keys, so its shape dicts lose it)
                  "inputs": list(b.inputs), "outputs": list(group[0]["outputs"])} for b, group in exported if b.out]
        manifest = make_manifest(job, files, report, verified, time.monotonic() - t0)
        shutil.rmtree(work, ignore_errors=True)
        return cache.commit(stage, manifest), manifest
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise


def quantization_facts(recipe: QuantRecipe, name: str, samples: dict[int, list] | None) -> dict[str, Any]:
    """The manifest's `quantization` section of a w8a8 slice: the whole recipe (QuantRecipe.from_dict reads it
    back), what this slice became, and how many calibration samples each seq bucket had."""
    return {"recipe": recipe.to_dict(), "slice_dtype": recipe.slice_dtype(name), "summary": recipe.describe(),
            "recipe_key": cache_text(recipe, name),  # the cache key's recipe part (artifacts.manifest_key re-derives the key)
            "calibration_sha256": text_digest(recipe.text),
            "samples_per_bucket": {str(k): len(v) for k, v in (samples or {}).items()}}


def compile_range(model: str, layers: str, *, platform: str = "rk3588", dtype: str = "fp16", buckets: Buckets | None = None,
                  verify: bool = False, cache_dir: Path | None = None, paths: Paths | None = None,
                  progress: bool = True, min_cos: float | None = None,
                  on_built: Callable[[SliceResult], None] | None = None,
                  recipe: QuantRecipe = DEFAULT_RECIPE,
                  specs: list[SliceSpec] | None = None, cut: list[SliceSpec] | None = None,
                  strict: bool = False) -> list[SliceResult]:
    """Compile every slice layer range `layers` ("A-B") of `model` needs; reuse what the cache already holds.

    `specs`: compile exactly these slices instead (a placement plan's NPU slices, `compile --placement`); `cut`: how
    that plan cuts the range into slices, so activations for verification are captured at their inputs.
    w8a8 builds follow `recipe` (slices/recipe.py; rknn/recipe.py applies it), which is part of each w8a8
    slice's cache key and manifest; w8a8 compiles whole decoder layers only. `strict`: refuse any slice (built or
    found in the cache) with a CPU op or a compiler error in any bucket. Default buckets: the runtime's for the npu
    backend (`npu_buckets(Buckets(batch=NPU_BATCH))`); w8a8 and models whose layers keep the "seq" form (qwen3)
    have no batch buckets: asking for them is refused (UsageError) before anything heavy."""
    from exo_rknpu.model.loader import load_args, resolve_model

    _check_request(dtype, platform, recipe)
    paths = paths or Paths.from_env()
    src = resolve_model(model, paths)
    args = load_args(src)
    lr = LayerRange.parse(layers, args.num_hidden_layers)
    specs = _npu_specs(lr, specs, dtype, npu_kv_layout(args))
    cache = cc.SliceCache(cache_dir or paths.compiled)
    cache.clean_tmp()
    buckets = buckets or npu_buckets(Buckets(batch=() if dtype == "w8a8" else NPU_BATCH), args)
    _check_batch(buckets, dtype, args.qk_norm)
    rc = _RangeCompiler(paths, cache, buckets, dtype, platform, recipe, verify, min_cos, strict)
    capturing = verify or dtype == "w8a8"
    slices = rc.captured(src, lr, specs, cut) if capturing else _one_layer_at_a_time(src, lr, specs)
    bar = Progress(len(specs), enabled=progress)
    bar.remaining_builds = sum(1 for s in specs if rc.found.get(s.name) is None)  # streaming: not known yet, assume built
    results = []
    for s, w in slices:
        bar.start(s.name)
        r = rc.compile(s, w)
        del w  # streaming: this layer's float32 goes before the next is read
        if r.status == "reused" and not capturing:
            bar.remaining_builds -= 1
        bar.finish(s.name, r.status, r.seconds)
        if on_built:
            on_built(r)
        results.append(r)
    return results


def _check_request(dtype: str, platform: str, recipe: QuantRecipe) -> None:
    """Refuse what cannot be compiled before anything is read."""
    if dtype not in DTYPES:
        raise CompileError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if platform not in PLATFORMS:
        raise CompileError(f"unsupported --platform {platform!r}; supported: {', '.join(PLATFORMS)}")
    if dtype == "w8a8" and recipe.rotation:
        raise CompileError(f"the w8a8 recipe rotates the residual stream ({recipe.rotation}): the runtime does not run a "
                           f"rotated embedding yet, so rotated slices are only measured (compile --agreement), not compiled")


def _check_batch(buckets: Buckets, dtype: str, qk_norm: bool) -> None:
    """Refuse decode batch buckets this form has no batch graph for, rather than record them unbuilt (the runtime
    then runs those shards' concurrent decode steps one after another, and says so when it opens one)."""
    if not buckets.batch:
        return
    why = ("w8a8 has none (hybrid quantization builds static files calibrated per bucket)" if dtype == "w8a8" else
           "this model's layers keep the \"seq\" cache form (per-head q/k norms, e.g. qwen3), which has none" if qk_norm
           else None)
    if why is not None:
        raise UsageError(f"--batch {','.join(map(str, buckets.batch))}: no decode batch graphs can be built: {why}; "
                           f"compile without --batch (or --batch 1): its concurrent decode steps run one after another")


def _npu_specs(lr: LayerRange, specs: list[SliceSpec] | None, dtype: str, kv_layout: str) -> list[SliceSpec]:
    """The slices to compile (default: one per layer and the head; the embedding stays on the host), in the npu
    backend's cache layout."""
    if specs is None:
        specs = [s for s in plan_slices(lr.start, lr.stop, lr.is_first, lr.is_last, 1) if not (EMBED_ON_HOST and s.kind == "embed")]
    if dtype == "w8a8" and any(s.kind == "layers" and not s.whole for s in specs):
        raise CompileError("w8a8 compiles whole decoder layers (the recipe calibrates and smooths per layer); compile a "
                           "block-split placement with --dtype fp16")
    return [replace(s, kv_layout=kv_layout) if s.kind == "layers" else s for s in specs]


@dataclass
class _RangeCompiler:
    """compile_range's state: the cache, the settings every slice shares, and what capture found."""

    paths: Paths
    cache: cc.SliceCache
    buckets: Buckets
    dtype: str
    platform: str
    recipe: QuantRecipe
    verify: bool
    min_cos: float | None
    strict: bool
    keys: dict[str, str] = field(default_factory=dict)
    found: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    samples: dict[str, dict[int, list[dict[str, np.ndarray]]]] = field(default_factory=dict)
    recipe_build: RecipeBuild | None = None
    py: Path | None = None

    def __post_init__(self) -> None:
        self.exporter = cc.exporter_version()
        self.tk_version = toolkit.status(self.paths).versions.get("rknn", toolkit.TOOLKIT_VERSION)

    def key_of(self, s: SliceSpec, w: ShardWeights) -> str:
        return cc.cache_key(weights_digest=cc.slice_digest(s, w), fingerprint=w.fingerprint, spec=s, buckets=self.buckets,
                            dtype=self.dtype, platform=self.platform, toolkit_version=self.tk_version, exporter=self.exporter,
                            calibration=cache_text(self.recipe, s.name) if self.dtype == "w8a8" else "")  # w8a8: its recipe

    def look_up(self, s: SliceSpec, w: ShardWeights) -> None:
        if s.name not in self.keys:
            self.keys[s.name] = self.key_of(s, w)
            self.found[s.name] = self.cache.lookup(self.keys[s.name])

    def captured(self, src: ModelSource, lr: LayerRange, specs: list[SliceSpec],
                 cut: list[SliceSpec] | None) -> Iterator[tuple[SliceSpec, ShardWeights]]:
        """Capture the inputs the slices still to build need (calibration runs the model from layer 0, so the range
        is held whole; each layer is still read once); every slice with the range's weights."""
        from exo_rknpu.model.loader import load_shard, load_tokenizer

        ws = load_shard(src, lr, weights="fp32")
        for s in specs:
            self.look_up(s, ws)
        todo = [s for s in specs if self.found[s.name] is None]
        if todo:
            self.py = toolkit.require(self.paths)[0]
            full = ws
            if not lr.is_first:  # the layers before the range (and the embedding) join the ones already read
                pre = load_shard(src, LayerRange(0, lr.start, lr.n_layers), weights="fp32")
                full = replace(ws, layer_range=LayerRange(0, lr.stop, lr.n_layers), layers={**pre.layers, **ws.layers},
                               embed_tokens=pre.embed_tokens)
            if self.dtype == "w8a8":  # the recipe's calibration activations and build weights, as rknn-sim gets them
                rb = self.recipe_build = RecipeBuild(src, self.recipe, stop=lr.stop, weights=full)
                self.samples = {s.name: {q: rb.calibration(s, ws, self.buckets, q, None) for q in self.buckets.seq} for s in todo}
            else:
                self.samples = capture(full, todo, self.buckets, load_tokenizer(src).encode(self.recipe.text), cut=cut)
        return ((s, ws) for s in specs)

    def compile(self, s: SliceSpec, w: ShardWeights) -> SliceResult:
        """`s` from the cache, or built into it."""
        t = time.monotonic()
        self.look_up(s, w)
        key = self.keys[s.name]
        if self.found[s.name] is not None:
            m, folder, status = self.found[s.name], self.cache.entry(key), "reused"
        else:
            self.py = self.py or toolkit.require(self.paths)[0]
            rb = self.recipe_build
            job = SliceJob(s, w, self.buckets, self.dtype, self.platform, key, self.tk_version, self.samples.get(s.name),
                           self.verify, self.min_cos, rb.build_weights(s, w) if rb else None,
                           self.recipe if self.dtype == "w8a8" else None, self.strict)
            (folder, m), status = compile_slice(job, self.cache, self.py), "built"
        assert m is not None
        per_bucket = m["build"].get("per_bucket", {})
        if self.strict:
            check_strict(s.name, per_bucket, f"cached: {folder}/build.log")
        return SliceResult(s.name, key, status, str(folder), [str(folder / f["file"]) for f in m["files"]],
                           round(time.monotonic() - t, 2), m["build"].get("cpu_ops", []), m["build"].get("fallbacks", []),
                           m.get("verify", {}), per_bucket, m["build"].get("verify_per_bucket") or {})


def _one_layer_at_a_time(src: ModelSource, lr: LayerRange, specs: list[SliceSpec]) -> Iterator[tuple[SliceSpec, ShardWeights]]:
    """Each slice with the weights it is built from, read one decoder layer at a time: every tensor is read once
    and one layer's float32 (with the final norm + head after the model's last layer) is alive at a time. The
    slices of one layer's parts (a placement plan's cut) share that layer's read."""
    from exo_rknpu.model.loader import load_shard

    heads = [s for s in specs if s.kind == "head"]
    groups: dict[tuple[int, int], list[SliceSpec]] = {}
    for s in specs:
        if s.kind == "layers":
            groups.setdefault((s.start, s.stop), []).append(s)
    for (start, stop), group in groups.items():
        w = load_shard(src, LayerRange(start, stop, lr.n_layers), weights="fp32", embed=False)  # + final norm/head if last
        for s in group:
            yield s, w
        if stop == lr.n_layers:
            for h in heads:
                yield h, w
            heads = []
        del w
    if heads:  # the head without the last layer's slices (a plan keeping that layer elsewhere)
        w = load_shard(src, LayerRange(lr.n_layers - 1, lr.n_layers, lr.n_layers), weights="fp32", embed=False)
        for h in heads:
            yield h, w
