"""Board backend `npu`: compiled .rknn slices on the RK3588 NPU through rknn-toolkit-lite2 (RKNNLite).

prepare() finds the slice in the compiled cache (slices/artifacts.py index) and checks it from the manifest and the
files alone: model fingerprint, model args, slice spec, buckets, dtype, platform, exporter version, the content
address over the recorded weights digest, and every file's size and sha256 (check_manifest; ArtifactError with the
reason and the compile command). The decoder layers' and the head's weights are never loaded on the board
(`needs_layer_weights = False`). It loads one RKNNLite context per file and calls init_runtime(core_mask=...). The KV cache stays on the host
(the runtime passes past_k/past_v each call); inputs/outputs go through rknn/io.py, the same code
the simulator verification uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exo_rknpu.backends import board
from exo_rknpu.rknn import io as rknn_io
from exo_rknpu.slices import artifacts as cc
from exo_rknpu.config import Paths
from exo_rknpu.errors import ArtifactError, BackendUnavailableError
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.backends.base import declared_support
from exo_rknpu.backends.board import CORE_MASKS, board_problems
from exo_rknpu.slices.spec import (PLACEMENT_BLOCKS, Buckets, SliceSpec, bucket_shapes, bucket_tag, npu_kv_layout,
                                   shape_key, to_npu_batch_inputs, to_npu_inputs)

if TYPE_CHECKING:  # annotations only: the loader is not imported with the backend
    from exo_rknpu.model.loader import ShardSource


def librknnrt_needed(m: dict[str, Any]) -> str:
    """The oldest librknnrt a compiled slice runs on: recorded at compile time (older manifests: the toolkit's)."""
    return str(m.get("librknnrt_min") or m.get("toolkit_version") or "")


class NpuRunner:
    def __init__(self, spec: SliceSpec, folder: Path, manifest: dict[str, Any], core_mask: int, args: ModelArgs) -> None:
        from rknnlite.api import RKNNLite

        self.spec, self.args = spec, args
        self.input_names = frozenset(n for f in manifest["files"] for sh in f["shapes"] for n in sh["inputs"])
        self.files: list[tuple[dict[str, Any], Any]] = []
        self.by_shape: dict[tuple, tuple[Any, dict, dict, tuple[list[str], list[str]]]] = {}
        self.inference_options = board.inference_options(RKNNLite)  # reuse_outputs only where lite2 has it (2.5.0 on)
        try:
            for f in manifest["files"]:
                if "io" not in f:
                    raise ArtifactError(f"{folder}/manifest.json records no input/output attributes for {f['file']} "
                                        f"(compiled by an older exo-rknpu); delete that folder and run exo-rknpu compile again")
                rk = RKNNLite(verbose=False)
                if rk.load_rknn(str(folder / f["file"])) != 0:
                    raise ArtifactError(f"RKNNLite could not load {folder / f['file']}")
                if rk.init_runtime(core_mask=core_mask) != 0:
                    rk.release()
                    raise BackendUnavailableError(f"RKNNLite init_runtime failed for {folder / f['file']} "
                                                  f"(core_mask={core_mask}); RKNNLite's log above says why; "
                                                  "exo-rknpu doctor checks this board")
                self.files.append((f, rk))
                # the graph's input and output order, as compile recorded it (older manifests: the kind's fixed names)
                order = (f.get("inputs") or list(rknn_io.slice_names(spec.kind, f["shapes"][0]["inputs"], rknn_io.SLICE_INPUTS)),
                         f.get("outputs") or list(rknn_io.slice_names(spec.kind, f["shapes"][0]["outputs"], rknn_io.SLICE_OUTPUTS)))
                for sh in f["shapes"]:
                    self.by_shape[shape_key(sh["inputs"])] = (rk, sh, f["io"]["inputs"], order)
        except BaseException:
            self.close()
            raise

    def run(self, inputs: dict[str, Any], cache_in_place: bool = False) -> dict[str, np.ndarray]:
        """One call: inputs as the runtime gives them (runtime/shard.py; a decode batch's caches as sequences).
        It writes nothing into its inputs (cache_in_place is not used): k_new/v_new are always returned."""
        if self.spec.has_attention and self.spec.kv_layout == "npu":
            # float16; the cache already is (runtime/cache.py); a decode batch: each request's cache in place
            batched = isinstance(inputs["past_k"], (list, tuple))
            inputs = (to_npu_batch_inputs if batched else to_npu_inputs)(self.spec, self.args, inputs)
        given = {n: np.shape(v) for n, v in inputs.items() if n in self.input_names}
        hit = self.by_shape.get(shape_key(given))
        if hit is None:
            raise ArtifactError(f"slice {self.spec.name} was not compiled for input shapes {given}; "
                                f"compiled buckets: {[dict(k) for k in self.by_shape]}")
        rk, sh, io, (ins, outs_order) = hit
        # each input in the dtype and layout the file records: no conversion left for RKNNLite to do on the host
        arrays, fmt = rknn_io.pack_inputs(self.spec.kind, inputs, {n: sh["inputs"][n] for n in ins}, io=io)
        outs = rk.inference(inputs=arrays, data_type=rknn_io.data_types(arrays), data_format=fmt, **self.inference_options)
        if outs is None:
            raise BackendUnavailableError(f"RKNNLite inference failed for slice {self.spec.name}")
        # copies (out of reused buffers on 2.5)
        return rknn_io.unpack_outputs(self.spec.kind, outs, {n: sh["outputs"][n] for n in outs_order})

    def open(self) -> None:
        pass  # its compiled files were loaded by prepare

    def close(self) -> None:
        for _, rk in self.files:
            rk.release()
        self.files.clear()


@dataclass(frozen=True)
class ShardMemory:
    """Host memory (bytes) a shard needs on the npu backend, from the compiled sizes recorded in the manifests."""

    rknn_bytes: dict[str, int]  # slice name -> its .rknn files' bytes (RKNNLite loads them into the board's DDR)
    internal_bytes: int  # the largest "Total Internal Memory Size" of the build logs (activation buffers), per context
    embed_bytes: int  # the embedding table on the host (first shard only)
    kv_bytes: int  # the host KV-cache budget
    contexts: dict[str, int]  # slice name -> its files, each one RKNNLite context with its own internal memory

    def slice_bytes(self, name: str) -> int:
        """What one slice holds: its files and the internal memory of each file's context."""
        return self.rknn_bytes[name] + self.internal_bytes * self.contexts[name]

    @property
    def total(self) -> int:
        return sum(self.slice_bytes(n) for n in self.rknn_bytes) + self.embed_bytes + self.kv_bytes


class NpuBackend:
    name = "npu"
    processor = "npu"
    # "npu": the NPU form (slices/npu_form.py): float16 cache kept as the compiled slice takes it, and a graph with no
    # CPU op at any default bucket (docs/compiler.md)
    kv_layout = "npu"
    static_shapes = True
    layers_per_slice: int | None = 1  # compiled slices are one graph per decoder layer (rknn/compile.py)
    needs_layer_weights = False  # layers and head run from the .rknn files: the loader leaves their weights out
    # only the embedding is loaded; float32 as the compiled slices were checked against (False would keep it compact:
    # GGUF Q8_0 exactly, float sources as int8, measured cosine 0.99985 against float32 on the tiny test model)
    float_weights = True
    batches = True  # fp16: batch buckets are compiled (Buckets.batch, slices/npu_form.py); w8a8: not (set in __init__)
    max_slice_bytes = None
    # every block but the embedding (a row gather over the vocabulary table stays on the host); static shapes
    blocks = frozenset(PLACEMENT_BLOCKS) - {"embedding"}

    def __init__(self, dtype: str = "fp16", platform: str = "rk3588", cache_dir: str | Path | None = None,
                 core_mask: str = "auto", check_board: bool = True) -> None:
        if core_mask not in CORE_MASKS:
            raise BackendUnavailableError(f"unknown core_mask {core_mask!r}; choose one of {', '.join(CORE_MASKS)}")
        self.dtype, self.platform, self.core_mask = dtype, platform, CORE_MASKS[core_mask]
        self.batches = dtype == "fp16"  # compile builds w8a8 without batch buckets
        self.cache = cc.SliceCache(Path(cache_dir) if cache_dir else Paths.from_env().compiled)
        self.check_board = check_board
        if check_board:
            problems = board_problems()
            if problems:
                raise BackendUnavailableError("the npu backend cannot run here: " + "; ".join(problems))

    def supports(self, spec: SliceSpec) -> bool:
        return declared_support(self.blocks, spec)

    def reads_written_cache(self, spec: SliceSpec, args: ModelArgs) -> bool:
        return False  # its graphs attend over their compiled context bucket (static shapes: never pooled)

    def locate(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> tuple[Path, dict[str, Any]]:
        """Find and check the compiled slice from its manifest and files alone (no layer weights are read);
        ArtifactError gives the reason for a refusal and the compile command to run."""
        hint = shard_compile_command(weights.layer_range, spec, self.dtype, self.platform, buckets)
        folder, m = self.cache.find(weights.fingerprint, self.dtype, self.platform, spec.name, hint=hint)
        check_manifest(m, spec, weights, buckets, self.dtype, self.platform, folder, hint)
        return folder, m

    def find_prepared(self, spec: SliceSpec, source: ShardSource, buckets: Buckets) -> None:
        return None  # its compiled slices are found by `prepare`, which reads no layer weights (needs_layer_weights)

    def prepare(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets) -> NpuRunner:
        folder, m = self.locate(spec, weights, buckets)
        if self.check_board:
            problem = board.librknnrt_problem(board.librknnrt_version(), librknnrt_needed(m))
            if problem:
                raise BackendUnavailableError(f"{folder}/manifest.json: {problem}")
        return NpuRunner(spec, folder, m, self.core_mask, weights.args)

    def resident_bytes(self, fingerprint: str, args: ModelArgs, layer_range: LayerRange, max_context: int,
                       max_requests: int = 1, kv_cap_bytes: int | None = None, embed_bytes: int | None = None) -> ShardMemory:
        """Host memory this backend needs for `layer_range`, from the manifests alone (nothing is loaded or hashed).

        .rknn bytes of every layer slice (+ the head on the last shard), the internal (activation) memory of each
        file's RKNNLite context (the largest of the build logs), the embedding on the first shard (`embed_bytes`; default: the float32 table the host
        loads today) and the KV cache: float32 K and V for the range's layers at `max_context`, for up to
        `max_requests` live requests; `kv_cap_bytes` (RequestLimits.max_bytes) bounds the other requests, the current
        one may exceed it. ArtifactError (with the compile command) if a slice is not compiled.
        """
        layout = npu_kv_layout(args)
        specs = [SliceSpec("layers", i, i + 1, kv_layout=layout) for i in layer_range.layers]
        if layer_range.is_last:
            specs.append(SliceSpec("head"))
        rknn: dict[str, int] = {}
        contexts: dict[str, int] = {}
        internal = 0
        for spec in specs:
            hint = shard_compile_command(layer_range, spec, self.dtype, self.platform, None)
            _, m = self.cache.find(fingerprint, self.dtype, self.platform, spec.name, check_files=False, hint=hint)
            rknn[spec.name] = sum(int(f["bytes"]) for f in m["files"])
            contexts[spec.name] = len(m["files"])  # a batch bucket's file (or a w8a8 bucket's) is a context of its own
            internal = max(internal, int(float(m.get("build", {}).get("internal_kb") or 0.0) * 1024))
        if embed_bytes is None:
            embed_bytes = args.vocab_size * args.hidden_size * 4 if layer_range.is_first else 0
        itemsize = 2 if layout == "npu" else 4  # the NPU form keeps the cache in float16
        per_request = 2 * len(layer_range.layers) * args.num_key_value_heads * max_context * args.head_dim * itemsize
        kv = max_requests * per_request
        if kv_cap_bytes is not None:
            kv = min(kv, kv_cap_bytes + per_request)
        return ShardMemory(rknn, internal, embed_bytes, kv, contexts)


def shard_compile_command(lr: LayerRange, spec: SliceSpec, dtype: str, platform: str, buckets: Buckets | None) -> str:
    """The one `exo-rknpu compile` line that builds every slice a shard of `lr` needs (all its layers, and the head
    when it is the last shard); compile skips what is already built. A slice of some parts of a layer comes from a
    placement plan, which compile needs too."""
    cmd = (f"exo-rknpu compile --model MODEL --layers {lr.start}-{lr.stop - 1} --dtype {dtype} --platform {platform}"
           + (" --placement PLAN" if spec.kind == "layers" and not spec.whole else ""))
    if buckets is not None:
        cmd += f" --seq {','.join(map(str, buckets.seq))} --context {','.join(map(str, buckets.context))}"
        cmd += f" --batch {','.join(map(str, buckets.batch or (1,)))}"
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
    run = f"; run: {hint or shard_compile_command(weights.layer_range, spec, dtype, platform, buckets)}"

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
    have = {bucket_tag(sh) for f in m["files"] for sh in f["shapes"]}
    need = [bucket_tag(sh) for sh in bucket_shapes(spec, weights.args, buckets)]
    missing = [t for t in need if t not in have]
    if missing:
        raise refuse(f"lacks buckets {missing} (s<seq>c<ctx>; b<B>c<ctx>: a decode batch of B requests)")


def _has_tensors(spec: SliceSpec, weights: ShardWeights) -> bool:
    if spec.kind == "layers":
        return all(i in weights.layers for i in range(spec.start, spec.stop))
    return weights.final_norm is not None and weights.lm_head is not None
