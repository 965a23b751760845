"""exo's UDP discovery, for real, in a private network of namespaces (netns_lab): no peers file, no loopback tricks.

Each node runs in its own network namespace with its own address (198.18.0.1x/24 on eth0) and exo's defaults for
discovery (UDP broadcast, port 5678) and the API (port 52415); the namespaces are joined by a bridge that only the
test can reach. Specification:
- two exo-rknpu nodes find each other, agree on one topology and on exo's memory-weighted partition, and answer a
  chat completion correctly through either node's API;
- an exo-rknpu node beside a plain stock exo node (exo's dummy engine): both see each other with the capabilities
  each reports, no engine is swapped, both derive stock exo's partition, and a request for smollm2-135m (for which
  stock exo has no card) through the exo-rknpu node's API fails at once, naming the stock node and the card;
- an exo-rknpu node beside exo's stock tinygrad engine (`exo-rknpu node --engine tinygrad`) form one mixed ring by
  UDP discovery: both compute layers, and both APIs answer as `exo-rknpu generate` alone does;
- a node that is killed is dropped from the topology, the survivor serves alone, and once the node is back the
  ring is whole and answers correctly again.

Skips without exo and without network namespaces (needs root and iproute2). Stock exo imports tinygrad on Linux to
report its device, and its tinygrad engine needs clang: CI installs tinygrad 0.10.2 and clang (.ci/run). Needs the
bundled smollm2-135m.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from exo_helpers import EXO_OK, needs_exo
from netns_lab import NetnsLab, netns_available, wait_until

NETNS_OK, NETNS_WHY = netns_available() if EXO_OK else (False, "not probed: exo is missing")
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=NETNS_WHY or "network namespaces unavailable")
pytestmark = [needs_exo, needs_netns, pytest.mark.exo, pytest.mark.slow]

API_PORT = 52415  # exo's default; every node is alone in its namespace, so defaults never clash
GRPC_PORT = 50051
MODEL = "smollm2-135m"
N_LAYERS = 30
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
DISCOVERY_TIMEOUT = 90
REQUEST_TIMEOUT = 240
RING_LINE = re.compile(r"\[exo-rknpu\] node (\S+): ring for \S+: (.*?)(?: = layers [^;]*)?; (.*)$")


@dataclass
class Node:
    host: str  # lab host label
    node_id: str
    cmd: list[str]
    log: Path
    proc: object = None


class Cluster:
    """Nodes started in a NetnsLab; the test talks to their APIs from inside the namespaces."""

    def __init__(self, lab: NetnsLab, tmp: Path) -> None:
        self.lab, self.tmp, self.nodes = lab, tmp, {}
        self.env = dict(os.environ, EXO_HOME=str(tmp / "exo-home"), PYTHONUNBUFFERED="1")
        # DEBUG=2 makes exo print every get_inference_engine call (the trace of an engine swap); tinygrad reads the
        # same variable (every kernel), so rings with a tinygrad engine run with 0
        self.debug = "2"
        self.topologies: dict[str, dict] = {}  # as first formed
        self.discovery_s = 0.0  # start of the processes -> every topology complete

    def add_rknpu(self, host: str, node_id: str, backend: str, memory_mb: int) -> Node:
        addr = self.lab.hosts[host].addr
        # float32 weights: ANSWER is the model's fp32 answer; with the default int8 weights and int8 activations the
        # onnx backend answers the chat differently (as llama.cpp does on this GGUF), which is not what these test
        cmd = [sys.executable, "-m", "exo_rknpu.cli.main", "node", "--api-host", addr, "--backend", backend,
               "--weights", "fp32", "--memory-mb", str(memory_mb), "--", "--node-id", node_id, "--node-host", addr,
               "--node-port", str(GRPC_PORT), "--disable-tui"]
        return self._add(Node(host, node_id, cmd, self.tmp / f"{node_id}.log"))

    def add_tinygrad(self, host: str, node_id: str, memory_mb: int) -> Node:
        """exo's stock tinygrad engine, started by the launcher (`exo-rknpu node --engine tinygrad`)."""
        addr = self.lab.hosts[host].addr
        cmd = [sys.executable, "-m", "exo_rknpu.cli.main", "node", "--engine", "tinygrad", "--api-host", addr,
               "--memory-mb", str(memory_mb), "--", "--node-id", node_id, "--node-host", addr,
               "--node-port", str(GRPC_PORT), "--disable-tui"]
        return self._add(Node(host, node_id, cmd, self.tmp / f"{node_id}.log"))

    def add_stock(self, host: str, node_id: str, response_timeout: int) -> Node:
        cmd = [sys.executable, "-m", "exo.main", "--inference-engine", "dummy", "--node-id", node_id,
               "--node-host", self.lab.hosts[host].addr, "--node-port", str(GRPC_PORT), "--disable-tui",
               "--chatgpt-api-response-timeout", str(response_timeout)]
        return self._add(Node(host, node_id, cmd, self.tmp / f"{node_id}.log"))

    def _add(self, node: Node) -> Node:
        self.nodes[node.node_id] = node
        return node

    def start(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.proc = self.lab.popen(node.host, node.cmd, node.log, dict(self.env, DEBUG=self.debug))

    def kill(self, node_id: str) -> None:
        self.lab.kill(self.nodes[node_id].proc, signal.SIGKILL)

    def log(self, node_id: str) -> str:
        return self.nodes[node_id].log.read_text(errors="replace")

    def addr(self, node_id: str) -> str:
        return self.lab.hosts[self.nodes[node_id].host].addr

    def topology(self, via: str) -> dict:
        reply = self.lab.request(self.nodes[via].host, "GET", self.addr(via), API_PORT, "/v1/topology", timeout=5)
        return reply.json() if reply.status == 200 else {}

    def wait_for_members(self, members: dict[str, set[str]], timeout: float = DISCOVERY_TIMEOUT) -> dict[str, dict]:
        """Wait until node `via` sees exactly `members[via]`, for every via; their topologies."""

        def check():
            for nid in members:
                proc = self.nodes[nid].proc
                if proc.poll() is not None:
                    raise AssertionError(f"node {nid} exited ({proc.returncode}):\n{self.log(nid)[-3000:]}")
            topos = {via: self.topology(via) for via in members}
            ok = all(set(t.get("nodes", {})) == members[via] for via, t in topos.items())
            return topos if ok else None

        return wait_until(check, timeout, what=f"topologies {members}")

    def chat(self, client: str, api_of: str, model: str = MODEL, question: str = QUESTION) -> tuple[int, object]:
        """A chat completion sent from node `client`'s namespace to node `api_of`'s API."""
        body = {"model": model, "messages": [{"role": "user", "content": question}]}
        reply = self.lab.request(self.nodes[client].host, "POST", self.addr(api_of), API_PORT,
                                 "/v1/chat/completions", body, timeout=REQUEST_TIMEOUT)
        return reply.status, reply.json()


def split_ring_line(text: str) -> list[str]:
    return re.findall(r"\S+ \[[^)]*\)", text)


def exo_partition(topology: dict, only: set[str] | None = None) -> list[tuple[str, float, float]]:
    """exo's own RingMemoryWeightedPartitioningStrategy over the capabilities the API reports (the reference)."""
    from exo.topology.device_capabilities import DeviceCapabilities
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy
    from exo.topology.topology import Topology

    topo = Topology()
    for nid, caps in topology["nodes"].items():
        if only is None or nid in only:
            topo.update_node(nid, DeviceCapabilities(**caps))
    return [(p.node_id, p.start, p.end) for p in RingMemoryWeightedPartitioningStrategy().partition(topo)]


def logged_ring(cluster: Cluster, node_id: str) -> tuple[list[tuple[str, float, float]], str]:
    """The last ring `node_id` logged for smollm2-135m: [(node id, start, end)] and how it was derived."""
    matches = [m for m in map(RING_LINE.search, cluster.log(node_id).splitlines()) if m and m.group(1) == node_id]
    if not matches:
        return [], ""
    last = matches[-1]
    split = []
    for part in split_ring_line(last.group(2)):
        nid, a, b = re.fullmatch(r"(\S+) \[(\S+), (\S+)\)", part).groups()
        split.append((nid, float(a), float(b)))
    return split, last.group(3)


def layer_ranges(split: list[tuple[str, float, float]]) -> dict[str, tuple[int, int]]:
    """exo's mapping of a partition to smollm2-135m layer ranges (inclusive)."""
    from exo.topology.partitioning_strategy import Partition, map_partitions_to_shards

    shards = map_partitions_to_shards([Partition(*p) for p in split], N_LAYERS, MODEL)
    return {p[0]: (s.start_layer, s.end_layer) for p, s in zip(split, shards)}


def assert_answer(status: int, body: object) -> None:
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == ANSWER, body
    assert body["choices"][0]["finish_reason"] == "stop", body


def engine_swaps(log: str) -> list[str]:
    """Lines where exo built an engine other than rknpu/dummy after start-up (DEBUG=2 prints each call)."""
    return [line for line in log.splitlines() if "get_inference_engine called with:" in line
            and not line.rstrip().endswith(("rknpu", "dummy"))]


@pytest.fixture(scope="module")
def smollm2():
    from exo_rknpu.model.zoo import resolve_model

    resolve_model(MODEL)  # fetch once, before two processes race for it


@pytest.fixture(scope="module")
def rk_pair(tmp_path_factory, smollm2):
    """Two exo-rknpu nodes, rk-a (numpy, 3000 MB) in h1 and rk-b (onnx, 2000 MB) in h2, found by UDP discovery."""
    lab = NetnsLab(2).create()
    try:
        cluster = Cluster(lab, tmp_path_factory.mktemp("discovery-pair"))
        cluster.add_rknpu("h1", "rk-a", "numpy", 3000)
        cluster.add_rknpu("h2", "rk-b", "onnx", 2000)
        t = time.monotonic()
        cluster.start("rk-a")
        cluster.start("rk-b")
        cluster.topologies = cluster.wait_for_members({"rk-a": {"rk-a", "rk-b"}, "rk-b": {"rk-a", "rk-b"}})
        cluster.discovery_s = time.monotonic() - t
        yield cluster
    finally:
        lab.close()


def test_two_rknpu_nodes_discover_each_other_over_udp(rk_pair):
    topo_a, topo_b = rk_pair.topologies["rk-a"], rk_pair.topologies["rk-b"]
    print(f"\nUDP discovery: both topologies complete {rk_pair.discovery_s:.1f}s after the processes started")
    assert topo_a["nodes"] == topo_b["nodes"]  # one topology, the same capabilities on both sides
    assert topo_a["nodes"]["rk-a"]["memory"] == 3000 and topo_a["nodes"]["rk-b"]["memory"] == 2000
    # found over the test network, not configured: the edge names the namespace's interface
    assert [e["description"] for e in topo_a["peer_graph"]["rk-a"]] == ["Ethernet (eth0)"]
    assert [e["to_id"] for e in topo_b["peer_graph"]["rk-b"]] == ["rk-a"]

    reference = exo_partition(topo_a)  # exo's strategy on the reported capabilities
    ranges = layer_ranges(reference)
    assert ranges == {"rk-a": (0, 17), "rk-b": (18, 29)}  # 3000:2000 of 30 layers; more memory goes first
    print(f"exo's partition of the reported topology: {reference} -> layers {ranges}")


@pytest.mark.parametrize("api_of", ["rk-a", "rk-b"])
def test_either_nodes_api_answers_and_both_use_exos_partition(rk_pair, api_of):
    client = "rk-b" if api_of == "rk-a" else "rk-a"  # the request itself crosses the test network
    t = time.monotonic()
    status, body = rk_pair.chat(client, api_of)
    print(f"\nchat via {api_of}'s API from {client}'s namespace: {time.monotonic() - t:.1f}s")
    assert_answer(status, body)
    # Both nodes used one partition, exo's own strategy on the reported capabilities (rings are logged when used).
    reference = exo_partition(rk_pair.topology(api_of))
    for nid in ("rk-a", "rk-b"):
        assert logged_ring(rk_pair, nid) == (reference, "exo's partition over every node")
        assert engine_swaps(rk_pair.log(nid)) == []


def test_a_killed_node_is_dropped_and_rejoins(rk_pair):
    """rk-b is SIGKILLed: rk-a drops it and serves alone; rk-b restarts: the ring is whole and answers again."""
    t = time.monotonic()
    rk_pair.kill("rk-b")
    rk_pair.wait_for_members({"rk-a": {"rk-a"}}, timeout=60)
    dropped_s = time.monotonic() - t
    t = time.monotonic()
    status, body = rk_pair.chat("rk-a", "rk-a")
    alone_s = time.monotonic() - t
    assert_answer(status, body)
    assert logged_ring(rk_pair, "rk-a") == ([("rk-a", 0.0, 1.0)], "exo's partition over every node")  # all 30 layers

    t = time.monotonic()
    rk_pair.start("rk-b")
    topos = rk_pair.wait_for_members({"rk-a": {"rk-a", "rk-b"}, "rk-b": {"rk-a", "rk-b"}})
    rejoin_s = time.monotonic() - t
    t = time.monotonic()
    status, body = rk_pair.chat("rk-a", "rk-b")
    again_s = time.monotonic() - t
    assert_answer(status, body)
    reference = exo_partition(topos["rk-a"])
    assert len(reference) == 2
    for nid in ("rk-a", "rk-b"):
        assert logged_ring(rk_pair, nid) == (reference, "exo's partition over every node")
    status, body = rk_pair.chat("rk-b", "rk-a")
    assert_answer(status, body)
    print(f"\nkill -> dropped from rk-a's topology {dropped_s:.1f}s; rk-a alone answered in {alone_s:.1f}s; "
          f"restart -> both topologies whole {rejoin_s:.1f}s; first request after rejoin {again_s:.1f}s")


def test_rknpu_node_beside_a_plain_stock_exo_node(tmp_path, smollm2):
    lab = NetnsLab(2).create()
    try:
        cluster = Cluster(lab, tmp_path)
        cluster.add_rknpu("h1", "rk", "onnx", 3000)
        cluster.add_stock("h2", "stock", response_timeout=20)
        t = time.monotonic()
        cluster.start("rk")
        cluster.start("stock")
        topos = cluster.wait_for_members({"rk": {"rk", "stock"}, "stock": {"rk", "stock"}})
        print(f"\nUDP discovery, exo-rknpu + stock exo: {time.monotonic() - t:.1f}s")

        # Both see each other, each with the capabilities the other reports about itself.
        assert topos["rk"]["nodes"] == topos["stock"]["nodes"]
        rk_caps, stock_caps = topos["rk"]["nodes"]["rk"], topos["rk"]["nodes"]["stock"]
        assert rk_caps["memory"] == 3000 and "(exo-rknpu, rknpu/onnx; serves " in rk_caps["model"]
        assert stock_caps["model"].startswith("Linux Box (Device: ")  # stock exo's Linux report (tinygrad device)
        import psutil

        assert stock_caps["memory"] == psutil.virtual_memory().total // 2**20  # stock reports total RAM

        # A plain stock node is in the ring: the exo-rknpu node derives exactly stock exo's partition, which gives
        # the dummy node (more memory) the first layers of smollm2-135m. Stock exo has no card for it: the request
        # through the exo-rknpu API fails at once, naming the node and the card (never a wrong answer or a wait).
        exo_ranges = layer_ranges(exo_partition(topos["rk"]))
        assert exo_ranges["stock"][0] == 0 and "rk" in exo_ranges
        t = time.monotonic()
        status, body = cluster.chat("stock", "rk")
        assert status == 503 and time.monotonic() - t < 10, body
        assert "gives node stock layers 0-" in body["detail"] and "no card for smollm2-135m" in body["detail"], body
        ring, how = logged_ring(cluster, "rk")
        assert ring == exo_partition(topos["rk"]) and how.startswith("exo's partition over every node (plain stock")
        # the stock node has no card for smollm2 and says so
        status, body = cluster.chat("rk", "stock")
        assert status == 400 and "Unsupported model" in str(body), body

        # The other direction is exo's: stock exo puts the exo-rknpu node into the dummy model's ring. Our node
        # refuses its layers with a clear error; stock exo's API does not hear of it and times out (20 s here).
        t = time.monotonic()
        status, body = cluster.chat("rk", "stock", model="dummy")
        waited = time.monotonic() - t
        assert status != 200, body
        assert "'dummy' has no exo-rknpu card" in cluster.log("rk")
        print(f"'dummy' via the stock API: HTTP {status} after {waited:.0f}s ({body})")

        # Neither node swapped its engine (exo swaps to tinygrad on peer changes unless stopped or dummy).
        assert engine_swaps(cluster.log("rk")) == [] and engine_swaps(cluster.log("stock")) == []
        assert "get_inference_engine called with: dummy" in cluster.log("stock")
    finally:
        lab.close()


def test_a_mixed_ring_with_stock_tinygrad_forms_by_udp_discovery(tmp_path, smollm2, stock_home, references):
    """exo-rknpu (onnx, fp32 weights, 2000 MB) and exo's tinygrad engine via the launcher (3000 MB: first layers)."""
    lab = NetnsLab(2).create()
    try:
        cluster = Cluster(lab, tmp_path)
        cluster.env, cluster.debug = stock_home.env(), "0"
        cluster.add_rknpu("h1", "rk", "onnx", 2000)
        cluster.add_tinygrad("h2", "tg", 3000)
        t = time.monotonic()
        cluster.start("rk")
        cluster.start("tg")
        topos = cluster.wait_for_members({"rk": {"rk", "tg"}, "tg": {"rk", "tg"}})
        print(f"\nUDP discovery, exo-rknpu + stock tinygrad: {time.monotonic() - t:.1f}s")
        assert [e["description"] for e in topos["rk"]["peer_graph"]["rk"]] == ["Ethernet (eth0)"]
        assert "(exo-rknpu, tinygrad; serves " in topos["rk"]["nodes"]["tg"]["model"]
        for api_of, client in [("rk", "tg"), ("tg", "rk")]:
            for question in references:
                t = time.monotonic()
                status, body = cluster.chat(client, api_of, question=question)
                assert status == 200, body
                assert body["choices"][0]["message"]["content"] == references[question], (api_of, question)
                print(f"{question!r} via {api_of}'s API: {time.monotonic() - t:.1f}s")
        reference = exo_partition(topos["rk"])
        assert layer_ranges(reference) == {"tg": (0, 17), "rk": (18, 29)}
        for nid in ("rk", "tg"):
            assert logged_ring(cluster, nid) == (reference, "exo's partition over every node")
    finally:
        lab.close()
