"""Tests of the exo adapter. Those that need legacy exo use the `exo` fixture / marker and skip without it."""

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

from exo_rknpu.exo import exo_importable
from exo_rknpu.exo.availability import Prober

EXO_OK, EXO_WHY = exo_importable()
needs_exo = pytest.mark.skipif(not EXO_OK, reason=EXO_WHY or "legacy exo is not importable")
# `exo-rknpu node` options of a ring whose answers a test asserts exactly: float32 weights give the model's own
# answer on every CPU (compact weights with int8 activations round differently per instruction set)
FP32 = ["--weights", "fp32"]
QUESTION = "What is the capital of France?"
REQUEST_TIMEOUT = 300
# what the peers file says about each node; exo replaces it with what the node reports once it is reached
PLACEHOLDER = {"model": "?", "chip": "?", "memory": 1, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}


def fake_shard_downloader(fetch):
    """An exo ShardDownloader (imports exo) whose ensure_shard records (shard, engine class name) in `.calls` and
    returns fetch(shard): a stand-in for exo's Hugging Face downloader."""
    from exo.download.shard_download import ShardDownloader

    class FakeShardDownloader(ShardDownloader):
        def __init__(self) -> None:
            self.calls: list = []

        async def ensure_shard(self, shard, inference_engine_name):
            self.calls.append((shard, inference_engine_name))
            return fetch(shard)

        @property
        def on_progress(self):
            raise NotImplementedError

        async def get_shard_download_status(self, inference_engine_name):
            if False:
                yield

    return FakeShardDownloader()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ring:
    """Nodes on 127.0.0.1 with manual discovery (a peers file). The node that reports the most memory gets the
    first layers (exo sorts by memory, descending). A node's spec: "memory" (MB it reports), and
    * "engine": "rknpu" (default; "backend", optional "extra" options of `exo-rknpu node`, "api_host", "api_key"),
      "tinygrad" (`exo-rknpu node --engine tinygrad`), or "plain-tinygrad" (stock exo unpatched, its API bound to
      127.0.0.1 by plain_stock_node.py; it reports its own memory, "memory" is ignored);
    * optional "exo_extra": more of exo's own arguments.
    `env`: the nodes' environment (default: this one, with EXO_HOME in `tmp`)."""

    def __init__(self, tmp: Path, nodes: dict[str, dict], env: dict[str, str] | None = None) -> None:
        self.tmp, self.nodes, self.procs, self.logs = tmp, nodes, {}, {}
        self.env = env or dict(os.environ, EXO_HOME=str(tmp / "exo-home"), PYTHONUNBUFFERED="1")
        for spec in nodes.values():
            spec["grpc"], spec["api"] = free_port(), free_port()
        peers = {nid: {"address": "127.0.0.1", "port": s["grpc"], "device_capabilities": PLACEHOLDER}
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
        exo_args = ["--node-id", nid, "--node-host", "127.0.0.1", "--node-port", str(s["grpc"]),
                    "--discovery-module", "manual", "--discovery-config-path", str(self.config),
                    "--chatgpt-api-port", str(s["api"]), "--disable-tui", *s.get("exo_extra", [])]
        engine = s.get("engine", "rknpu")
        host = s.get("api_host", "127.0.0.1")  # None: the node's default
        key = ["--api-key", s["api_key"]] if s.get("api_key") else []
        node = [sys.executable, "-m", "exo_rknpu.cli.main", "node", *(["--api-host", host] if host else []), *key,
                "--memory-mb", str(s.get("memory", 1000))]
        if engine == "rknpu":
            cmd = [*node, "--backend", s["backend"], *s.get("extra", []), "--", *exo_args]
        elif engine == "tinygrad":
            cmd = [*node, "--engine", "tinygrad", "--", *exo_args]
        else:
            assert engine == "plain-tinygrad", engine
            cmd = [sys.executable, str(Path(__file__).with_name("plain_stock_node.py")), *exo_args,
                   "--inference-engine", "tinygrad"]
        self.logs[nid] = self.tmp / f"{nid}.log"
        self.procs[nid] = subprocess.Popen(cmd, stdout=open(self.logs[nid], "a"), stderr=subprocess.STDOUT,
                                           env=self.env)

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
        """Wait until every node's topology holds every node with the capabilities that node reports (not the
        peers file's placeholders: until then nodes would partition differently); the first node's topology."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for nid, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"node {nid} exited ({p.returncode}):\n{self.log(nid)[-3000:]}")
            try:
                topo = [get_json(self.url(nid, "/v1/topology"), self.headers(nid)) for nid in self.nodes]
                if all(len(t.get("nodes", {})) == len(self.nodes) for t in topo) and all(
                        t["nodes"] == topo[0]["nodes"] for t in topo) and not any(
                        caps["model"] == PLACEHOLDER["model"] for caps in topo[0]["nodes"].values()):
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


def chat(url: str, stream: bool, model: str = "smollm2-135m", question: str = QUESTION) -> tuple[int, object]:
    """POST a chat completion: (status, body) or, streaming, (status, the chunks before [DONE])."""
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": question}]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, json.loads(raw)
        except ValueError:  # stock exo's aiohttp answers an unhandled exception with plain text
            return e.code, raw.decode(errors="replace")
    if not stream:
        return status, json.loads(raw)
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", raw[-500:]  # OpenAI's end-of-stream marker
    chunks = [json.loads(e) for e in events[:-1]]
    return status, chunks


class FixedProber(Prober):
    """A source prober with a fixed answer (a test's stand-in hub is "reachable"; an offline node's is not)."""

    def __init__(self, online: bool) -> None:
        super().__init__()
        self.online, self.asked = online, []

    def _probe(self, url: str) -> bool:
        self.asked.append(url)
        return self.online


def write_unsupported_model(folder: Path) -> Path:
    """A Hugging Face folder whose architecture exo-rknpu does not support (gemma): planning it fails."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 100,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 128}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder
