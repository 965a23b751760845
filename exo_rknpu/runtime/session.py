"""Opening shards from a model source: the one place that ties loader, buckets and backends together."""

from __future__ import annotations

from typing import Callable

from exo_rknpu.backends.base import backend_class, get_backend
from exo_rknpu.errors import UsageError
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.loader import load_args, load_shard
from exo_rknpu.model.quant import check_mode
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.runtime.placement import (CORE_MASK, PlacementPlan, ResolvedPlan, backend_picker, fallback_placement,
                                         npu_present, resolve)
from exo_rknpu.runtime.requests import RequestLimits
from exo_rknpu.runtime.shard import ShardRunner, SliceObserver
from exo_rknpu.slices.spec import Buckets, npu_buckets, plan_slices

DEFAULT_MAX_CONTEXT = 2048
# Slices a backend cannot run (the npu/rknn-sim embedding lookup) go to this one.
FALLBACK_BACKEND = "onnx"


def default_buckets(args: ModelArgs, max_context: int | None = None) -> Buckets:
    """Context buckets doubling from 256 up to max_context (default: 2048, capped by the model's own limit).

    A max_context below 1 or beyond the model's limit (max_position_embeddings) is refused: past its limit a
    model's rotary positions are untrained, so the answers would be wrong.
    """
    if max_context is not None and not 1 <= max_context <= args.max_position_embeddings:
        raise UsageError(f"--max-context {max_context} is out of range; this model allows 1 to "
                         f"{args.max_position_embeddings} positions")
    limit = max_context or min(DEFAULT_MAX_CONTEXT, args.max_position_embeddings)
    return Buckets.up_to(limit)


def open_shard(
    src: ModelSource,
    layer_range: LayerRange,
    backend: str = "onnx",
    buckets: Buckets | None = None,
    layers_per_slice: int | None = None,
    limits: RequestLimits = RequestLimits(),
    on_slice: SliceObserver | None = None,
    backend_options: dict | None = None,
    weights: str = "auto",
    progress: Callable[[str], None] | None = None,
    placement: PlacementPlan | None = None,
) -> ShardRunner:
    """Load only `layer_range`'s weights from `src` (in the form `weights` asks: auto | int4 | int8 | fp32) and
    prepare its slices on `backend`; `progress` gets one-line messages while that takes time.

    Slices `backend` does not support (the embedding, for npu and rknn-sim) run on FALLBACK_BACKEND. A backend
    that wants one graph per layer (attribute layers_per_slice, e.g. npu/rknn-sim) gets it unless asked otherwise.
    """
    check_mode(weights)
    if placement is not None:
        return _open_placed(src, layer_range, placement, backend, buckets, layers_per_slice, limits, on_slice,
                            backend_options, weights, progress)
    primary = get_backend(backend, **(backend_options or {}))
    if weights == "auto" and getattr(primary, "float_weights", False):
        weights = "fp32"  # compiled backends: the same float32 tensors (and digests) the compiler built from
    if layers_per_slice is None:
        layers_per_slice = getattr(primary, "layers_per_slice", None)
    placed = primary
    lr = layer_range
    plan = plan_slices(lr.start, lr.stop, lr.is_first, lr.is_last, layers_per_slice)
    off_primary = [s for s in plan if not primary.supports(s)]
    if off_primary:
        placed = fallback_placement(primary, get_backend(FALLBACK_BACKEND))
    # A backend running its slices from compiled files (npu) needs no layer/head weights, unless a slice it
    # cannot run (other than the embedding, always loaded) lands on the fallback.
    layers = getattr(primary, "needs_layer_weights", True) or any(s.kind != "embed" for s in off_primary)
    shard = load_shard(src, layer_range, weights, layers=layers, progress=progress)
    budget = getattr(primary, "max_slice_bytes", None)
    if layers_per_slice is None and budget and shard.layers:
        # bounded slices bound the peak while a runtime packs weights (source and packed copy of one slice)
        layers_per_slice = max(1, budget // max(lw.nbytes for lw in shard.layers.values()))
    buckets = buckets or default_buckets(shard.args)
    if getattr(primary, "kv_layout", "seq") == "npu":  # the NPU form's prefill chunks are bounded (slices/spec.py)
        buckets = npu_buckets(buckets, shard.args)
    return ShardRunner(
        shard,
        placed,
        buckets,
        layers_per_slice=layers_per_slice,
        limits=limits,
        on_slice=on_slice,
        progress=progress,
        release_weights=True,
    )


def resolve_placement(src: ModelSource, layer_range: LayerRange, placement: PlacementPlan | None, backend: str,
                      buckets: Buckets | None = None, layers_per_slice: int | None = None, weights: str = "auto",
                      npu_dtype: str = "fp16") -> ResolvedPlan:
    """The plan for one shard, checked against the model's config and the backends here (nothing is loaded)."""
    args = load_args(src)
    return resolve(placement, args, layer_range, backend, buckets or default_buckets(args), layers_per_slice=layers_per_slice,
                   npu_available=npu_present(), weights=weights, npu_dtype=npu_dtype)


def _open_placed(src, layer_range, placement, backend, buckets, layers_per_slice, limits, on_slice, backend_options,
                 weights, progress) -> ShardRunner:
    """open_shard for a placement plan: one backend instance per device, the slices the planner cut."""
    opts = backend_options or {}
    resolved = resolve_placement(src, layer_range, placement, backend, buckets, layers_per_slice, weights,
                                 opts.get("dtype", "fp16"))
    classes = {s.backend: backend_class(s.backend) for s in resolved.slices}
    if weights == "auto" and any(getattr(c, "float_weights", False) for c in classes.values()):
        weights = "fp32"  # a compiled backend is among them: the float32 tensors (and digests) the compiler built from
    # layer and head weights are loaded unless every slice reading them runs from compiled files (npu)
    need_layers = any(getattr(classes[s.backend], "needs_layer_weights", True) for s in resolved.slices if s.spec.kind != "embed")
    shard = load_shard(src, layer_range, weights, layers=need_layers, progress=progress)

    emulated = {s.device for s in resolved.slices if s.emulated}

    def make(device: str, name: str):
        own = dict(opts) if name == backend else {}
        if device in emulated and name == "onnx":
            own["threads"] = 1  # an emulated NPU core is one CPU thread
        if name == "npu":
            own["core_mask"] = CORE_MASK[device] if device in CORE_MASK else own.get("core_mask", "auto")
        return get_backend(name, **own)

    buckets = resolved.buckets
    if any(getattr(c, "kv_layout", "seq") == "npu" for c in classes.values()):  # the NPU form's prefill chunks are bounded
        buckets = npu_buckets(buckets, shard.args)
    runner = ShardRunner(shard, backend_picker(resolved, make), buckets, limits=limits, on_slice=on_slice,
                         progress=progress, release_weights=True, specs=resolved.specs)
    runner.placement = resolved
    return runner
