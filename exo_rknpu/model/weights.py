"""The weights of one shard, in canonical (HF) layout: linear weights are [out, in], either float32 arrays or
compact `QTensor`s (model/quant.py) as `--weights` asks; norms and biases are always float32."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np

from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.quant import QTensor, Weight


@dataclass
class RowTable:
    """An embedding table left where it is stored (a read-only mapping of the model file): `rows` widens only the
    gathered rows to float32 with the source format's own decoder, so a lookup gives exactly the stored values and
    only the pages of the rows looked up become resident. What --weights auto keeps the embedding as (a tied head
    is loaded as its own compact linear for onnxruntime)."""

    stored: np.ndarray  # [V, bytes or elements per row]: the file's own bytes (np.memmap)
    widen: Callable[[np.ndarray], np.ndarray]  # stored rows [n, ...] -> float32 [n, H]
    shape: tuple[int, int]
    origin: str = ""

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (any integer shape) as float32 [*ids.shape, H]."""
        ids = np.asarray(ids)
        flat = np.asarray(self.stored[ids.reshape(-1)])
        return np.asarray(self.widen(flat), np.float32).reshape(*ids.shape, self.shape[1])

    def dequantize(self) -> np.ndarray:
        """The whole table as float32 (a new array; for the float paths that need one)."""
        return self.rows(np.arange(self.shape[0]))

    @property
    def nbytes(self) -> int:
        """Bytes mapped (resident only as far as rows are read)."""
        return int(self.stored.nbytes)

    def hash_into(self, h: "hashlib._Hash") -> None:
        h.update(f"table:{self.shape}:{self.origin};".encode())
        h.update(memoryview(np.ascontiguousarray(self.stored)).cast("B"))


@dataclass
class LayerWeights:
    """One decoder layer. Biases are None unless the family has them (qwen2: q/k/v); q_norm/k_norm likewise (qwen3)."""

    input_norm: np.ndarray  # [H]
    q_proj: Weight  # [nh*hd, H]
    k_proj: Weight  # [nkv*hd, H]
    v_proj: Weight  # [nkv*hd, H]
    o_proj: Weight  # [H, nh*hd]
    post_norm: np.ndarray  # [H]
    gate_proj: Weight  # [F, H]
    up_proj: Weight  # [F, H]
    down_proj: Weight  # [H, F]
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # [hd], float32: RMSNorm of each q head before RoPE (qwen3)
    k_norm: np.ndarray | None = None  # [hd], float32: the same for k

    def arrays(self) -> dict[str, Weight]:
        """Named tensors of this layer (None biases left out), in a fixed order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def digest(self) -> str:
        """sha256 over names, shapes, dtypes and bytes: identifies this layer's weights."""
        h = hashlib.sha256()
        for name, a in self.arrays().items():
            h.update(f"{name}:".encode())
            hash_weight(h, a)  # hashed in place, not copied
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


@dataclass(frozen=True)
class SourceStamp:
    """What a shard's weights are built from, known without reading them (model/loader.py `source_stamp`): each
    source file's path, size, modification and change times and inode; the model's fingerprint (config + tensor
    table); the weights mode; and the version of the code that turns stored tensors into these weights. A file
    rewritten in place changes its size or times (its change time cannot be set back), so it no longer matches."""

    files: tuple[tuple[str, int, int, int, int], ...]  # (path, size, mtime_ns, ctime_ns, inode) of every source file
    fingerprint: str
    weights: str  # the --weights mode
    loader: str  # model/loader.py loader_version()

    def parts(self) -> dict[str, Any]:
        """The stamp as JSON-ready parts of a cache key."""
        return {"files": [list(f) for f in self.files], "fingerprint": self.fingerprint, "weights": self.weights,
                "loader": self.loader}


@dataclass(frozen=True)
class LeftOut:
    """Parts of a shard the loader leaves out because something else serves them (a slice prepared earlier from
    the same sources): these decoder layers, and the final norm + head."""

    layers: frozenset[int] = frozenset()
    head: bool = False


@dataclass
class ShardWeights:
    """Only what a layer range needs: its layers, plus embedding (first) and final norm + head (last).

    `lm_head` is the embedding matrix itself when the model ties them (no copy is made).
    """

    args: ModelArgs
    layer_range: LayerRange
    layers: dict[int, LayerWeights]  # global layer index -> weights
    embed_tokens: Weight | RowTable | None = None  # [V, H], first shard only
    final_norm: np.ndarray | None = None  # [H], last shard only
    lm_head: Weight | None = None  # [V, H], last shard only
    fingerprint: str = ""  # identifies the model (config + source); set by the loader
    # set only by ShardSource.load (model/loader.py), whose weights are exactly what the stamped sources give and
    # are handed to nobody but the ShardRunner that asked: a backend may file what it prepares from them under it
    stamp: SourceStamp | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        n = sum(lw.nbytes for lw in self.layers.values())
        for a in (self.embed_tokens, self.final_norm, self.lm_head):
            if a is not None:
                n += a.nbytes
        if self.lm_head is not None and self.lm_head is self.embed_tokens:
            n -= self.lm_head.nbytes
        return n


def hash_weight(h: "hashlib._Hash", a: Weight | RowTable) -> None:
    """Feed a tensor's layout and bytes to `h` without copying them (memoryview of the array)."""
    if isinstance(a, (QTensor, RowTable)):
        a.hash_into(h)
        return
    h.update(f"{a.shape}:{a.dtype};".encode())
    h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
