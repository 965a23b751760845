"""Public model-loading API: args, one shard's weights, and the tokenizer of a ModelSource (HF folder or GGUF).

    src = resolve_model("smollm2-135m")                  # or an HF folder / .gguf path
    header = load_header(src)                            # config (+ a GGUF file's parsed header), read once
    shard = load_shard(header, LayerRange(0, 10, header.args.num_hidden_layers))  # (src works too: read again)
    tok = load_tokenizer(header)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from exo_rknpu.errors import LayerRangeError
from exo_rknpu.model import gguf as gguf_reader
from exo_rknpu.model import hf
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.quant import DEFAULT_WEIGHTS, check_available, check_mode
from exo_rknpu.model.weights import LeftOut, ShardWeights, SourceStamp
from exo_rknpu.model.zoo import ModelSource, resolve_model

if TYPE_CHECKING:  # the tokenizers library is imported where a tokenizer is loaded: a bench worker loads none
    from exo_rknpu.model.tokenizer import Tokenizer

__all__ = ["ModelSource", "resolve_model", "ModelHeader", "load_header", "header_of", "load_args", "load_shard", "load_tokenizer",
           "model_fingerprint", "source_fingerprint", "source_stamp", "ShardSource"]

# the modules that turn stored tensors into a shard's weights (their source is loader_version's input)
_LOADER_SOURCES = ("model/loader.py", "model/gguf.py", "model/hf.py", "model/quant.py", "model/weights.py",
                   "model/registry.py", "model/base.py")
# gguf's block decoding (gguf.quants.dequantize) and the block sizes it reads
_GGUF_SOURCES = ("quants.py", "constants.py")


@dataclass(frozen=True)
class ModelHeader:
    """What a start reads of a model before any weight, once (`load_header`), and hands to everything that needs it:
    its config and, for a GGUF file, the parsed header (metadata and tensor table: ~30 ms on a 1B file), which the
    tokenizer, the fingerprint and the loader read instead of parsing the file again."""

    src: ModelSource
    args: ModelArgs
    gguf: gguf_reader.GGUFFile | None = None  # None for an HF folder


def load_header(src: ModelSource) -> ModelHeader:
    """`src`'s config (and GGUF header): no weights are read."""
    if src.format == "hf":
        return ModelHeader(src, hf.load_hf_args(src.path))
    g = gguf_reader.GGUFFile(src.path)
    return ModelHeader(src, gguf_reader.args_from_gguf(g), g)


def header_of(model: ModelSource | ModelHeader) -> ModelHeader:
    """`model`'s header: read now for a ModelSource, as it is for a header read earlier (load_header)."""
    return model if isinstance(model, ModelHeader) else load_header(model)


def load_args(src: ModelSource) -> ModelArgs:
    """The model's normalised hyper-parameters (for a caller that needs nothing else of the header)."""
    return load_header(src).args


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


def source_fingerprint(header: ModelHeader) -> str:
    """The model's fingerprint (what load_shard sets) from its config and tensor table alone: no weights are read."""
    digest = hf.source_digest(header.src.path) if header.gguf is None else header.gguf.digest()
    return model_fingerprint(header.args, header.src.format, digest)


def loader_version() -> str:
    """Changes whenever the code that builds weights from stored tensors changes (its sources), or the gguf
    package's dequantizer that widens the block types we do not decode ourselves (its sources, found without
    importing gguf: a warm start that finds its slices prepared never imports it, nor importlib.metadata)."""
    pkg = Path(__file__).resolve().parent.parent
    gguf_dir = Path(importlib.util.find_spec("gguf").origin).parent  # type: ignore[union-attr, arg-type]
    h = hashlib.sha256()
    for base, rel in [*((pkg, r) for r in _LOADER_SOURCES), *((gguf_dir, r) for r in _GGUF_SOURCES)]:
        h.update(rel.encode())
        h.update((base / rel).read_bytes())
    return h.hexdigest()[:16]


def source_files(src: ModelSource) -> list[Path]:
    """Every file a shard's weights can be read from: the GGUF file; or an HF folder's config, index and the weight
    files present (a node that downloaded only its shard's files has no others, and reads none)."""
    if src.format != "hf":
        return [Path(src.path)]
    folder = Path(src.path)
    index = folder / hf.INDEX_FILE
    weight_files = sorted(set(hf.weight_map(folder).values())) if index.exists() else [hf.SINGLE_FILE]
    present = [folder / f for f in weight_files if (folder / f).exists()]
    return [folder / "config.json", *([index] if index.exists() else []), *present]


