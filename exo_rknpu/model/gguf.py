"""GGUF reader: metadata -> ModelArgs, tensors of one layer range -> ShardWeights in canonical HF layout.

Translation happens here, once: GGUF names -> LayerWeights fields, dequantisation to float32,
GGUF's [in, out] dims -> HF [out, in], and (llama only) undoing llama.cpp's Q/K row permutation.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from exo_rknpu.errors import UnsupportedModelError, WeightsError
from exo_rknpu.model import registry
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.hf import LINEAR_FIELDS, check_shape, expected_shapes, layer_fields
from exo_rknpu.model.quant import (QTensor, Weight, compact, form_for, from_gguf_blocks, q4_1_exact, q4_1_to_int4,
                                   q4_1_to_int8, q6_k_exact)
from exo_rknpu.model.weights import LayerWeights, LeftOut, RowTable, ShardWeights


_MAGIC = b"GGUF"
T = TypeVar("T")
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # GGUF float tensor types (quantized to Q8_0 under --weights native)
# GGUF value types -> struct format (little-endian); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class BlockType:
    """A GGML tensor type: its id in the file, its name, and elements and bytes per block."""

    id: int
    name: str
    block: int
    size: int


# The types the weights here usually come in, as the GGUF format defines them: a start that finds its slices
# prepared reads the header with these alone and never imports gguf-py (~6 MiB resident with what it pulls in).
# Any other id is looked up in gguf-py's table (`block_type`); tests check these entries against it.
_TYPES = {t.id: t for t in (BlockType(0, "F32", 1, 4), BlockType(1, "F16", 1, 2), BlockType(2, "Q4_0", 32, 18),
                            BlockType(3, "Q4_1", 32, 20), BlockType(8, "Q8_0", 32, 34),
                            BlockType(14, "Q6_K", 256, 210), BlockType(30, "BF16", 1, 2))}


def block_type(type_id: int) -> BlockType:
    """The GGML type with id `type_id` (ValueError for an id gguf-py does not know)."""
    known = _TYPES.get(type_id)
    if known is not None:
        return known
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    qt = GGMLQuantizationType(type_id)
    return BlockType(type_id, qt.name, *GGML_QUANT_SIZES[qt])


def dequantize(rows: np.ndarray, qtype: BlockType) -> np.ndarray:
    """Stored blocks widened by gguf-py's dequantizer (imported here, where a block type is widened by it)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(rows, GGMLQuantizationType(qtype.id))


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor table. `dims` are GGUF order (innermost first)."""

    name: str
    dims: tuple[int, ...]
    qtype: BlockType
    offset: int  # absolute file offset of the data

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.dims, dtype=np.int64))
        return n // self.qtype.block * self.qtype.size


@dataclass(frozen=True)
class ArrayAt:
    """A metadata array of strings or numbers, left in the file until it is read (`GGUFFile.get`).

    A vocabulary is ~100k strings (tokens and merges: +11 MiB resident while they exist): only the tokenizer reads
    them, and every other parse of the file (its shape, its tensor table) would build and drop them, leaving the
    memory they took fragmented among the objects made meanwhile (~1.7 MiB more resident for the whole run of
    smollm2's `generate`)."""

    etype: int
    count: int
    offset: int  # absolute file offset of the first element
    end: int  # absolute file offset just past the last element


class StringArray(Sequence[str]):
    """A metadata array of strings kept as its bytes in the file's encoding (per element: u64 length, UTF-8), each
    element decoded when it is read: the tokenizer's 49k merges pass through as short-lived strings one at a time
    instead of existing all at once among the objects made meanwhile (~1 MiB less resident for the whole run of
    smollm2's `generate`)."""

    def __init__(self, data: bytes, count: int) -> None:
        starts = np.empty(count + 1, np.int64)  # element i is data[starts[i] + 8 : starts[i + 1]]
        pos = 0
        for i in range(count):
            starts[i] = pos
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        if pos != len(data):
            raise ValueError("a string array's lengths do not add up to its bytes")
        starts[count] = pos
        self._data, self._starts = data, starts

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i: int) -> str:  # type: ignore[override]  # elements only, no slices
        n = len(self)
        if not -n <= i < n:
            raise IndexError("string array index out of range")
        i %= n
        start, stop = int(self._starts[i]) + 8, int(self._starts[i + 1])
        return self._data[start:stop].decode("utf-8", errors="replace")


