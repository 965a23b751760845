"""The NPU form of a decoder-layer slice (KV layout "npu"): a graph rknn-toolkit2 places wholly on the RK3588 NPU
at every bucket, whose inputs the host keeps in the dtype and layout the compiled file records.

Why each choice (rknn-toolkit2 2.5.0, rk3588, smollm2- and Llama-3.2-1B-shaped layers; figures in docs/compiler.md):
* The cache inputs are 3-D, float16: keys [n*kv, hd, C], values [n*kv, C, hd]. RKNN records a 3-D input's layout
  as UNDEFINED (row-major, its native form), so the host's buffer is handed over as it is. As 4-D inputs they were
  recorded NHWC: RKNNLite transposed the NCHW buffers in numpy and converted float32 to float16 on every call, and
  the compiler added a mean/std Conv over the whole cache in every call.
* Keys transposed, values as rows: the operands the NPU's matmuls read in place (the contraction axis in their
  channels). The "seq" form's Transpose of the [C+S, hd] keys and values went to the CPU in every prefill bucket
  ((C+S)*hd > 8192), and its GQA repeat materialised the cache rep times (a Gather->Conv).
* Scores are computed transposed ([positions, rep*S]) and the probabilities are cut into past and new positions, so
  no op concatenates the cache with the new rows and no tensor has C+S as its width: the concatenating forms
  put a Reshape of the values on the CPU and tripped 13-bit register fields ("REGTASK ... limit: 0x1fff") from
  ctx 1024 on.
* Query heads are folded onto their kv head ([1, kv, rep*S, hd], row r*S + s), one reshape; the host gives the mask
  already tiled to those rows and transposed, [1, 1, C+S, rep*S]. The folded queries are transposed on the NPU only
  while rep*S*hd <= 8192, which bounds the seq buckets (slices/spec.py::npu_max_seq: 32 for smollm2 and 1B shapes).
* cos/sin/mask stay 4-D with one channel: NHWC and NCHW are the same bytes, so handing them over as NHWC is a view
  (3-D cos/sin made the compiler crash under dynamic_input, "reduce_tp_in_mesh: -1 is not in list").
* Batch buckets (build_npu_batch_onnx): one decode step of B requests, the linears over the B rows together and one
  attention block per request over its own cache inputs, so each request's cache stays as above.

The head (final norm + lm_head) has an NPU form too: the lm_head as MatMuls of at most NPU_HEAD_ROWS vocabulary rows,
concatenated. As one MatMul, the Transpose rknn puts after its Conv ((1, V, 1, S) -> (1, S, 1, V)) went to the CPU
in every prefill bucket, with "channel is too large, may produce thousands of regtask" errors (smollm2 and the 1B
shape, V = 49152); with pieces of 8192 rows the compiler concatenates them and transposes on the NPU.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.graph import rope
from exo_rknpu.slices.onnx_export import IR_VERSION, OPSET, OnnxOps
from exo_rknpu.slices.spec import (PARTS, SliceSpec, batch_name, npu_batch_input_shapes, npu_batch_output_shapes,
                                   npu_input_shapes, npu_output_shapes, state_name)


# Vocabulary rows per lm_head MatMul in the head's NPU form (module docstring): a head of V rows is ceil(V / 8192)
# MatMuls, concatenated along the vocabulary.
NPU_HEAD_ROWS = 8192


def compiler_onnx(spec: SliceSpec, weights: ShardWeights, seq: int | None = None, ctx: int | None = None,
                  batch: int = 1) -> onnx.ModelProto:
    """The ONNX model the RKNN compiler gets for `spec`: the NPU form for the head and for layer slices in the "npu"
    KV layout (their decode batch graph for `batch` > 1), slices/onnx_export.build_onnx otherwise (the embedding and
    the "seq" layout)."""
    from exo_rknpu.slices.onnx_export import build_onnx

    if batch > 1:
        return build_npu_batch_onnx(spec, weights, batch, ctx)
    if spec.kind == "layers" and spec.kv_layout == "npu":
        return build_npu_onnx(spec, weights, seq, ctx)
    if spec.kind == "head":
        return build_npu_head_onnx(spec, weights, seq)
    return build_onnx(spec, weights, seq=seq, ctx=ctx)


def build_npu_head_onnx(spec: SliceSpec, weights: ShardWeights, seq: int | None = None) -> onnx.ModelProto:
    """ONNX model of the head in the NPU form: hidden [1, S, H] -> final norm -> logits [1, S, V] from MatMuls of at
    most NPU_HEAD_ROWS vocabulary rows each, concatenated (float32 weights inside the proto). seq None: symbolic S."""
    if spec.kind != "head":
        raise ValueError(f"build_npu_head_onnx builds the head, not {spec.kind}")
    assert weights.final_norm is not None and weights.lm_head is not None, "head slice needs norm + lm_head (last shard)"
    a = weights.args
    ops = OnnxOps("sdpa", compact=False)
    ops.args = a
    w = weights.lm_head if isinstance(weights.lm_head, np.ndarray) else weights.lm_head.dequantize()
    # kept alive until the graph is made: OnnxOps names weights by their id()
    pieces = [w[i : i + NPU_HEAD_ROWS] for i in range(0, w.shape[0], NPU_HEAD_ROWS)]
    h = ops.rms_norm("hidden", weights.final_norm, a.rms_norm_eps)
    parts = [ops.linear(h, p) for p in pieces]
    logits = parts[0] if len(parts) == 1 else ops.concat(parts, axis=-1)
    ops.g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="out_logits"))
    S: int | str = seq if seq is not None else "S"
    return _model(ops, f"exo_rknpu_npu_{spec.name}", {"hidden": [1, S, a.hidden_size]}, {"logits": [1, S, w.shape[0]]})


def build_npu_onnx(spec: SliceSpec, weights: ShardWeights, seq: int | None = None, ctx: int | None = None) -> onnx.ModelProto:
    """ONNX model of a layer slice in the NPU form (float32 weights inside the proto, the compiler's input).
    seq/ctx None: symbolic S/C (one graph for rknn's dynamic_input)."""
    if spec.kind != "layers":
        raise ValueError(f"the NPU form is for decoder-layer slices, not {spec.kind}")
    a = weights.args
    ops = OnnxOps("sdpa", compact=False)
    ops.n_layers, ops.args = spec.n_layers, a
    S: int | str = seq if seq is not None else "S"
    C: int | str = ctx if ctx is not None else "C"
    dims = {"S": S, "C": C, "RS": a.n_rep * seq if seq is not None else "RS",
            "CS": seq + ctx if seq is not None and ctx is not None else "CS"}
    ins = _symbolic(npu_input_shapes(spec, a, 1, 1), spec, a, dims)
    outs = _symbolic(npu_output_shapes(spec, a, 1), spec, a, dims)
    st = {k: state_name(k) for k in spec.state_inputs()}
    new: dict[str, list[str]] = {"k_new": [], "v_new": []}
    for i in range(spec.start, spec.stop):
        cache = _layer_cache(ops, a, spec, i - spec.start, ctx) if spec.has_attention else None

        def attend(w, st: dict, cache: _Cache | None = cache) -> None:
            assert cache is not None
            st["o"], cache["k_new"], cache["v_new"] = _attention(ops, a, w, st["q"], st["k"], st["v"], cache, seq)

        st = _run_layer(ops, a, weights, i, spec, st, attend)
        if cache is not None:
            for name in new:
                new[name].append(cache[name])
    return _layer_model(ops, spec, st, new, ins, outs, f"exo_rknpu_npu_{spec.name}")


def build_npu_batch_onnx(spec: SliceSpec, weights: ShardWeights, batch: int, ctx: int | None = None) -> onnx.ModelProto:
    """The decode batch graph of a layer slice in the NPU form: one step of `batch` requests in one call.

    The linears, norms and MLP take the requests' rows together, as the rows of one seq-`batch` chunk ([1, B,
    width]: each weight is read once for all of them). Attention is one block per request: its row of q/k/v and of
    cos/sin is cut out first, then it runs the seq-1 decode attention of the graph above over that request's own
    cache inputs (past_k_b, past_v_b: each request's cache stays its own, handed over in place) and its own mask_b.
    No op is larger than in the seq-1 and seq-B graphs, so the NPU form's limits hold. rotate_half is a matmul
    with its +-1 matrix here: from four requests under dynamic_input, its Slice/Neg/Concat form made rknn-toolkit2
    2.5.0's transpose reduction fail ("reduce_tp_in_mesh: -1 is not in list"), and so did rotating all rows before
    cutting them, or cutting the rotated [1, heads, B, hd] heads (measured). ctx None: symbolic C (one graph for
    dynamic_input)."""
    if spec.kind != "layers" or not spec.has_attention:
        raise ValueError(f"a batch graph is for slices reading the cache; {spec.name} runs a batch as seq {batch}")
    a = weights.args
    ops = OnnxOps("sdpa", compact=False)
    ops.n_layers, ops.args = spec.n_layers, a
    ins = _batch_shapes(npu_batch_input_shapes, spec, a, batch, ctx)
    outs = {n: list(sh) for n, sh in npu_batch_output_shapes(spec, a, batch).items()}
    st = {k: state_name(k) for k in spec.state_inputs()}
    rows: list[list[_Cache]] = []  # [layer][request]
    axis1, axis2 = ops._const(np.array([1], np.int64)), ops._const(np.array([2], np.int64))
    for i in range(spec.start, spec.stop):
        caches = [_layer_cache(ops, a, spec, i - spec.start, ctx, row=b) for b in range(batch)]

        def attend(w, st: dict, caches: list[_Cache] = caches) -> None:
            rows_o = []
            for b, cache in enumerate(caches):  # request b: row b of q/k/v [1, B, width] and of cos/sin [1, 1, B, hd]
                at = [ops._const(np.array([b], np.int64)), ops._const(np.array([b + 1], np.int64))]
                q, k, v = (ops._node("Slice", [st[n], *at, axis1]) for n in ("q", "k", "v"))
                cos, sin = (ops._node("Slice", [n, *at, axis2]) for n in ("cos", "sin"))
                qb, kb, vb = _heads(ops, a, w, q, k, v, cos, sin, by_matmul=True)
                o, cache["k_new"], cache["v_new"] = _attend(ops, a, qb, kb, vb, cache, batch_name("mask", b), 1)
                rows_o.append(o)
            st["o"] = ops.concat(rows_o, axis=1)  # [1, B, nh*hd]

        st = _run_layer(ops, a, weights, i, spec, st, attend)
        rows.append(caches)
    # request-major: request b's rows of every layer, then request b+1's (what the host splits per request)
    new = {name: [rows[layer][b][name] for b in range(batch) for layer in range(spec.n_layers)] for name in ("k_new", "v_new")}
    return _layer_model(ops, spec, st, new, ins, outs, f"exo_rknpu_npu_{spec.name}_b{batch}")


def _batch_shapes(shapes: Callable[..., dict[str, tuple[int, ...]]], spec: SliceSpec, a: ModelArgs, batch: int,
                  ctx: int | None) -> dict[str, list]:
    """Input shapes of a batch graph at `ctx`, or with the dimensions that follow the context named (C, CS = C+1)."""
    if ctx is not None:
        return {n: list(sh) for n, sh in shapes(spec, a, batch, ctx).items()}
    one, two = shapes(spec, a, batch, 1), shapes(spec, a, batch, 2)
    return {n: [d if d == e else {1: "C", 2: "CS"}[d] for d, e in zip(one[n], two[n])] for n in one}


def _layer_model(ops: OnnxOps, spec: SliceSpec, st: dict, new: dict[str, list[str]], ins: dict[str, list], outs: dict[str, list],
           name: str) -> onnx.ModelProto:
    """The ONNX model of a built graph: the live layer state and the stacked new cache rows as its outputs."""
    results = {state_name(k, output=True): st[k] for k in spec.state_outputs()}
    if spec.has_attention:
        for key, parts in new.items():
            results[key] = parts[0] if len(parts) == 1 else ops.concat(parts, axis=0)
    for n in outs:
        ops.g.nodes.append(helper.make_node("Identity", [results[n]], [n], name=f"out_{n}"))
    return _model(ops, name, ins, outs)


def _model(ops: OnnxOps, name: str, ins: dict[str, list], outs: dict[str, list]) -> onnx.ModelProto:
    """The recorded graph as an ONNX model with float32 inputs and outputs of these (named) shapes."""
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(ops.g.nodes, name,
                              [helper.make_tensor_value_info(n, f32, list(sh)) for n, sh in ins.items()],
                              [helper.make_tensor_value_info(n, f32, list(sh)) for n, sh in outs.items()],
                              initializer=ops.g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="exo-rknpu")
    model.ir_version = IR_VERSION
    return model


def _symbolic(shapes: dict[str, tuple[int, ...]], spec: SliceSpec, a: ModelArgs, dims: dict) -> dict[str, list]:
    """Shapes at seq=ctx=1 with the bucket dimensions put back by name (S, C, RS = rep*S, CS = C+S)."""
    rows = spec.n_layers * a.num_key_value_heads
    hd = a.head_dim
    table = {"cos": [1, 1, "S", hd], "sin": [1, 1, "S", hd], "mask": [1, 1, "CS", "RS"], "past_k": [rows, hd, "C"],
             "past_v": [rows, "C", hd], "k_new": [rows, hd, "S"], "v_new": [rows, "S", hd]}
    out = {}
    for name, sh in shapes.items():
        out[name] = [dims[d] if isinstance(d, str) else d for d in table.get(name, [1, "S", sh[-1]])]
    return out


_Cache = dict[str, str]  # one layer's past_k/past_v graph values, then its k_new/v_new once computed


def _layer_cache(ops: OnnxOps, a: ModelArgs, spec: SliceSpec, layer: int, ctx: int | None, row: int | None = None) -> _Cache:
    """The cache rows of one layer of the slice, as graph values ([1, kv, hd, C] keys, [1, kv, C, hd] values); in a
    batch graph, request `row`'s own cache inputs (past_k_<row>, past_v_<row>)."""
    kv, hd, n = a.num_key_value_heads, a.head_dim, spec.n_layers
    out: _Cache = {}
    axis0 = ops._const(np.array([0], np.int64))
    for key in ("past_k", "past_v"):
        name = key if row is None else batch_name(key, row)
        x = name if n == 1 else ops._node("Slice", [name, *ops._range(layer * kv, (layer + 1) * kv), axis0])
        out[key] = ops._node("Unsqueeze", [x, axis0])  # [1, kv, hd, C] keys, [1, kv, C, hd] values
    # C for cutting the probabilities: read from the values' shape under dynamic_input; a constant in a static graph,
    # where rknn dropped the values input whose Shape it had folded (measured: a decode build recorded no past_v)
    out["ctx"] = (ops._const(np.array([ctx], np.int64)) if ctx is not None
                  else ops._node("Slice", [ops._node("Shape", [out["past_v"]]), *ops._range(2, 3)]))
    return out


def _run_layer(ops: OnnxOps, a: ModelArgs, weights: ShardWeights, i: int, spec: SliceSpec, st: dict,
               attend: Callable[[Any, dict], None]) -> dict:
    """One layer's parts (whole layer or a run of parts): graph.run_part for all but attention, which is written
    in the NPU form here (`attend(layer weights, state)` sets st["o"] and keeps the new cache rows)."""
    from exo_rknpu.slices.graph import run_part

    w = weights.layers[i]
    for part in spec.parts or PARTS:
        if part == "attention":
            attend(w, st)
        else:
            run_part(ops, a, w, part, st)
    return st


def _attention(ops: OnnxOps, a: ModelArgs, w, q: str, k: str, v: str, cache: _Cache, seq: int | None) -> tuple[str, str, str]:
    """o [1,S,nh*hd] from q [1,S,nh*hd], k/v [1,S,kv*hd] over the cache; returns (o, k_new [kv,hd,S], v_new [kv,S,hd])."""
    qh, kh, vh = _heads(ops, a, w, q, k, v)
    return _attend(ops, a, qh, kh, vh, cache, "mask", seq)


def _heads(ops: OnnxOps, a: ModelArgs, w, q: str, k: str, v: str, cos: str = "cos", sin: str = "sin",
           by_matmul: bool = False) -> tuple[str, str, str]:
    """q [1,nh,S,hd], k and v [1,kv,S,hd] from the projections, q/k normed (qwen3) and rotated by cos/sin [1,1,S,hd].
    by_matmul: rotate_half as a matmul with its +-1 matrix (exact), not Slice/Neg/Concat: see build_npu_batch_onnx."""
    hd, nh, kv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
    qh = ops.split_heads(q, nh, hd)  # [1,nh,S,hd]
    kh = ops.split_heads(k, kv, hd)
    if w.q_norm is not None:
        qh = ops.rms_norm(qh, w.q_norm, a.rms_norm_eps)
    if w.k_norm is not None:
        kh = ops.rms_norm(kh, w.k_norm, a.rms_norm_eps)
    if by_matmul:
        r = ops._const(_rotate_half_matrix(hd))
        return tuple(ops.add(ops.mul(x, cos), ops.mul(ops._node("MatMul", [x, r]), sin)) for x in (qh, kh)) + (  # type: ignore[return-value]
            ops.split_heads(v, kv, hd),)
    return rope(ops, qh, cos, sin, hd), rope(ops, kh, cos, sin, hd), ops.split_heads(v, kv, hd)


def _rotate_half_matrix(hd: int) -> np.ndarray:
    """R with x @ R == rotate_half(x) = cat(-x2, x1): one +-1 per column, so the product is exact in any precision."""
    half = hd // 2
    r = np.zeros((hd, hd), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def _attend(ops: OnnxOps, a: ModelArgs, qh: str, kh: str, vh: str, cache: _Cache, mask: str,
            seq: int | None) -> tuple[str, str, str]:
    """One request's attention over its cache (qh [1,nh,S,hd], kh/vh [1,kv,S,hd], `mask` [1,1,C+S,rep*S]):
    (o [1,S,nh*hd], k_new [kv,hd,S], v_new [kv,S,hd])."""
    hd, nh = a.head_dim, a.num_attention_heads
    qf = _fold(ops, qh, a)  # [1,kv,rep*S,hd]
    qf = ops._node("Mul", [qf, ops._const(np.array(hd**-0.5, np.float32))])
    # Scores are computed transposed ([1,kv,positions,rS]): every tensor with a positions axis keeps it where the
    # NPU's matmul wants it (its channels), never as a width, and the values are read where they lie: the
    # probabilities are cut into past and new positions instead of concatenating the cache with the new rows.
    qt = ops.swap_last(qf)  # [1,kv,hd,rS]
    s_past = ops._node("MatMul", [ops.swap_last(cache["past_k"]), qt])  # [1,kv,C,rS]
    s_new = ops._node("MatMul", [kh, qt])  # [1,kv,S,rS]
    p = ops._node("Softmax", [ops._node("Add", [ops._node("Concat", [s_past, s_new], axis=2), mask])], axis=2)
    c = cache["ctx"]
    axis = ops._const(np.array([2], np.int64))
    p_past = ops._node("Slice", [p, ops._const(np.array([0], np.int64)), c, axis])
    p_new = ops._node("Slice", [p, c, ops._const(np.array([2**62], np.int64)), axis])
    # one new position (a static decode graph): its value term is an outer product, written as one; as a MatMul,
    # rknn's fuse_exmatmul_add merged the two value matmuls and dropped the past one (measured: no past_v input left)
    new_term = (ops._node("Mul", [ops.swap_last(p_new), vh]) if seq == 1
                else ops._node("MatMul", [ops.swap_last(p_new), vh]))
    o = ops._node("Add", [ops._node("MatMul", [ops.swap_last(p_past), cache["past_v"]]), new_term])  # [1,kv,rS,hd]
    kt = ops.swap_last(kh)  # [1,kv,hd,S]
    o = ops.merge_heads(_unfold(ops, o, a), nh, hd)
    axis0 = ops._const(np.array([0], np.int64))
    k_new, v_new = ops._node("Squeeze", [kt, axis0]), ops._node("Squeeze", [vh, axis0])
    return o, k_new, v_new


def _fold(ops: OnnxOps, qh: str, a: ModelArgs) -> str:
    """[1, kv*rep, S, hd] (head h = g*rep + r) -> [1, kv, rep*S, hd] (row r*S + s of kv head g): a reshape."""
    return qh if a.n_rep == 1 else ops._node("Reshape", [qh, ops._shape([1, a.num_key_value_heads, -1, a.head_dim])])


def _unfold(ops: OnnxOps, o: str, a: ModelArgs) -> str:
    """Inverse of _fold: [1, kv, rep*S, hd] -> [1, kv*rep, S, hd]."""
    return o if a.n_rep == 1 else ops._node("Reshape", [o, ops._shape([1, a.num_attention_heads, -1, a.head_dim])])