def source_stamp(header: ModelHeader, weights: str) -> SourceStamp:
    """The stamp of the model's weights in mode `weights` (model/weights.py SourceStamp): file facts, no tensor read."""
    files = []
    for p in source_files(header.src):
        st = os.stat(p)
        files.append((str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return SourceStamp(tuple(files), source_fingerprint(header), check_mode(weights), loader_version())


@dataclass(frozen=True)
class ShardSource:
    """One shard as the loader would read it (`load_shard`'s arguments), named before anything is read: its model's
    header, layer range and `stamp`. What opens a shard (runtime/shard.py ShardRunner) asks its backends for slices
    they prepared earlier from this stamp and loads only the rest (`load`)."""

    header: ModelHeader
    layer_range: LayerRange
    weights: str
    layers: bool = True  # False: the embedding only (load_shard's `layers`)

    @property
    def src(self) -> ModelSource:
        return self.header.src

    @property
    def args(self) -> ModelArgs:
        return self.header.args

    @cached_property
    def stamp(self) -> SourceStamp:
        """Taken once, before anything is loaded."""
        return source_stamp(self.header, self.weights)

    def load(self, left_out: LeftOut = LeftOut(), progress: Callable[[str], None] | None = None) -> ShardWeights:
        """The shard's weights without what `left_out` names, carrying `stamp` (ShardWeights.stamp)."""
        stamp = self.stamp
        shard = load_shard(self.header, self.layer_range, self.weights, layers=self.layers, progress=progress,
                           left_out=left_out)
        shard.stamp = stamp
        return shard


def load_shard(model: ModelSource | ModelHeader, layer_range: LayerRange, weights: str = DEFAULT_WEIGHTS,
               layers: bool = True, embed: bool = True, progress: Callable[[str], None] | None = None,
               left_out: LeftOut = LeftOut()) -> ShardWeights:
    """Weights for `layer_range` only (+ embedding if first, final norm + head if last), HF layout.

    `weights` (auto | int4 | int8 | fp32 | native) picks the form of linear weights and the embedding
    (model/quant.py, docs/design.md#weights): auto keeps compact blocks multiplied in float32 (the same answers on
    every CPU up to float32 rounding); native keeps GGUF Q4_0/Q4_1/Q8_0/Q6_K blocks (float sources as Q8_0) for the
    native kernel (the same bits on every CPU); int4/int8 quantize (compact, faster, CPU-dependent rounding); fp32
    widens everything. Norms and biases are float32 always.
    layers=False: only the embedding (first shard). The decoder layers and the final norm + head are neither read
    nor dequantized: for a backend that runs them from compiled files (npu, `needs_layer_weights = False`).
    embed=False: no embedding even on the first shard (the compiler, which builds no embed slice). A tied head
    on the last shard is still read (it is the embedding matrix).
    `progress` gets a one-line message now and then while layers load.
    `model`: the model's source, or its header (load_header) when the caller has read it, so neither config.json
    nor the GGUF header is read again.
    `left_out`: layers (and the final norm + head) served from elsewhere: neither read nor built.
    """
    check_available(weights)  # native without a C compiler fails here, before any tensor is read
    report = _layer_progress(layer_range, progress)
    header = header_of(model)
    _check_range(header.args, layer_range)
    if header.gguf is None:
        shard = hf.load_hf_shard(header.src.path, layer_range, header.args, weights, layers=layers, embed=embed,
                                 progress=report, left_out=left_out)
    else:
        shard = gguf_reader.load_gguf_shard(header.gguf, layer_range, header.args, weights, layers=layers, embed=embed,
                                            progress=report, left_out=left_out)
    shard.fingerprint = source_fingerprint(header)
    return shard


def _layer_progress(layer_range: LayerRange, progress: Callable[[str], None] | None) -> Callable[[int], None] | None:
    """A per-layer callback that reports at most about once a second."""
    if progress is None:
        return None
    last = [time.monotonic()]

    def report(i: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or i == layer_range.stop - 1:
            last[0] = now
            progress(f"loading weights: layer {i + 1 - layer_range.start}/{layer_range.stop - layer_range.start}")

    return report


def load_tokenizer(model: ModelSource | ModelHeader) -> Tokenizer:
    """The model's tokenizer (tokenizer.json for HF folders, tokenizer.ggml.* metadata for GGUF). `model`: its
    source, or its header when the caller has read it (a GGUF file's header is then not parsed again)."""
    from exo_rknpu.model.tokenizer import Tokenizer

    if isinstance(model, ModelHeader):
        return Tokenizer.from_hf_dir(model.src.path) if model.gguf is None else Tokenizer.from_gguf(model.gguf)
    if model.format == "hf":
        return Tokenizer.from_hf_dir(model.path)
    return Tokenizer.from_gguf(model.path)


def _check_range(args: ModelArgs, layer_range: LayerRange) -> None:
    if layer_range.n_layers != args.num_hidden_layers:
        raise LayerRangeError(
            f"layer range {layer_range} was made for {layer_range.n_layers} layers, "
            f"but the model has {args.num_hidden_layers}"
        )
