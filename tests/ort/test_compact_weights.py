"""Compact weights end to end: GGUF blocks reach onnxruntime's MatMulNBits as stored, the numpy reference and the
onnx backend agree on them, shards split the same way, prepared slices are cached on disk and checked, and a
slice over protobuf's 2 GiB limit prepares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.backends.numpy_ref import NumpyBackend
from exo_rknpu.backends.ort import OrtBackend, OrtRunner
from exo_rknpu.backends.prepared import WEIGHTS_FILE
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.quant import QTensor
from exo_rknpu.model.weights import LayerWeights, RowTable, ShardWeights
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.slices.onnx_export import build_onnx_compact
from exo_rknpu.slices.spec import SliceSpec
from helpers import SMALL_BUCKETS, greedy, nmse, ring
from tiny_models import make_tiny_gguf, make_tiny_hf

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]
# int4/int8: MatMulNBits runs at accuracy level 4 (activations quantized to int8 per block inside the kernel): the
# onnx backend's logits differ from the float numpy reference on the same compact weights by that much at most
ONNX_VS_NUMPY_COMPACT_NMSE = 1e-3
# auto: Q4_0 blocks multiplied with float32 activations: only float32 rounding separates onnx from numpy
ONNX_VS_NUMPY_FP32_ARITHMETIC_NMSE = 1e-9


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("compact")
    hf = make_tiny_hf(d / "hf", n_layers=3, seed=11)
    return {"hf": hf, **{q: make_tiny_gguf(d / f"{q}.gguf", hf, qtype=q) for q in ("Q4_0", "Q8_0", "Q4_1")}}


@pytest.mark.parametrize("qtype,bits,weights", [("Q4_0", 4, "auto"), ("Q4_0", 4, "int4"), ("Q8_0", 8, "int8"),
                                                ("Q8_0", 8, "auto"), ("Q4_1", 4, "auto")])
def test_gguf_q4_0_and_q8_0_layers_load_as_stored(gguf_models, qtype, bits, weights):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = gguf_models[qtype]
    shard = load_shard(resolve_model(str(path)), LayerRange.full(3), weights)
    reader = {t.name: t for t in GGUFReader(str(path)).tensors}
    for field, name in (("v_proj", "blk.1.attn_v.weight"), ("gate_proj", "blk.2.ffn_gate.weight")):
        w = getattr(shard.layers[int(name.split(".")[1])], field)
        assert isinstance(w, QTensor) and w.bits == bits and w.origin == f"{qtype} (exact)"
        assert (w.kernel == "fp32") == (weights == "auto")  # auto: multiplied in float32 (same answers on every CPU)
        t = reader[name]
        assert np.array_equal(w.dequantize(), dequantize(t.data, t.tensor_type))
    assert shard.layers[0].input_norm.dtype == np.float32  # norms stay float32


def test_tied_head_is_the_embedding_and_stays_compact(tmp_path):
    path = make_tiny_gguf(tmp_path / "t.gguf", make_tiny_hf(tmp_path / "hf", tied=True), qtype="Q8_0")
    shard = load_shard(resolve_model(str(path)), LayerRange.full(3), "int8")
    assert isinstance(shard.embed_tokens, QTensor) and shard.lm_head is shard.embed_tokens


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("weights,kernel", [("auto", "fp32"), ("native", "native")])
def test_embedding_stays_in_the_file_and_the_tied_head_is_compact(tmp_path, qtype, weights, kernel):
    """auto and native (the default): looked-up embedding rows are gguf's own dequantization of the stored rows
    (nothing widened up front); the tied head is its own compact linear, multiplied by the form's kernel."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = make_tiny_gguf(tmp_path / "t.gguf", make_tiny_hf(tmp_path / "hf", tied=True), qtype=qtype)
    shard = load_shard(resolve_model(str(path)), LayerRange.full(3), weights)
    t = {t.name: t for t in GGUFReader(str(path)).tensors}["token_embd.weight"]
    ids = np.array([[3, 0, 7, 3]])
    assert isinstance(shard.embed_tokens, RowTable)
    assert np.array_equal(shard.embed_tokens.rows(ids), dequantize(t.data, t.tensor_type)[ids])
    assert isinstance(shard.lm_head, QTensor) and shard.lm_head.kernel == kernel


