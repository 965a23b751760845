"""Slice specifications and shape buckets.

A slice is one graph: the embedding, a group of consecutive decoder layers, or the head (final norm + lm_head).
The KV cache is an explicit input/output of layer slices, because the NPU only runs static graphs:

  layers slice inputs:  hidden [1,S,H] f32, cos [1,1,S,hd], sin [1,1,S,hd], mask [1,1,S,C+S],
                        past_k [n,kv,C,hd], past_v [n,kv,C,hd]        (n = layers in the slice)
  layers slice outputs: hidden_out [1,S,H], k_new [n,kv,S,hd], v_new [n,kv,S,hd]
  embed slice:          token_ids [1,S] int64 -> hidden [1,S,H]
  head slice:           hidden [1,S,H] -> logits [1,S,V]

S is a prefill/decode bucket, C a context bucket. The host owns the cache and writes k_new/v_new into it.

kv_layout "seq" is the form above (the CPU backends); "npu" is the NPU's own form (slices/npu_form.py: float16,
keys transposed, the layers' caches stacked), which its compiled graphs take without a conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from exo_rknpu.errors import ContextOverflowError
from exo_rknpu.model.base import ModelArgs

SliceKind = Literal["embed", "layers", "head"]
# A decoder layer is six parts in this order (block "attn" = the first four, "mlp" = the last two); a slice runs all of them ("attn", "mlp": the whole layer) or a
# contiguous run of them on one layer (a placement that puts blocks of a layer on different devices).
Part = Literal["attn_norm", "qkv", "attention", "o_proj", "mlp_norm", "ffn"]
Block = Literal["attn", "mlp", "attn_norm", "qkv", "attention", "o_proj", "mlp_norm", "ffn"]
PARTS: tuple[Part, ...] = ("attn_norm", "qkv", "attention", "o_proj", "mlp_norm", "ffn")
# The blocks a placement plan names (runtime/placement.py) and backends declare (`Backend.blocks`): each layer part
# belongs to one; the embedding and head slices are blocks of their own.
PART_BLOCK: dict[str, str] = {"attn_norm": "norm", "qkv": "projections", "attention": "attention",
                              "o_proj": "projections", "mlp_norm": "norm", "ffn": "mlp"}
PLACEMENT_BLOCKS = ("embedding", "attention", "projections", "mlp", "norm", "head")
WHOLE_LAYER: tuple[Block, ...] = ("attn", "mlp")
# What each part reads and writes of a layer's running state (x: the residual stream; h: a normed x; q/k/v: the
# projections before rotary; o: attention output, heads merged). The attention part also reads cos/sin/mask and
# the cache and writes k_new/v_new. Every hand-off is a [1,S,D] float32 tensor kept on the host.
PART_READS: dict[str, tuple[str, ...]] = {"attn_norm": ("x",), "qkv": ("h",), "attention": ("q", "k", "v"),
                                          "o_proj": ("x", "o"), "mlp_norm": ("x",), "ffn": ("x", "h")}
PART_WRITES: dict[str, tuple[str, ...]] = {"attn_norm": ("h",), "qkv": ("q", "k", "v"), "attention": ("o",),
                                           "o_proj": ("x",), "mlp_norm": ("h",), "ffn": ("x",)}
# cache rows [.., C, hd], transposed [.., hd, C], or the NPU form (slices/npu_form.py): float16 keys [n*kv, hd, C],
# values [n*kv, C, hd], and the slice's other inputs as the compiled graph takes them
KVLayout = Literal["seq", "npu"]
NPU_DTYPE = "float16"  # the dtype of every input and output of a slice in the NPU form (what RKNN records)

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

    For kind == "layers", [start, stop) are global layer indices and `blocks` says which parts of each layer
    run: WHOLE_LAYER, or a contiguous run of PARTS on a single layer (see `parts`, `state_inputs`).
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
        return base if self.whole else f"{base}.{'+'.join(self.blocks)}"

    @property
    def n_layers(self) -> int:
        return self.stop - self.start if self.kind == "layers" else 0

    @property
    def whole(self) -> bool:
        """True for whole decoder layers (or a non-layer slice)."""
        return self.blocks == WHOLE_LAYER

    @property
    def parts(self) -> tuple[Part, ...]:
        """The layer parts this slice runs, in order."""
        if self.kind != "layers":
            return ()
        out: list[str] = []
        for b in self.blocks:
            out += {"attn": PARTS[:4], "mlp": PARTS[4:]}.get(b, (b,))
        return tuple(out)  # type: ignore[return-value]

    @property
    def placement_blocks(self) -> frozenset[str]:
        """The placement blocks this slice computes (PLACEMENT_BLOCKS)."""
        if self.kind != "layers":
            return frozenset({"embedding" if self.kind == "embed" else "head"})
        return frozenset(PART_BLOCK[p] for p in self.parts)

    @property
    def has_attention(self) -> bool:
        """Reads the KV cache (and so is built per context bucket on static-shape backends)."""
        return "attention" in self.parts

    @property
    def cache_layers(self) -> int:
        """Layers whose KV cache this slice reads and writes."""
        return self.n_layers if self.has_attention else 0

    def state_inputs(self) -> tuple[str, ...]:
        """Layer-state tensors a partial slice reads before writing them (whole layers: x only)."""
        seen: list[str] = []
        written: set[str] = set()
        for p in self.parts:
            seen += [k for k in PART_READS[p] if k not in written and k not in seen]
            written.update(PART_WRITES[p])
        return tuple(seen)

    def state_outputs(self) -> tuple[str, ...]:
        """Layer-state tensors a later part reads before it writes them again (the live ones at the slice's end)."""
        parts = self.parts
        if not parts:
            return ()
        written = {k for p in parts for k in PART_WRITES[p]}
        after = PARTS[PARTS.index(parts[-1]) + 1:] + PARTS  # the rest of this layer, then the next layer
        live: list[str] = []
        for k in sorted(written, key=lambda k: "xhqkvo".index(k)):
            for p in after:
                if k in PART_READS[p]:
                    live.append(k)
                    break
                if k in PART_WRITES[p]:
                    break
        return tuple(live)

    def validate(self) -> None:
        """A partial slice is one layer and a contiguous run of parts."""
        if self.kind != "layers" or self.whole:
            return
        parts = self.parts
        i = PARTS.index(parts[0]) if parts and parts[0] in PARTS else -1
        if self.n_layers != 1 or i < 0 or parts != PARTS[i : i + len(parts)]:
            raise ValueError(f"a slice of blocks {self.blocks} must be one layer and a contiguous run of {PARTS}")

    def input_shapes(self, args: ModelArgs, seq: int, ctx: int) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for bucket (seq, ctx)."""
        H, hd, kv = args.hidden_size, args.head_dim, args.num_key_value_heads
        if self.kind == "embed":
            return {"token_ids": (1, seq)}
        if self.kind == "head":
            return {"hidden": (1, seq, H)}
        if self.kv_layout == "npu":
            return npu_input_shapes(self, args, seq, ctx)
        n = self.n_layers
        cache = (n, kv, ctx, hd)
        out = {state_name(k): (1, seq, state_width(args, k)) for k in self.state_inputs()}
        if self.has_attention:
            out.update({"cos": (1, 1, seq, hd), "sin": (1, 1, seq, hd), "mask": (1, 1, seq, ctx + seq),
                        "past_k": cache, "past_v": cache})
        return out

    def output_shapes(self, args: ModelArgs, seq: int) -> dict[str, tuple[int, ...]]:
        H, hd, kv = args.hidden_size, args.head_dim, args.num_key_value_heads
        if self.kind == "embed":
            return {"hidden": (1, seq, H)}
        if self.kind == "head":
            return {"logits": (1, seq, args.vocab_size)}
        if self.kv_layout == "npu":
            return npu_output_shapes(self, args, seq)
        n = self.n_layers
        new = (n, kv, seq, hd)
        out = {state_name(k, output=True): (1, seq, state_width(args, k)) for k in self.state_outputs()}
        if self.has_attention:
            out.update({"k_new": new, "v_new": new})
        return out


def state_name(key: str, output: bool = False) -> str:
    """Graph input/output name of a layer-state tensor: x is hidden / hidden_out (the whole-layer names)."""
    if key == "x":
        return "hidden_out" if output else "hidden"
    return f"{key}_out" if output else key


def state_width(args: ModelArgs, key: str) -> int:
    """Last dimension of a layer-state tensor."""
    if key == "q":
        return args.num_attention_heads * args.head_dim
    if key in ("k", "v"):
        return args.num_key_value_heads * args.head_dim
    if key == "o":
        return args.num_attention_heads * args.head_dim
    return args.hidden_size


def to_kv_layout(inputs: dict, layout: KVLayout) -> dict:
    """A layer slice's inputs (seq layout, as the CPU backends see them) in `layout`: for "npu" the cache as the
    host keeps it in that form (float16 keys [n*kv, hd, C], values [n*kv, C, hd])."""
    if layout == "seq" or "past_k" not in inputs:
        return inputs
    out = dict(inputs)
    for name in ("past_k", "past_v"):
        past = inputs[name]
        n, kv, c, hd = past.shape
        rows = past.swapaxes(-1, -2) if name == "past_k" else past
        out[name] = rows.reshape(n * kv, *rows.shape[2:]).astype(NPU_DTYPE)
    return out


def compiled_inputs(spec: "SliceSpec", args: ModelArgs, sample: dict) -> dict:
    """A slice's inputs in the "seq" form (as the CPU backends and the calibration captures have them) as its
    compiled graph takes them: the cache in the slice's layout, and for "npu" every input in the NPU form."""
    if not spec.has_attention:
        return sample
    x = to_kv_layout(sample, spec.kv_layout)
    return to_npu_inputs(spec, args, x) if spec.kv_layout == "npu" else x


def to_npu_inputs(spec: "SliceSpec", args: ModelArgs, inputs: dict) -> dict:
    """A layer slice's runtime inputs -> what its compiled NPU form takes: float16, the mask tiled to the folded
    query rows (r*S + s sees mask row s) and transposed to [1, 1, C+S, rep*S]. The cache (past_k/past_v) is
    expected in the NPU form already (runtime/cache.py keeps it so) and is passed on without a copy."""
    import numpy as np

    out = {}
    for name, a in inputs.items():
        a = np.asarray(a)
        if name == "mask":
            a = np.tile(a, (1, 1, args.n_rep, 1)).swapaxes(2, 3)
        out[name] = a if a.dtype == NPU_DTYPE else a.astype(NPU_DTYPE)
    return out


def npu_outputs_to_seq(tensors: dict, args: ModelArgs) -> dict:
    """NPU-form cache tensors (past_k/k_new [n*kv, hd, L], past_v/v_new [n*kv, L, hd]) in the "seq" form (float32,
    [n, kv, L, hd]); other tensors as float32. To compare with, or feed, the CPU graph."""
    import numpy as np

    out = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    for name in ("k_new", "v_new", "past_k", "past_v"):
        if name in out:
            a = out[name].swapaxes(-1, -2) if name in ("k_new", "past_k") else out[name]
            out[name] = a.reshape(-1, args.num_key_value_heads, *a.shape[1:])
    return out


def npu_cache_shapes(args: ModelArgs, n_layers: int, ctx: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The host KV cache of an n-layer slice in the NPU form: keys [n*kv, hd, C], values [n*kv, C, hd] (float16)."""
    rows = n_layers * args.num_key_value_heads
    return (rows, args.head_dim, ctx), (rows, ctx, args.head_dim)


def npu_input_shapes(spec: "SliceSpec", args: ModelArgs, seq: int, ctx: int) -> dict[str, tuple[int, ...]]:
    """Graph inputs of a layer slice in the NPU form, in graph order (slices/npu_form.py says why each is so)."""
    hd = args.head_dim
    out = {state_name(k): (1, seq, state_width(args, k)) for k in spec.state_inputs()}
    if spec.has_attention:
        keys, values = npu_cache_shapes(args, spec.n_layers, ctx)
        out.update({"cos": (1, 1, seq, hd), "sin": (1, 1, seq, hd), "mask": (1, 1, ctx + seq, args.n_rep * seq),
                    "past_k": keys, "past_v": values})
    return out


def npu_output_shapes(spec: "SliceSpec", args: ModelArgs, seq: int) -> dict[str, tuple[int, ...]]:
    """Graph outputs of a layer slice in the NPU form: the live layer state, then k_new [n*kv, hd, S], v_new [n*kv, S, hd]."""
    out = {state_name(k, output=True): (1, seq, state_width(args, k)) for k in spec.state_outputs()}
    if spec.has_attention:
        keys, values = npu_cache_shapes(args, spec.n_layers, seq)
        out.update({"k_new": keys, "v_new": values})
    return out


def npu_max_seq(args: ModelArgs) -> int:
    """The largest seq bucket the NPU form compiles without a CPU op: its folded queries [rep*S, hd] are transposed
    on the NPU only while rep*S*hd <= 8192 (rknn's Transpose limit, measured)."""
    return max(1, 8192 // (args.n_rep * args.head_dim))


def npu_buckets(buckets: Buckets, args: ModelArgs) -> Buckets:
    """`buckets` for a backend running the NPU form: seq buckets above npu_max_seq are replaced by the largest power
    of two under it (prefill then goes in smaller chunks); context buckets are kept."""
    limit = npu_max_seq(args)
    seq = [b for b in buckets.seq if b <= limit]
    if len(seq) < len(buckets.seq):
        top = 1 << (limit.bit_length() - 1)
        seq = sorted(set(seq) | {top})
    return Buckets(seq=tuple(seq), context=buckets.context)


def bucket_shapes(spec: SliceSpec, args: ModelArgs, buckets: Buckets) -> list[dict[str, Any]]:
    """The shape sets a static-shape backend compiles a slice for (rknn/compile.py builds them, rknn/sim.py checks
    calls against them): a slice reading the cache every (seq, ctx) pair, any other every seq."""
    out = []
    for ctx in (buckets.context if spec.has_attention else (buckets.context[0],)):  # only the cache needs ctx buckets
        for seq in buckets.seq:
            out.append({"seq": seq, "ctx": ctx if spec.has_attention else None,
                        "inputs": {k: list(v) for k, v in spec.input_shapes(args, seq, ctx).items()},
                        "outputs": {k: list(v) for k, v in spec.output_shapes(args, seq).items()}})
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
