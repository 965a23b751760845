"""exo's UDP discovery, for real, in a private network of namespaces (netns_lab): no peers file, no loopback tricks.

Each node runs in its own network namespace with its own address (198.18.0.1x/24 on eth0) and exo's defaults for
discovery (UDP broadcast, port 5678) and the API (port 52415); the namespaces are joined by a bridge that only the
test can reach. Specification:
- two exo-rknpu nodes find each other, agree on one topology and on exo's memory-weighted partition, and answer a
  chat completion correctly through either node's API;
- an exo-rknpu node beside a stock exo node (exo's dummy engine): both see each other with the capabilities each
  reports, no engine is swapped, and smollm2-135m (which only exo-rknpu serves) is not given to the stock node,
  although exo's own partitioner would give it layers;
- a node that is killed is dropped from the topology, the survivor serves alone, and once the node is back the
  ring is whole and answers correctly again.

Skips without exo, without network namespaces (needs root and iproute2), and (stock-node test) without tinygrad,
which stock exo imports on Linux to report its device. Needs the bundled smollm2-135m.
"""

from __future__ import annotations

import importlib.util
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
RING_LINE = re.compile(r"\[exo-rknpu\] node (\S+): ring of exo-rknpu nodes: (.*?)(?:; stock exo nodes given no layers: (.*))?$")


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
        self.topologies: dict[str, dict] = {}  # as first formed
        self.discovery_s = 0.0  # start of the processes -> every topology complete

    def add_rknpu(self, host: str, node_id: str, backend: str, memory_mb: int) -> Node:
        addr = self.lab.hosts[host].addr
        cmd = [sys.executable, "-m", "exo_rknpu.cli.main", "node", "--api-host", addr, "--backend", backend,
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
        # DEBUG=2 makes exo print every get_inference_engine call: the trace of an engine swap
        node.proc = self.lab.popen(node.host, node.cmd, node.log, dict(self.env, DEBUG="2"))

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

    def chat(self, client: str, api_of: str, model: str = MODEL) -> tuple[int, object]:
        """A chat completion sent from node `client`'s namespace to node `api_of`'s API."""
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}]}
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


def logged_ring(cluster: Cluster, node_id: str) -> tuple[list[tuple[str, float, float]], list[str]]:
    """The last ring `node_id` logged: [(node id, start, end)] and the stock nodes it left out."""
    matches = [m for m in map(RING_LINE.search, cluster.log(node_id).splitlines()) if m and m.group(1) == node_id]
    if not matches:
        return [], []
    last = matches[-1]
    split = []
    for part in split_ring_line(last.group(2)):
        nid, a, b = re.fullmatch(r"(\S+) \[(\S+), (\S+)\)", part).groups()
        split.append((nid, float(a), float(b)))
    left_out = last.group(3).split(", ") if last.group(3) else []
    return split, left_out


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
        assert logged_ring(rk_pair, nid) == (reference, [])
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
    assert logged_ring(rk_pair, "rk-a") == ([("rk-a", 0.0, 1.0)], [])  # rk-a ran all 30 layers

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
        assert logged_ring(rk_pair, nid) == (reference, [])
    status, body = rk_pair.chat("rk-b", "rk-a")
    assert_answer(status, body)
    print(f"\nkill -> dropped from rk-a's topology {dropped_s:.1f}s; rk-a alone answered in {alone_s:.1f}s; "
          f"restart -> both topologies whole {rejoin_s:.1f}s; first request after rejoin {again_s:.1f}s")


needs_tinygrad = pytest.mark.skipif(
    importlib.util.find_spec("tinygrad") is None,
    reason="stock exo on Linux imports tinygrad to report its device (exo/topology/device_capabilities.py) even "
           "with the dummy engine; pip install tinygrad to run the mixed-cluster test")


@needs_tinygrad
def test_rknpu_node_beside_a_stock_exo_node(tmp_path, smollm2):
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
        assert rk_caps["memory"] == 3000 and rk_caps["model"].endswith("(exo-rknpu, onnx)")
        assert stock_caps["model"].startswith("Linux Box (Device: ")  # stock exo's Linux report (tinygrad device)
        import psutil

        assert stock_caps["memory"] == psutil.virtual_memory().total // 2**20  # stock reports total RAM

        # What exo alone would do: give the stock node (more memory) the first layers of every model, smollm2 too.
        exo_ranges = layer_ranges(exo_partition(topos["rk"]))
        assert exo_ranges["stock"][0] == 0 and "rk" in exo_ranges
        # What the exo-rknpu node does: a ring of exo-rknpu nodes only, split by exo's strategy among them.
        # smollm2 through our API: served by exo-rknpu alone, correctly (the dummy would pass hidden states through)
        status, body = cluster.chat("stock", "rk")
        assert_answer(status, body)
        ring, left_out = logged_ring(cluster, "rk")
        assert ring == exo_partition(topos["rk"], only={"rk"}) == [("rk", 0.0, 1.0)]
        assert left_out == ["stock"]
        print(f"exo's partition would give smollm2 layers {exo_ranges}; the exo-rknpu node's ring: {ring}, "
              f"left out: {left_out}")
        # the stock node has no card for smollm2 and says so
        status, body = cluster.chat("rk", "stock")
        assert status == 400 and "Unsupported model" in str(body), body

        # The reverse direction is exo's: stock exo puts the exo-rknpu node into the dummy model's ring. Our node
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
        # and our engine still serves after the peer change and the failed foreign request
        status, body = cluster.chat("rk", "rk")
        assert_answer(status, body)
    finally:
        lab.close()
