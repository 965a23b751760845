"""exo's Shard (inclusive ends) <-> LayerRange (half-open). The one place the conversion happens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from exo_rknpu.errors import LayerRangeError
from exo_rknpu.model import hf, registry
from exo_rknpu.model.base import LayerRange


class ShardLike(Protocol):
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int


def shard_to_range(shard: ShardLike) -> LayerRange:
    """exo Shard(start_layer, end_layer inclusive, n_layers) -> LayerRange(start, stop exclusive, n_layers).

    Raises LayerRangeError, naming the model, for a shard that is empty or lies outside the model.
    """
    try:
        start, end, n = int(shard.start_layer), int(shard.end_layer), int(shard.n_layers)
    except (AttributeError, TypeError, ValueError):
        raise LayerRangeError(f"not an exo Shard: {shard!r}") from None
    if n <= 0 or not (0 <= start <= end < n):
        raise LayerRangeError(
            f"exo shard of {getattr(shard, 'model_id', '?')!r} asks for layers {start}-{end} (inclusive), "
            f"which is empty or outside the model's layers 0-{n - 1}"
        )
    return LayerRange(start, end + 1, n)


def range_to_shard(model_id: str, layer_range: LayerRange) -> Any:
    """LayerRange -> exo's Shard (imports exo)."""
    from exo.inference.shard import Shard

    return Shard(model_id, layer_range.start, layer_range.stop - 1, layer_range.n_layers)


def extra_ranges_to_download(folder: Path, layer_range: LayerRange) -> list[LayerRange]:
    """Single-layer ranges to ask exo's downloader for, when a downloaded sharded HF repo lacks a non-layer tensor
    that `layer_range` needs. exo's get_allow_patterns gives the first file (assumed to hold the embedding) only to
    the first shard and the last file (norm, head) only to a last-but-not-first shard; but a tied
    last shard needs the embedding as its head, and a whole-model shard needs the final norm too."""
    folder = Path(folder)
    if not (layer_range.is_first or layer_range.is_last) or not (folder / hf.INDEX_FILE).exists():
        return []
    wm = hf.weight_map(folder)

    def missing(name: str) -> bool:
        return name in wm and not (folder / wm[name]).exists()

    n = layer_range.n_layers
    tied = bool(hf.read_config(folder).get("tie_word_embeddings", False))
    extra = []
    if (layer_range.is_first or tied and layer_range.is_last) and missing(registry.HF_EMBED):
        extra.append(LayerRange(0, 1, n))
    if layer_range.is_last and (missing(registry.HF_NORM) or not tied and missing(registry.HF_HEAD)):
        extra.append(LayerRange(n - 1, n, n))
    return extra
