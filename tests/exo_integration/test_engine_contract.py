"""RKNPUInferenceEngine against legacy exo's InferenceEngine ABC and exo's own engine tests (skips without exo).

* exo's test_inference_engine.py logic (prefill + one decode step, full shard vs [0, pp] + [pp+1, n-1], the same
  request id, the first engine switching from the full shard to its half). Tolerance: none, np.array_equal,
  on the same backend with float32 hidden states.
* exo's test_dummy_inference_engine.py shape checks.
* The ABC contract: subclass, every abstract method implemented, sample() -> exactly one token, state None.

The model is a tiny random 16-layer llama served as the `llama-3.2-1b` card through --model-dir (no download).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from exo_helpers import FixedProber, fake_shard_downloader, needs_exo
from tiny_models import make_tiny_hf

pytestmark = [needs_exo, pytest.mark.exo]

N = 16
MODEL = "llama-3.2-1b"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_hf(root / MODEL, n_layers=N, hidden=64, vocab=320, sharded=True)
    return root


def make_engine(model_dir, backend="numpy", hidden_dtype="float32", downloader=None, weights="auto", prober=None):
    from exo_rknpu.engine import EngineConfig
    from exo_rknpu.exo.inference_engine import RKNPUInferenceEngine
    from exo_rknpu.exo.options import NodeOptions

    opts = NodeOptions(engine=EngineConfig(backend=backend, hidden_dtype=hidden_dtype, weights=weights), model_dir=model_dir)
    return RKNPUInferenceEngine(downloader, opts, prober)


def shard(start, end, model=MODEL, n=N):
    from exo.inference.shard import Shard

    return Shard(model, start, end, n)


PROMPT = "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n"


def test_is_an_exo_inference_engine(model_dir):
    from exo.inference.inference_engine import InferenceEngine
    from exo_rknpu.exo.inference_engine import RKNPUInferenceEngine

    assert issubclass(RKNPUInferenceEngine, InferenceEngine)
    assert not getattr(RKNPUInferenceEngine, "__abstractmethods__", set())
    for name in ("encode", "decode", "sample", "infer_tensor", "infer_prompt", "ensure_shard", "load_checkpoint"):
        assert inspect.iscoroutinefunction(getattr(RKNPUInferenceEngine, name)), name
    params = inspect.signature(RKNPUInferenceEngine.sample).parameters
    assert params["temp"].default == 0.0 and params["top_p"].default == 1.0  # node.py calls sample(x, temp=...)
    e = make_engine(model_dir)
    assert e.shard is None and e.tokenizer is None and e.session == {} and e.session is not InferenceEngine.session
    e.core.close()


async def test_split_vs_full_like_exos_test_inference_engine(model_dir):
    engine_1, engine_2 = make_engine(model_dir), make_engine(model_dir)
    pp = N // 2
    try:
        resp_full, state = await engine_1.infer_prompt("A", shard(0, N - 1), PROMPT)
        assert state is None
        token_full = await engine_1.sample(resp_full, temp=0.0)
        next_resp_full, _ = await engine_1.infer_tensor("A", shard(0, N - 1), token_full.reshape(1, -1))

        resp1, _ = await engine_1.infer_prompt("B", shard(0, pp), PROMPT)
        resp2, _ = await engine_2.infer_tensor("B", shard(pp + 1, N - 1), resp1)
        tokens2 = await engine_1.sample(resp2, temp=0.0)
        resp3, _ = await engine_1.infer_tensor("B", shard(0, pp), tokens2.reshape(1, -1))
        resp4, _ = await engine_2.infer_tensor("B", shard(pp + 1, N - 1), resp3)

        assert engine_1.core.loads == 2 and engine_1.shard == shard(0, pp)  # switched full -> half
        assert resp_full.shape == resp2.shape and next_resp_full.shape == (1, 1, 320)
        assert np.array_equal(resp_full, resp2)  # exact, as exo asserts
        assert np.array_equal(next_resp_full, resp4)
        assert int(token_full.item()) == int(tokens2.item())
    finally:
        engine_1.core.close()
        engine_2.core.close()


async def test_split_vs_full_mixed_backends_numpy_and_onnx(model_dir):
    # A mixed ring (numpy first half, onnx second half) vs a full numpy run: float32 rounding differs between
    # the two runtimes, so the comparison is allclose (atol 1e-4) and the greedy token must agree.
    # float32 weights: with int8 weights onnxruntime also quantizes activations, which numpy does not
    full_engine, e1 = make_engine(model_dir, weights="fp32"), make_engine(model_dir, weights="fp32")
    e2 = make_engine(model_dir, backend="onnx", weights="fp32")
    try:
        ref, _ = await full_engine.infer_prompt("C", shard(0, N - 1), PROMPT)
        h, _ = await e1.infer_prompt("C", shard(0, 7), PROMPT)
        out, _ = await e2.infer_tensor("C", shard(8, N - 1), h)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
        assert np.argmax(out[0, -1]) == np.argmax(ref[0, -1])
    finally:
        for e in (full_engine, e1, e2):
            e.core.close()


async def test_dummy_style_shapes(model_dir):
    # exo's test_dummy_inference_engine: infer_prompt / infer_tensor return arrays with shape[0] == 1.
    e = make_engine(model_dir)
    try:
        out, _ = await e.infer_prompt("D", shard(0, N - 1), PROMPT)
        assert isinstance(out, np.ndarray) and out.shape[0] == 1 and out.ndim == 3
        tok = await e.sample(out)
        assert tok.shape == (1,) and tok.dtype == np.int64 and tok.size == 1
        out2, _ = await e.infer_tensor("D", shard(0, N - 1), tok.reshape(1, -1))
        assert out2.shape == (1, 1, 320)
        ids = await e.encode(shard(0, N - 1), PROMPT)
        assert ids.ndim == 1 and ids.dtype == np.int64
        assert await e.decode(shard(0, N - 1), ids) == e.tokenizer.decode(ids.tolist())
        assert e.tokenizer.eos_token_id == 2
    finally:
        e.core.close()


async def test_sample_returns_exactly_one_token(model_dir):
    e = make_engine(model_dir)
    try:
        logits = np.zeros((1, 4, 320), np.float32)
        logits[0, -1, 17] = 5.0
        logits[0, 0, 3] = 9.0  # only the last row counts
        t = await e.sample(logits)
        assert t.tolist() == [17] and t.item() == 17 and t.reshape(1, -1).shape == (1, 1)
        hot = await e.sample(logits, temp=0.7, top_p=0.9)
        assert hot.shape == (1,) and 0 <= hot.item() < 320
        with pytest.raises(ValueError, match="logits"):
            await e.sample(np.zeros((2, 3, 4, 5), np.float32))
    finally:
        e.core.close()


async def test_hidden_float16_option(model_dir):
    e = make_engine(model_dir, hidden_dtype="float16")
    try:
        h, state = await e.infer_prompt("E", shard(0, 7), PROMPT)
        assert h.dtype == np.float16 and h.shape[2] == 64 and state is None
    finally:
        e.core.close()


async def test_bad_inputs_fail_the_request_with_clear_errors(model_dir):
    from exo_rknpu.errors import LayerRangeError, TensorContractError, UnknownModelError

    e = make_engine(model_dir)
    try:
        with pytest.raises(TensorContractError, match=r"\(1, seq, 64\)") as ei:
            await e.infer_tensor("F", shard(8, N - 1), np.zeros((1, 2, 576), np.float32))
        assert "layers 0-7" in str(ei.value)
        kind, message = e.take_failure("F")
        assert kind == "error" and "TensorContractError" in message and e.take_failure("F") is None
        with pytest.raises(UnknownModelError, match="no exo-rknpu card"):
            await e.infer_tensor("G", shard(0, 3, model="qwen-2.5-7b", n=28), np.zeros((1, 2), np.int64))
        with pytest.raises(Exception, match="card says 24"):  # legacy exo's wrong layer count for this model
            await e.infer_tensor("G2", shard(0, 3, model="qwen-2.5-0.5b", n=28), np.zeros((1, 2), np.int64))
        with pytest.raises(LayerRangeError, match="outside the model"):
            await e.infer_tensor("H", shard(8, N, n=N), np.zeros((1, 2, 64), np.float32))
        with pytest.raises(Exception, match="card says 16"):
            await e.ensure_shard(shard(0, 3, n=20))
    finally:
        e.core.close()


async def test_downloads_through_exos_shard_downloader(model_dir, tmp_path):
    """Without a local copy the engine asks exo's downloader for its shard (engine class name as exo expects),
    and exo's allow-patterns for that shard select only the files of its layers."""
    from exo.download.hf.hf_helpers import get_allow_patterns

    downloader = fake_shard_downloader(lambda s: model_dir / MODEL)
    e = make_engine(None, downloader=downloader, prober=FixedProber(True))  # the fake downloader stands in for the hub
    try:
        out, _ = await e.infer_tensor("I", shard(8, N - 1), np.zeros((1, 2, 64), np.float32))
        assert out.shape == (1, 2, 320)
        assert downloader.calls == [(shard(8, N - 1), "RKNPUInferenceEngine")]
    finally:
        e.core.close()
    weight_map = json.loads((model_dir / MODEL / "model.safetensors.index.json").read_text())["weight_map"]
    files = {p for p in get_allow_patterns(weight_map, shard(8, N - 1)) if p.endswith(".safetensors")}
    total = len(set(weight_map.values()))
    # file 1 = embedding, 2+i = layer i, last = norm + head (tests/tiny_models.py layout)
    assert files == {f"model-{2 + i:05d}-of-{total:05d}.safetensors" for i in range(8, N)} | {
        f"model-{total:05d}-of-{total:05d}.safetensors"}


async def test_a_model_neither_here_nor_fetchable_fails_at_once_without_asking_the_downloader(tmp_path, monkeypatch):
    from exo_rknpu.errors import ModelUnavailableError
    from exo_rknpu.exo.availability import Prober

    class Offline(Prober):
        def _probe(self, url):
            return False

    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo"))
    downloader = fake_shard_downloader(lambda s: tmp_path)
    e = make_engine(None, downloader=downloader, prober=Offline())
    try:
        with pytest.raises(ModelUnavailableError, match="--model-dir"):
            await e.infer_tensor("J", shard(8, N - 1), np.zeros((1, 2, 64), np.float32))
        assert downloader.calls == []  # no download was started, so none is retried after the client left
    finally:
        e.core.close()
