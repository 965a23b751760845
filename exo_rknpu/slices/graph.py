"""The one definition of every slice, written once against an `Ops` interface.

`NumpyOps` evaluates it eagerly (the reference backend); `OnnxOps` (slices/onnx_export.py) records the same
calls as an ONNX graph, which onnxruntime runs and the RKNN compiler turns into NPU code. Keeping a single
definition is what makes every backend compute the same thing.
The op pattern follows what rknn-toolkit2 fuses: Pow/ReduceMean/Add/Sqrt/Div/Mul -> exNorm,
MatMul/Mul/Add/Softmax/MatMul -> exSDPAttention, Sigmoid*x -> exSwish, constant-B MatMul -> 1x1 Conv.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.quant import QTensor, Weight
from exo_rknpu.model.weights import LayerWeights, RowTable, ShardWeights
from exo_rknpu.slices.spec import PARTS, SliceSpec, state_name

T = Any  # a numpy array (eager) or a symbolic ONNX value


class Ops(Protocol):
    """The operations slices are written in. Weights are in HF layout: float32 arrays, or QTensors for linears."""

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


def rope(ops: Ops, x: T, cos: T, sin: T, head_dim: int) -> T:
    """Rotary embedding, HF rotate-half convention; cos/sin come from the host per position.

    An Ops may provide a fused `rotary(x, cos, sin, head_dim)` computing the same thing (onnxruntime's contrib op)."""
    fused = getattr(ops, "rotary", None)
    if fused is not None:
        return fused(x, cos, sin, head_dim)
    return ops.add(ops.mul(x, cos), ops.mul(ops.rotate_half(x, head_dim), sin))


def swiglu(ops: Ops, x: T, gate: Weight, up: Weight) -> T:
    """silu(x @ gate.T) * (x @ up.T), the MLP's activation. An Ops may provide a fused `fused_swiglu(x, gate, up)`
    computing the same, which returns None for weights it does not fuse (onnxruntime's form with native weights:
    one op, slices/onnx_export.py)."""
    fused = getattr(ops, "fused_swiglu", None)
    y = fused(x, gate, up) if fused is not None else None
    if y is None:
        g, u = ops.linears(x, [gate, up], [None, None])
        y = ops.mul(ops.silu(g), u)
    return y


def run_part(ops: Ops, a: ModelArgs, w: LayerWeights, part: str, st: dict[str, T],
             attn_in: dict[str, T] | None = None) -> dict[str, T]:
    """Apply one part of a decoder layer (slices/spec.py PARTS) to the layer state `st` (updated in place).

    The attention part also takes cos/sin/mask/past_k/past_v (`attn_in`) and adds k_new/v_new."""
    hd, nh, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
    if part == "attn_norm":
        st["h"] = ops.rms_norm(st["x"], w.input_norm, a.rms_norm_eps)
    elif part == "qkv":
        h = st["h"]
        st["q"], st["k"], st["v"] = ops.linears(h, [w.q_proj, w.k_proj, w.v_proj], [w.q_bias, w.k_bias, w.v_bias])
    elif part == "attention":
        assert attn_in is not None, "the attention part needs cos, sin, mask and the cache"
        fused = getattr(ops, "cached_attention", None)
        if fused is not None:
            st["o"], st["k_new"], st["v_new"] = _cached_attention(ops, fused, a, w, st, attn_in)
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
        st["x"] = ops.add(st["x"], ops.linear(st["o"], w.o_proj))
    elif part == "mlp_norm":
        st["h"] = ops.rms_norm(st["x"], w.post_norm, a.rms_norm_eps)
    elif part == "ffn":
        st["x"] = ops.add(st["x"], ops.linear(swiglu(ops, st["h"], w.gate_proj, w.up_proj), w.down_proj))
    else:
        raise ValueError(f"unknown layer part {part!r}; parts are {PARTS}")
    return st


def _cached_attention(ops: Ops, fused: Any, a: ModelArgs, w: LayerWeights, st: dict[str, T], attn_in: dict[str, T]) -> tuple[T, T, T]:
    """The attention part as one op that also extends the cache (onnxruntime's GroupQueryAttention, see
    slices/onnx_export.py OnnxOps.cached_attention): rope, softmax(q K^T * scale) V over the cached and new
    positions, and the new k/v written into the cache buffer. q/k/v stay [B,S,heads*hd]; qwen3's per-head norms
    go through the head layout and back. Returns (o [B,S,nh*hd], the layer's cache after the call, keys and values)."""
    hd, nh, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
    q, k = st["q"], st["k"]
    if w.q_norm is not None:
        q = ops.merge_heads(ops.rms_norm(ops.split_heads(q, nh, hd), w.q_norm, a.rms_norm_eps), nh, hd)
    if w.k_norm is not None:
        k = ops.merge_heads(ops.rms_norm(ops.split_heads(k, nkv, hd), w.k_norm, a.rms_norm_eps), nkv, hd)
    return fused(q, k, st["v"], attn_in["past_k"], attn_in["past_v"], hd**-0.5)


def attention_block(
    ops: Ops, a: ModelArgs, w: LayerWeights, x: T, cos: T, sin: T, mask: T, past_k: T, past_v: T
) -> tuple[T, T, T]:
    """x + attn(norm(x)) over [past, new]; returns (x, k_new, v_new)."""
    st: dict[str, T] = {"x": x}
    attn_in = {"cos": cos, "sin": sin, "mask": mask, "past_k": past_k, "past_v": past_v}
    for part in PARTS[:4]:
        run_part(ops, a, w, part, st, attn_in)
    return st["x"], st["k_new"], st["v_new"]


def mlp_block(ops: Ops, a: ModelArgs, w: LayerWeights, x: T) -> T:
    """x + down(silu(gate(norm(x))) * up(norm(x)))."""
    st: dict[str, T] = {"x": x}
    for part in PARTS[4:]:
        run_part(ops, a, w, part, st)
    return st["x"]


def layers_slice(
    ops: Ops, a: ModelArgs, ws: list[LayerWeights], hidden: T, cos: T, sin: T, mask: T, past_k: T, past_v: T
) -> tuple[T, T, T]:
    """A group of consecutive decoder layers; past_k/past_v hold one cache row per layer on axis 0. Returns
    (x, k_new, v_new) with the new rows of every layer stacked on axis 0, or, when the ops extend each layer's
    cache in place (`cached_attention`), lists of each layer's cache after the call."""
    ks, vs = [], []
    x = hidden
    for i, w in enumerate(ws):
        x, k, v = attention_block(ops, a, w, x, cos, sin, mask, ops.take_layer(past_k, i), ops.take_layer(past_v, i))
        x = mlp_block(ops, a, w, x)
        ks.append(k)
        vs.append(v)
    if getattr(ops, "cached_attention", None) is not None:  # each layer's cache was extended in place: one per layer
        return x, ks, vs
    k_new = ks[0] if len(ks) == 1 else ops.concat(ks, axis=0)
    v_new = vs[0] if len(vs) == 1 else ops.concat(vs, axis=0)
    return x, k_new, v_new


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
    w = weights.layers[spec.start]
    for part in spec.parts:
        run_part(ops, weights.args, w, part, st, attn_in)
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
