"""--weights native on tiny models (the bundled model's figures: test_native_weights.py): each GGUF block type the
kernel has (and float sources as Q8_0) reaches onnxruntime as one QMatMul per stacked linear, the onnx backend's
logits stay within the int16-activation error of the numpy reference on the same weights, a graph may mix QMatMul
with MatMulNBits, and prepared slices are cached like the other compact forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.backends.numpy_ref import NumpyBackend
from exo_rknpu.backends.ort import OrtBackend, OrtRunner
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu import native
from exo_rknpu.model.quant import QTensor, native_format, native_parts, quantize
from exo_rknpu.model.weights import RowTable
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.slices.onnx_export import (NATIVE_DOMAIN, NATIVE_OP, NATIVE_SWIGLU_OP, PendingPack, build_onnx_compact,
                                          materialize, stack_rows)
from exo_rknpu.slices.spec import SliceSpec
from helpers import SMALL_BUCKETS, greedy, nmse, ring
from tiny_models import make_tiny_gguf, make_tiny_hf

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]
# the native kernel quantizes activations to int16 per block of 32: its logits differ from float arithmetic on the
# same weights by that much at most (measured 3.6e-9 .. 5.5e-9 on these models; int8 activations needed 1e-3)
NATIVE_VS_FLOAT_NMSE = 1e-7


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("native")
    hf = make_tiny_hf(d / "hf", n_layers=3, seed=11)
    return {"hf": hf, **{q: make_tiny_gguf(d / f"{q}.gguf", hf, qtype=q) for q in ("Q4_0", "Q4_1", "Q8_0", "F32")}}


def q6_k_headed(folder: Path) -> Path:
    """A tied model shaped for Q6_K (hidden 256: whole super-blocks; vocab 333: a partial row group) whose Q4_0 file
    keeps token_embd at Q6_K, as llama.cpp's quantizer does."""
    hf = make_tiny_hf(folder / "hf6", n_layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=333, tied=True,
                      seed=13)
    return make_tiny_gguf(folder / "q6k.gguf", hf, qtype="Q4_0", embed_qtype="Q6_K")


def test_a_q6_k_head_is_one_qmatmul_in_the_kernels_q6_k_format(tmp_path):
    """The tied Q6_K head packs its own copy for the kernel's Q6_K format (0.82 bytes per weight, as the file);
    the embedding stays a table in the file, looked up by gguf's own decoder."""
    shard = load_shard(resolve_model(str(q6_k_headed(tmp_path))), LayerRange.full(2), "native")
    assert isinstance(shard.embed_tokens, RowTable) and isinstance(shard.lm_head, QTensor)
    assert shard.lm_head.kernel == "native" and shard.lm_head.origin == "Q6_K (exact)"
    graph, external = build_onnx_compact(SliceSpec("head"), shard)
    nodes = [n for n in graph.graph.node if n.op_type == NATIVE_OP]
    assert len(nodes) == 1 and not any(n.op_type == "MatMulNBits" for n in graph.graph.node)
    assert {a.name: a.i for a in nodes[0].attribute} == {"fmt": native.Q6_K, "K": 256, "N": 333}
    packed = materialize(external[nodes[0].input[1]])
    assert packed.size == native.packed_bytes(native.Q6_K, 333, 256) == 21 * 8 * (384 + 36)


def test_a_q6_k_head_at_native_stays_within_the_int16_activation_error_of_float_arithmetic(tmp_path):
    """Against float32 arithmetic on the file's values (measured: nmse 3.3e-9, 1 - cosine 2.1e-9 at the worst
    position)."""
    path = q6_k_headed(tmp_path)
    float_logits = ring(path, None, "numpy", weights="fp32").forward("r", np.array([PROMPT]), logits="all")
    native_logits = ring(path, None, "onnx", weights="native").forward("r", np.array([PROMPT]), logits="all")
    a, b = native_logits.astype(np.float64).reshape(-1, 333), float_logits.astype(np.float64).reshape(-1, 333)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert 0 < nmse(native_logits, float_logits) <= NATIVE_VS_FLOAT_NMSE
    assert cosine.min() >= 1 - 1e-6 and np.array_equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("model,fmt", [("Q4_0", 0), ("Q4_1", 1), ("Q8_0", 2), ("F32", 2), ("hf", 2)])
def test_each_linear_is_one_qmatmul_over_packed_bytes(models, model, fmt):
    shard = load_shard(resolve_model(str(models[model])), LayerRange.full(3), "native")
    graph, external = build_onnx_compact(SliceSpec("layers", 0, 3), shard)
    nodes = [n for n in graph.graph.node if n.op_type in (NATIVE_OP, NATIVE_SWIGLU_OP)]
    # qkv, o, down; gate/up with the activation (test_native_swiglu.py)
    assert [n.op_type for n in nodes].count(NATIVE_SWIGLU_OP) == 3 and len(nodes) == 4 * 3
    assert not any(n.op_type == "MatMulNBits" for n in graph.graph.node)
    assert all(n.domain == NATIVE_DOMAIN and {a.name: a.i for a in n.attribute}["fmt"] == fmt for n in nodes)
    assert any(o.domain == NATIVE_DOMAIN for o in graph.opset_import)
    packed = {n.input[1] for n in nodes}
    # left unpacked until written (a first start never holds a slice's packed bytes all at once)
    assert all(isinstance(external[name], PendingPack) for name in packed)
    made = {name: materialize(external[name]) for name in packed}
    assert all(a.dtype == np.uint8 and a.shape == external[name].shape for name, a in made.items())


