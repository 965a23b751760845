"""The native library's attention op (exo_rknpu/native/attention.c, exo_rknpu.Attention): GroupQueryAttention's
contract for a packed q|k|v. It computes rope + causal softmax attention as a float64 numpy reference does and as
onnxruntime's GroupQueryAttention does (to float32 rounding), extends the caches in place, gives each request of a
batch exactly its lone result (any batch, one thread or two), gives the same bits in every build of the library, and
is what slices with native weights run (fp32 slices keep GroupQueryAttention)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from exo_rknpu.backends.ort import session_options
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.native.build import X86, library
from exo_rknpu.slices.onnx_export import MS_DOMAIN, NATIVE_ATTENTION_OP, NATIVE_DOMAIN, build_onnx_compact
from exo_rknpu.slices.spec import SliceSpec
from helpers import nmse, ring
from tiny_models import make_tiny_hf

TABLE = 600  # rope table rows (positions)
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]
NATIVE_VS_FLOAT_NMSE = 1e-7  # the native kernel's int16 activations against float arithmetic (test_native_form.py)
FLOAT32_ROUNDING = 2e-5  # a float32 computation against float64 / another float32 order, relative to the largest value


def attention_session(op: str, nh: int, kv: int, scale: float, threads: int,
                      isa: str = "native") -> ort.InferenceSession:
    """One attention node over qkv [B,S,(nh+2kv)*hd], past [B,kv,C,hd], seqlens_k, total, cos/sin [P,hd/2]:
    ours, or onnxruntime's GroupQueryAttention as the exporter writes it."""
    names = ["qkv", "past_k", "past_v", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
    if op == "gqa":
        node = helper.make_node("GroupQueryAttention", names[:1] + ["", ""] + names[1:],
                                ["out", "present_k", "present_v"], domain=MS_DOMAIN, num_heads=nh, kv_num_heads=kv,
                                scale=scale, do_rotary=1, rotary_interleaved=0)
    else:
        node = helper.make_node(NATIVE_ATTENTION_OP, names, ["out", "present_k", "present_v"], domain=NATIVE_DOMAIN,
                                num_heads=nh, kv_num_heads=kv, scale=scale)
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    ins = [helper.make_tensor_value_info("qkv", f32, ["B", "S", "W"])]
    ins += [helper.make_tensor_value_info(n, f32, ["B", kv, "C", "H"]) for n in names[1:3]]
    ins += [helper.make_tensor_value_info("seqlens_k", i32, ["B"]),
            helper.make_tensor_value_info("total_sequence_length", i32, [])]
    ins += [helper.make_tensor_value_info(n, f32, ["P", "R"]) for n in names[5:]]
    outs = [helper.make_tensor_value_info("out", f32, ["B", "S", "O"])]
    outs += [helper.make_tensor_value_info(n, f32, ["B", kv, "T", "H"]) for n in ("present_k", "present_v")]
    model = helper.make_model(helper.make_graph([node], "attention", ins, outs), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(NATIVE_DOMAIN, 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, library(isa)),
                                providers=["CPUExecutionProvider"])


def case(nh: int, kv: int, hd: int, past: list[int], seq: int, capacity: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one call: requests with `past` cached positions each, `seq` new rows, caches of `capacity`."""
    rng = np.random.default_rng(seed)
    b = len(past)
    ang = np.arange(TABLE)[:, None] * (10000.0 ** (-np.arange(hd // 2) / (hd // 2)))[None]
    past_k = rng.standard_normal((b, kv, capacity, hd)).astype(np.float32)
    for i, p in enumerate(past):  # rows past a request's length are stale: nothing may read them
        past_k[i, :, p:] = 1e4
    return {"qkv": rng.standard_normal((b, seq, (nh + 2 * kv) * hd)).astype(np.float32), "past_k": past_k,
            "past_v": rng.standard_normal((b, kv, capacity, hd)).astype(np.float32),
            "seqlens_k": (np.array(past) + seq - 1).astype(np.int32),
            "total_sequence_length": np.array(max(past) + seq, np.int32),
            "cos_cache": np.cos(ang).astype(np.float32), "sin_cache": np.sin(ang).astype(np.float32)}


def reference(x: dict[str, np.ndarray], nh: int, kv: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotate-half rope at each row's position, the new rows written into the caches, causal softmax attention of
    each query head over its kv head's visible positions; in float64."""
    b, seq, width = x["qkv"].shape
    hd = width // (nh + 2 * kv)
    keys, values = x["past_k"].astype(np.float64), x["past_v"].astype(np.float64)
    out = np.zeros((b, seq, nh * hd))

    def rope(v, p):
        c, s, h = x["cos_cache"][p].astype(np.float64), x["sin_cache"][p].astype(np.float64), hd // 2
        return np.concatenate([v[:h] * c - v[h:] * s, v[h:] * c + v[:h] * s])

    for i in range(b):
        first = int(x["seqlens_k"][i]) - seq + 1
        rows = x["qkv"][i].astype(np.float64).reshape(seq, nh + 2 * kv, hd)
        for s in range(seq):
            for g in range(kv):
                keys[i, g, first + s] = rope(rows[s, nh + g], first + s)
                values[i, g, first + s] = rows[s, nh + kv + g]
        for s in range(seq):
            p = first + s
            for h in range(nh):
                g = h // (nh // kv)
                z = keys[i, g, : p + 1] @ rope(rows[s, h], p) * scale
                w = np.exp(z - z.max())
                out[i, s, h * hd : (h + 1) * hd] = (w / w.sum()) @ values[i, g, : p + 1]
    return out, keys, values


def run(session: ort.InferenceSession, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session.run(None, x)


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.abs(got - want).max() <= FLOAT32_ROUNDING * np.abs(want).max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("nh,kv,hd", [(8, 2, 64), (6, 2, 32), (4, 4, 16)])  # 4, 3 and 1 query heads per kv head
@pytest.mark.parametrize("past,seq", [([0, 7, 20, 33], 1), ([9], 5), ([0], 23), ([0, 9], 5)])  # decode, chunk, prefill
def test_attention_equals_the_float64_reference_and_grouped_query_attention(nh, kv, hd, past, seq, threads):
    """(GroupQueryAttention takes several rows of several requests only without a past: not compared there.)"""
    x = case(nh, kv, hd, past, seq, capacity=48)
    scale = 1 / np.sqrt(hd)
    got = run(attention_session("exo", nh, kv, scale, threads), x)
    want = reference(x, nh, kv, scale)
    gqa = run(attention_session("gqa", nh, kv, scale, threads), x) if seq == 1 or len(past) == 1 else want
    for i, name in enumerate(("out", "present_k", "present_v")):
        assert got[i].shape == want[i].shape, name
        valid = [np.s_[r, :, : p + seq] for r, p in enumerate(past)] if i else [np.s_[:]]  # written cache rows
        for rows in valid:
            assert close(got[i][rows], want[i][rows]) and close(got[i][rows], gqa[i][rows]), name


@pytest.mark.parametrize("threads", [1, 2])
# a decode step on the calling thread (below EXO_PARALLEL_MACS), one split over the pool by (request, kv head) where
# each lone call stays on the calling thread (~0.6M multiply-adds, each request under 0.2M), and longer ones
@pytest.mark.parametrize("past", [[3, 0, 9, 5], [3, 0, 40, 17, 29, 8, 16, 31], [300, 280, 310, 290]])
def test_each_request_of_a_batch_gets_its_lone_result_bit_for_bit(past, threads):
    nh, kv, hd = 32, 8, 64  # the 1B shape
    session = attention_session("exo", nh, kv, 0.125, threads)
    x = case(nh, kv, hd, past, 1, capacity=320)
    batch = run(session, x)
    for r in range(len(past)):
        rows = {k: x[k][r : r + 1] for k in ("qkv", "past_k", "past_v", "seqlens_k")}
        lone = run(session, {**x, **rows, "total_sequence_length": np.array(past[r] + 1, np.int32)})
        for got, want in zip(batch, lone):
            assert np.array_equal(got[r : r + 1], want)


@pytest.mark.parametrize("nh,kv,hd", [(32, 8, 64), (6, 2, 32)])
def test_every_build_of_the_library_gives_the_same_bits(nh, kv, hd):
    """Scalar C against this CPU's build (AVX-512 on the development machine: 16 keys at a time, 4 heads' sums at
    once) and AVX2: score tails of every length, keys near the end of the cache (not a whole block of 16 left)."""
    isas = ["scalar", "native"] + (["avx2"] if X86 and "avx2" in open("/proc/cpuinfo").read() else [])
    cases = [([0, 5, 15, 16, 17, 31, 38], 1, 40), ([2, 9], 7, 20), ([45, 46], 1, 47)]
    for past, seq, capacity in cases:
        x = case(nh, kv, hd, past, seq, capacity, seed=5)
        runs = [run(attention_session("exo", nh, kv, 1 / np.sqrt(hd), 1, isa), x) for isa in isas]
        for other in runs[1:]:
            for got, want in zip(other, runs[0]):
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_caches_bound_to_the_inputs_memory_are_extended_in_place_and_others_copied():
    nh, kv, hd = 8, 2, 64
    session = attention_session("exo", nh, kv, 0.125, 1)
    x = case(nh, kv, hd, [4, 9], 1, capacity=16)
    copied = run(session, x)  # present_* are onnxruntime's own arrays: past copied, the new rows added
    want = reference(x, nh, kv, 0.125)
    io = session.io_binding()
    before = {n: x[n].copy() for n in ("past_k", "past_v")}
    for name, arr in x.items():
        if name in ("past_k", "past_v"):
            io.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            io.bind_output(name.replace("past", "present"), "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        else:
            io.bind_cpu_input(name, arr)
    io.bind_output("out")
    session.run_with_iobinding(io)
    for i, name in ((1, "past_k"), (2, "past_v")):
        assert np.array_equal(x[name], copied[i])
        changed = np.nonzero(np.any(x[name] != before[name], axis=(1, 3)))
        assert sorted(zip(*changed)) == [(0, 4), (1, 9)]  # (request, position): one new row each
        for r, p in enumerate([4, 9]):
            assert close(x[name][r, :, p], want[i][r, :, p])


def test_positions_outside_the_cache_or_the_tables_are_refused():
    session = attention_session("exo", 8, 2, 0.125, 1)
    x = case(8, 2, 64, [15], 1, capacity=16)
    with pytest.raises(Exception, match="seqlens_k out of range"):
        run(session, {**x, "seqlens_k": np.array([16], np.int32)})  # past the cache (total says 16)
    with pytest.raises(Exception, match="seqlens_k out of range"):
        run(session, {**x, "seqlens_k": np.array([-1], np.int32)})  # fewer positions than new rows


def test_slices_of_native_weights_run_the_native_attention_and_others_grouped_query_attention(tiny_llama):
    for weights, want in (("native", NATIVE_ATTENTION_OP), ("int4", "GroupQueryAttention"),
                          ("fp32", "GroupQueryAttention")):
        shard = load_shard(resolve_model(str(tiny_llama)), LayerRange.full(5), weights)
        model, _ = build_onnx_compact(SliceSpec("layers", 0, 5), shard, attention_form="gqa")
        ops = [(n.domain, n.op_type) for n in model.graph.node]
        assert ops.count((NATIVE_DOMAIN if want == NATIVE_ATTENTION_OP else MS_DOMAIN, want)) == 5, weights
        assert ("", "Concat") not in ops  # q|k|v reach it packed (one Split of the fused projection)


def test_qwen3s_normed_q_and_k_reach_the_op_packed_again_within_the_native_error(tmp_path):
    """qwen3's per-head q/k norms sit between the projection's Split and the attention: q|k|v are concatenated
    again (a copy of one row per position). Prefill and a decode step stay within the native kernel's error of the
    numpy backend on the same weights (float arithmetic, test_native_form.py's bound)."""
    path = make_tiny_hf(tmp_path / "qwen3", arch="qwen3", n_layers=2, head_dim=32, seed=3)
    shard = load_shard(resolve_model(str(path)), LayerRange.full(2), "native")
    model, _ = build_onnx_compact(SliceSpec("layers", 0, 2), shard, attention_form="gqa")
    made_by = {out: n.op_type for n in model.graph.node for out in n.output}
    ops = [n for n in model.graph.node if n.op_type == NATIVE_ATTENTION_OP]
    assert len(ops) == 2 and all(made_by[n.input[0]] == "Concat" for n in ops)
    rings = [ring(path, None, backend, weights="native") for backend in ("onnx", "numpy")]
    prefill = [r.forward("r", np.array([PROMPT]), logits="all") for r in rings]
    step = [r.forward("r", np.array([[int(prefill[1][0, -1].argmax())]]), logits="all") for r in rings]
    assert 0 < nmse(*prefill) <= NATIVE_VS_FLOAT_NMSE and 0 < nmse(*step) <= NATIVE_VS_FLOAT_NMSE
