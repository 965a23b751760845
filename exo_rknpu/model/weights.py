"""The weights of one shard, in canonical (HF) layout: linear weights are [out, in], either float32 arrays or
compact `QTensor`s (model/quant.py) as `--weights` asks; norms and biases are always float32."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.quant import QTensor, Weight


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


@dataclass
class ShardWeights:
    """Only what a layer range needs: its layers, plus embedding (first) and final norm + head (last).

    `lm_head` is the embedding matrix itself when the model ties them (no copy is made).
    """

    args: ModelArgs
    layer_range: LayerRange
    layers: dict[int, LayerWeights]  # global layer index -> weights
    embed_tokens: Weight | None = None  # [V, H], first shard only
    final_norm: np.ndarray | None = None  # [H], last shard only
    lm_head: Weight | None = None  # [V, H], last shard only
    fingerprint: str = ""  # identifies the model (config + source); set by the loader

    @property
    def nbytes(self) -> int:
        n = sum(lw.nbytes for lw in self.layers.values())
        for a in (self.embed_tokens, self.final_norm, self.lm_head):
            if a is not None:
                n += a.nbytes
        if self.lm_head is not None and self.lm_head is self.embed_tokens:
            n -= self.lm_head.nbytes
        return n


def hash_weight(h: "hashlib._Hash", a: Weight) -> None:
    """Feed a tensor's layout and bytes to `h` without copying them (memoryview of the array)."""
    if isinstance(a, QTensor):
        a.hash_into(h)
        return
    h.update(f"{a.shape}:{a.dtype};".encode())
    h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
