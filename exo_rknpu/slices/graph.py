"""The one definition of every slice, written once against an `Ops` interface.

`NumpyOps` evaluates it eagerly (the reference backend); `OnnxOps` (slices/onnx_export.py) records the same
calls as an ONNX graph, which onnxruntime runs and the RKNN compiler turns into NPU code. Keeping a single
definition is what makes every backend compute the same thing.
The op pattern follows what rknn-toolkit2 fuses: Pow/ReduceMean/Add/Sqrt/Div/Mul -> exNorm,
MatMul/Mul/Add/Softmax/MatMul -> exSDPAttention, Sigmoid*x -> exSwish, constant-B MatMul -> 1x1 Conv.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Protocol

import numpy as np

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.quant import QTensor, Weight
from exo_rknpu.model.weights import LayerWeights, RowTable, ShardWeights
from exo_rknpu.slices.spec import PARTS, SliceSpec, state_name

T = Any  # a numpy array (eager) or a symbolic ONNX value


# The fused forms: steps an Ops may write as one op each. graph.py asks `Ops.fuses` before each use and calls the
# method of that name where the answer is True; otherwise it composes the step from the plain ops, which stays the
# reference (each fused form computes what its composition computes):
#   rotary(x, cos, sin, head_dim)                 rope(): x * cos + rotate_half(x) * sin
#   swiglu(x, gate, up)                           swiglu(): silu(x @ gate.T) * (x @ up.T)
#   add_rms_norm(a, b, w, eps) -> (h, a + b)      a residual sum and the norm read right after it (run_layer)
#   cached_attention(q, k, v, past_k, past_v, scale) -> (o, cache_k, cache_v)
#                                                 the attention part, extending each layer's cache (_cached_attention)
Fused = Literal["rotary", "swiglu", "add_rms_norm", "cached_attention"]


class Ops(Protocol):
    """The operations slices are written in. Weights are in HF layout: float32 arrays, or QTensors for linears.

    The fused forms (`Fused`, last below) are called only where `fuses` answers True: an Ops that fuses nothing
    (NumpyOps) answers False throughout and need not have them."""

    def linear(self, x: T, w: Weight, b: np.ndarray | None = None) -> T: ...  # x @ w.T + b
    def linears(self, x: T, ws: list[Weight], bs: list[np.ndarray | None]) -> list[T]: ...  # several linears of one x
    def rms_norm(self, x: T, w: np.ndarray, eps: float) -> T: ...
    def add(self, a: T, b: T) -> T: ...
    def mul(self, a: T, b: T) -> T: ...
    def silu(self, x: T) -> T: ...
    # a leading 1 below may be a batch B of requests in the CPU forms (numpy, onnxruntime): see Backend.batches
    def split_heads(self, x: T, n_heads: int, head_dim: int) -> T: ...  # [1,S,n*hd] -> [1,n,S,hd]
    def merge_heads(self, x: T, n_heads: int, head_dim: int) -> T: ...  # [1,n,S,hd] -> [1,S,n*hd]
    def rotate_half(self, x: T, head_dim: int) -> T: ...  # cat(-x2, x1) on the last axis
    def concat(self, xs: list[T], axis: int) -> T: ...
    def take_layer(self, x: T, i: int) -> T: ...  # x[i:i+1] on axis 0
    def attention(self, q: T, past_k: T, k: T, past_v: T, v: T, mask: T, scale: float, n_rep: int) -> T:
        """softmax(q K^T * scale + mask) V over K = [past_k, k], V = [past_v, v]; q head h uses kv head h // n_rep.

        q [1,nh,S,hd]; k, v [1,kv,S,hd]; mask [1,1,S,C+S]; past [1,kv,C,hd]; returns [1,nh,S,hd].
        """
        ...

    def embed(self, table: Weight, ids: T) -> T: ...

    def fuses(self, form: Fused, *weights: Weight) -> bool:
        """Whether this Ops writes the fused form `form` as one op, for these weights where that depends on them
        (swiglu: gate, up; add_rms_norm: the norm's weight; the others: none). Asked before every use (as ggml asks
        a backend's supports_op), so the answer may differ from layer to layer."""
        ...

    def rotary(self, x: T, cos: T, sin: T, head_dim: int) -> T: ...
    def swiglu(self, x: T, gate: Weight, up: Weight) -> T: ...
    def add_rms_norm(self, a: T, b: T, w: np.ndarray, eps: float) -> tuple[T, T]: ...  # (rms_norm(a + b), a + b)
    def cached_attention(self, q: T, k: T, v: T, past_k: T, past_v: T, scale: float) -> tuple[T, T, T]: ...


def rope(ops: Ops, x: T, cos: T, sin: T, head_dim: int) -> T:
    """Rotary embedding, HF rotate-half convention; cos/sin come from the host per position (fused: `rotary`)."""
    if ops.fuses("rotary"):
        return ops.rotary(x, cos, sin, head_dim)
    return ops.add(ops.mul(x, cos), ops.mul(ops.rotate_half(x, head_dim), sin))


def swiglu(ops: Ops, x: T, gate: Weight, up: Weight) -> T:
    """silu(x @ gate.T) * (x @ up.T), the MLP's activation (fused: `swiglu`)."""
    if ops.fuses("swiglu", gate, up):
        return ops.swiglu(x, gate, up)
    g, u = ops.linears(x, [gate, up], [None, None])
    return ops.mul(ops.silu(g), u)


def run_part(ops: Ops, a: ModelArgs, w: LayerWeights, part: str, st: dict[str, T],
             attn_in: dict[str, T] | None = None, norm_next: np.ndarray | None = None) -> dict[str, T]:
    """Apply one part of a decoder layer (slices/spec.py PARTS) to the layer state `st` (updated in place).

    The attention part also takes cos/sin/mask/past_k/past_v (`attn_in`) and adds k_new/v_new. `norm_next`: after
    a residual part (o_proj, ffn), the weight of the norm the slice applies right after it (run_layer); where the
    ops fuse that norm with the sum (`add_rms_norm`), the sum is left to the norm (st["dx"]), which makes both."""
    hd, nh, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
    if part == "attn_norm":
        _norm(ops, a, st, w.input_norm)
    elif part == "qkv":
        h = st["h"]
        st["q"], st["k"], st["v"] = ops.linears(h, [w.q_proj, w.k_proj, w.v_proj], [w.q_bias, w.k_bias, w.v_bias])
    elif part == "attention":
        assert attn_in is not None, "the attention part needs cos, sin, mask and the cache"
        if ops.fuses("cached_attention"):
            st["o"], st["k_new"], st["v_new"] = _cached_attention(ops, a, w, st, attn_in)
            return st
        cos, sin = attn_in["cos"], attn_in["sin"]
        q, k = ops.split_heads(st["q"], nh, hd), ops.split_heads(st["k"], nkv, hd)
        if w.q_norm is not None:  # qwen3: RMSNorm over head_dim of each q and k head, before RoPE
            q = ops.rms_norm(q, w.q_norm, a.rms_norm_eps)
        if w.k_norm is not None:
            k = ops.rms_norm(k, w.k_norm, a.rms_norm_eps)
        q, k = rope(ops, q, cos, sin, hd), rope(ops, k, cos, sin, hd)
        v = ops.split_heads(st["v"], nkv, hd)
        o = ops.attention(q, attn_in["past_k"], k, attn_in["past_v"], v, attn_in["mask"], hd**-0.5, a.n_rep)
        st["o"] = ops.merge_heads(o, nh, hd)
        st["k_new"], st["v_new"] = k, v
    elif part == "o_proj":
        _residual(ops, st, ops.linear(st["o"], w.o_proj), norm_next)
    elif part == "mlp_norm":
        _norm(ops, a, st, w.post_norm)
    elif part == "ffn":
        _residual(ops, st, ops.linear(swiglu(ops, st["h"], w.gate_proj, w.up_proj), w.down_proj), norm_next)
    else:
        raise ValueError(f"unknown layer part {part!r}; parts are {PARTS}")
    return st


def _residual(ops: Ops, st: dict[str, T], dx: T, norm_next: np.ndarray | None) -> None:
    """x + dx: added now, or left to the norm applied next (its weight `norm_next`) where the ops fuse the two."""
    if norm_next is not None and ops.fuses("add_rms_norm", norm_next):
        st["dx"] = dx
    else:
        st["x"] = ops.add(st["x"], dx)


def _norm(ops: Ops, a: ModelArgs, st: dict[str, T], w: np.ndarray) -> None:
    """h = rms_norm(x), after adding the residual branch left to it (st["dx"], `_residual`) in the same op."""
    if "dx" in st:
        st["h"], st["x"] = ops.add_rms_norm(st["x"], st.pop("dx"), w, a.rms_norm_eps)
    else:
        st["h"] = ops.rms_norm(st["x"], w, a.rms_norm_eps)


def run_layer(ops: Ops, a: ModelArgs, w: LayerWeights, parts: tuple[str, ...], st: dict[str, T],
              attn_in: dict[str, T] | None = None, next_layer: LayerWeights | None = None) -> dict[str, T]:
    """Apply a contiguous run of PARTS of one layer to `st` (run_part each). o_proj's residual sum goes to mlp_norm
    when that runs next, ffn's to `next_layer`'s attn_norm (the next layer of the same slice), so an Ops that fuses
    `add_rms_norm` writes each sum and the norm after it as one op."""
    for part in parts:
        norm_next = None
        if part == "o_proj" and "mlp_norm" in parts:
            norm_next = w.post_norm
        elif part == "ffn" and next_layer is not None:
            norm_next = next_layer.input_norm
        run_part(ops, a, w, part, st, attn_in, norm_next)
    assert next_layer is not None or "dx" not in st, "a residual sum was left to a norm outside the slice"
    return st


def _cached_attention(ops: Ops, a: ModelArgs, w: LayerWeights, st: dict[str, T], attn_in: dict[str, T]) -> tuple[T, T, T]:
    """The attention part as one op that also extends the cache (`cached_attention`: onnxruntime's
    GroupQueryAttention or the native library's, slices/onnx_export.py): rope, softmax(q K^T * scale) V over the
    cached and new positions, and the new k/v written into the cache buffer. q/k/v stay [B,S,heads*hd]; qwen3's
    per-head norms go through the head layout and back. Returns (o [B,S,nh*hd], the layer's cache after the call,
    keys and values)."""
    hd, nh, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
    q, k = st["q"], st["k"]
    if w.q_norm is not None:
        q = ops.merge_heads(ops.rms_norm(ops.split_heads(q, nh, hd), w.q_norm, a.rms_norm_eps), nh, hd)
    if w.k_norm is not None:
        k = ops.merge_heads(ops.rms_norm(ops.split_heads(k, nkv, hd), w.k_norm, a.rms_norm_eps), nkv, hd)
    return ops.cached_attention(q, k, st["v"], attn_in["past_k"], attn_in["past_v"], hd**-0.5)


def layers_slice(
    ops: Ops, a: ModelArgs, ws: list[LayerWeights], hidden: T, cos: T, sin: T, mask: T, past_k: T, past_v: T
) -> tuple[T, T, T]:
    """A group of consecutive decoder layers; past_k/past_v hold one cache row per layer on axis 0. Returns
    (x, k_new, v_new) with the new rows of every layer stacked on axis 0, or, when the ops extend each layer's
    cache in place (`cached_attention`), lists of each layer's cache after the call."""
    ks, vs = [], []
    st: dict[str, T] = {"x": hidden}
    for i, w in enumerate(ws):
        attn_in = {"cos": cos, "sin": sin, "mask": mask,
                   "past_k": ops.take_layer(past_k, i), "past_v": ops.take_layer(past_v, i)}
        run_layer(ops, a, w, PARTS, st, attn_in, ws[i + 1] if i + 1 < len(ws) else None)
        ks.append(st["k_new"])
        vs.append(st["v_new"])
    if ops.fuses("cached_attention"):  # each layer's cache was extended in place: one per layer
        return st["x"], ks, vs
    k_new = ks[0] if len(ks) == 1 else ops.concat(ks, axis=0)
    v_new = vs[0] if len(vs) == 1 else ops.concat(vs, axis=0)
    return st["x"], k_new, v_new


def head_slice(ops: Ops, a: ModelArgs, final_norm: np.ndarray, lm_head: Weight, hidden: T) -> T:
    """Final norm then logits."""
    return ops.linear(ops.rms_norm(hidden, final_norm, a.rms_norm_eps), lm_head)


def run_slice(ops: Ops, spec: SliceSpec, weights: ShardWeights, inputs: dict[str, T]) -> dict[str, T]:
    """Apply `spec` to named inputs with `ops`; returns named outputs (see slices/spec.py for names)."""
    a = weights.args
    if spec.kind == "embed":
        assert weights.embed_tokens is not None, "embed slice needs the embedding (first shard)"
        return {"hidden": ops.embed(weights.embed_tokens, inputs["token_ids"])}
    if spec.kind == "head":
        assert weights.final_norm is not None and weights.lm_head is not None, "head slice needs norm + lm_head (last shard)"
        return {"logits": head_slice(ops, a, weights.final_norm, weights.lm_head, inputs["hidden"])}
    if not spec.whole:
        return _partial_layer(ops, spec, weights, inputs)
    ws = [weights.layers[i] for i in range(spec.start, spec.stop)]
    x, k, v = layers_slice(ops, a, ws, *(inputs[n] for n in ("hidden", "cos", "sin", "mask", "past_k", "past_v")))
    return {"hidden_out": x, "k_new": k, "v_new": v}


def _partial_layer(ops: Ops, spec: SliceSpec, weights: ShardWeights, inputs: dict[str, T]) -> dict[str, T]:
    """A run of parts of one layer: the state it reads comes in under state_name(), what stays live goes out."""
    spec.validate()
    st: dict[str, T] = {k: inputs[state_name(k)] for k in spec.state_inputs()}
    attn_in = None
    if spec.has_attention:
        attn_in = {n: inputs[n] for n in ("cos", "sin", "mask")}
        attn_in.update({n: ops.take_layer(inputs[n], 0) for n in ("past_k", "past_v")})
    run_layer(ops, weights.args, weights.layers[spec.start], spec.parts, st, attn_in)
    out = {state_name(k, output=True): st[k] for k in spec.state_outputs()}
    if spec.has_attention:
        out.update({"k_new": st["k_new"], "v_new": st["v_new"]})
    return out


def slice_weights(spec: SliceSpec, weights: ShardWeights) -> ShardWeights:
    """Only the tensors `spec` reads (its layers; or the embedding; or final norm + head): what a runner may keep."""
    # (a shard loaded without layer weights, for a backend running them from compiled files, has none to pass on)
    layers = {i: weights.layers[i] for i in range(spec.start, spec.stop) if i in weights.layers} if spec.kind == "layers" else {}
    return replace(weights, layers=layers,
                   embed_tokens=weights.embed_tokens if spec.kind == "embed" else None,
                   final_norm=weights.final_norm if spec.kind == "head" else None,
                   lm_head=weights.lm_head if spec.kind == "head" else None)


class NumpyOps:
    """Eager float32 numpy: the readable reference."""

    def linear(self, x, w, b=None):
        y = w.matmul_t(x) if isinstance(w, QTensor) else x @ w.T  # compact weights widen a few rows at a time
        return y if b is None else y + b

    def linears(self, x, ws, bs):
        return [self.linear(x, w, b) for w, b in zip(ws, bs)]

    def rms_norm(self, x, w, eps):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def silu(self, x):
        return x / (np.float32(1) + np.exp(-x))

    def split_heads(self, x, n_heads, head_dim):
        return x.reshape(x.shape[0], -1, n_heads, head_dim).transpose(0, 2, 1, 3)

    def merge_heads(self, x, n_heads, head_dim):
        return x.transpose(0, 2, 1, 3).reshape(x.shape[0], -1, n_heads * head_dim)

    def rotate_half(self, x, head_dim):
        half = head_dim // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def take_layer(self, x, i):
        return x[i] if x.ndim == 5 else x[i : i + 1]  # [n,B,kv,C,hd]: a batch of requests' caches

    def attention(self, q, past_k, k, past_v, v, mask, scale, n_rep):
        k = np.repeat(np.concatenate([past_k, k], axis=2), n_rep, axis=1)
        v = np.repeat(np.concatenate([past_v, v], axis=2), n_rep, axis=1)
        s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(scale) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        return (s / s.sum(axis=-1, keepdims=True)) @ v

    def embed(self, table, ids):
        return table.rows(ids) if isinstance(table, (QTensor, RowTable)) else table[ids]

    def fuses(self, form, *weights):
        return False  # the reference: graph.py composes every fused form from the ops above