@pytest.mark.parametrize("model,weights", [("Q4_0", "int4"), ("Q8_0", "int8"), ("Q4_1", "int8"), ("hf", "int8"), ("hf", "int4")])
def test_onnx_and_numpy_agree_on_compact_weights(gguf_models, model, weights):
    path = gguf_models[model]
    numpy_logits = ring(path, None, "numpy", weights=weights).forward("r", np.array([PROMPT]), logits="all")
    onnx_logits = ring(path, "0-0,1-2", "onnx", weights=weights).forward("r", np.array([PROMPT]), logits="all")
    assert nmse(onnx_logits, numpy_logits) <= ONNX_VS_NUMPY_COMPACT_NMSE


@pytest.mark.parametrize("model", ["Q4_0", "Q8_0", "Q4_1", "hf"])
def test_auto_weights_compute_in_float32_so_answers_do_not_depend_on_the_cpu(gguf_models, model):
    """auto keeps every linear compact (Q4_0, Q4_1 and Q8_0 exactly as stored; float sources as 8-bit blocks) but
    multiplies them with float32 activations: onnxruntime's logits match the float numpy reference on the same
    weights (which never quantizes activations) to float32 rounding -- for the exact GGUF forms, the file's own
    values widened to float32 too -- far closer than the int8 activations of --weights int4/int8 on the same
    blocks, the rounding that differs between instruction sets."""
    path = gguf_models[model]
    shard = load_shard(resolve_model(str(path)), LayerRange.full(3), "auto")
    linears = [w for lw in shard.layers.values() for w in lw.arrays().values() if len(w.shape) == 2]
    assert all(isinstance(w, QTensor) and w.kernel == "fp32" for w in linears), model
    numpy_logits = ring(path, None, "numpy", weights="fp32" if model != "hf" else "auto").forward(
        "r", np.array([PROMPT]), logits="all")
    fp32_arith = ring(path, "0-0,1-2", "onnx", weights="auto").forward("r", np.array([PROMPT]), logits="all")
    int8_arith = ring(path, "0-0,1-2", "onnx", weights="int8").forward("r", np.array([PROMPT]), logits="all")
    assert nmse(fp32_arith, numpy_logits) <= ONNX_VS_NUMPY_FP32_ARITHMETIC_NMSE < nmse(int8_arith, numpy_logits)


def test_int8_and_int4_stay_close_to_float32(gguf_models):
    path = gguf_models["hf"]
    ref = ring(path, None, "numpy", weights="fp32").forward("r", np.array([PROMPT]), logits="all")
    errors = {w: nmse(ring(path, None, "numpy", weights=w).forward("r", np.array([PROMPT]), logits="all"), ref)
              for w in ("int8", "int4")}
    assert errors["int8"] < 1e-3 and errors["int4"] < 0.15 and errors["int8"] < errors["int4"], errors


@pytest.mark.parametrize("model", ["Q4_1", "hf"])
def test_split_gives_the_same_tokens_as_unsplit_on_compact_weights(gguf_models, model):
    path = gguf_models[model]
    expected = greedy(ring(path, None, "onnx", weights="int8"), PROMPT, 8)
    for split in ("0-0,1-2", "0-0,1-1,2-2"):
        assert greedy(ring(path, split, "onnx", weights="int8"), PROMPT, 8) == expected, split


