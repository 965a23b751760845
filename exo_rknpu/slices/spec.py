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
from functools import cached_property
from typing import Any, Literal

from exo_rknpu.errors import ContextOverflowError
from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.quant import QTensor
from exo_rknpu.model.weights import ShardWeights

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
    batch: decode batch sizes a static-shape backend is compiled for (one step of B requests in one call, each
    with its own cache; slices/npu_form.py), ascending, each >= 2; empty: one request per call. The CPU
    backends take any batch and ignore it.
    """

    seq: tuple[int, ...] = (1, 16, 64)
    context: tuple[int, ...] = (256, 512, 1024, 2048)
    batch: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, b in (("seq", self.seq), ("context", self.context)):
            if not b or list(b) != sorted(set(b)) or b[0] < 1:
                raise ValueError(f"{name} buckets must be ascending positive integers, got {b}")
        if self.seq[0] != 1:
            raise ValueError(f"seq buckets must include 1 (decode), got {self.seq}")
        if list(self.batch) != sorted(set(self.batch)) or (self.batch and self.batch[0] < 2):
            raise ValueError(f"batch buckets must be ascending integers of at least 2, got {self.batch}")

    def batch_for(self, n: int) -> int:
        """Smallest batch bucket holding `n` requests (1 for one request); ValueError beyond the largest."""
        if n == 1:
            return 1
        for b in self.batch:
            if b >= n:
                return b
        raise ValueError(f"{n} requests exceed the largest batch bucket ({max(self.batch, default=1)})")

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

    def describe(self) -> dict[str, list[int]]:
        """What manifests and cache keys record: seq and context, and batch when there are batch buckets (so
        entries compiled without any keep their keys)."""
        out = {"seq": list(self.seq), "context": list(self.context)}
        if self.batch:
            out["batch"] = list(self.batch)
        return out


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

    # name, parts and the state names are worked out once per spec (cached_property: frozen fields, and the runtime
    # reads them for every slice of every step)
    @cached_property
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

    @cached_property
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

    @cached_property
    def has_attention(self) -> bool:
        """Reads the KV cache (and so is built per context bucket on static-shape backends)."""
        return "attention" in self.parts

    @property
    def cache_layers(self) -> int:
        """Layers whose KV cache this slice reads and writes."""
        return self.n_layers if self.has_attention else 0

    def state_inputs(self) -> tuple[str, ...]:
        """Layer-state tensors a partial slice reads before writing them (whole layers: x only)."""
        return self._state_inputs

    @cached_property
    def _state_inputs(self) -> tuple[str, ...]:
        seen: list[str] = []
        written: set[str] = set()
        for p in self.parts:
            seen += [k for k in PART_READS[p] if k not in written and k not in seen]
            written.update(PART_WRITES[p])
        return tuple(seen)

    def state_outputs(self) -> tuple[str, ...]:
        """Layer-state tensors a later part reads before it writes them again (the live ones at the slice's end)."""
        return self._state_outputs

    @cached_property
    def _state_outputs(self) -> tuple[str, ...]:
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


def to_npu_batch_inputs(spec: "SliceSpec", args: ModelArgs, inputs: dict) -> dict:
    """A decode batch's runtime inputs -> what its batch graph takes (npu_batch_input_shapes), float16: the layer
    state [1, B, width] and cos/sin [1, 1, B, hd] as they are, each request's mask row (`mask` [B, 1, 1, C+1])
    tiled and transposed like to_npu_inputs' as mask_b, and its own cache (`past_k`/`past_v`: sequences of B
    arrays in the NPU form) as past_k_b/past_v_b, passed on without a copy."""
    import numpy as np

    many = {"mask", "past_k", "past_v"}
    out = to_npu_inputs(spec, args, {k: v for k, v in inputs.items() if k not in many})
    masks = np.asarray(inputs["mask"])
    for b, (keys, values) in enumerate(zip(inputs["past_k"], inputs["past_v"], strict=True)):
        out[batch_name("mask", b)] = to_npu_inputs(spec, args, {"mask": masks[b : b + 1]})["mask"]
        out[batch_name("past_k", b)], out[batch_name("past_v", b)] = keys, values
    return out


def npu_outputs_to_seq(tensors: dict, args: ModelArgs) -> dict:
    """NPU-form cache tensors (past_k/k_new [n*kv, hd, L], past_v/v_new [n*kv, L, hd]) in the "seq" form (float32,
    [n, kv, L, hd]); other tensors as float32. To compare with, or feed, the CPU graph."""
    import numpy as np

    out = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    for name in ("k_new", "v_new", "past_k", "past_v"):
        if name in out:
            a = out[name].swapaxes(-1, -2) if name in ("k_new", "past_k") else out[name]
            out[name] = np.ascontiguousarray(a.reshape(-1, args.num_key_value_heads, *a.shape[1:]))  # ort binds it by address
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


def batch_name(name: str, row: int) -> str:
    """Graph input name of request `row`'s own tensor in a batch graph (mask_0, past_k_0, past_v_0, ...)."""
    return f"{name}_{row}"


def npu_batch_input_shapes(spec: "SliceSpec", args: ModelArgs, batch: int, ctx: int) -> dict[str, tuple[int, ...]]:
    """Graph inputs of a layer slice's decode batch graph in the NPU form (slices/npu_form.py::build_npu_batch_onnx),
    in graph order: the layer state [1, B, width] (row b = request b), cos/sin [1, 1, B, hd], then per request b its
    mask_b [1, 1, C+1, rep] and its own cache past_k_b [n*kv, hd, C], past_v_b [n*kv, C, hd]."""
    hd = args.head_dim
    out = {state_name(k): (1, batch, state_width(args, k)) for k in spec.state_inputs()}
    if spec.has_attention:
        keys, values = npu_cache_shapes(args, spec.n_layers, ctx)
        out.update({"cos": (1, 1, batch, hd), "sin": (1, 1, batch, hd)})
        for b in range(batch):
            out.update({batch_name("mask", b): (1, 1, ctx + 1, args.n_rep), batch_name("past_k", b): keys,
                        batch_name("past_v", b): values})
    return out


def npu_batch_output_shapes(spec: "SliceSpec", args: ModelArgs, batch: int) -> dict[str, tuple[int, ...]]:
    """Outputs of a decode batch graph: the live layer state [1, B, width], then every request's new cache row
    stacked request-major: k_new [B*n*kv, hd, 1], v_new [B*n*kv, 1, hd] (rows of request b: b*n*kv ...)."""
    out = {state_name(k, output=True): (1, batch, state_width(args, k)) for k in spec.state_outputs()}
    if spec.has_attention:
        keys, values = npu_cache_shapes(args, spec.n_layers * batch, 1)
        out.update({"k_new": keys, "v_new": values})
    return out


def npu_max_seq(args: ModelArgs) -> int:
    """The largest seq bucket the NPU form compiles without a CPU op: its folded queries [rep*S, hd] are transposed
    on the NPU only while rep*S*hd <= 8192 (rknn's Transpose limit, measured)."""
    return max(1, 8192 // (args.n_rep * args.head_dim))


# Decode batch sizes the runtime's default buckets hold (runtime/placement.py::default_buckets), compiled for the NPU
# form: one, 4, because each batch file costs more than the seq file (smollm2 layer, 4 context buckets: b2 32 MB,
# b4 57 MB, b8 106 MB against 23 MB; docs/compiler.md, "Batch buckets"); 2-3 requests pad to 4, 8 run as two 4s
NPU_BATCH = (4,)


def npu_buckets(buckets: Buckets, args: ModelArgs) -> Buckets:
    """`buckets` for a backend running the NPU form: seq buckets above npu_max_seq are replaced by the largest power
    of two under it (prefill then goes in smaller chunks); context and batch buckets are kept, except that a model
    whose layers keep the "seq" form (per-head q/k norms, slices/spec.py::npu_kv_layout) has no batch graph."""
    limit = npu_max_seq(args)
    seq = [b for b in buckets.seq if b <= limit]
    if len(seq) < len(buckets.seq):
        top = 1 << (limit.bit_length() - 1)
        seq = sorted(set(seq) | {top})
    return Buckets(seq=tuple(seq), context=buckets.context, batch=() if args.qk_norm else buckets.batch)


def bucket_shapes(spec: SliceSpec, args: ModelArgs, buckets: Buckets) -> list[dict[str, Any]]:
    """The shape sets a static-shape backend compiles a slice for (rknn/compile.py builds them, rknn/sim.py checks
    calls against them): a slice reading the cache every (seq, ctx) pair, any other every seq. Batch buckets: a
    slice in the NPU form reading the cache gets a decode batch graph per (batch, ctx) (entries with "batch": B);
    any other slice runs a batch of B one-token rows as seq B, so B joins its seq buckets. Slices reading the
    cache in the "seq" form get no batch buckets (their backend runs steps one at a time)."""
    out = []
    batched = spec.has_attention and spec.kv_layout == "npu"
    seqs = buckets.seq if spec.has_attention else tuple(sorted(set(buckets.seq) | set(buckets.batch)))
    for ctx in (buckets.context if spec.has_attention else (buckets.context[0],)):  # only the cache needs ctx buckets
        for seq in seqs:
            out.append({"seq": seq, "ctx": ctx if spec.has_attention else None,
                        "inputs": {k: list(v) for k, v in spec.input_shapes(args, seq, ctx).items()},
                        "outputs": {k: list(v) for k, v in spec.output_shapes(args, seq).items()}})
        for b in buckets.batch if batched else ():
            out.append({"seq": 1, "ctx": ctx, "batch": b,
                        "inputs": {k: list(v) for k, v in npu_batch_input_shapes(spec, args, b, ctx).items()},
                        "outputs": {k: list(v) for k, v in npu_batch_output_shapes(spec, args, b).items()}})
    return out


def shape_key(shapes: dict[str, Any]) -> tuple:
    """A hashable key of named input shapes, whatever their order: how static-shape runners find the compiled shape
    set of a call (a batch graph's inputs differ from the seq graph's by name and number)."""
    return tuple(sorted((n, tuple(int(d) for d in sh)) for n, sh in shapes.items()))


def bucket_tag(sh: dict[str, Any]) -> str:
    """The name of a bucket_shapes entry in reports and refusals: s<seq>c<ctx> (s<seq> for slices without a cache;
    b<B>c<ctx> for a decode batch of B requests)."""
    return (f"b{sh['batch']}" if sh.get("batch") else f"s{sh['seq']}") + (f"c{sh['ctx']}" if sh.get("ctx") else "")


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


def npu_kv_layout(args: ModelArgs) -> str:
    """The cache layout an NPU backend uses for this model's layer slices: the NPU form, except for per-head q/k
    norms (qwen3), whose NPU-form graph rknn-toolkit2 2.5.0 cannot build (its reduce fusion fails with "-1 is not
    in list"); those keep the "seq" graph they were built and verified with before."""
    return "seq" if args.qk_norm else "npu"


def per_layer_cache_names(name: str, n: int) -> list[str]:
    """Input names of a per-layer cache: past_k -> past_k.0, past_k.1, ..."""
    return [f"{name}.{i}" for i in range(n)]


def slice_tensors(spec: SliceSpec, weights: ShardWeights) -> list:
    """The weight tensors a slice runs: its layers' (a layers slice), the head's or the embedding's."""
    if spec.kind == "layers":
        return [w for i in range(spec.start, spec.stop) for w in weights.layers[i].arrays().values()]
    return [weights.lm_head if spec.kind == "head" else weights.embed_tokens]


def slice_kernels(spec: SliceSpec, weights: ShardWeights) -> frozenset[str]:
    """The kernels its compact tensors run on (QTensor.kernel: "native", "fp32", "int8", ...): whether a slice is
    native (the exporter writes the native library's ops, the backend registers the library) is read here only."""
    return frozenset(w.kernel for w in slice_tensors(spec, weights) if isinstance(w, QTensor))
