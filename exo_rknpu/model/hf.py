"""Hugging Face folder reader: config.json -> ModelArgs, safetensors -> ShardWeights for one layer range.

Only the safetensors files that hold tensors of the requested range are opened, and tensors are
read one at a time, so a node holding layers 10-19 never touches the bytes of layers 0-9.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exo_rknpu.errors import UnsupportedModelError, WeightsError
from exo_rknpu.model import registry
from exo_rknpu.model.base import LayerRange, ModelArgs, RopeScaling
from exo_rknpu.model.quant import Weight, compact, form_for
from exo_rknpu.model.weights import LayerWeights, LeftOut, RowTable, ShardWeights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# --------------------------------------------------------------------------- config


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object; WeightsError naming the file if it is missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path} not found: a Hugging Face model folder needs it") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of an HF model folder, as a dict."""
    return read_json(Path(folder) / "config.json")


def _first_id(value: Any) -> int | None:
    """eos_token_id may be an int or a list of ints (llama3, qwen2 generation configs): take the first."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def all_ids(value: Any) -> list[int]:
    """Every id of an int-or-list token id field."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [] if value is None else [int(value)]


def _rope_settings(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and llama3 scaling from either the transformers-4 or transformers-5 config layout.

    transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}` and drops top-level rope_theta;
    transformers 4 writes top-level `rope_theta` plus an optional `rope_scaling` dict.
    """
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        block = cfg.get(key)
        if isinstance(block, Mapping):
            params.update(block)
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: plain RoPE and 'llama3'"
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise UnsupportedModelError(f"llama3 rope scaling lacks {e.args[0]!r} in config.json") from None
    return float(theta), scaling


def args_from_config(cfg: Mapping[str, Any]) -> ModelArgs:
    """Normalise an HF config dict into ModelArgs (llama / qwen2 / qwen3 families)."""
    family = registry.canonical_family(cfg.get("model_type"), cfg)
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        ffn = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise WeightsError(f"config.json lacks {e.args[0]!r}") from None
    theta, scaling = _rope_settings(cfg)
    head_dim = cfg.get("head_dim") or hidden // heads
    # qwen2 always has q/k/v biases; llama has them only when attention_bias says so.
    bias = registry.has_attention_bias(family) or bool(cfg.get("attention_bias", False))
    return ModelArgs(
        architecture=family,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        vocab_size=vocab,
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bias,
        qk_norm=registry.has_qk_norm(family),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=_first_id(cfg.get("bos_token_id")),
        eos_token_id=_first_id(cfg.get("eos_token_id")),
    )


def load_hf_args(folder: Path) -> ModelArgs:
    """ModelArgs of an HF model folder."""
    return args_from_config(read_config(Path(folder)))


# --------------------------------------------------------------------------- tensor location


def weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> file name (relative to folder), from the index or the single file's header."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict):
            raise WeightsError(f"{index} has no 'weight_map' object")
        return {str(k): str(v) for k, v in wm.items()}
    single = folder / SINGLE_FILE
    if not single.exists():
        raise WeightsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}: is this a Hugging Face model folder?")
    _, header = read_header(single)
    return {name: SINGLE_FILE for name in header if name != "__metadata__"}


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header dict) of a safetensors file, parsed by hand (8-byte LE length + JSON)."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise WeightsError(f"{path} is truncated or not a safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100_000_000:
                raise WeightsError(f"{path} is corrupt or not a safetensors file (header length {n})")
            raw = f.read(n)
        if len(raw) != n:
            raise WeightsError(f"{path} is truncated (header cut short)")
        header = json.loads(raw)
    except WeightsError:
        raise  # already names the file and what is wrong (WeightsError is a ValueError: keep it unwrapped)
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} is missing; re-download the model") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} is corrupt or not a safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is corrupt: header is not a JSON object")
    return 8 + n, header


# --------------------------------------------------------------------------- dtype widening


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32: bf16 is the top half of an fp32 word."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _read_raw_bf16(path: Path, header_len: int, info: Mapping[str, Any]) -> np.ndarray:
    """Read one BF16 tensor's bytes straight from the file (numpy has no bfloat16) and widen it."""
    begin, end = info["data_offsets"]
    shape = tuple(int(d) for d in info["shape"])
    with open(path, "rb") as f:
        f.seek(header_len + begin)
        buf = f.read(end - begin)
    if len(buf) != end - begin or len(buf) != 2 * int(np.prod(shape, dtype=np.int64)):
        raise WeightsError(f"{path} is truncated or corrupt (tensor bytes do not match its shape)")
    return bf16_to_f32(np.frombuffer(buf, dtype="<u2")).reshape(shape)


class _SafetensorsFile:
    """One open safetensors file; yields float32 tensors one at a time. (The safetensors library is imported here,
    where tensors are read: a start that finds its slices prepared never needs it.)"""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = path
        self.header_len, self.header = read_header(path)
        try:
            self._cm = safe_open(str(path), "numpy")
            self._f = self._cm.__enter__()
        except SafetensorError as e:
            raise WeightsError(f"{path} is corrupt or truncated: {e}; re-download the model") from None

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def get(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError

        info = self.header.get(name)
        if info is None:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}")
        try:
            if info.get("dtype") == "BF16":
                return _read_raw_bf16(self.path, self.header_len, info)
            a = self._f.get_tensor(name)
        except SafetensorError as e:
            raise WeightsError(f"cannot read {name!r} from {self.path}: {e}") from None
        if a.dtype != np.float32:
            if not np.issubdtype(a.dtype, np.floating):
                raise WeightsError(f"tensor {name!r} in {self.path} has dtype {a.dtype}; expected a float type")
            a = a.astype(np.float32)
        return a


_ROW_DTYPES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}


class _MappedRows:
    """A 2-D safetensors matrix read a few rows at a time, each slice widened to float32.

    Slices are read with pread into a fresh buffer, not through a mapping: the pages of a mapping read once stay in
    this process's resident memory while the mapping lives, so quantizing the 1B shape's tied head (its 200 MB bf16
    embedding) through one added 200 MB to the load's peak. `data` (the mapping) is only for `RowTable`, whose
    lookups touch a few rows."""

    def __init__(self, path: Path, header_len: int, info: Mapping[str, Any]) -> None:
        begin, end = info["data_offsets"]
        self.shape = tuple(int(d) for d in info["shape"])
        self.bf16 = info["dtype"] == "BF16"
        self.dtype = np.dtype(_ROW_DTYPES[info["dtype"]])
        if end - begin != self.dtype.itemsize * self.shape[0] * self.shape[1] or path.stat().st_size < header_len + end:
            raise WeightsError(f"{path} is truncated or corrupt (tensor bytes do not match its shape)")
        self.path, self.offset = path, header_len + begin

    @property
    def data(self) -> np.ndarray:
        """The matrix as a read-only mapping of the file."""
        return np.memmap(self.path, self.dtype, "r", self.offset, self.shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows are read as one contiguous range")
        row_bytes = self.dtype.itemsize * self.shape[1]
        n = max(0, stop - start) * row_bytes
        with open(self.path, "rb", buffering=0) as f:
            buf = os.pread(f.fileno(), n, self.offset + start * row_bytes)
        if len(buf) != n:
            raise WeightsError(f"{self.path} is truncated (a tensor's rows are cut short)")
        return self.widen(np.frombuffer(buf, self.dtype).reshape(-1, self.shape[1]))

    def widen(self, a: np.ndarray) -> np.ndarray:
        return bf16_to_f32(a) if self.bf16 else a.astype(np.float32)


class TensorSource:
    """Opens the files of an HF folder lazily, once each, and remembers which ones it opened."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.map = weight_map(self.folder)
        self.opened: dict[str, _SafetensorsFile] = {}

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.opened.values():
            f.close()
        self.opened.clear()

    def has(self, name: str) -> bool:
        return name in self.map

    def rows(self, name: str) -> "_MappedRows | np.ndarray":
        """A matrix read a few rows at a time (float types of 2 dims), else the whole tensor as float32."""
        fname = self.map.get(name)
        if fname is not None:
            f = self.opened.get(fname) or self.opened.setdefault(fname, _SafetensorsFile(self.folder / fname))
            info = f.header.get(name)
            if info is not None and info.get("dtype") in _ROW_DTYPES and len(info.get("shape", ())) == 2:
                return _MappedRows(f.path, f.header_len, info)
        return self.get(name)

    def table(self, name: str) -> "RowTable | np.ndarray":
        """A float matrix left in the mapped file, rows widened when looked up (else the tensor as float32)."""
        rows = self.rows(name)
        if isinstance(rows, _MappedRows):
            return RowTable(rows.data, rows.widen, rows.shape, "mapped")  # type: ignore[arg-type]
        return rows

    def get(self, name: str) -> np.ndarray:
        fname = self.map.get(name)
        if fname is None:
            where = INDEX_FILE if (self.folder / INDEX_FILE).exists() else SINGLE_FILE
            raise WeightsError(f"tensor {name!r} is missing from {self.folder / where}")
        f = self.opened.get(fname)
        if f is None:
            f = self.opened[fname] = _SafetensorsFile(self.folder / fname)
        return f.get(name)


# --------------------------------------------------------------------------- shard loading


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """LayerWeights field -> shape, in HF [out, in] layout."""
    h, f, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    return {
        "input_norm": (h,),
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "post_norm": (h,),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
        "q_bias": (q,),
        "k_bias": (kv,),
        "v_bias": (kv,),
        "q_norm": (hd,),
        "k_norm": (hd,),
    }


# LayerWeights fields that are linear weights [out, in] (compact under --weights int4/int8); the rest stay float32.
LINEAR_FIELDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_shape(name: str, a: Any, shape: tuple[int, ...], where: object) -> np.ndarray:
    """Raise WeightsError if a tensor's shape disagrees with the config."""
    if tuple(a.shape) != tuple(shape):
        raise WeightsError(
            f"tensor {name!r} in {where} has shape {tuple(a.shape)}, but the config implies {tuple(shape)}"
        )
    return a


def layer_fields(args: ModelArgs) -> list[str]:
    """LayerWeights fields this model has (biases only with attention_bias, q/k norms only with qk_norm)."""
    fields = list(registry.HF_LAYER_TENSORS)
    if args.attention_bias:
        fields += list(registry.HF_BIAS_TENSORS)
    if args.qk_norm:
        fields += list(registry.HF_QK_NORM_TENSORS)
    return fields


def load_hf_shard(folder: Path, layer_range: LayerRange, args: ModelArgs | None = None, weights: str = "fp32",
                  layers: bool = True, embed: bool = True, progress: Callable[[int], None] | None = None,
                  left_out: LeftOut = LeftOut()) -> ShardWeights:
    """Load only what `layer_range` needs from an HF folder, linear weights in the form `weights` asks for
    (quant.py, `form_for`). Each matrix is quantized a few rows at a time. `fingerprint` is left empty (the
    loader sets it). layers=False: the embedding only (first shard); no file holding only layer or head tensors
    is opened. `left_out`: layers (and the head) neither read nor built."""
    folder = Path(folder)
    args = args or load_hf_args(folder)
    shapes = expected_shapes(args)
    vh = (args.vocab_size, args.hidden_size)
    form = form_for(weights)

    def linear(name: str, shape: tuple[int, ...]) -> Weight:
        # quantized a few rows at a time: a bf16 matrix never exists whole as float32 (the 1B embedding is 1 GB)
        rows = src.get(name) if form.bits is None else src.rows(name)
        return compact(check_shape(name, rows, shape, folder), form)

    with TensorSource(folder) as src:
        loaded: dict[int, LayerWeights] = {}
        for i in layer_range.layers if layers else ():
            if i in left_out.layers:
                continue
            kw: dict[str, Weight] = {}
            for field in layer_fields(args):
                name = registry.hf_layer_name(i, field)
                kw[field] = linear(name, shapes[field]) if field in LINEAR_FIELDS else check_shape(name, src.get(name), shapes[field], folder)
            loaded[i] = LayerWeights(**kw)
            if progress is not None:
                progress(i)
        want_embed, embed, norm, head = embed, None, None, None
        if layer_range.is_first and want_embed:
            embed = check_shape(registry.HF_EMBED, src.table(registry.HF_EMBED), vh, folder) if form.mapped_embedding \
                else linear(registry.HF_EMBED, vh)
        if layer_range.is_last and layers and not left_out.head:
            norm = check_shape(registry.HF_NORM, src.get(registry.HF_NORM), (args.hidden_size,), folder)
            if args.tie_word_embeddings:
                # Tied: the head *is* the embedding (no second copy), unless the embedding stays mapped in the file
                head = embed if embed is not None and not form.mapped_embedding else linear(registry.HF_EMBED, vh)
            else:
                head = linear(registry.HF_HEAD, vh)
    return ShardWeights(args=args, layer_range=layer_range, layers=loaded, embed_tokens=embed,
                        final_norm=norm, lm_head=head)


def source_digest(folder: Path) -> bytes:
    """Cheap identity of the weights: the tensor table (names, dtypes, shapes, offsets) of a single file,
    or the index's weight_map for sharded checkpoints (so no file outside a range is opened).
    Does not hash tensor bytes; use LayerWeights.digest() for content identity."""
    folder = Path(folder)
    h = hashlib.sha256()
    index = folder / INDEX_FILE
    if index.exists():
        h.update(b"index:")
        h.update(json.dumps(weight_map(folder), sort_keys=True).encode())
    else:
        _, header = read_header(folder / SINGLE_FILE)
        header.pop("__metadata__", None)
        h.update(b"single:")
        h.update(json.dumps(header, sort_keys=True).encode())
    return h.digest()

