"""Public model-loading API: args, one shard's weights, and the tokenizer of a ModelSource (HF folder or GGUF).

    src = resolve_model("smollm2-135m")                  # or an HF folder / .gguf path
    args = load_args(src)
    shard = load_shard(src, LayerRange(0, 10, args.num_hidden_layers))
    tok = load_tokenizer(src)
"""

from __future__ import annotations

import hashlib
import json

from exo_rknpu.errors import LayerRangeError
from exo_rknpu.model import gguf as gguf_reader
from exo_rknpu.model import hf
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.tokenizer import Tokenizer
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.model.zoo import ModelSource, resolve_model

__all__ = ["ModelSource", "resolve_model", "load_args", "load_shard", "load_tokenizer", "model_fingerprint"]


def load_args(src: ModelSource) -> ModelArgs:
    """The model's normalised hyper-parameters."""
    if src.format == "hf":
        return hf.load_hf_args(src.path)
    return gguf_reader.load_gguf_args(src.path)


def model_fingerprint(args: ModelArgs, src_format: str, table_digest: bytes) -> str:
    """sha256 over the normalised config (ModelArgs), the source format and the tensor table digest.

    The table digest covers tensor names, shapes, dtypes/quant types and offsets (GGUF: the whole table;
    HF single file: its header; HF sharded: the index's weight_map). It does NOT hash tensor bytes, so it is
    cheap and identical for every shard of the same model; use LayerWeights.digest() for content identity.
    """
    h = hashlib.sha256()
    h.update(json.dumps(args.to_dict(), sort_keys=True).encode())
    h.update(f"|{src_format}|".encode())
    h.update(table_digest)
    return h.hexdigest()


def load_shard(src: ModelSource, layer_range: LayerRange, layers: bool = True, embed: bool = True) -> ShardWeights:
    """Weights for `layer_range` only (+ embedding if first, final norm + head if last), float32, HF layout.

    layers=False: only the embedding (first shard). The decoder layers and the final norm + head are neither read
    nor dequantized: for a backend that runs them from compiled files (npu, `needs_layer_weights = False`).
    embed=False: no embedding even on the first shard (the compiler, which builds no embed slice). A tied head
    on the last shard is still read (it is the embedding matrix).
    """
    if src.format == "hf":
        args = hf.load_hf_args(src.path)
        _check_range(args, layer_range)
        shard = hf.load_hf_shard(src.path, layer_range, args, layers=layers, embed=embed)
        digest = hf.source_digest(src.path)
    else:
        g = gguf_reader.GGUFFile(src.path)
        args = gguf_reader.args_from_gguf(g)
        _check_range(args, layer_range)
        shard = gguf_reader.load_gguf_shard(g, layer_range, args, layers=layers, embed=embed)
        digest = g.digest()
    shard.fingerprint = model_fingerprint(args, src.format, digest)
    return shard


def load_tokenizer(src: ModelSource) -> Tokenizer:
    """The model's tokenizer (tokenizer.json for HF folders, tokenizer.ggml.* metadata for GGUF)."""
    if src.format == "hf":
        return Tokenizer.from_hf_dir(src.path)
    return Tokenizer.from_gguf(src.path)


def _check_range(args: ModelArgs, layer_range: LayerRange) -> None:
    if layer_range.n_layers != args.num_hidden_layers:
        raise LayerRangeError(
            f"layer range {layer_range} was made for {layer_range.n_layers} layers, "
            f"but the model has {args.num_hidden_layers}"
        )
