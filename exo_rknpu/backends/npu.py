"""Board backend `npu`: compiled .rknn slices on the RK3588 NPU through rknn-toolkit-lite2 (RKNNLite).

prepare() finds the slice in the compiled cache (slices/artifacts.py index) and checks it from the manifest and the
files alone: model fingerprint, model args, slice spec, buckets, dtype, platform, exporter version, the content
address over the recorded weights digest, and every file's size and sha256 (check_manifest; ArtifactError with the
reason and the compile command). The decoder layers' and the head's weights are never loaded on the board
(`needs_layer_weights = False`). It loads one RKNNLite context per file and calls init_runtime(core_mask=...). The KV cache stays on the host
(the runtime passes past_k/past_v each call); inputs/outputs go through backends/rknn_io.py, the same code
the simulator verification uses.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exo_rknpu.backends import rknn_io
from exo_rknpu.slices import artifacts as cc
from exo_rknpu.config import Paths, librknnrt_path
from exo_rknpu.errors import ArtifactError, BackendUnavailableError
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.backends.base import declared_support
from exo_rknpu.slices.spec import PLACEMENT_BLOCKS, Buckets, SliceSpec, to_npu_inputs

DEVICE_TREE = Path("/proc/device-tree/compatible")
CORE_MASKS = {"auto": 0, "0": 1, "1": 2, "2": 4, "0_1": 3, "0_1_2": 7, "all": 0xFFFF}


def board_problems(librknnrt: Path | None = None, machine: str | None = None) -> list[str]:
    """What stops the NPU backend on this machine (empty when nothing does)."""
    problems = []
    machine = machine or _platform.machine()
    if machine not in ("aarch64", "arm64"):
        problems.append(f"this machine is {machine}, not aarch64: the NPU backend runs only on an RK3588 board")
    try:
        import rknnlite.api  # noqa: F401
    except ImportError:
        problems.append("rknn-toolkit-lite2 is not installed (pip install 'exo-rknpu[board]' on the board; aarch64 wheels only)")
    lib = librknnrt or librknnrt_path()
    if not lib.exists():
        problems.append(f"no {lib}: install Rockchip's librknnrt.so (rknpu2 runtime) on the board")
    drv = npu_driver_version()
    if drv is None:
        problems.append("no RKNPU driver visible (/sys/kernel/debug/rknpu/version or /proc/device-tree): is this an RK3588 with the rknpu driver?")
    elif tuple(int(x) for x in drv.split(".")[:2] if x.isdigit()) < (0, 9):
        problems.append(f"RKNPU driver {drv} is too old; rknn 2.5 needs >= 0.9 (update the board's kernel)")
    return problems


def npu_driver_version() -> str | None:
    for p in (Path("/sys/kernel/debug/rknpu/version"), Path("/sys/module/rknpu/version")):
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        return text.split(":")[-1].strip().lstrip("v") or None
    return None


class NpuRunner:
    def __init__(self, spec: SliceSpec, folder: Path, manifest: dict[str, Any], core_mask: int, args: ModelArgs) -> None:
        from rknnlite.api import RKNNLite

        self.spec, self.args = spec, args
        # graph input order: the kind's fixed names, or the compiled shapes' order (a slice of some blocks of a layer)
        self.names = rknn_io.slice_names(spec.kind, manifest["files"][0]["shapes"][0]["inputs"], rknn_io.SLICE_INPUTS)
        self.files: list[tuple[dict[str, Any], Any]] = []
        self.by_shape: dict[tuple, tuple[Any, dict, dict]] = {}
        try:
            for f in manifest["files"]:
                if "io" not in f:
                    raise ArtifactError(f"{folder}/manifest.json records no input/output attributes for {f['file']}; "
                                        f"recompile it: {compile_command(spec, args.num_hidden_layers, manifest['dtype'], manifest['platform'], None)}")
                rk = RKNNLite(verbose=False)
                if rk.load_rknn(str(folder / f["file"])) != 0:
                    raise ArtifactError(f"RKNNLite could not load {folder / f['file']}")
                if rk.init_runtime(core_mask=core_mask) != 0:
                    raise BackendUnavailableError(f"RKNNLite init_runtime failed for {f['file']} (core_mask={core_mask}); see the rknn log")
                self.files.append((f, rk))
                for sh in f["shapes"]:
                    key = tuple(tuple(sh["inputs"][n]) for n in self.names)
                    self.by_shape[key] = (rk, sh, f["io"]["inputs"])
        except BaseException:
            self.close()
            raise

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.names
        if self.spec.has_attention and self.spec.kv_layout == "npu":
            inputs = to_npu_inputs(self.spec, self.args, inputs)  # float16; the cache already is (runtime/cache.py)
        key = tuple(tuple(np.shape(inputs[n])) for n in names)
        hit = self.by_shape.get(key)
        if hit is None:
            raise ArtifactError(f"slice {self.spec.name} was not compiled for input shapes {dict(zip(names, key))}; "
                                f"compiled buckets: {[dict(zip(names, k)) for k in self.by_shape]}")
        rk, sh, io = hit
        # each input in the dtype and layout the file records: no conversion left for RKNNLite to do on the host
        arrays, fmt = rknn_io.pack_inputs(self.spec.kind, inputs, sh["inputs"], io=io)
        outs = rk.inference(inputs=arrays, data_type=rknn_io.data_types(arrays), data_format=fmt, reuse_outputs=True)
        if outs is None:
            raise BackendUnavailableError(f"RKNNLite inference failed for slice {self.spec.name}")
        return rknn_io.unpack_outputs(self.spec.kind, outs, sh["outputs"])  # copies out of the reused buffers

    def close(self) -> None:
        for _, rk in self.files:
            rk.release()
        self.files.clear()


@dataclass(frozen=True)
class ShardMemory:
    """Host memory (bytes) a shard needs on the npu backend, from the compiled sizes recorded in the manifests."""

    rknn_bytes: dict[str, int]  # slice name -> its .rknn files' bytes (RKNNLite loads them into the board's DDR)
    internal_bytes: int  # the largest "Total Internal Memory Size" of the build logs (activation buffers), per slice
    embed_bytes: int  # the embedding table on the host (first shard only)
    kv_bytes: int  # the host KV-cache budget

    @property
    def total(self) -> int:
        return sum(self.rknn_bytes.values()) + self.internal_bytes * len(self.rknn_bytes) + self.embed_bytes + self.kv_bytes


class NpuBackend:
    name = "npu"
    # "npu": the NPU form (slices/npu_form.py): float16 cache kept as the compiled slice takes it, and a graph with no
    # CPU op at the default buckets up to ctx 512 (docs/compiler.md lists what remains at 1024 and 2048)
    kv_layout = "npu"
    static_shapes = True
    layers_per_slice: int | None = 1  # compiled slices are one graph per decoder layer (compiler/compile.py)
    needs_layer_weights = False  # layers and head run from the .rknn files: the loader leaves their weights out
    # only the embedding is loaded; float32 as the compiled slices were checked against (False would keep it compact:
    # GGUF Q8_0 exactly, float sources as int8, measured cosine 0.99985 against float32 on the tiny test model)
    float_weights = True
    max_slice_bytes = None
    # every block but the embedding (a row gather over the vocabulary table stays on the host); static shapes
    blocks = frozenset(PLACEMENT_BLOCKS) - {"embedding"}

    def __init__(self, dtype: str = "fp16", platform: str = "rk3588", cache_dir: str | Path | None = None,
                 core_mask: str = "auto", check_board: bool = True) -> None:
        if core_mask not in CORE_MASKS:
            raise BackendUnavailableError(f"unknown core_mask {core_mask!r}; choose one of {', '.join(CORE_MASKS)}")
        self.dtype, self.platform, self.core_mask = dtype, platform, CORE_MASKS[core_mask]
        self.cache = cc.SliceCache(Path(cache_dir) if cache_dir else Paths.from_env().compiled)
        if check_board:
            problems = board_problems()
            if problems:
                raise BackendUnavailableError("the npu backend cannot run here: " + "; ".join(problems))

    def supports(self, spec: SliceSpec) -> bool:
        return declared_support(self.blocks, spec)

    def locate(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> tuple[Path, dict[str, Any]]:
        """Find and check the compiled slice from its manifest and files alone (no layer weights are read);
        ArtifactError gives the reason for a refusal and the compile command to run."""
        hint = compile_command(spec, weights.args.num_hidden_layers, self.dtype, self.platform, buckets)
        folder, m = self.cache.find(weights.fingerprint, self.dtype, self.platform, spec.name, hint=hint)
        check_manifest(m, spec, weights, buckets, self.dtype, self.platform, folder, hint)
        return folder, m

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> NpuRunner:
        folder, m = self.locate(spec, weights, buckets)
        return NpuRunner(spec, folder, m, self.core_mask, weights.args)

    def resident_bytes(self, fingerprint: str, args: ModelArgs, layer_range: LayerRange, max_context: int,
                       max_requests: int = 1, kv_cap_bytes: int | None = None, embed_bytes: int | None = None) -> ShardMemory:
        """Host memory this backend needs for `layer_range`, from the manifests alone (nothing is loaded or hashed).

        .rknn bytes of every layer slice (+ the head on the last shard), each slice's internal (activation) memory
        from its build log, the embedding on the first shard (`embed_bytes`; default: the float32 table the host
        loads today) and the KV cache: float32 K and V for the range's layers at `max_context`, for up to
        `max_requests` live requests; `kv_cap_bytes` (RequestLimits.max_bytes) bounds the other requests, the current
        one may exceed it. ArtifactError (with the compile command) if a slice is not compiled.
        """
        specs = [SliceSpec("layers", i, i + 1, kv_layout=self.kv_layout) for i in layer_range.layers]
        if layer_range.is_last:
            specs.append(SliceSpec("head"))
        rknn: dict[str, int] = {}
        internal = 0
        for spec in specs:
            hint = compile_command(spec, args.num_hidden_layers, self.dtype, self.platform, None)
            _, m = self.cache.find(fingerprint, self.dtype, self.platform, spec.name, check_files=False, hint=hint)
            rknn[spec.name] = sum(int(f["bytes"]) for f in m["files"])
            internal = max(internal, int(float(m.get("build", {}).get("internal_kb") or 0.0) * 1024))
        if embed_bytes is None:
            embed_bytes = args.vocab_size * args.hidden_size * 4 if layer_range.is_first else 0
        itemsize = 2 if self.kv_layout == "npu" else 4  # the NPU form keeps the cache in float16
        per_request = 2 * len(layer_range.layers) * args.num_key_value_heads * max_context * args.head_dim * itemsize
        kv = max_requests * per_request
        if kv_cap_bytes is not None:
            kv = min(kv, kv_cap_bytes + per_request)
        return ShardMemory(rknn, internal, embed_bytes, kv)


def compile_command(spec: SliceSpec, n_layers: int, dtype: str, platform: str, buckets: Buckets | None) -> str:
    """The `exo-rknpu compile` line that builds `spec` (the head is built with the model's last layer)."""
    layers = f"{spec.start}-{spec.stop - 1}" if spec.kind == "layers" else f"{n_layers - 1}-{n_layers - 1}"
    cmd = f"exo-rknpu compile --model MODEL --layers {layers} --dtype {dtype} --platform {platform}"
    if buckets is not None:
        cmd += f" --seq {','.join(map(str, buckets.seq))} --context {','.join(map(str, buckets.context))}"
    return cmd


def check_manifest(m: dict[str, Any], spec: SliceSpec, weights: ShardWeights, buckets: Buckets, dtype: str, platform: str,
                   folder: Path, hint: str | None = None) -> None:
    """Compare the facts recorded at compile time with what this shard needs; one-line ArtifactError on a mismatch.

    Reads only the manifest (its files' sizes and sha256 are checked by SliceCache.find): the model fingerprint comes
    from the source's config and tensor table, and the slice weights digest is tied to the entry by its content
    address (artifacts.manifest_key), so the layer weights need not be loaded. When the shard did load the slice's
    tensors (a host with the weights), their digest is compared too.
    """
    where = f"{folder}/manifest.json"
    run = f"; run: {hint or compile_command(spec, weights.args.num_hidden_layers, dtype, platform, buckets)}"

    def refuse(why: str) -> ArtifactError:
        return ArtifactError(f"{where} {why}{run}")

    if m["model_fingerprint"] != weights.fingerprint:
        raise refuse(f"was compiled for another model (fingerprint {m['model_fingerprint'][:12]}…, "
                     f"this model is {weights.fingerprint[:12]}…)")
    if m["platform"] != platform:
        raise refuse(f"targets {m['platform']}, not {platform}")
    if m["dtype"] != dtype:
        raise refuse(f"is {m['dtype']}, {dtype} was asked for")
    want_spec = cc.spec_dict(spec)
    if m["slice"] != want_spec:
        diff = {k: m["slice"].get(k) for k in want_spec if m["slice"].get(k) != want_spec[k]}
        raise refuse(f"holds slice {m['slice'].get('name')} {diff}, this shard needs {spec.name} "
                     f"{ {k: want_spec[k] for k in diff} }")
    if json.loads(json.dumps(weights.args.to_dict())) != m.get("model_args"):
        raise refuse("records other model hyper-parameters (model_args) than this model's config")
    if m.get("exporter_version") != cc.exporter_version():
        raise refuse(f"was built by another version of the slice graph/exporter ({m.get('exporter_version')}, "
                     f"this one is {cc.exporter_version()})")
    if m["key"] != folder.name or m["key"] != cc.manifest_key(m):
        raise refuse("does not match its content address (its recorded facts were edited or it was moved)")
    if _has_tensors(spec, weights) and m.get("weights_digest") != cc.slice_digest(spec, weights):
        raise refuse(f"was compiled from other weights of {spec.name} than this model's")
    have = set()
    for f in m["files"]:
        for sh in f["shapes"]:
            have.add((sh["seq"], sh["ctx"]))
    need = {(s, c if spec.has_attention else None) for s in buckets.seq for c in (buckets.context if spec.has_attention else (0,))}
    missing = sorted(need - have, key=str)
    if missing:
        raise refuse(f"lacks buckets (seq, ctx) {missing}")


def _has_tensors(spec: SliceSpec, weights: ShardWeights) -> bool:
    if spec.kind == "layers":
        return all(i in weights.layers for i in range(spec.start, spec.stop))
    return weights.final_norm is not None and weights.lm_head is not None
