"""Model hyper-parameters and layer ranges."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from exo_rknpu.errors import LayerRangeError


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (rope_type == "llama3"); None on ModelArgs means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters shared by the llama, qwen2 and qwen3 families (HF names, normalised)."""

    architecture: str  # canonical family: "llama" | "qwen2" | "qwen3"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (qwen3)
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        """Inverse of to_dict (keeps only known keys)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("rope_scaling"), dict):
            kw["rope_scaling"] = RopeScaling(**kw["rope_scaling"])
        return cls(**kw)


@dataclass(frozen=True)
class LayerRange:
    """Half-open range [start, stop) of decoder layers out of n_layers.

    exo's Shard is inclusive on both ends; it is converted in exactly one place (the exo adapter).
    """

    start: int
    stop: int
    n_layers: int

    def __post_init__(self) -> None:
        if self.n_layers <= 0:
            raise LayerRangeError(f"model has no layers (n_layers={self.n_layers})")
        if not (0 <= self.start < self.stop <= self.n_layers):
            raise LayerRangeError(
                f"layer range {self.start}-{self.stop - 1} is empty or outside the model "
                f"(valid layers are 0-{self.n_layers - 1})"
            )

    @classmethod
    def parse(cls, text: str, n_layers: int) -> "LayerRange":
        """Parse "A-B" (inclusive, as users write it) or "A" into a LayerRange."""
        try:
            if "-" in text:
                a, b = text.split("-", 1)
                start, last = int(a), int(b)
            else:
                start = last = int(text)
        except ValueError:
            raise LayerRangeError(f"cannot parse layer range {text!r}: write it as A-B, e.g. 0-9") from None
        if last < start:
            raise LayerRangeError(f"layer range {text!r} is empty: the end is before the start")
        return cls(start, last + 1, n_layers)

    @classmethod
    def full(cls, n_layers: int) -> "LayerRange":
        return cls(0, n_layers, n_layers)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.n_layers

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.start}-{self.stop - 1}"


def parse_split(text: str, n_layers: int) -> list[LayerRange]:
    """Parse "0-9,10-19,20-29" into consecutive ranges that together cover the whole model."""
    ranges = [LayerRange.parse(part.strip(), n_layers) for part in text.split(",") if part.strip()]
    if not ranges:
        raise LayerRangeError("empty --split")
    expect = 0
    for r in ranges:
        if r.start != expect:
            raise LayerRangeError(
                f"--split {text!r}: range {r} should start at layer {expect}; "
                f"ranges must be consecutive and cover 0-{n_layers - 1}"
            )
        expect = r.stop
    if expect != n_layers:
        raise LayerRangeError(f"--split {text!r} stops at layer {expect - 1}; the model has layers 0-{n_layers - 1}")
    return ranges