def test_onnx_graph_carries_no_weights_in_its_protobuf(gguf_models):
    shard = load_shard(resolve_model(str(gguf_models["Q4_0"])), LayerRange.full(3), "auto")
    model, external = build_onnx_compact(SliceSpec("layers", 0, 3), shard)
    ops = {n.op_type for n in model.graph.node}
    levels = {a.i for n in model.graph.node for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {1}  # auto: float32 activations
    assert "MatMulNBits" in ops and "MatMul" in ops  # MatMul remains only for attention scores
    assert all(n.domain == "com.microsoft" for n in model.graph.node if n.op_type == "MatMulNBits")
    assert sum(a.nbytes for a in external.values()) > model.ByteSize()
    o = shard.layers[0].o_proj
    assert any(a is o.blocks for a in external.values())  # handed over as is, not copied
    # q/k/v and gate/up each run as one MatMulNBits over their stacked rows
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 4 * 3


# --------------------------------------------------------------------------- prepared-slice disk cache


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*") if p.is_dir())


def _prepare(path: Path, root: Path) -> ShardRunner:
    shard = load_shard(resolve_model(str(path)), LayerRange.full(3))
    return ShardRunner(shard, OrtBackend(cache_dir=root), SMALL_BUCKETS, release_weights=True)


def test_prepared_slices_are_reused_and_tampered_or_stale_ones_rebuilt(gguf_models, tmp_path):
    path, root = gguf_models["Q4_0"], tmp_path / "prepared"
    expected = _prepare(path, root).forward("a", np.array([PROMPT]), logits="all")
    entries = _entries(root)
    assert len(entries) == 2  # the layers slice and the head (the embedding is a host-side lookup)
    stamps = {p: p.stat().st_mtime_ns for e in entries for p in e.iterdir()}

    # reuse: same files, untouched, same logits
    again = _prepare(path, root).forward("a", np.array([PROMPT]), logits="all")
    assert np.array_equal(again, expected)
    assert {p: p.stat().st_mtime_ns for e in _entries(root) for p in e.iterdir()} == stamps

    # tampered: one byte of the weights flipped -> refused, rebuilt, same logits as before
    weights = entries[0] / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert np.array_equal(_prepare(path, root).forward("a", np.array([PROMPT]), logits="all"), expected)
    assert (entries[0] / WEIGHTS_FILE).read_bytes() != bytes(data)

    # stale: the manifest names another key (an entry copied or left from an older build) -> refused, rebuilt
    manifest = entries[0] / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "key": "0" * 64}))
    assert np.array_equal(_prepare(path, root).forward("a", np.array([PROMPT]), logits="all"), expected)
    assert json.loads(manifest.read_text())["key"] == m["key"]


def test_a_shard_opens_its_sessions_before_its_first_call_and_they_compute_what_a_late_open_does(gguf_models, tmp_path):
    """Every onnx session of a shard opens once all its slices are prepared (so their packing never coincides with
    scales a run has made resident); a runner left to open on its first call gives the same logits."""
    path, root = gguf_models["hf"], tmp_path / "prepared"
    shard = _prepare(path, root)
    sessions = [r for r in shard.runners.values() if isinstance(r, OrtRunner)]
    assert len(sessions) == 2 and all(r.session is not None for r in sessions)
    expected = shard.forward("a", np.array([PROMPT]), logits="all")
    for r in sessions:  # the same prepared files, opened again by the call itself
        r.session, r.model_file, r._binding = None, r.model_file, None
        r._bound.clear()
    assert np.array_equal(shard.forward("b", np.array([PROMPT]), logits="all"), expected)


def test_calls_of_several_positions_hand_their_arena_back_and_decode_steps_keep_theirs(gguf_models, tmp_path):
    """onnxruntime's arena shrinkage (OrtRunner's run options) goes with every call of more than one position, and
    with no one-position call (a decode step then allocates nothing new)."""
    shard = _prepare(gguf_models["hf"], tmp_path / "prepared")
    shrunk: list[bool] = []
    for r in (r for r in shard.runners.values() if isinstance(r, OrtRunner)):
        for method in ("run", "run_with_iobinding"):  # run options are the last argument of either
            real = getattr(r.session, method)
            setattr(r.session, method, lambda *a, _real=real, _r=r: (shrunk.append(a[-1] is _r._shrink), _real(*a))[1])
    shard.forward("a", np.array([PROMPT]))
    prefill = len(shrunk)
    shard.forward("a", np.array([PROMPT[-1:]]), start=False)
    assert prefill and all(shrunk[:prefill]) and len(shrunk) > prefill and not any(shrunk[prefill:])


