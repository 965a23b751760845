"""Board backend `npu`: compiled .rknn slices on the RK3588 NPU through rknn-toolkit-lite2 (RKNNLite).

prepare() finds the slice in the compiled cache (slices/artifacts.py index), refuses a manifest that does not
match the model fingerprint, the weights, the platform or its files' sha256 (ArtifactError with the reason),
loads one RKNNLite context per file and calls init_runtime(core_mask=...). The KV cache stays on the host
(the runtime passes past_k/past_v each call); inputs/outputs go through backends/rknn_io.py, the same code
the simulator verification uses.
"""

from __future__ import annotations

import platform as _platform
from pathlib import Path
from typing import Any

import numpy as np

from exo_rknpu.backends import rknn_io
from exo_rknpu.slices import artifacts as cc
from exo_rknpu.config import Paths, librknnrt_path
from exo_rknpu.errors import ArtifactError, BackendUnavailableError
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.spec import Buckets, SliceSpec

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
    def __init__(self, spec: SliceSpec, folder: Path, manifest: dict[str, Any], core_mask: int) -> None:
        from rknnlite.api import RKNNLite

        self.spec = spec
        self.files: list[tuple[dict[str, Any], Any]] = []
        self.by_shape: dict[tuple, tuple[Any, dict]] = {}
        try:
            for f in manifest["files"]:
                rk = RKNNLite(verbose=False)
                if rk.load_rknn(str(folder / f["file"])) != 0:
                    raise ArtifactError(f"RKNNLite could not load {folder / f['file']}")
                if rk.init_runtime(core_mask=core_mask) != 0:
                    raise BackendUnavailableError(f"RKNNLite init_runtime failed for {f['file']} (core_mask={core_mask}); see the rknn log")
                self.files.append((f, rk))
                for sh in f["shapes"]:
                    key = tuple(tuple(sh["inputs"][n]) for n in rknn_io.SLICE_INPUTS[spec.kind])
                    self.by_shape[key] = (rk, sh)
        except BaseException:
            self.close()
            raise

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = rknn_io.SLICE_INPUTS[self.spec.kind]
        key = tuple(tuple(np.shape(inputs[n])) for n in names)
        hit = self.by_shape.get(key)
        if hit is None:
            raise ArtifactError(f"slice {self.spec.name} was not compiled for input shapes {dict(zip(names, key))}; "
                                f"compiled buckets: {[dict(zip(names, k)) for k in self.by_shape]}")
        rk, sh = hit
        arrays, fmt = rknn_io.pack_inputs(self.spec.kind, inputs, sh["inputs"])
        outs = rk.inference(inputs=arrays, data_format=fmt, reuse_outputs=True)
        if outs is None:
            raise BackendUnavailableError(f"RKNNLite inference failed for slice {self.spec.name}")
        return rknn_io.unpack_outputs(self.spec.kind, outs, sh["outputs"])  # copies out of the reused buffers

    def close(self) -> None:
        for _, rk in self.files:
            rk.release()
        self.files.clear()


class NpuBackend:
    name = "npu"
    # "seq": decode buckets build with no CPU op. The transposed "dim" layout removes the CPU Transposes of prefill
    # buckets but leaves a small CPU Gather in every bucket (measured, docs/compiler.md), so decode keeps priority.
    kv_layout = "seq"
    static_shapes = True
    layers_per_slice: int | None = 1  # compiled slices are one graph per decoder layer (compiler/compile.py)

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
        return spec.kind in ("layers", "head")  # the embedding lookup stays on the host

    def locate(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> tuple[Path, dict[str, Any]]:
        """Find and check the compiled slice for these weights; ArtifactError gives the reason for a refusal."""
        folder, m = self.cache.find(weights.fingerprint, self.dtype, self.platform, spec.name)
        check_manifest(m, spec, weights, buckets, self.dtype, self.platform, folder)
        return folder, m

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> NpuRunner:
        folder, m = self.locate(spec, weights, buckets)
        return NpuRunner(spec, folder, m, self.core_mask)


def check_manifest(m: dict[str, Any], spec: SliceSpec, weights: ShardWeights, buckets: Buckets, dtype: str, platform: str,
                   folder: Path) -> None:
    where = f"{folder}/manifest.json"
    if m["model_fingerprint"] != weights.fingerprint:
        raise ArtifactError(f"{where} was compiled for another model (fingerprint {m['model_fingerprint'][:12]}…, "
                            f"this model is {weights.fingerprint[:12]}…); recompile for this model")
    if m["platform"] != platform:
        raise ArtifactError(f"{where} targets {m['platform']}, not {platform}; compile with --platform {platform}")
    if m["dtype"] != dtype:
        raise ArtifactError(f"{where} is {m['dtype']}, {dtype} was asked for")
    if m["slice"]["name"] != spec.name:
        raise ArtifactError(f"{where} holds slice {m['slice']['name']}, not {spec.name}")
    if m.get("weights_digest") != cc.slice_digest(spec, weights):
        raise ArtifactError(f"{where}: the weights of {spec.name} differ from those it was compiled from; recompile")
    have = set()
    for f in m["files"]:
        for sh in f["shapes"]:
            have.add((sh["seq"], sh["ctx"]))
    need = {(s, c if spec.kind == "layers" else None) for s in buckets.seq for c in (buckets.context if spec.kind == "layers" else (0,))}
    missing = sorted(need - have, key=str)
    if missing:
        raise ArtifactError(f"{where} lacks buckets (seq, ctx) {missing}; recompile with --seq/--context matching the runtime buckets")
