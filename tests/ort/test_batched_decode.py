"""Batched decode across requests (issue 19): one step of several live requests runs as one batch through every
slice, each request with its own position, mask and KV cache, and each gets exactly what its lone step gives."""

from __future__ import annotations

import numpy as np
import pytest

from exo_rknpu.errors import CapacityError, RequestStateError, TensorContractError, UsageError
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.runtime.requests import RequestLimits
from helpers import SMALL_BUCKETS

# different lengths: the requests sit at different positions and, past 16, in different context buckets
PROMPTS = [[5, 17, 42], [7, 99, 3, 250, 11, 64, 8, 31, 2, 9, 14, 15, 16, 17], [12]]


def _shards(model, backend: str, split: str | None = None, weights: str = "fp32"):
    src = resolve_model(str(model))
    ranges = [LayerRange(0, 2, 5), LayerRange(2, 5, 5)] if split else [LayerRange.full(5)]
    return [open_shard(src, r, backend, SMALL_BUCKETS, weights=weights) for r in ranges]


def _step(shards, calls, batched: bool):
    """One decode step of every (request id, token) in `calls` through the shards, batched or one at a time."""
    xs = [(rid, np.array([[tok]])) for rid, tok in calls]
    for shard in shards:
        outs = shard.forward_batch(xs) if batched else [shard.forward(rid, x, start=False) for rid, x in xs]
        xs = [(rid, out) for (rid, _), out in zip(xs, outs)]
    return [out for _, out in xs]


@pytest.mark.parametrize("backend,split", [("onnx", None), ("onnx", "0-1,2-4"), ("numpy", None)])
def test_each_request_of_a_batch_gets_its_lone_greedy_tokens(tiny_llama, backend, split):
    lone, batch = _shards(tiny_llama, backend, split), _shards(tiny_llama, backend, split)
    tokens = {}
    for i, p in enumerate(PROMPTS):  # prefill alone (prompts of any length), the same in both
        for shards in (lone, batch):
            x = np.array([p])
            for shard in shards:
                x = shard.forward(f"r{i}", x)
            tokens[i] = int(x[0, -1].argmax())
    want, got = {i: [t] for i, t in tokens.items()}, {i: [t] for i, t in tokens.items()}
    for _ in range(12):  # the second request crosses from context bucket 16 to 32 on the way
        for shards, seqs, batched in ((lone, want, False), (batch, got, True)):
            logits = _step(shards, [(f"r{i}", s[-1]) for i, s in seqs.items()], batched)
            for i, lg in zip(seqs, logits):
                seqs[i].append(int(lg[0, -1].argmax()))
    assert got == want
    # really batched: one head call per step for all three requests, where the lone steps take three
    assert lone[-1].stats.calls["head"] - batch[-1].stats.calls["head"] == (len(PROMPTS) - 1) * 12
    assert [batch[0].requests.get(f"r{i}").pos for i in range(3)] == [len(p) + 12 for p in PROMPTS]


def test_a_batch_with_a_request_that_is_not_live_moves_no_request(tiny_llama):
    (shard,) = _shards(tiny_llama, "onnx")
    shard.forward("a", np.array([[5, 17, 42]]))
    with pytest.raises(RequestStateError):
        shard.forward_batch([("a", np.array([[3]])), ("never-started", np.array([[4]]))])
    with pytest.raises(TensorContractError, match="twice"):
        shard.forward_batch([("a", np.array([[3]])), ("a", np.array([[4]]))])
    with pytest.raises(TensorContractError, match="exactly one token"):
        shard.forward_batch([("a", np.array([[3, 4]])), ("b", np.array([[4]]))])
    assert shard.requests.get("a").pos == 3


def test_a_batch_that_fails_midway_moves_no_request_and_a_retry_gives_the_lone_answers(tiny_llama):
    (lone,), (batch,) = _shards(tiny_llama, "onnx"), _shards(tiny_llama, "onnx")
    for shard in (lone, batch):
        for i, p in enumerate(PROMPTS):
            shard.forward(f"r{i}", np.array([p]))

    def fail(spec, inputs, outputs):
        if spec.kind == "layers":  # after the first layer slice has written its caches' new rows
            raise RuntimeError("device lost")

    batch.on_slice = fail
    calls = [(f"r{i}", np.array([[i + 3]])) for i in range(len(PROMPTS))]
    with pytest.raises(RuntimeError, match="device lost"):
        batch.forward_batch(calls)
    assert [batch.requests.get(f"r{i}").pos for i in range(3)] == [len(p) for p in PROMPTS]
    batch.on_slice = None
    got = batch.forward_batch(calls)
    want = [lone.forward(rid, x, start=False) for rid, x in calls]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert [batch.requests.get(f"r{i}").pos for i in range(3)] == [len(p) + 1 for p in PROMPTS]


