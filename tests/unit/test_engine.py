"""exo_rknpu.engine.ShardEngine (no exo needed): loading, swapping, caches, dtypes, errors, the worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from exo_rknpu.engine import EngineConfig, ShardEngine, open_runner
from exo_rknpu.errors import BackendUnavailableError, CapacityError, ExoRknpuError, RequestStateError, TensorContractError
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.requests import RequestLimits
from tiny_models import make_tiny_gguf, make_tiny_hf

N_LAYERS = 4
HIDDEN = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", n_layers=N_LAYERS, hidden=HIDDEN, vocab=320)


def make_engine(tiny, **cfg) -> ShardEngine:
    async def source(model_id, layer_range):
        return resolve_model(str(tiny))

    cfg.setdefault("backend", "numpy")
    return ShardEngine(EngineConfig(label=cfg.pop("label", "node-a"), **cfg), source)


@pytest.fixture
def make(tiny):
    """make(**config) -> a ShardEngine on the tiny model, closed when the test ends."""
    made: list[ShardEngine] = []

    def _make(**cfg) -> ShardEngine:
        made.append(make_engine(tiny, **cfg))
        return made[-1]

    yield _make
    for e in made:
        e.close()


def full() -> LayerRange:
    return LayerRange.full(N_LAYERS)


PROMPT = np.array([[5, 17, 42, 99, 7, 3]], dtype=np.int64)


async def split_vs_full(tiny, backend: str, hidden_dtype: str):
    """exo's test_inference_engine logic: prefill + one decode step, full shard vs two halves; the first engine
    switches from the full shard to the first half; the same request id is used across calls."""
    pp = N_LAYERS // 2
    e1, e2 = make_engine(tiny, backend=backend, hidden_dtype=hidden_dtype), make_engine(tiny, backend=backend, hidden_dtype=hidden_dtype)
    try:
        resp_full = await e1.forward("A", "tiny", full(), PROMPT)
        token = np.array([[int(np.argmax(resp_full[0, -1]))]], dtype=np.int64)
        next_full = await e1.forward("A", "tiny", full(), token)

        h = await e1.forward("B", "tiny", LayerRange(0, pp, N_LAYERS), PROMPT)
        resp2 = await e2.forward("B", "tiny", LayerRange(pp, N_LAYERS, N_LAYERS), h)
        h = await e1.forward("B", "tiny", LayerRange(0, pp, N_LAYERS), token)
        next2 = await e2.forward("B", "tiny", LayerRange(pp, N_LAYERS, N_LAYERS), h)
        assert e1.loads == 2  # full, then the first half: the same engine switched shards
        return resp_full, resp2, next_full, next2, h
    finally:
        e1.close()
        e2.close()


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
async def test_split_equals_full_exactly_float32(tiny, backend):
    # Same backend, float32 hidden states on the wire: bit-identical, as exo's own test demands.
    resp_full, resp2, next_full, next2, h = await split_vs_full(tiny, backend, "float32")
    assert resp_full.shape == (1, PROMPT.shape[1], 320) and next_full.shape == (1, 1, 320)
    assert h.dtype == np.float32 and h.shape == (1, 1, HIDDEN)
    np.testing.assert_array_equal(resp_full, resp2)
    np.testing.assert_array_equal(next_full, next2)


async def test_split_vs_full_float16_wire(tiny):
    # float16 hidden states lose precision at the hop: close (stated tolerance), same greedy token.
    resp_full, resp2, next_full, next2, h = await split_vs_full(tiny, "numpy", "float16")
    assert h.dtype == np.float16
    np.testing.assert_allclose(resp2, resp_full, atol=5e-2, rtol=5e-2)
    np.testing.assert_allclose(next2, next_full, atol=5e-2, rtol=5e-2)
    assert np.argmax(resp2[0, -1]) == np.argmax(resp_full[0, -1])
    assert not np.array_equal(resp_full, resp2)  # the option really changed the wire dtype


async def test_loading_a_shard_of_a_gguf_file_parses_its_header_once(tiny, tmp_path, monkeypatch):
    """The config, the tokenizer and the shard's weights come from one parse (loader.ModelHeader, handed down)."""
    from exo_rknpu.model import gguf as gguf_reader

    path = make_tiny_gguf(tmp_path / "tiny.gguf", tiny)
    parses: list = []
    parse = gguf_reader.GGUFFile._parse
    monkeypatch.setattr(gguf_reader.GGUFFile, "_parse", lambda g, c: parses.append(g.path) or parse(g, c))

    async def source(model_id, layer_range):
        return resolve_model(str(path))

    e = ShardEngine(EngineConfig(label="node-a", backend="onnx", backend_options={"cache_dir": tmp_path / "p"}), source)
    try:
        assert (await e.forward("A", "tiny", full(), PROMPT)).shape == (1, PROMPT.shape[1], 320)
        assert parses == [path]
    finally:
        e.close()


