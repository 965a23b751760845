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


def needs_tied_embedding_file(folder: Path, layer_range: LayerRange) -> bool:
    """True when a downloaded sharded HF repo lacks the file with the embedding that a tied last shard needs as
    its head (exo's get_allow_patterns adds that file only for the first shard)."""
    folder = Path(folder)
    if not layer_range.is_last or layer_range.is_first or not (folder / hf.INDEX_FILE).exists():
        return False
    if not hf.read_config(folder).get("tie_word_embeddings", False):
        return False
    fname = hf.weight_map(folder).get(registry.HF_EMBED)
    return fname is not None and not (folder / fname).exists()
