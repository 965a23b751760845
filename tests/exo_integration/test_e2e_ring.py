"""Two `exo-rknpu node` processes on 127.0.0.1 form a legacy exo ring (manual discovery, no broadcast, no TUI)
and answer /v1/chat/completions on smollm2-135m. The two nodes use different backends (numpy, onnx).

Skips without exo. Needs the bundled smollm2-135m (fetched once into the exo-rknpu cache).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from exo_helpers import FP32, needs_exo
from tiny_models import make_tiny_hf

pytestmark = [needs_exo, pytest.mark.exo, pytest.mark.slow]

QUESTION = "What is the capital of France?"
REQUEST_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ring:
    """Two nodes; node "a" reports more memory, so it gets the first layers (exo sorts by memory, descending)."""

    def __init__(self, tmp: Path, nodes: dict[str, dict]) -> None:
        self.tmp, self.nodes, self.procs, self.logs = tmp, nodes, {}, {}
        for spec in nodes.values():
            spec["grpc"], spec["api"] = free_port(), free_port()
        peers = {nid: {"address": "127.0.0.1", "port": s["grpc"],
                       "device_capabilities": {"model": "?", "chip": "?", "memory": 1, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}
                 for nid, s in nodes.items()}
        self.config = tmp / "ring.json"
        self.config.write_text(json.dumps({"peers": peers}))

    def start(self) -> "Ring":
        for nid in self.nodes:
            self.spawn(nid)
        self.wait_for_topology()
        return self

    def spawn(self, nid: str) -> None:
        """Start node `nid` (again: same ports, its log appended to)."""
        s = self.nodes[nid]
        env = dict(os.environ, EXO_HOME=str(self.tmp / "exo-home"), PYTHONUNBUFFERED="1")
        host = s.get("api_host", "127.0.0.1")  # None: the node's default
        key = ["--api-key", s["api_key"]] if s.get("api_key") else []
        cmd = [sys.executable, "-m", "exo_rknpu.cli.main", "node", *(["--api-host", host] if host else []), *key,
               "--backend", s["backend"], "--memory-mb", str(s["memory"]), *s.get("extra", []), "--",
               "--node-id", nid, "--node-host", "127.0.0.1", "--node-port", str(s["grpc"]),
               "--discovery-module", "manual", "--discovery-config-path", str(self.config),
               "--chatgpt-api-port", str(s["api"]), "--disable-tui", *s.get("exo_extra", [])]
        self.logs[nid] = self.tmp / f"{nid}.log"
        self.procs[nid] = subprocess.Popen(cmd, stdout=open(self.logs[nid], "a"), stderr=subprocess.STDOUT, env=env)

    def restart(self, nid: str) -> None:
        self.spawn(nid)
        self.wait_for_topology()

    def log(self, nid: str) -> str:
        return self.logs[nid].read_text(errors="replace")

    def headers(self, nid: str) -> dict[str, str]:
        """What a client of node `nid`'s API sends (its API key, if the node was given one)."""
        key = self.nodes[nid].get("api_key")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def url(self, nid: str, path: str) -> str:
        return f"http://127.0.0.1:{self.nodes[nid]['api']}{path}"

    def wait_for_topology(self, timeout: float = 90) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for nid, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"node {nid} exited ({p.returncode}):\n{self.log(nid)[-3000:]}")
            try:
                topo = [get_json(self.url(nid, "/v1/topology"), self.headers(nid)) for nid in self.nodes]
                if all(len(t.get("nodes", {})) == len(self.nodes) for t in topo):
                    return topo[0]
            except (OSError, ValueError):
                pass
            time.sleep(1)
        raise AssertionError("the ring did not form:\n" + "\n".join(self.log(n)[-2000:] for n in self.nodes))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return json.loads(r.read())


def chat(url: str, stream: bool, model: str = "smollm2-135m") -> tuple[int, object]:
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": QUESTION}]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    if not stream:
        return status, json.loads(raw)
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", raw[-500:]  # OpenAI's end-of-stream marker
    chunks = [json.loads(e) for e in events[:-1]]
    return status, chunks


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
    assert "exo-rknpu, numpy" in topo["node-a"]["model"] and "exo-rknpu, onnx" in topo["node-b"]["model"]


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