async def test_ensure_is_idempotent_under_concurrency(make):
    e = make()
    results = await asyncio.gather(*(e.ensure("tiny", full()) for _ in range(5)))
    assert e.loads == 1 and all(r is results[0] for r in results)
    assert (await e.ensure("tiny", full())) is results[0] and e.loads == 1


async def test_shard_change_releases_old_runner_and_its_caches(make):
    e = make()
    first = await e.ensure("tiny", LayerRange(0, 2, N_LAYERS))
    await e.forward("r1", "tiny", LayerRange(0, 2, N_LAYERS), PROMPT)
    assert "r1" in first.runner.requests
    second = await e.ensure("tiny", LayerRange(2, 4, N_LAYERS))
    assert second is not first and e.current is second
    assert first.runner.runners == {} and len(first.runner.requests) == 0  # closed
    assert second.runner.layer_range == LayerRange(2, 4, N_LAYERS)


async def test_live_requests_are_never_evicted_and_ended_ones_never_restart(make):
    e = make(limits=RequestLimits(max_requests=2))
    for rid in ("r1", "r2"):
        await e.forward(rid, "tiny", full(), PROMPT)
    with pytest.raises(CapacityError, match="--max-requests 2"):
        await e.forward("r3", "tiny", full(), PROMPT)
    reqs = e.current.runner.requests
    assert reqs.ids() == ["r1", "r2"] and e.live_requests() == 2
    e.release("r1", "finished")
    await e.forward("r3", "tiny", full(), PROMPT)  # the released slot is free again
    with pytest.raises(RequestStateError, match=r"request r1 has ended on this node \(finished\)"):
        await e.forward("r1", "tiny", full(), np.array([[3]]))
    with pytest.raises(RequestStateError, match="no KV cache for request r9"):
        await e.forward("r9", "tiny", full(), np.array([[3]]), start=False)


async def test_a_shard_change_ends_every_live_request_with_the_reason(make):
    e = make()
    await e.forward("r1", "tiny", full(), PROMPT)
    await e.ensure("tiny", LayerRange(0, 2, N_LAYERS))
    with pytest.raises(RequestStateError, match="shard changed"):
        await e.forward("r1", "tiny", LayerRange(0, 2, N_LAYERS), np.array([[3]]))


async def test_idle_requests_are_released_when_a_new_one_needs_room(make):
    e = make(limits=RequestLimits(max_requests=1, idle_seconds=0.05))
    await e.forward("old", "tiny", full(), PROMPT)
    await asyncio.sleep(0.1)
    await e.forward("new", "tiny", full(), PROMPT)  # admitted: "old" was abandoned
    with pytest.raises(RequestStateError, match="idle for more than 0.05 s"):
        await e.forward("old", "tiny", full(), np.array([[3]]))