def test_other_weights_modes_get_their_own_prepared_slices(gguf_models, tmp_path):
    root = tmp_path / "prepared"
    src = resolve_model(str(gguf_models["hf"]))
    for mode in ("int8", "int4"):
        ShardRunner(load_shard(src, LayerRange.full(3), mode), OrtBackend(cache_dir=root), SMALL_BUCKETS)
    assert len(_entries(root)) == 2 * 2  # layers + head, per mode


# --------------------------------------------------------------------------- beyond protobuf's 2 GiB


def _random_q4(rng: np.random.Generator, n: int, k: int) -> QTensor:
    blocks = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales = np.full((n, k // 32), 0.02 / np.sqrt(k / 32), np.float32)
    return QTensor(4, (n, k), 32, blocks, scales, None, "random")


@pytest.mark.slow
def test_a_slice_over_2_gib_of_float32_weights_prepares_and_runs_on_onnx(tmp_path):
    """9 layers of Llama-3.2-1B's shape in one onnx session: 547M parameters, 2.2 GB as float32 (the old path
    serialized that through protobuf and died at 2 GiB). The layers share their random bytes in memory but are
    distinct tensors, so the graph really holds nine layers of weights."""
    h, f, kv, n = 2048, 8192, 512, 9
    args = ModelArgs(architecture="llama", hidden_size=h, intermediate_size=f, num_hidden_layers=n + 1,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=1024, head_dim=64)
    rng = np.random.default_rng(0)
    base = {name: _random_q4(rng, *shape) for name, shape in {
        "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
        "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}.items()}

    def layer() -> LayerWeights:
        fresh = {k: QTensor(q.bits, q.shape, q.block_size, q.blocks, q.scales, None, q.origin) for k, q in base.items()}
        return LayerWeights(input_norm=np.ones(h, np.float32), post_norm=np.ones(h, np.float32), **fresh)

    shard = ShardWeights(args, LayerRange(0, n, n + 1), {i: layer() for i in range(n)})  # a first-but-not-last shard
    float_bytes = sum(4 * w.shape[0] * w.shape[1] for lw in shard.layers.values() for w in lw.arrays().values()
                      if isinstance(w, QTensor))
    assert float_bytes > 2**31
    spec = SliceSpec("layers", 0, n)
    model, external = build_onnx_compact(spec, shard)
    assert model.ByteSize() < 2**20  # the graph only: every linear's blocks are outside the protobuf
    assert sum(a.dtype == np.uint8 for a in external.values()) == 4 * n  # qkv, o, gate+up, down per layer
    del model, external
    runner = OrtBackend(cache_dir=tmp_path / "prepared").prepare(spec, shard, SMALL_BUCKETS)
    inputs = {"hidden": rng.standard_normal((1, 1, h)).astype(np.float32),
              "cos": np.ones((1, 1, 1, 64), np.float32), "sin": np.zeros((1, 1, 1, 64), np.float32),
              "mask": np.zeros((1, 1, 1, 17), np.float32),
              "past_k": np.zeros((n, 8, 16, 64), np.float32), "past_v": np.zeros((n, 8, 16, 64), np.float32)}
    ours = runner.run(inputs)["hidden_out"]
    runner.close()
    ref = NumpyBackend().prepare(spec, shard, SMALL_BUCKETS).run(inputs)["hidden_out"]
    assert nmse(ours, ref) <= ONNX_VS_NUMPY_COMPACT_NMSE


def test_matrices_whose_inner_size_is_not_a_block_multiple_stay_float32(tmp_path):
    path = make_tiny_hf(tmp_path / "odd", hidden=48, heads=4, kv_heads=2, ffn=96, n_layers=2)
    layer = load_shard(resolve_model(str(path)), LayerRange.full(2), "int8").layers[0]
    assert isinstance(layer.q_proj, np.ndarray) and layer.q_proj.dtype == np.float32  # K = 48
    assert isinstance(layer.down_proj, QTensor)  # K = 96 = 3 blocks
    numpy_logits = ring(path, None, "numpy", weights="int8").forward("r", np.array([PROMPT]), logits="all")
    onnx_logits = ring(path, None, "onnx", weights="int8").forward("r", np.array([PROMPT]), logits="all")
    assert nmse(onnx_logits, numpy_logits) <= ONNX_VS_NUMPY_COMPACT_NMSE
