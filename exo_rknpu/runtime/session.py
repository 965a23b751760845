"""Opening shards from a model source: the one place that ties loader, buckets and backends together."""

from __future__ import annotations

from exo_rknpu.backends.base import get_backend
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.runtime.requests import RequestLimits
from exo_rknpu.runtime.shard import ShardRunner, SliceObserver
from exo_rknpu.slices.spec import Buckets

DEFAULT_MAX_CONTEXT = 2048


def default_buckets(args: ModelArgs, max_context: int | None = None) -> Buckets:
    """Context buckets doubling from 256 up to max_context (default: 2048, capped by the model's own limit)."""
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
) -> ShardRunner:
    """Load only `layer_range`'s weights from `src` and prepare its slices on `backend`."""
    weights = load_shard(src, layer_range)
    return ShardRunner(
        weights,
        get_backend(backend, **(backend_options or {})),
        buckets or default_buckets(weights.args),
        layers_per_slice=layers_per_slice,
        limits=limits,
        on_slice=on_slice,
    )