class _Cursor:
    """Bounds-checked little-endian reader over the file's bytes (a truncated file raises WeightsError)."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise WeightsError(f"{self.path} is truncated or corrupt (metadata runs past the end of the file)")
        self.pos += n
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def value(self, vtype: int, lazy: bool = True) -> Any:
        """The value at the cursor. With `lazy`, an array of strings or numbers is skipped and left as an `ArrayAt`."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if not lazy or etype not in _NP_TYPES and etype != 8:
                return self.elements(etype, count)
            start = self.pos
            if etype == 8:
                for _ in range(count):
                    self.take(self.scalar("<Q"))
            else:
                self.take(count * np.dtype(_NP_TYPES[etype]).itemsize)
            return ArrayAt(etype, count, start, self.pos)
        raise WeightsError(f"{self.path} is corrupt (unknown metadata value type {vtype})")

    def elements(self, etype: int, count: int) -> list[Any]:
        """`count` values of type `etype` from the cursor on, decoded."""
        if etype in _NP_TYPES:
            dt = np.dtype(_NP_TYPES[etype])
            start = self.take(count * dt.itemsize)
            return np.frombuffer(self.buf, dtype=dt, count=count, offset=start).tolist()
        return [self.value(etype, lazy=False) for _ in range(count)]

    def array(self, a: ArrayAt) -> list[Any] | StringArray:
        """The elements of `a`: a `StringArray` of strings, a list of numbers."""
        if a.etype == 8:
            return StringArray(bytes(self.buf[a.offset : a.end]), a.count)
        self.pos = a.offset
        return self.elements(a.etype, a.count)


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed directly (gguf.GGUFReader takes seconds on a
    49k-token vocabulary; this takes tens of milliseconds). Tensor bytes are read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"GGUF file {self.path} not found")
        st = self.path.stat()
        self.size, self._identity = st.st_size, (st.st_size, st.st_mtime_ns, st.st_ino)
        self.metadata, self.tensors = self._read(self._parse)

    def check_unchanged(self) -> None:
        """WeightsError if the file on disk is no longer the one parsed (replaced or rewritten since): a header is
        parsed once per start and handed down, so its tensor table must not be applied to other bytes."""
        try:
            st = self.path.stat()
        except OSError as e:
            raise WeightsError(f"{self.path} is gone ({e})") from None
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self._identity:
            raise WeightsError(f"{self.path} changed while the model was being opened; start again")

    def _read(self, read: Callable[[_Cursor], T]) -> T:
        """`read` applied to a cursor over the file's bytes; a file that is not readable GGUF raises WeightsError."""
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return read(_Cursor(buf, self.path))
        except WeightsError:
            raise  # already says what is wrong with which file (WeightsError is a ValueError: keep it unwrapped)
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise WeightsError(f"{self.path} is not a readable GGUF file ({e}); re-download it") from None

    def _parse(self, c: _Cursor) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        start = c.take(4)
        if c.buf[start : start + 4] != _MAGIC:
            raise WeightsError(f"{self.path} is not a GGUF file (bad magic)")
        version = c.scalar("<I")
        if version not in (2, 3):
            raise WeightsError(f"{self.path}: GGUF version {version} is not supported (need 2 or 3, little-endian)")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.scalar("<I"))
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.scalar("<I")
            dims = tuple(int(c.scalar("<Q")) for _ in range(n_dims))
            raw.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = (c.pos + align - 1) // align * align
        tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in raw:
            try:
                qt = block_type(qtype)
            except ValueError:
                raise WeightsError(f"{self.path}: tensor {name!r} has unknown type {qtype}") from None
            info = TensorInfo(name, dims, qt, data_start + offset)
            if info.offset + info.nbytes > self.size:
                raise WeightsError(f"{self.path} is truncated (tensor {name!r} runs past the end); re-download it")
            tensors[name] = info
        return meta, tensors

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value, or `default` if the key is absent: strings decoded, arrays read from the file now (of
        strings as a `StringArray`, decoding each element as it is read; of numbers as a list)."""
        value = self.metadata.get(key, default)
        return self._read(lambda c: c.array(value)) if isinstance(value, ArrayAt) else value

    def length(self, key: str) -> int | None:
        """Number of elements of the array at `key` without reading them (None if absent or not an array)."""
        value = self.metadata.get(key)
        return value.count if isinstance(value, ArrayAt) else len(value) if isinstance(value, list) else None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise WeightsError(f"{self.path} lacks metadata key {key!r}")
        return value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in HF layout (GGUF lists dims innermost first, so reverse them)."""
        t = self.tensors.get(name)
        if t is None:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}")
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            buf = f.read(t.nbytes)
        if len(buf) != t.nbytes:
            raise WeightsError(f"{self.path} is truncated (tensor {name!r} cut short); re-download it")
        shape = tuple(reversed(t.dims))
        block, size = t.qtype.block, t.qtype.size
        rows = np.frombuffer(buf, dtype=np.uint8).reshape(*shape[:-1], shape[-1] // block * size)
        try:
            a = dequantize(rows, t.qtype)
        except NotImplementedError as e:
            raise UnsupportedModelError(f"tensor {name!r} in {self.path}: {e}") from None
        # F32 comes back as a read-only view of `buf`; make every result an owned, writable float32 array.
        return np.array(a.reshape(shape), dtype=np.float32)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as uint8 rows [*shape[:-1], row bytes] (a read-only view of the mapped file)."""
        t = self.tensors.get(name)
        if t is None:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}")
        shape = tuple(reversed(t.dims))
        block, size = t.qtype.block, t.qtype.size
        return np.memmap(self.path, np.uint8, "r", t.offset, (*shape[:-1], shape[-1] // block * size))

    def stored_rows(self, name: str) -> "StoredRows":
        """The tensor's stored bytes as rows read from the file when sliced (not mapped: converting a large tensor a
        few rows at a time then keeps only those rows of it resident, where a mapping keeps every page it touched)."""
        t = self.tensors.get(name)
        if t is None:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}")
        shape = tuple(reversed(t.dims))
        block, size = t.qtype.block, t.qtype.size
        return StoredRows(self.path, t.offset, (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1] // block * size))

    def linear(self, name: str, mode: str) -> Weight:
        """A [out, in] matrix in the form `mode` asks for (quant.py; docs/design.md#weights): Q4_0, Q4_1, Q8_0 and
        Q6_K blocks are kept exactly under auto (multiplied with float32 activations), Q4_0/Q8_0 under the int
        mode of their width, Q4_0/Q4_1/Q8_0/Q6_K under native (the native kernel; float types become Q8_0 for it,
        other types take auto's form); every other type is widened (a few rows at a time) and quantized, or kept
        float32."""
        t = self.tensors.get(name)
        if t is None:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}")
        qname, shape, form = t.qtype.name, tuple(reversed(t.dims)), form_for(mode)
        if len(shape) != 2 or form.bits is None:
            return self.tensor(name)
        if mode == "native" and qname in ("Q4_0", "Q8_0"):
            return from_gguf_blocks(self.stored_rows(name), qname, shape, kernel="native")  # type: ignore[arg-type]
        if mode == "native" and qname == "Q4_1":
            return q4_1_exact(self.raw(name), shape, kernel="native")  # type: ignore[arg-type]
        if mode in ("auto", "native") and qname == "Q6_K":  # exact: MatMulNBits' form (auto) or the kernel's own
            return q6_k_exact(self.raw(name), shape, lambda rows: dequantize(rows, t.qtype), form.kernel)  # type: ignore[arg-type]
        if mode == "native" and qname not in _FLOAT_TYPES:  # K-quants and the rest: auto's MatMulNBits form
            mode, form = "auto", form_for("auto")
        if mode == "auto" and qname in ("Q4_0", "Q8_0"):
            return from_gguf_blocks(self.stored_rows(name), qname, shape, kernel="fp32")  # type: ignore[arg-type]
        if mode == "auto" and qname == "Q4_1":
            return q4_1_exact(self.raw(name), shape)  # type: ignore[arg-type]
        if (qname, form.bits) in (("Q4_0", 4), ("Q8_0", 8)):
            return from_gguf_blocks(self.stored_rows(name), qname, shape)  # type: ignore[arg-type]
        if qname == "Q4_1":
            return (q4_1_to_int4 if form.bits == 4 else q4_1_to_int8)(self.raw(name), shape)  # type: ignore[arg-type]
        # widened a few rows at a time while quantizing: no float32 copy of the whole matrix
        target = "Q8_0" if form.kernel == "native" else f"int{form.bits}"
        return compact(_WidenedRows(self.stored_rows(name), t.qtype, shape), form, f"{qname} -> {target}")  # type: ignore[arg-type]

    def table(self, name: str) -> RowTable:
        """A [rows, cols] tensor left in the mapped file; looked-up rows are widened as the linear weights read
        their blocks (Q4_0/Q8_0: `from_gguf_blocks`, the same values as gguf-py's dequantizer, bit for bit) or by
        gguf-py's dequantizer (every other type)."""
        t = self.tensors.get(name)
        if t is None:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}")
        qtype, cols, path = t.qtype, t.dims[0], self.path  # not self: its metadata (the vocabulary) would stay

        def widen(rows: np.ndarray) -> np.ndarray:
            if qtype.name in ("Q4_0", "Q8_0"):
                return from_gguf_blocks(rows, qtype.name, (rows.shape[0], cols)).dequantize()
            try:
                return dequantize(rows, qtype)
            except NotImplementedError as e:
                raise UnsupportedModelError(f"tensor {name!r} in {path}: {e}") from None

        return RowTable(self.raw(name), widen, tuple(reversed(t.dims)), f"{qtype.name} (mapped)")  # type: ignore[arg-type]

    def digest(self) -> bytes:
        """Cheap identity: the tensor table (name, dims, type, offset) -- no tensor bytes are hashed."""
        h = hashlib.sha256()
        for t in self.tensors.values():
            h.update(f"{t.name}:{list(t.dims)}:{t.qtype.name}:{t.offset};".encode())
        return h.digest()


class StoredRows:
    """Rows [rows, row_bytes] of a tensor's stored bytes, read from the file (os.pread) when sliced."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, int]) -> None:
        self.path, self.offset, self.shape = path, offset, shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("StoredRows reads contiguous rows only")
        n = max(0, stop - start) * self.shape[1]
        with open(self.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), n, self.offset + start * self.shape[1])
        if len(data) != n:
            raise WeightsError(f"{self.path} is truncated (a tensor's rows run past the end); re-download it")
        return np.frombuffer(data, np.uint8).reshape(-1, self.shape[1])


class _WidenedRows:
    """A GGUF matrix that widens to float32 only the rows sliced from it (what `quant.quantize` reads)."""

    def __init__(self, raw: "np.ndarray | StoredRows", qtype: BlockType, shape: tuple[int, ...]) -> None:
        self.raw, self.qtype, self.shape = raw, qtype, shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        try:
            return dequantize(np.asarray(self.raw[rows]), self.qtype).reshape(-1, self.shape[-1]).astype(np.float32)
        except NotImplementedError as e:
            raise UnsupportedModelError(f"{self.qtype.name} tensors: {e}") from None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of Q/K rows (interleaved RoPE pairs -> HF rotate_half halves).

    llama.cpp stores rows as reshape(n_head, 2, d/2, cols).swapaxes(1, 2); this is its inverse.
    Works for weights [rows, cols] and biases [rows].
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _f32(v: Any) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06. Take the shortest float32 repr."""
    return float(str(np.float32(v)))


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
    vocab = g.length("tokenizer.ggml.tokens") or int(g.require(k("vocab_size")))
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
        rms_norm_eps=_f32(g.get(k("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_theta=_f32(g.get(k("rope.freq_base"), 10000.0)),
        rope_scaling=None,
        tie_word_embeddings=registry.GGUF_HEAD not in g.tensors,
        attention_bias=registry.has_attention_bias(family) or "blk.0.attn_q.bias" in g.tensors,
        qk_norm=registry.has_qk_norm(family),
        max_position_embeddings=int(g.get(k("context_length"), 2048)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
    )


def _layer(g: GGUFFile, args: ModelArgs, i: int, weights: str = "fp32") -> LayerWeights:
    shapes = expected_shapes(args)
    # llama.cpp permutes Q/K rows only for the llama family: its Qwen2Model/Qwen3Model converters
    # (conversion/qwen.py) inherit TextModel.modify_tensors, which does not, and run NEOX (rotate-half) RoPE.
    heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads,
             "q_bias": args.num_attention_heads, "k_bias": args.num_key_value_heads}
    kw: dict[str, Weight] = {}
    for field in layer_fields(args):
        name = registry.gguf_layer_name(i, field)
        a = g.linear(name, weights) if field in LINEAR_FIELDS else g.tensor(name)
        check_shape(name, a, shapes[field], g.path)
        if args.architecture == "llama" and field in heads:
            if isinstance(a, QTensor):  # rows are output features: permute whole rows, codes untouched
                a = a.take_rows(unpermute_qk(np.arange(a.shape[0]), heads[field]))
            else:
                a = unpermute_qk(a, heads[field])
        kw[field] = a
    return LayerWeights(**kw)


def load_gguf_shard(g: GGUFFile, layer_range: LayerRange, args: ModelArgs,
                    weights: str = "fp32", layers: bool = True, embed: bool = True,
                    progress: Callable[[int], None] | None = None, left_out: LeftOut = LeftOut()) -> ShardWeights:
    """Load only what `layer_range` needs from a GGUF file, linear weights in the form `weights` asks for
    (quant.py). `fingerprint` is left empty (the loader sets it).
    layers=False: the embedding only (first shard); no layer or head tensor bytes are read.
    `left_out`: layers (and the head) neither read nor built."""
    g.check_unchanged()  # `g` may have been parsed a while ago, at the start (loader.load_header)
    vh = (args.vocab_size, args.hidden_size)
    loaded: dict[int, LayerWeights] = {}
    for i in layer_range.layers if layers else ():
        if i in left_out.layers:
            continue
        loaded[i] = _layer(g, args, i, weights)
        if progress is not None:
            progress(i)
    want_embed, embed, norm, head = embed, None, None, None
    mapped = form_for(weights).mapped_embedding
    if layer_range.is_first and want_embed:
        embed = check_shape(registry.GGUF_EMBED, g.table(registry.GGUF_EMBED) if mapped else
                            g.linear(registry.GGUF_EMBED, weights), vh, g.path)
    if layer_range.is_last and layers and not left_out.head:
        norm = check_shape(registry.GGUF_NORM, g.tensor(registry.GGUF_NORM), (args.hidden_size,), g.path)
        if args.tie_word_embeddings:
            # tied: the head is the embedding object, unless the embedding stays mapped (then the head is compact)
            head = embed if embed is not None and not mapped else check_shape(
                registry.GGUF_EMBED, g.linear(registry.GGUF_EMBED, weights), vh, g.path
            )
        else:
            head = check_shape(registry.GGUF_HEAD, g.linear(registry.GGUF_HEAD, weights), vh, g.path)
    return ShardWeights(args=args, layer_range=layer_range, layers=loaded, embed_tokens=embed,
                        final_norm=norm, lm_head=head)