@pytest.mark.parametrize("backend", ["onnx", "numpy"])
def test_requests_keep_their_answers_when_others_end_and_batches_take_any_subset(tiny_llama, backend):
    """The requests' caches share one pool (a slot each, consecutive slots read in place): a request that ends in
    the middle hands its slot to the last one, and a batch of requests in slots that are not consecutive is read
    through a gathered copy; every request still gets exactly its lone greedy tokens."""
    (lone,), (batch,) = _shards(tiny_llama, backend), _shards(tiny_llama, backend)
    prompts = PROMPTS + [[8, 8, 9], [300, 2]]
    want, got = {}, {}
    for shard, seqs in ((lone, want), (batch, got)):
        for i, p in enumerate(prompts):
            seqs[i] = [int(shard.forward(f"r{i}", np.array([p]))[0, -1].argmax())]

    def step(which: list[int]) -> None:
        for i in which:
            want[i].append(int(lone.forward(f"r{i}", np.array([[want[i][-1]]]), start=False)[0, -1].argmax()))
        outs = batch.forward_batch([(f"r{i}", np.array([[got[i][-1]]])) for i in which])
        for i, out in zip(which, outs):
            got[i].append(int(out[0, -1].argmax()))

    step([0, 1, 2, 3, 4])
    batch.drop("r1")  # the last request moves into r1's slot
    lone.drop("r1")
    assert sorted(batch.requests.get(f"r{i}").slot for i in (0, 2, 3, 4)) == [0, 1, 2, 3]
    step([4, 2, 0, 3])  # every live request, in any order
    step([0, 3])  # slots 0 and 2: not consecutive
    step([3, 4, 2])
    del want[1], got[1]
    assert got == want
    for i in (0, 2, 3, 4):
        batch.drop(f"r{i}")
    # the last request's end frees the pool: a growing one's buffers, a reserved one's pages (its address space stays)
    assert batch.pool.nbytes == 0 and (batch.pool.reserved_bytes == 0) == (not batch.pool.reserved)


def test_two_requests_at_float32_activation_weights_get_their_lone_outputs_bit_for_bit(tiny_llama):
    """At `auto` (4-bit blocks times float32 activations) a batch of two runs as one call per row on the onnx
    backend (backends/ort.py ROWS_APART: onnxruntime's two-row kernel costs more than two one-row calls, and sums
    in another order): each request's hidden states and logits are exactly its lone step's, bit for bit."""
    lone, batch = _shards(tiny_llama, "onnx", "0-1,2-4", "auto"), _shards(tiny_llama, "onnx", "0-1,2-4", "auto")
    for shards in (lone, batch):
        for i, p in enumerate(PROMPTS):
            x = np.array([p])
            for shard in shards:
                x = shard.forward(f"r{i}", x)
    xs = [("r0", np.array([[3]])), ("r1", np.array([[9]]))]
    for s_lone, s_batch in zip(lone, batch):  # each shard fed the same inputs: its own outputs are compared
        got = s_batch.forward_batch(xs)
        want = [s_lone.forward(rid, x, start=False) for rid, x in xs]
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        xs = [(rid, out) for (rid, _), out in zip(xs, got)]
    assert lone[-1].stats.calls["head"] - batch[-1].stats.calls["head"] == 1  # the shard ran one batched step


@pytest.mark.parametrize("backend,options,reserved", [
    ("onnx", {}, True),  # the gqa form: attention over each request's written positions
    ("onnx", {"fused_attention": False}, False),  # the split form attends over the whole capacity
    ("numpy", {}, False),  # so does numpy's
])
def test_the_pool_is_reserved_up_front_where_attention_reads_only_the_written_positions(
        tiny_llama, backend, options, reserved):
    """Where every attention slice reads only what its requests wrote, the shard's pool maps as many slots as
    admission admits requests (here the KV budget holds three at the largest context, 64 positions), each at that
    context, and never grows or moves while they decode; elsewhere it starts small and grows. Each request gets its
    lone greedy tokens either way."""
    src, full = resolve_model(str(tiny_llama)), LayerRange.full(5)
    one = open_shard(src, full, backend, SMALL_BUCKETS, weights="fp32").request_reserve_bytes
    limits = RequestLimits(max_requests=8, max_bytes=3 * one + one // 2)
    batch = open_shard(src, full, backend, SMALL_BUCKETS, weights="fp32", limits=limits, backend_options=options)
    lone = open_shard(src, full, backend, SMALL_BUCKETS, weights="fp32", backend_options=options)
    want, got = {}, {}
    for shard, seqs in ((lone, want), (batch, got)):
        for i, p in enumerate(PROMPTS):
            seqs[i] = [int(shard.forward(f"r{i}", np.array([p]))[0, -1].argmax())]
    with pytest.raises(CapacityError):
        batch.forward("r3", np.array([[1]]))
    pool = batch.pool
    assert (pool.slots, pool.capacity) == ((3, 64) if reserved else (4, 32))
    buffers = [a.ctypes.data for a in (*pool.keys, *pool.values)]
    for _ in range(40):  # the longest request reaches 54 positions
        for i in want:
            want[i].append(int(lone.forward(f"r{i}", np.array([[want[i][-1]]]), start=False)[0, -1].argmax()))
        outs = batch.forward_batch([(f"r{i}", np.array([[got[i][-1]]])) for i in got])
        for i, out in zip(got, outs):
            got[i].append(int(out[0, -1].argmax()))
    assert got == want
    assert ([a.ctypes.data for a in (*pool.keys, *pool.values)] == buffers) == reserved  # never re-allocated
    assert pool.capacity == 64


def test_a_kv_budget_the_os_cannot_map_is_refused_when_the_shard_opens(tiny_llama):
    """The reserved pool maps its slots when the shard opens: a budget past any address space (here 2^60 bytes for
    2^40 requests) is a one-line error then, not a failure at some later request."""
    limits = RequestLimits(max_requests=1 << 40, max_bytes=1 << 60)
    with pytest.raises(UsageError, match="cannot reserve .* of address space .* lower --max-kv-mb"):
        open_shard(resolve_model(str(tiny_llama)), LayerRange.full(5), "onnx", SMALL_BUCKETS, weights="fp32",
                   limits=limits)
