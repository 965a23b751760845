"""Two `exo-rknpu node` processes on 127.0.0.1 form a legacy exo ring (manual discovery, no broadcast, no TUI)
and answer /v1/chat/completions on smollm2-135m. The two nodes use different backends (numpy, onnx).

Skips without exo. Needs the bundled smollm2-135m (fetched once into the exo-rknpu cache).
"""

from __future__ import annotations

import time

import pytest

from exo_helpers import FP32, Ring, chat, get_json, needs_exo
from tiny_models import make_tiny_hf

pytestmark = [needs_exo, pytest.mark.exo, pytest.mark.slow]

@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    from exo_rknpu.model.zoo import resolve_model

    resolve_model("smollm2-135m")  # fetch once, before two processes race for it
    r = Ring(tmp_path_factory.mktemp("ring"), {
        # float32 weights: the answer asserted below is the model's own, on every CPU (see FP32 in exo_helpers)
        "node-a": {"backend": "numpy", "memory": 3000, "extra": FP32},
        "node-b": {"backend": "onnx", "memory": 2000, "extra": FP32},
    })
    try:
        yield r.start()
    finally:
        r.stop()


def test_topology_reports_each_node(ring):
    topo = get_json(ring.url("node-a", "/v1/topology"))["nodes"]
    assert topo["node-a"]["memory"] == 3000 and topo["node-b"]["memory"] == 2000
    assert "(exo-rknpu, rknpu/numpy; serves " in topo["node-a"]["model"] and "(exo-rknpu, rknpu/onnx; serves " in topo["node-b"]["model"]


def test_chat_completion_non_streaming(ring):
    t = time.perf_counter()
    status, body = chat(ring.url("node-a", "/v1/chat/completions"), stream=False)
    first = time.perf_counter() - t
    assert status == 200, body
    text = body["choices"][0]["message"]["content"]
    assert "Paris" in text, text
    assert body["choices"][0]["finish_reason"] == "stop"
    t = time.perf_counter()
    status, body2 = chat(ring.url("node-a", "/v1/chat/completions"), stream=False)
    warm = time.perf_counter() - t
    assert body2["choices"][0]["message"]["content"] == text  # greedy: the same answer again
    print(f"\nnon-streaming: first request {first:.1f}s (loads shards), warm {warm:.1f}s, "
          f"{body['usage']['completion_tokens']} tokens: {text!r}")
    # Each node loaded its own half: node-a the first layers (numpy), node-b the last (onnx).
    assert "Error" not in ring.log("node-a") and "Error" not in ring.log("node-b")


def test_chat_completion_streaming_on_the_other_node(ring):
    status, chunks = chat(ring.url("node-b", "/v1/chat/completions"), stream=True)
    assert status == 200
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert len(chunks) > 2 and "Paris" in text, text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_unknown_model_is_rejected(ring):
    status, body = chat(ring.url("node-a", "/v1/chat/completions"), stream=False, model="no-such-model")
    assert status == 400 and "no card" in body["detail"]


def test_api_binds_only_to_api_host(ring):
    psutil = pytest.importorskip("psutil")
    pid = ring.procs["node-a"].pid
    listening = {c.laddr for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    api = [addr for addr in listening if addr.port == ring.nodes["node-a"]["api"]]
    assert api and all(addr.ip == "127.0.0.1" for addr in api), listening


def test_wrong_hidden_width_fails_the_request_quickly(tmp_path):
    """node-b serves a different model under the same id (hidden 64, not 576): the request fails with a clear
    error in node-b's log and an HTTP 500 from node-a's API, instead of waiting out exo's 900 s timeout."""
    from exo_rknpu.model.zoo import resolve_model

    resolve_model("smollm2-135m")
    make_tiny_hf(tmp_path / "wrong" / "smollm2-135m", n_layers=30, hidden=64, vocab=320)
    r = Ring(tmp_path, {
        "node-a": {"backend": "numpy", "memory": 3000},
        "node-b": {"backend": "numpy", "memory": 2000, "extra": ["--model-dir", str(tmp_path / "wrong")]},
    })
    try:
        r.start()
        t = time.perf_counter()
        status, body = chat(r.url("node-a", "/v1/chat/completions"), stream=False)
        elapsed = time.perf_counter() - t
        assert status == 500, body
        assert "node node-b" in body["detail"] and "(1, seq, 64)" in body["detail"] and "576" in body["detail"]
        assert elapsed < 120
        log_b = r.log("node-b")
        assert "TensorContractError" in log_b and "layers 0-" in log_b
    finally:
        r.stop()
