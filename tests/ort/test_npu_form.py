"""The NPU form of a layer slice (slices/npu_form.py: its own graph, float16 inputs, the "npu" cache layout) and of
the head (the lm_head in vocabulary pieces) computes what the CPU graph computes: both run in onnxruntime on the same
(float16-rounded) inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.cache import KVCache
from exo_rknpu.slices import npu_form
from exo_rknpu.slices.npu_form import build_npu_batch_onnx, build_npu_head_onnx, build_npu_onnx
from exo_rknpu.slices.onnx_export import build_onnx
from exo_rknpu.slices.spec import (MASK_VALUE, SliceSpec, compiled_inputs, npu_batch_input_shapes, npu_outputs_to_seq,
                                   to_npu_batch_inputs)

from helpers import nmse


def _inputs(spec: SliceSpec, args, seq: int, ctx: int, pos: int, rng) -> dict[str, np.ndarray]:
    """"seq"-form inputs of a call at position `pos` (rows past `pos` of the cache masked), rounded to float16."""
    shapes = spec.input_shapes(args, seq, ctx)
    x = {n: rng.standard_normal(sh).astype(np.float16).astype(np.float32) for n, sh in shapes.items()}
    ang = rng.uniform(0, 6.3, (1, 1, seq, args.head_dim)).astype(np.float32)
    x["cos"], x["sin"] = np.cos(ang).astype(np.float16).astype(np.float32), np.sin(ang).astype(np.float16).astype(np.float32)
    mask = np.full((1, 1, seq, ctx + seq), MASK_VALUE, np.float32)
    mask[..., :pos] = 0
    for i in range(seq):
        mask[0, 0, i, ctx : ctx + i + 1] = 0
    if "mask" in x:
        x["mask"] = mask
    return x


def _run(model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {i.name: np.asarray(feed[i.name], np.float32) for i in sess.get_inputs()})))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("spec", [SliceSpec("layers", 1, 2), SliceSpec("layers", 0, 2),
                                  SliceSpec("layers", 1, 2, blocks=("qkv", "attention")),
                                  SliceSpec("layers", 1, 2, blocks=("attention", "o_proj", "mlp_norm"))],
                         ids=["one-layer", "two-layers", "qkv+attention", "attention+o_proj+mlp_norm"])
@pytest.mark.parametrize("seq,ctx,pos", [(1, 32, 20), (16, 32, 5)])
def test_npu_form_computes_what_the_cpu_graph_computes(request, model, spec, seq, ctx, pos):
    src = resolve_model(str(request.getfixturevalue(model)))
    w = load_shard(src, LayerRange(0, 2, load_args(src).num_hidden_layers), weights="fp32")
    a = w.args
    x = _inputs(spec, a, seq, ctx, pos, np.random.default_rng(seq))
    want = _run(build_onnx(spec, w, seq=seq, ctx=ctx), x)
    npu = SliceSpec(spec.kind, spec.start, spec.stop, spec.blocks, kv_layout="npu")
    feed = compiled_inputs(npu, a, x)
    assert all(v.dtype == np.float16 for k, v in feed.items()), "every compiled input is float16"
    assert {k: v.shape for k, v in feed.items()} == npu.input_shapes(a, seq, ctx)
    for graph in (build_npu_onnx(npu, w, seq, ctx), build_npu_onnx(npu, w)):  # static and symbolic (dynamic_input)
        got = npu_outputs_to_seq(_run(graph, feed), a)
        assert set(got) == set(want)
        for name in want:
            assert nmse(got[name], want[name]) <= 1e-10, name


def test_npu_cache_is_float16_in_the_compiled_shapes_and_grows_along_positions(tiny_llama):
    a = load_shard(resolve_model(str(tiny_llama)), LayerRange(0, 2, 5), weights="fp32").args
    spec = SliceSpec("layers", 0, 2, kv_layout="npu")
    c = KVCache.empty(2, a.num_key_value_heads, 32, a.head_dim, "npu")
    sh = spec.input_shapes(a, 1, 32)
    assert (c.keys.shape, c.values.shape) == (sh["past_k"], sh["past_v"]) and c.keys.dtype == c.values.dtype == np.float16
    out = spec.output_shapes(a, 4)
    k_new, v_new = np.ones(out["k_new"], np.float32), np.full(out["v_new"], 2.0, np.float32)
    c.write(3, k_new, v_new, 2)  # the first 2 of a 4-token chunk
    c.grow(64)
    assert c.capacity == 64 and c.keys.shape[2] == c.values.shape[1] == 64
    seq_k = npu_outputs_to_seq({"past_k": c.keys}, a)["past_k"]  # [n, kv, C, hd]
    assert seq_k[:, :, :, 0].sum(axis=(0, 1)).tolist()[:6] == [0, 0, 0, 4, 4, 0]
    assert c.values[:, 3:5].min() == 2 and c.values[:, 5:].max() == 0


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])  # qwen2: a tied head (the embedding table)
@pytest.mark.parametrize("rows", [None, 128])  # 128: the tiny vocabulary (320) in 3 pieces, the last one shorter
def test_npu_head_in_vocabulary_pieces_computes_the_cpu_heads_logits(request, monkeypatch, model, rows):
    src = resolve_model(str(request.getfixturevalue(model)))
    n = load_args(src).num_hidden_layers
    w = load_shard(src, LayerRange(n - 1, n, n), weights="fp32")
    if rows:
        monkeypatch.setattr(npu_form, "NPU_HEAD_ROWS", rows)
    vocab = w.lm_head.shape[0]
    pieces = -(-vocab // npu_form.NPU_HEAD_ROWS)
    assert pieces == (3 if rows else 1), vocab
    spec = SliceSpec("head")
    for seq in (1, 16):
        x = {"hidden": np.random.default_rng(seq).standard_normal((1, seq, w.args.hidden_size)).astype(np.float32)}
        want = _run(build_onnx(spec, w, seq=seq), x)["logits"]
        for graph in (build_npu_head_onnx(spec, w, seq), build_npu_head_onnx(spec, w)):  # static and symbolic
            assert sum(nd.op_type == "MatMul" for nd in graph.graph.node) == pieces
            got = _run(graph, x)["logits"]
            assert got.shape == want.shape == (1, seq, vocab)
            assert nmse(got, want) <= 1e-12


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("spec", [SliceSpec("layers", 1, 2, kv_layout="npu"), SliceSpec("layers", 0, 2, kv_layout="npu"),
                                  SliceSpec("layers", 1, 2, blocks=("qkv", "attention"), kv_layout="npu")],
                         ids=["one-layer", "two-layers", "qkv+attention"])
def test_a_batch_graph_gives_each_request_what_its_lone_decode_step_gives(request, model, spec):
    """B requests at their own positions with their own caches in one call of the batch graph: each request's
    outputs (state row, new cache rows) are those of the seq-1 graph run on that request alone."""
    src = resolve_model(str(request.getfixturevalue(model)))
    w = load_shard(src, LayerRange(0, 2, load_args(src).num_hidden_layers), weights="fp32")
    a, ctx, batch = w.args, 32, 3
    rng = np.random.default_rng(7)
    alone = [compiled_inputs(spec, a, _inputs(SliceSpec(spec.kind, spec.start, spec.stop, spec.blocks), a, 1, ctx, pos, rng))
             for pos in (20, 3, 31)]
    want = [_run(build_npu_onnx(spec, w, 1, ctx), x) for x in alone]
    states = [n for n in alone[0] if n not in ("cos", "sin", "mask", "past_k", "past_v")]
    runtime = {n: np.concatenate([x[n] for x in alone], axis=1 if n not in ("cos", "sin") else 2) for n in states + ["cos", "sin"]}
    runtime["mask"] = np.concatenate([x["mask"][..., :1].swapaxes(2, 3) for x in alone])  # each request's [1,1,1,C+1] row
    runtime["past_k"], runtime["past_v"] = [x["past_k"] for x in alone], [x["past_v"] for x in alone]
    feed = to_npu_batch_inputs(spec, a, runtime)
    assert {k: v.shape for k, v in feed.items()} == npu_batch_input_shapes(spec, a, batch, ctx)
    assert all(v.dtype == np.float16 for v in feed.values())
    for graph in (build_npu_batch_onnx(spec, w, batch, ctx), build_npu_batch_onnx(spec, w, batch)):  # static, symbolic
        got = _run(graph, feed)
        rows = got["k_new"].shape[0] // batch
        for b, lone in enumerate(want):
            mine = {n: got[n][:, b : b + 1] for n in got if n not in ("k_new", "v_new")}
            mine.update({n: got[n][b * rows : (b + 1) * rows] for n in ("k_new", "v_new")})
            assert set(mine) == set(lone)
            for name in lone:
                assert nmse(mine[name], lone[name]) <= 1e-10, (b, name)
