"""Slice specifications and shape buckets.

A slice is one graph: the embedding, a group of consecutive decoder layers, or the head (final norm + lm_head).
The KV cache is an explicit input/output of layer slices, because the NPU only runs static graphs:

  layers slice inputs:  hidden [1,S,H] f32, cos [1,1,S,hd], sin [1,1,S,hd], mask [1,1,S,C+S],
                        past_k [n,kv,C,hd], past_v [n,kv,C,hd]        (n = layers in the slice)
  layers slice outputs: hidden_out [1,S,H], k_new [n,kv,S,hd], v_new [n,kv,S,hd]
  embed slice:          token_ids [1,S] int64 -> hidden [1,S,H]
  head slice:           hidden [1,S,H] -> logits [1,S,V]

S is a prefill/decode bucket, C a context bucket. The host owns the cache and writes k_new/v_new into it.

kv_layout "dim" stores the cache transposed, past_k/past_v [n,kv,hd,C] and k_new/v_new [n,kv,hd,S]: the NPU's
attention kernel wants keys and values that way, and rknn-toolkit2 puts a Transpose of a [C+S, hd] tensor on the
CPU once C+S times hd passes 8192 (measured: every prefill bucket of a 64-wide head). CPUs use "seq".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from exo_rknpu.errors import ContextOverflowError
from exo_rknpu.model.base import ModelArgs

SliceKind = Literal["embed", "layers", "head"]
Block = Literal["attn", "mlp"]
KVLayout = Literal["seq", "dim"]  # cache rows [.., C, hd] or transposed [.., hd, C]

# Value used for masked attention positions: finite so fp16 graphs never see inf - inf.
MASK_VALUE = -1e4

LAYER_INPUTS = ("hidden", "cos", "sin", "mask", "past_k", "past_v")
LAYER_OUTPUTS = ("hidden_out", "k_new", "v_new")


@dataclass(frozen=True)
class Buckets:
    """Static shapes every backend is called with.

    seq: token counts per call (1 is decode; larger ones are prefill chunks), ascending.
    context: KV-cache lengths (the C in past_k), ascending; the largest is the context limit.
    """

    seq: tuple[int, ...] = (1, 16, 64)
    context: tuple[int, ...] = (256, 512, 1024, 2048)

    def __post_init__(self) -> None:
        for name, b in (("seq", self.seq), ("context", self.context)):
            if not b or list(b) != sorted(set(b)) or b[0] < 1:
                raise ValueError(f"{name} buckets must be ascending positive integers, got {b}")
        if self.seq[0] != 1:
            raise ValueError(f"seq buckets must include 1 (decode), got {self.seq}")

    @property
    def max_context(self) -> int:
        return self.context[-1]

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """Split n tokens into (real, bucket) chunks: the largest bucket while it fits, then the smallest that holds the rest."""
        out: list[tuple[int, int]] = []
        big = self.seq[-1]
        while n >= big:
            out.append((big, big))
            n -= big
        if n:
            out.append((n, next(b for b in self.seq if b >= n)))
        return out

    def context_for(self, needed: int) -> int:
        """Smallest context bucket holding `needed` positions."""
        for c in self.context:
            if c >= needed:
                return c
        raise ContextOverflowError(
            f"request needs {needed} positions but the largest context bucket is {self.max_context}; "
            f"raise it with --max-context (or add larger context buckets)"
        )

    @classmethod
    def up_to(cls, max_context: int, seq: tuple[int, ...] = (1, 16, 64), smallest: int = 256) -> "Buckets":
        """Context buckets doubling from `smallest` up to and including max_context."""
        ctx: list[int] = []
        c = min(smallest, max_context)
        while c < max_context:
            ctx.append(c)
            c *= 2
        ctx.append(max_context)
        return cls(seq=seq, context=tuple(ctx))


@dataclass(frozen=True)
class SliceSpec:
    """What one graph computes. Shapes (S, C) are chosen per call from Buckets, or fixed when compiling.

    For kind == "layers", [start, stop) are global layer indices and `blocks` says which parts of each
    layer run (both, for now; a later placement stage may split attention and MLP onto different devices).
    """

    kind: SliceKind
    start: int = 0
    stop: int = 0
    blocks: tuple[Block, ...] = ("attn", "mlp")
    kv_layout: KVLayout = "seq"

    @property
    def name(self) -> str:
        """Stable name used by placement rules and artefact files: embed, head, layers.4, layers.4-7."""
        if self.kind != "layers":
            return self.kind
        base = f"layers.{self.start}" if self.stop - self.start == 1 else f"layers.{self.start}-{self.stop - 1}"
        return base if self.blocks == ("attn", "mlp") else f"{base}.{'+'.join(self.blocks)}"

    @property
    def n_layers(self) -> int:
        return self.stop - self.start if self.kind == "layers" else 0

    def input_shapes(self, args: ModelArgs, seq: int, ctx: int) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for bucket (seq, ctx)."""
        H, hd, kv = args.hidden_size, args.head_dim, args.num_key_value_heads
        if self.kind == "embed":
            return {"token_ids": (1, seq)}
        if self.kind == "head":
            return {"hidden": (1, seq, H)}
        n = self.n_layers
        cache = (n, kv, ctx, hd) if self.kv_layout == "seq" else (n, kv, hd, ctx)
        return {
            "hidden": (1, seq, H),
            "cos": (1, 1, seq, hd),
            "sin": (1, 1, seq, hd),
            "mask": (1, 1, seq, ctx + seq),
            "past_k": cache,
            "past_v": cache,
        }

    def output_shapes(self, args: ModelArgs, seq: int) -> dict[str, tuple[int, ...]]:
        H, hd, kv = args.hidden_size, args.head_dim, args.num_key_value_heads
        if self.kind == "embed":
            return {"hidden": (1, seq, H)}
        if self.kind == "head":
            return {"logits": (1, seq, args.vocab_size)}
        n = self.n_layers
        new = (n, kv, seq, hd) if self.kv_layout == "seq" else (n, kv, hd, seq)
        return {"hidden_out": (1, seq, H), "k_new": new, "v_new": new}


def to_kv_layout(inputs: dict, layout: KVLayout) -> dict:
    """A layer slice's inputs (seq layout, as the CPU backends see them) in `layout`: past_k/past_v transposed for "dim"."""
    if layout == "seq" or "past_k" not in inputs:
        return inputs
    out = dict(inputs)
    for name in ("past_k", "past_v"):
        out[name] = inputs[name].swapaxes(-1, -2).copy()
    return out


def plan_slices(start: int, stop: int, first: bool, last: bool, layers_per_slice: int | None) -> list[SliceSpec]:
    """Slices for a shard covering layers [start, stop): embed?, layer groups, head?.

    layers_per_slice=None puts the whole range in one graph (fewest calls, best on CPU);
    1 gives one graph per layer (what the NPU compiler emits).
    """
    step = (stop - start) if not layers_per_slice else layers_per_slice
    out: list[SliceSpec] = [SliceSpec("embed")] if first else []
    out += [SliceSpec("layers", a, min(a + step, stop)) for a in range(start, stop, step)]
    if last:
        out.append(SliceSpec("head"))
    return out