async def test_output_dtypes(tiny):
    e32, e16 = make_engine(tiny), make_engine(tiny, hidden_dtype="float16")
    try:
        lr = LayerRange(0, 2, N_LAYERS)
        out32 = await e32.forward("r", "tiny", lr, PROMPT)
        out16 = await e16.forward("r", "tiny", lr, PROMPT)
        assert out32.dtype == np.float32 and out16.dtype == np.float16
        assert out16.flags.c_contiguous and out16.shape == (1, PROMPT.shape[1], HIDDEN)
        logits = await e16.forward("r2", "tiny", full(), PROMPT)  # last shard: logits stay float32
        assert logits.dtype == np.float32
    finally:
        e32.close()
        e16.close()


async def test_read_only_float16_input_is_accepted(make):
    e = make()
    h = np.frombuffer(np.ones((1, 3, HIDDEN), np.float16).tobytes(), np.float16).reshape(1, 3, HIDDEN)
    assert not h.flags.writeable  # what exo's gRPC server hands over
    out = await e.forward("r", "tiny", LayerRange(2, 4, N_LAYERS), h)
    assert out.shape == (1, 3, 320) and np.isfinite(out).all()


async def test_wrong_width_says_who_and_what(make):
    e = make(label="rk-2")
    with pytest.raises(TensorContractError) as ei:
        await e.forward("r", "tiny", LayerRange(2, 4, N_LAYERS), np.zeros((1, 3, 576), np.float32))
    msg = str(ei.value)
    assert "[rk-2]" in msg and "layers 2-3" in msg and f"(1, seq, {HIDDEN})" in msg
    assert "layers 0-1" in msg  # which node sent it
    # The engine still works after the bad input.
    out = await e.forward("r", "tiny", LayerRange(2, 4, N_LAYERS), np.zeros((1, 3, HIDDEN), np.float32))
    assert out.shape == (1, 3, 320)


@pytest.mark.parametrize("bad", [np.zeros((1, 3, HIDDEN), np.float64), np.zeros((1, 3), np.int64)])
async def test_wrong_dtype_or_kind_is_rejected(make, bad):
    e = make()
    with pytest.raises(TensorContractError, match="layers 2-3"):
        await e.forward("r", "tiny", LayerRange(2, 4, N_LAYERS), bad)


async def test_first_shard_rejects_hidden_states(make):
    e = make()
    with pytest.raises(TensorContractError, match="token ids"):
        await e.forward("r", "tiny", LayerRange(0, 2, N_LAYERS), np.zeros((1, 3, HIDDEN), np.float32))


async def test_card_layer_count_mismatch(make):
    e = make()
    with pytest.raises(ExoRknpuError, match="has 4"):
        await e.ensure("tiny", LayerRange(0, 3, 6))
    assert e.current is None


async def test_npu_without_slices_names_the_compile_command(make, tiny):
    e = make(backend="npu")
    with pytest.raises(ExoRknpuError) as ei:
        await e.ensure("tiny", LayerRange(0, 2, N_LAYERS))
    msg = str(ei.value)
    assert f"exo-rknpu compile --model {tiny} --layers 0-1" in msg, msg


async def test_blocking_work_runs_on_one_worker_thread_and_the_loop_stays_responsive(tiny):
    threads: set[str] = set()

    class SlowRunner:
        batches = False  # one call at a time (the engine says why once, at load)
        unbatched_reason = "this test's runner runs one call at a time"

        def __init__(self, inner):
            self.inner = inner
            self.requests = inner.requests

        def forward(self, request_id, x, logits="all", start=None):
            threads.add(threading.current_thread().name)
            time.sleep(0.4)
            return self.inner.forward(request_id, x, logits, start)

        def drop(self, request_id):
            self.inner.drop(request_id)

        def close(self):
            threads.add(threading.current_thread().name)
            self.inner.close()

    async def source(model_id, lr):
        return resolve_model(str(tiny))

    def factory(header, lr, cfg):
        threads.add(threading.current_thread().name)
        return SlowRunner(open_runner(header, lr, cfg))

    e = ShardEngine(EngineConfig(backend="numpy"), source, runner_factory=factory)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        await asyncio.gather(e.forward("a", "tiny", full(), PROMPT), e.forward("b", "tiny", full(), PROMPT))
        await e.ensure("tiny", LayerRange(0, 2, N_LAYERS))  # closes the old runner on the worker too
    finally:
        t.cancel()
        e.close()
    assert ticks >= 20  # ~0.8 s of forwards; the loop kept running meanwhile
    assert threads and all(name.startswith("exo-rknpu-engine") for name in threads)
    assert len(threads) == 1


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        EngineConfig(hidden_dtype="bfloat16")
    with pytest.raises(ValueError):
        EngineConfig(logits="some")


