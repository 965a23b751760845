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
from dataclasses import dataclass, field, replace
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
from exo_rknpu.errors import CompileError
from exo_rknpu.fileio import sha256_file
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.recipe import DEFAULT_RECIPE, QuantRecipe
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.slices.spec import Buckets, SliceSpec, bucket_shapes, compiled_inputs, npu_buckets, npu_outputs_to_seq, plan_slices
from exo_rknpu.rknn.npu import NpuBackend

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
    """The slice's reference outputs: the "seq" graph (CPU backends' form) in onnxruntime, on the "seq" inputs."""
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


def _run_worker(py: Path, job: dict[str, Any], workdir: Path, timeout_per_build: float = BUILD_TIMEOUT_S) -> list[dict[str, Any]]:
    jp = workdir / "job.json"
    jp.write_text(json.dumps(job))
    pkg_root = Path(__file__).resolve().parent.parent.parent
    env = {"PYTHONPATH": str(pkg_root), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "OMP_NUM_THREADS": "2"}
    timeout = timeout_per_build * max(1, len(job["builds"]))
    try:
        p = subprocess.run([str(py), "-m", "exo_rknpu.rknn.venv.worker", str(jp)], env=env, cwd=str(workdir),
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


def compile_slice(spec: SliceSpec, ws: ShardWeights, *, buckets: Buckets, dtype: str, platform: str, key: str,
                  cache: cc.SliceCache, py: Path, tk_version: str, samples: dict[int, list[dict[str, np.ndarray]]] | None,
                  verify: bool, min_cos: float | None, build_ws: ShardWeights | None = None,
                  recipe: QuantRecipe | None = None, strict: bool = False) -> tuple[Path, dict[str, Any]]:
    """Build one slice into a staging folder, verify it in the simulator, commit it to the cache.

    w8a8: `recipe` (slices/recipe.py) decides the build; `build_ws` are the weights the .rknn is built from (the
    recipe's equivalent transform of `ws`); the manifest's weights digest and the verify reference use `ws`. A
    slice the recipe keeps in fp16 is built in fp16, one file per bucket like the rest of the w8a8 build.
    `strict`: refuse (CompileError, nothing committed) a slice with any CPU op or compiler error in any bucket."""
    from exo_rknpu.slices.npu_form import compiler_onnx
    import onnx

    t0 = time.monotonic()
    stage = cache.staging()
    work = Path(tempfile.mkdtemp(prefix="work-", dir=stage.parent))
    try:
        shapes = bucket_shapes(spec, ws.args, buckets)
        names = tuple(shapes[0]["inputs"])  # graph order (slices/spec.py input_shapes)
        builds: list[dict[str, Any]] = []
        verify_sets: list[tuple[dict, list[dict[str, np.ndarray]]]] = []  # (shape set, samples)
        build_dtype = recipe.slice_dtype(spec.name) if (dtype == "w8a8" and recipe is not None) else dtype

        def logical_for(sh: dict[str, Any]) -> list[dict[str, np.ndarray]]:  # "seq" form at this bucket (the reference's)
            got = (samples or {}).get(sh["seq"], [])
            return [repad(s, sh["ctx"]) if spec.has_attention else s for s in got]

        def sample_for(sh: dict[str, Any]) -> list[dict[str, np.ndarray]]:  # as the compiled slice takes them
            return [compiled_inputs(spec, ws.args, s) for s in logical_for(sh)]

        if dtype == "fp16":
            onnx_path = work / f"{spec.name}.onnx"
            if len(shapes) == 1:  # one shape: a static graph (dynamic_input needs at least two shape sets)
                only = shapes[0]
                onnx.save(compiler_onnx(spec, ws, only["seq"], only["ctx"] or buckets.context[0]), str(onnx_path))
            else:  # symbolic S/C: one file, dynamic_input lists the buckets
                onnx.save(compiler_onnx(spec, ws), str(onnx_path))
            groups = [(f"{spec.name}.rknn", shapes)]
        else:
            groups = [(f"{spec.name}.s{sh['seq']}" + (f".c{sh['ctx']}" if sh["ctx"] else "") + ".rknn", [sh]) for sh in shapes]
        for fname, group in groups:
            if dtype == "fp16":
                src = onnx_path
                dyn = [[group_sh["inputs"][n] for n in names] for group_sh in group] if len(group) > 1 else None
            else:
                sh = group[0]
                src = work / f"{fname[:-5]}.onnx"
                onnx.save(compiler_onnx(spec, build_ws or ws, sh["seq"], sh["ctx"] or buckets.context[0]), str(src))
                dyn = None
            b: dict[str, Any] = {"name": f"{spec.name}/{fname}", "kind": spec.kind, "onnx": str(src), "out": str(stage / fname),
                                 "log": str(work / f"{fname}.log"), "workdir": str(work / f"wd-{fname}"), "platform": platform,
                                 "dtype": build_dtype, "dynamic_input": dyn, "verify": [], "out_shapes": [],
                                 "inputs": list(names)}
            if build_dtype == "w8a8":
                assert recipe is not None
                b["quant_policy"], b["quantized_algorithm"] = recipe.policy, recipe.algorithm
                calib = sample_for(group[0])
                if not calib:
                    raise CompileError(f"no calibration activations for {spec.name} at seq {group[0]['seq']}; "
                                       f"the calibration text is too short for this bucket")
                b["calib"] = []
                for i, s in enumerate(calib):
                    paths = []
                    for n in names:
                        p = work / f"calib-{fname}-{i}-{n}.npy"
                        np.save(p, s[n].astype(np.float32))  # rknn reads calibration data as float32
                        paths.append(str(p.resolve()))
                    b["calib"].append(paths)
            if verify:
                for sh in group:
                    vs = logical_for(sh)[:2]
                    for i, s in enumerate(vs):
                        ip, op = work / f"v-{fname}-{sh['seq']}-{sh['ctx']}-{i}-in.npz", work / f"v-{fname}-{sh['seq']}-{sh['ctx']}-{i}-out.npz"
                        np.savez(ip, **compiled_inputs(spec, ws.args, s))
                        b["verify"].append([str(ip), str(op)])
                        b["out_shapes"].append(sh["outputs"])
                        verify_sets.append((sh, [s]))
            builds.append(b)
        results = _run_worker(py, {"result": str(work / "result.json"), "builds": builds}, work)

        # Logs -> placement report; keep the logs with the artefact.
        report: dict[str, Any] = {"cpu_ops": [], "fallbacks": [], "cycles": [], "internal_kb": 0.0, "weight_kb": 0.0, "errors": []}
        log_text = []
        for b in builds:
            text = Path(b["log"]).read_text(errors="replace")
            log_text.append(f"===== {b['name']}\n{text}")
            r = parse_build_log(text)
            report["cpu_ops"] += [x for x in r.cpu_ops if x not in report["cpu_ops"]]
            report["fallbacks"] += [x for x in r.fallbacks if x not in report["fallbacks"]]
            report["cycles"] += r.cycles
            report["internal_kb"] = max(report["internal_kb"], r.internal_kb or 0.0)
            report["weight_kb"] = max(report["weight_kb"], r.weight_kb or 0.0)
            report["errors"] += r.errors[:5]
        (stage / "build.log").write_text("\n".join(log_text))
        report["build_seconds"] = sum(r.get("build_s", 0.0) for r in results)
        report["per_bucket"] = placement_per_bucket([parse_build_log(Path(b["log"]).read_text(errors="replace")) for b in builds],
                                                    [group for _, group in groups])
        if strict and any(v["cpu"] or v["errors"] for v in report["per_bucket"].values()):
            bad = {k: v for k, v in report["per_bucket"].items() if v["cpu"] or v["errors"]}
            raise CompileError(f"--strict: slice {spec.name} has CPU ops or compiler errors in buckets {bad} "
                               f"(CPU ops: {report['cpu_ops'] + report['fallbacks']}; errors: {report['errors'][:2]}); "
                               f"nothing was cached")

        verify_figs: dict[str, float] = {}
        if verify:
            figs: list[dict[str, float]] = []
            per_bucket: dict[str, dict[str, float]] = {}
            vi = 0
            pairs = [pair for b in builds for pair in b["verify"]]
            for (_, op), (sh, (sample,)) in zip(pairs, verify_sets):
                with np.load(op) as z:
                    got = {k: z[k] for k in z.files}
                if spec.kind == "layers" and spec.kv_layout == "npu":
                    got = npu_outputs_to_seq(got, ws.args)
                ref = _ort_reference(spec, ws, [sample])[0]
                f = _figures(spec, sample, ref, got)
                figs.append(f)
                tag = bucket_tag(sh)
                per_bucket[tag] = _merge([per_bucket.get(tag, f), f])
                vi += 1
            if not figs:
                raise CompileError(f"--verify: no activations captured for {spec.name}")
            verify_figs = _merge(figs)
            verify_figs["samples"] = float(vi)
            threshold = min_cos if min_cos is not None else (FP16_MIN_COS if dtype == "fp16" else None)
            if threshold is not None:
                bad = {k: v for k, v in verify_figs.items() if k.startswith("cos_") and k != "cos_delta" and v < threshold}
                if bad:
                    raise CompileError(f"slice {spec.name} ({dtype}) failed verification: "
                                       + ", ".join(f"{k}={v:.6f}" for k, v in bad.items()) + f" < {threshold}")
            report["verify_per_bucket"] = per_bucket

        files = []
        out_names = list(shapes[0]["outputs"])
        for fname, group in groups:
            p = stage / fname
            # what the file records for each input and output (dtype, layout): the board hands inputs over so
            try:  # a graph input the compiler dropped shows here (the file records the inputs it kept)
                io = rknn_io.read_io(p.read_bytes(), names, out_names)
            except rknn_io.MarshalError as e:
                raise CompileError(f"slice {spec.name}: {fname}: {e} (did the compiler drop an input?)") from None
            files.append({"file": fname, "sha256": sha256_file(p), "bytes": p.stat().st_size, "shapes": group, "io": io})
        manifest = {
            "format": mf.FORMAT, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "slice": cc.spec_dict(spec), "layers": list(range(spec.start, spec.stop)) if spec.kind == "layers" else [],
            "model_fingerprint": ws.fingerprint, "weights_digest": cc.slice_digest(spec, ws), "model_args": ws.args.to_dict(),
            "dtype": dtype, "platform": platform, "toolkit_version": tk_version, "exporter_version": cc.exporter_version(),
            # the oldest board runtime that loads these files: librknnrt refuses files of a newer toolkit ("Invalid
            # RKNN model version"); the npu backend and doctor check it (backends/board.py)
            "librknnrt_min": tk_version,
            "buckets": {"seq": list(buckets.seq), "context": list(buckets.context)},
            "files": files, "build": {"seconds": round(time.monotonic() - t0, 2), **report},
            "verify": verify_figs,
        }
        if dtype == "w8a8" and recipe is not None:
            manifest["quantization"] = quantization_facts(recipe, spec.name, samples)
        if cc.manifest_key(manifest) != key:  # the board re-derives the key from these facts (npu.check_manifest)
            raise CompileError(f"internal: the manifest of {spec.name} does not re-derive its cache key; "
                               f"artifacts.manifest_key is out of step with compile_range's key")
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        folder = cache.commit(stage, manifest)
        return folder, manifest
    except BaseException:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise


def bucket_tag(sh: dict[str, Any]) -> str:
    """The name of a shape set in reports: s<seq>c<ctx> (s<seq> for slices without a cache)."""
    return f"s{sh['seq']}" + (f"c{sh['ctx']}" if sh.get("ctx") else "")


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
    found in the cache) with a CPU op or a compiler error in any bucket."""
    from exo_rknpu.model.loader import load_args, load_shard, load_tokenizer, resolve_model

    if dtype not in DTYPES:
        raise CompileError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if platform not in PLATFORMS:
        raise CompileError(f"unsupported --platform {platform!r}; supported: {', '.join(PLATFORMS)}")
    paths = paths or Paths.from_env()
    src = resolve_model(model, paths)
    args = load_args(src)
    buckets = buckets or npu_buckets(Buckets(), args)  # the npu backend's prefill chunks are bounded (slices/spec.py)
    lr = LayerRange.parse(layers, args.num_hidden_layers)
    if dtype == "w8a8" and recipe.rotation:
        raise CompileError(f"the w8a8 recipe rotates the residual stream ({recipe.rotation}): the runtime does not run a "
                           f"rotated embedding yet, so rotated slices are only measured (compile --agreement), not compiled")
    if specs is None:
        specs = [s for s in plan_slices(lr.start, lr.stop, lr.is_first, lr.is_last, 1) if not (EMBED_ON_HOST and s.kind == "embed")]
    if dtype == "w8a8" and any(s.kind == "layers" and not s.whole for s in specs):
        raise CompileError("w8a8 compiles whole decoder layers (the recipe calibrates and smooths per layer); compile a "
                           "block-split placement with --dtype fp16")
    specs = [replace(s, kv_layout=NpuBackend.kv_layout) if s.kind == "layers" else s for s in specs]  # compiled for the npu backend's cache layout
    cache = cc.SliceCache(cache_dir or paths.compiled)
    cache.clean_tmp()
    exporter = cc.exporter_version()
    tk_status = toolkit.status(paths)
    tk_version = tk_status.versions.get("rknn", toolkit.TOOLKIT_VERSION)

    def key_of(s: SliceSpec, w: ShardWeights) -> str:
        return cc.cache_key(weights_digest=cc.slice_digest(s, w), fingerprint=w.fingerprint, spec=s, buckets=buckets,
                            dtype=dtype, platform=platform, toolkit_version=tk_version, exporter=exporter,
                            calibration=cache_text(recipe, s.name) if dtype == "w8a8" else "")  # w8a8: its recipe

    keys: dict[str, str] = {}
    found: dict[str, dict[str, Any] | None] = {}
    samples: dict[str, dict[int, list[dict[str, np.ndarray]]]] = {}
    py = None
    rb: RecipeBuild | None = None
    capturing = verify or dtype == "w8a8"
    if capturing:
        # Calibration runs the model from layer 0, so the range is held whole (each layer is still read once).
        ws = load_shard(src, lr, weights="fp32")
        keys = {s.name: key_of(s, ws) for s in specs}
        found = {s.name: cache.lookup(keys[s.name]) for s in specs}
        todo = [s for s in specs if found[s.name] is None]
        if todo:
            py, _ = toolkit.require(paths)
            full = ws
            if not lr.is_first:  # the layers before the range (and the embedding) join the ones already read
                pre = load_shard(src, LayerRange(0, lr.start, args.num_hidden_layers), weights="fp32")
                full = replace(ws, layer_range=LayerRange(0, lr.stop, args.num_hidden_layers),
                               layers={**pre.layers, **ws.layers}, embed_tokens=pre.embed_tokens)
            if dtype == "w8a8":  # the recipe's calibration activations and build weights, as rknn-sim gets them
                rb = RecipeBuild(src, recipe, stop=lr.stop, weights=full)
                samples = {s.name: {q: rb.calibration(s, ws, buckets, q, None) for q in buckets.seq} for s in todo}
            else:
                samples = capture(full, todo, buckets, load_tokenizer(src).encode(recipe.text), cut=cut)
        slices: Iterator[tuple[SliceSpec, ShardWeights]] = ((s, ws) for s in specs)
    else:
        slices = _one_layer_at_a_time(src, lr, specs)
    bar = Progress(len(specs), enabled=progress)
    bar.remaining_builds = sum(1 for s in specs if found.get(s.name) is None)  # streaming: not known yet, assume built
    results = []
    for s, w in slices:
        bar.start(s.name)
        t = time.monotonic()
        if s.name not in keys:
            keys[s.name] = key_of(s, w)
            found[s.name] = cache.lookup(keys[s.name])
        if found[s.name] is not None:
            m, folder, status = found[s.name], cache.entry(keys[s.name]), "reused"
            if not capturing:
                bar.remaining_builds -= 1
        else:
            py = py or toolkit.require(paths)[0]
            folder, m = compile_slice(s, w, buckets=buckets, dtype=dtype, platform=platform, key=keys[s.name], cache=cache,
                                      py=py, tk_version=tk_version, samples=samples.get(s.name), verify=verify,
                                      min_cos=min_cos, build_ws=rb.build_weights(s, w) if rb else None,
                                      recipe=recipe if dtype == "w8a8" else None, strict=strict)
            status = "built"
        del w  # streaming: this layer's float32 goes before the next is read
        r = SliceResult(s.name, keys[s.name], status, str(folder), [str(folder / f["file"]) for f in m["files"]],
                        round(time.monotonic() - t, 2), m["build"].get("cpu_ops", []), m["build"].get("fallbacks", []),
                        m.get("verify", {}), m["build"].get("per_bucket", {}))
        if strict and (r.cpu_count or r.error_count):
            raise CompileError(f"--strict: the cached slice {s.name} has {r.cpu_count} CPU ops and {r.error_count} "
                               f"compiler errors over its buckets ({folder}/build.log)")
        bar.finish(s.name, status, r.seconds)
        if on_built:
            on_built(r)
        results.append(r)
    return results


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
