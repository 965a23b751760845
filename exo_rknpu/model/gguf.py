"""GGUF reader: metadata -> ModelArgs, tensors of one layer range -> ShardWeights in canonical HF layout.

Translation happens here, once: GGUF names -> LayerWeights fields, dequantisation to float32,
GGUF's [in, out] dims -> HF [out, in], and (llama only) undoing llama.cpp's Q/K row permutation.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize

from exo_rknpu.errors import UnsupportedModelError, WeightsError
from exo_rknpu.model import registry
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.hf import check_shape, expected_shapes, layer_fields
from exo_rknpu.model.weights import LayerWeights, ShardWeights


class GGUFFile:
    """A parsed GGUF file: metadata fields and a tensor table (data is memory-mapped, read on demand)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"GGUF file {self.path} not found")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises ValueError/struct.error/IndexError/... on bad bytes
            raise WeightsError(
                f"{self.path} is truncated or not a valid GGUF file ({type(e).__name__}: {e}); re-download it"
            ) from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value (strings decoded, arrays as lists), or `default` if the key is absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise WeightsError(f"{self.path} lacks metadata key {key!r}")
        return value

    @cached_property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in HF layout (GGUF lists dims innermost first, so reverse them)."""
        t = self.tensors.get(name)
        if t is None:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}")
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"tensor {name!r} in {self.path} uses quantization {t.tensor_type.name}, which gguf cannot dequantize: {e}"
            ) from None
        except (ValueError, OSError) as e:
            raise WeightsError(f"cannot read tensor {name!r} from {self.path}: {e}") from None
        shape = tuple(int(d) for d in reversed(t.shape))
        a = a.reshape(shape)
        if a.dtype != np.float32 or np.may_share_memory(a, t.data):
            # F32 tensors come back as views of the memory map: copy so weights outlive the file.
            a = np.array(a, dtype=np.float32)
        return a

    def digest(self) -> bytes:
        """Cheap identity: the tensor table (name, dims, type, offset) -- no tensor bytes are hashed."""
        h = hashlib.sha256()
        for t in self.reader.tensors:
            h.update(f"{t.name}:{list(map(int, t.shape))}:{t.tensor_type.name}:{int(t.data_offset)};".encode())
        return h.digest()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of Q/K rows (interleaved RoPE pairs -> HF rotate_half halves).

    llama.cpp stores rows as reshape(n_head, 2, d/2, cols).swapaxes(1, 2); this is its inverse.
    Works for weights [rows, cols] and biases [rows].
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert permutation (HF -> GGUF); the inverse of unpermute_qk. Used by test fixtures."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def args_from_gguf(g: GGUFFile) -> ModelArgs:
    """ModelArgs from `<arch>.*` metadata; vocab size from the tokenizer's token list."""
    family = registry.canonical_family(g.architecture)
    arch = g.architecture
    k = lambda key: f"{arch}.{key}"  # noqa: E731 - tiny local key builder
    hidden = int(g.require(k("embedding_length")))
    heads = int(g.require(k("attention.head_count")))
    head_dim = int(g.get(k("attention.key_length")) or hidden // heads)
    rope_dim = int(g.get(k("rope.dimension_count")) or head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings (rope dim {rope_dim} of head dim {head_dim}) are not supported")
    scaling_type = g.get(k("rope.scaling.type"))
    if scaling_type not in (None, "none") or "rope_freqs.weight" in g.tensors:
        raise UnsupportedModelError(
            f"{g.path}: GGUF rope scaling ({scaling_type or 'rope_freqs tensor'}) is not supported; "
            "use the Hugging Face folder of this model instead"
        )
    if g.get(k("attention.sliding_window")):
        raise UnsupportedModelError("sliding-window attention is not supported")
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else int(g.require(k("vocab_size")))
    bos, eos = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.eos_token_id")
    return ModelArgs(
        architecture=family,
        hidden_size=hidden,
        intermediate_size=int(g.require(k("feed_forward_length"))),
        num_hidden_layers=int(g.require(k("block_count"))),
        num_attention_heads=heads,
        num_key_value_heads=int(g.get(k("attention.head_count_kv")) or heads),
        vocab_size=vocab,
        head_dim=head_dim,
        rms_norm_eps=float(g.get(k("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_theta=float(g.get(k("rope.freq_base"), 10000.0)),
        rope_scaling=None,
        tie_word_embeddings=registry.GGUF_HEAD not in g.tensors,
        attention_bias=registry.has_attention_bias(family) or "blk.0.attn_q.bias" in g.tensors,
        max_position_embeddings=int(g.get(k("context_length"), 2048)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
    )


def load_gguf_args(path: Path) -> ModelArgs:
    """ModelArgs of a GGUF file."""
    return args_from_gguf(GGUFFile(path))


def _layer(g: GGUFFile, args: ModelArgs, i: int) -> LayerWeights:
    shapes = expected_shapes(args)
    # llama.cpp permutes Q/K rows only for the llama family (qwen2 is converted without it).
    heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads,
             "q_bias": args.num_attention_heads, "k_bias": args.num_key_value_heads}
    kw: dict[str, np.ndarray] = {}
    for field in layer_fields(args):
        name = registry.gguf_layer_name(i, field)
        a = check_shape(name, g.tensor(name), shapes[field], g.path)
        if args.architecture == "llama" and field in heads:
            a = unpermute_qk(a, heads[field])
        kw[field] = a
    return LayerWeights(**kw)


def load_gguf_shard(path: Path | GGUFFile, layer_range: LayerRange, args: ModelArgs | None = None) -> ShardWeights:
    """Load only what `layer_range` needs from a GGUF file. `fingerprint` is left empty (the loader sets it)."""
    g = path if isinstance(path, GGUFFile) else GGUFFile(path)
    args = args or args_from_gguf(g)
    vh = (args.vocab_size, args.hidden_size)
    layers = {i: _layer(g, args, i) for i in layer_range.layers}
    embed = norm = head = None
    if layer_range.is_first:
        embed = check_shape(registry.GGUF_EMBED, g.tensor(registry.GGUF_EMBED), vh, g.path)
    if layer_range.is_last:
        norm = check_shape(registry.GGUF_NORM, g.tensor(registry.GGUF_NORM), (args.hidden_size,), g.path)
        if args.tie_word_embeddings:
            head = embed if embed is not None else check_shape(
                registry.GGUF_EMBED, g.tensor(registry.GGUF_EMBED), vh, g.path
            )
        else:
            head = check_shape(registry.GGUF_HEAD, g.tensor(registry.GGUF_HEAD), vh, g.path)
    return ShardWeights(args=args, layer_range=layer_range, layers=layers, embed_tokens=embed,
                        final_norm=norm, lm_head=head)