@pytest.mark.parametrize("model", ["Q4_0", "Q8_0", "hf"])
def test_stacked_weights_pack_as_one_matrix_and_stay_as_they_were(models, model):
    # the stacked copy of gate/up becomes its codes in place: the packed bytes are those of the rows stacked,
    # dequantized by the reference packer's parts, and the layer's own blocks are untouched
    shard = load_shard(resolve_model(str(models[model])), LayerRange.full(3), "native")
    gate, up = shard.layers[0].gate_proj, shard.layers[0].up_proj
    before = [gate.blocks.copy(), up.blocks.copy()]
    p = PendingPack((gate, up), native_format(gate))
    got = p.packed()
    d = np.concatenate([gate.scales, up.scales]).astype(np.float16)
    if gate.bits == 8:
        codes = (np.concatenate([gate.blocks, up.blocks]).astype(np.int16) - 128).astype(np.int8)
        want = native.pack(p.fmt, d, codes.reshape(-1, gate.shape[1]))
    else:
        want = native.pack(p.fmt, d, native_parts(stack_rows([gate, up])).codes)
    assert got.shape == p.shape and np.array_equal(got, want)
    assert np.array_equal(gate.blocks, before[0]) and np.array_equal(up.blocks, before[1])


@pytest.mark.parametrize("model", ["Q4_0", "Q4_1", "Q8_0", "hf"])
def test_onnx_at_native_stays_within_the_int8_activation_error_of_float_arithmetic(models, model):
    path = models[model]
    float_logits = ring(path, None, "numpy", weights="native").forward("r", np.array([PROMPT]), logits="all")
    native_logits = ring(path, "0-0,1-2", "onnx", weights="native").forward("r", np.array([PROMPT]), logits="all")
    assert 0 < nmse(native_logits, float_logits) <= NATIVE_VS_FLOAT_NMSE


def test_split_gives_the_same_tokens_as_unsplit_at_native(models):
    expected = greedy(ring(models["Q4_1"], None, "onnx", weights="native"), PROMPT, 8)
    assert greedy(ring(models["Q4_1"], "0-0,1-1,2-2", "onnx", weights="native"), PROMPT, 8) == expected


def test_a_graph_mixes_qmatmul_with_matmulnbits(models):
    """K-quant tensors keep auto's form under native: a layer of such weights next to native ones runs both kernels
    in one graph, and the logits still match the numpy reference on the same weights."""
    src = resolve_model(str(models["Q8_0"]))
    shard = load_shard(src, LayerRange.full(3), "native")
    layer = shard.layers[1]
    for field in ("gate_proj", "up_proj", "down_proj"):  # as auto would hold a K-quant: 8-bit blocks, float32 activations
        setattr(layer, field, quantize(getattr(layer, field).dequantize(), 8, 64, kernel="fp32"))
    graph, _ = build_onnx_compact(SliceSpec("layers", 0, 3), shard)
    assert {"MatMulNBits", NATIVE_OP} <= {n.op_type for n in graph.graph.node}
    ids = np.array([PROMPT])
    reference = ShardRunner(shard, NumpyBackend(), SMALL_BUCKETS).forward("r", ids, logits="all")
    runner = ShardRunner(shard, OrtBackend(use_cache=False), SMALL_BUCKETS)
    assert nmse(runner.forward("r", ids, logits="all"), reference) <= NATIVE_VS_FLOAT_NMSE
    sessions = [r for r in runner.runners.values() if isinstance(r, OrtRunner)]
    assert sessions and all(r.custom_ops is not None for r in sessions)


def test_prepared_native_slices_are_cached_and_reopen_with_the_library(models, tmp_path):
    src = resolve_model(str(models["Q4_0"]))
    first = ShardRunner(load_shard(src, LayerRange.full(3), "native"), OrtBackend(cache_dir=tmp_path),
                        SMALL_BUCKETS, release_weights=True)
    expected = first.forward("a", np.array([PROMPT]), logits="all")
    entries = sorted(p for p in tmp_path.glob("??/*") if p.is_dir())
    assert len(entries) == 2  # layers + head
    again = ShardRunner(load_shard(src, LayerRange.full(3), "native"), OrtBackend(cache_dir=tmp_path),
                        SMALL_BUCKETS, release_weights=True)
    assert sorted(p for p in tmp_path.glob("??/*") if p.is_dir()) == entries
    assert np.array_equal(again.forward("a", np.array([PROMPT]), logits="all"), expected)