async def test_closed_engine_refuses_work(tiny):
    e = make_engine(tiny)
    e.close()
    with pytest.raises(RuntimeError, match="closed"):
        await e.ensure("tiny", full())


def test_unknown_backend_is_a_clear_error(tiny):
    async def go():
        e = make_engine(tiny, backend="gpu9000")
        try:
            await e.ensure("tiny", full())
        finally:
            e.close()

    with pytest.raises(BackendUnavailableError, match="known backends"):
        asyncio.run(go())


@pytest.mark.slow
async def test_smollm2_split_equals_full_exactly():
    """The bundled model, split at exo's pp = n // 2 (inclusive ends 0-15 / 16-29), numpy backend, float32 wire."""
    src = resolve_model("smollm2-135m")

    async def source(model_id, lr):
        return src

    n, pp = 30, 15
    e1 = ShardEngine(EngineConfig(backend="numpy", logits="last", weights="fp32"), source)  # " Paris" on every CPU
    e2 = ShardEngine(EngineConfig(backend="numpy", logits="last", weights="fp32"), source)
    try:
        loaded = await e1.ensure("smollm2-135m", LayerRange.full(n))
        ids = np.array([loaded.tokenizer.encode("The capital of France is")], dtype=np.int64)
        ref = await e1.forward("A", "smollm2-135m", LayerRange.full(n), ids)
        tok = np.array([[int(np.argmax(ref[0, -1]))]], dtype=np.int64)
        assert loaded.tokenizer.decode(tok[0].tolist()) == " Paris"
        ref_next = await e1.forward("A", "smollm2-135m", LayerRange.full(n), tok)

        first, second = LayerRange(0, pp + 1, n), LayerRange(pp + 1, n, n)
        out = await e2.forward("B", "smollm2-135m", second, await e1.forward("B", "smollm2-135m", first, ids))
        out_next = await e2.forward("B", "smollm2-135m", second, await e1.forward("B", "smollm2-135m", first, tok))
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(out_next, ref_next)
    finally:
        e1.close()
        e2.close()


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
async def test_concurrent_decode_steps_run_as_one_batch_and_give_each_request_its_lone_tokens(make, backend):
    """Requests decoding at the same time on one engine: their one-token steps that wait for the worker together
    run as one batch (fewer head calls than steps), and every request gets the greedy tokens it gets alone."""
    prompts = {"a": [5, 17, 42], "b": [7, 99, 3, 250, 11], "c": [12]}

    async def decode(e, rid: str, first: np.ndarray, n: int) -> list[int]:
        tokens = [int(np.argmax(first[0, -1]))]
        for _ in range(n):
            logits = await e.forward(rid, "tiny", full(), np.array([[tokens[-1]]]))
            tokens.append(int(np.argmax(logits[0, -1])))
        return tokens

    alone, together = make(backend=backend, weights="fp32"), make(backend=backend, weights="fp32")
    want = {rid: await decode(alone, rid, await alone.forward(rid, "tiny", full(), np.array([p])), 8)
            for rid, p in prompts.items()}
    firsts = {rid: await together.forward(rid, "tiny", full(), np.array([p])) for rid, p in prompts.items()}
    got = await asyncio.gather(*(decode(together, rid, firsts[rid], 8) for rid in prompts))
    assert dict(zip(prompts, got)) == want
    steps = 8 * len(prompts)
    # both ran the same prefills; alone made one head call per decode step, together fewer (steps shared calls)
    extra_alone = alone.current.runner.stats.calls["head"] - together.current.runner.stats.calls["head"]
    assert extra_alone > 0 and steps - extra_alone < steps
