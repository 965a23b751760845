"""Mixed rings on 127.0.0.1 (manual discovery): exo's stock tinygrad engine, really computing layers, beside an
exo-rknpu node, in both layer orders; and a plain stock exo node that has no card for the model.

Specification:
- a stock tinygrad node (`exo-rknpu node --engine tinygrad`: exo's engine with the launcher's fixes) and an
  exo-rknpu node (`--weights fp32`, so answers do not depend on the CPU) form one ring whose partition is exactly
  stock exo's (RingMemoryWeightedPartitioningStrategy over the reported topology), logged the same by both nodes;
- with tinygrad first (it reports more memory) and with tinygrad last (the exo-rknpu node first: the order in which
  stock exo's missing final norm would give garbage), several requests in a row through each node's API, streaming
  and not, each answer equal to `exo-rknpu generate --chat --weights fp32` alone;
- a plain stock exo node (unpatched, no card for smollm2-135m) beside an exo-rknpu node: a request through the
  exo-rknpu node's API fails at once, naming that node and the missing card; through the stock node's API exo
  substitutes its default model (llama-3.2-1b), which it cannot load offline: HTTP 500.

Skips only without exo. Needs tinygrad 0.10.2 and clang (CI installs both; .ci/run).
"""

from __future__ import annotations

import re
import time

import pytest

from conftest import QUESTIONS
from exo_helpers import Ring, chat, get_json, needs_exo

pytestmark = [needs_exo, pytest.mark.exo, pytest.mark.slow]

MODEL, N_LAYERS = "smollm2-135m", 30
RKNPU = {"engine": "rknpu", "backend": "onnx", "extra": ["--weights", "fp32"]}
TINYGRAD = {"engine": "tinygrad"}
ORDERS = {  # the node that reports more memory takes the first layers
    "tinygrad-first": {"tg": {**TINYGRAD, "memory": 3000}, "rk": {**RKNPU, "memory": 2000}},
    "rknpu-first": {"rk": {**RKNPU, "memory": 3000}, "tg": {**TINYGRAD, "memory": 2000}},
}
RING_LINE = re.compile(r"\[exo-rknpu\] node (\S+): ring for smollm2-135m: .* = layers (.*?); (.*)$", re.M)


@pytest.fixture(scope="module", params=list(ORDERS))
def mixed_ring(request, stock_home, tmp_path_factory):
    from exo_rknpu.model.zoo import resolve_model

    resolve_model(MODEL)
    ring = Ring(tmp_path_factory.mktemp(request.param), {k: dict(v) for k, v in ORDERS[request.param].items()},
                env=stock_home.env())
    started = time.perf_counter()
    try:
        yield ring.start()
    finally:
        ring.stop()
        print(f"\n{request.param}: ring up and tested in {time.perf_counter() - started:.0f} s")


def expected_layers(topology: dict) -> dict[str, tuple[int, int]]:
    """Stock exo's partition of the reported topology, by exo's own code."""
    from exo.topology.device_capabilities import DeviceCapabilities
    from exo.topology.partitioning_strategy import map_partitions_to_shards
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy
    from exo.topology.topology import Topology

    topo = Topology()
    for nid, caps in topology["nodes"].items():
        topo.update_node(nid, DeviceCapabilities(**caps))
    partitions = RingMemoryWeightedPartitioningStrategy().partition(topo)
    shards = map_partitions_to_shards(partitions, N_LAYERS, MODEL)
    return {p.node_id: (s.start_layer, s.end_layer) for p, s in zip(partitions, shards)}


def answer(status: int, body: object, stream: bool) -> str:
    assert status == 200, body
    if stream:
        assert body[-1]["choices"][0]["finish_reason"] == "stop"
        return "".join(c["choices"][0]["delta"]["content"] for c in body)
    assert body["choices"][0]["finish_reason"] == "stop"
    return body["choices"][0]["message"]["content"]


def test_every_node_reports_the_launcher_mark(mixed_ring):
    nodes = get_json(mixed_ring.url("rk", "/v1/topology"))["nodes"]
    assert "(exo-rknpu, tinygrad; serves " in nodes["tg"]["model"] and MODEL in nodes["tg"]["model"]
    assert "(exo-rknpu, rknpu/onnx; serves " in nodes["rk"]["model"]
    assert {nid: n["memory"] for nid, n in nodes.items()} == {nid: s["memory"] for nid, s in mixed_ring.nodes.items()}


def test_requests_through_every_api_equal_generate_alone(mixed_ring, references):
    """Several requests in a row through each node's API, streaming and not; both nodes compute layers. Each is
    printed (-s): the table of docs/exo.md §9."""
    for api in mixed_ring.nodes:
        for question, stream in [(QUESTIONS[0], False), (QUESTIONS[1], True), (QUESTIONS[1], False),
                                 (QUESTIONS[0], True)]:
            t = time.perf_counter()
            status, body = chat(mixed_ring.url(api, "/v1/chat/completions"), stream=stream, question=question)
            if status == 503 and "left the ring" in str(body):
                # exo dropped a peer whose health check timed out (a loaded machine): the request was refused, not
                # answered wrong; once the ring is whole again it must answer right
                print(f"\n{api}: {body['detail']}; retried once the ring was whole")
                mixed_ring.wait_for_topology()
                status, body = chat(mixed_ring.url(api, "/v1/chat/completions"), stream=stream, question=question)
            got = answer(status, body, stream)
            print(f"\n{first_node(mixed_ring)} first, {api} API, {question!r} stream={stream}: HTTP {status} in "
                  f"{time.perf_counter() - t:.1f} s, equal to generate alone: {got == references[question]}")
            assert got == references[question], (api, question, stream)


def first_node(ring) -> str:
    return max(ring.nodes, key=lambda n: ring.nodes[n]["memory"])


def test_both_nodes_log_stock_exos_partition(mixed_ring):
    topology = get_json(mixed_ring.url("tg", "/v1/topology"))
    want = expected_layers(topology)
    assert len(want) == 2 and list(want)[0] == first_node(mixed_ring)
    for nid in mixed_ring.nodes:
        lines = RING_LINE.findall(mixed_ring.log(nid))
        assert lines, mixed_ring.log(nid)[-3000:]
        logged_by, layers, how = lines[-1]
        print(f"\n{first_node(mixed_ring)} first, logged by {nid}: layers {layers}; {how} (exo's strategy: {want})")
        got = {name: tuple(map(int, rng.split("-"))) for name, rng in (p.split(" ") for p in layers.split(", "))}
        assert logged_by == nid and got == want and how == "exo's partition over every node"
    assert "refuses the step" not in mixed_ring.log("rk") + mixed_ring.log("tg")


def test_plain_stock_node_without_a_card_is_named_at_once(tmp_path):
    """A plain stock exo node (tinygrad, unpatched) reports its total RAM, so exo's partition gives it the first
    layers of smollm2-135m, for which stock exo has no card."""
    from exo_rknpu.model.zoo import resolve_model

    resolve_model(MODEL)
    ring = Ring(tmp_path, {"rk": {**RKNPU, "memory": 2000}, "plain": {"engine": "plain-tinygrad"}})
    try:
        ring.start()
        t = time.perf_counter()
        status, body = chat(ring.url("rk", "/v1/chat/completions"), stream=False)
        elapsed = time.perf_counter() - t
        print(f"\nplain stock node, rk API: HTTP {status} in {elapsed:.1f} s: {body}")
        assert status == 503, body
        detail = body["detail"]
        assert "gives node plain layers" in detail and "plain is a plain stock exo node" in detail and f"no card for {MODEL}" in detail, detail
        assert "exo-rknpu node --engine tinygrad" in detail  # the fix
        assert elapsed < 10
        # through the stock node's API, exo's own behaviour: it has no card for smollm2-135m and silently substitutes
        # its --default-model (llama-3.2-1b), whose tokenizer it cannot fetch offline: HTTP 500 (online it would
        # answer with llama-3.2-1b, another model than the one asked for)
        t = time.perf_counter()
        status, body = chat(ring.url("plain", "/v1/chat/completions"), stream=False)
        print(f"\nplain stock node, its own API: HTTP {status} in {time.perf_counter() - t:.1f} s: {str(body)[:300]}")
        assert status == 500, (status, body)
        assert "Unsupported model: unsloth/Llama-3.2-1B-Instruct" in ring.log("plain")
    finally:
        ring.stop()


def test_beside_a_plain_stock_node_a_model_the_exo_rknpu_node_cannot_plan_fails_at_once_naming_it(tmp_path):
    """exo's partition over every node gives the exo-rknpu node (it reports more memory: int4) the first layers of
    llama-3.2-1b, a model stock exo has a card for but whose files in the node's --model-dir it cannot plan (its mark
    leaves it out; a plain node ignores marks). The plain node has the model's tokenizer under its repo's name
    (SmolLM2's: it never runs a layer). Through the plain node's API, which hears none of the ring's reports, the
    request fails at once with the node's name and reason (it raises it back to the sender); through the exo-rknpu
    node's API, 404 with the reason it gave at start."""
    from transformers import AutoTokenizer

    from exo_helpers import write_unsupported_model
    from stock_exo import offline_env

    from exo_rknpu.model.zoo import resolve_model

    gguf = resolve_model(MODEL).path
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(
        str(tmp_path / "exo-home" / "downloads" / "unsloth--Llama-3.2-1B-Instruct"))
    write_unsupported_model(tmp_path / "models" / "llama-3.2-1b")
    rk = {"engine": "rknpu", "backend": "onnx", "memory": 200000,
          "extra": ["--weights", "int4", "--model-dir", str(tmp_path / "models")]}
    ring = Ring(tmp_path, {"rk": rk, "plain": {"engine": "plain-tinygrad"}},
                env=offline_env(tmp_path / "exo-home", tmp_path / "tmp"))
    try:
        ring.start()
        said = [line.removeprefix("[exo-rknpu] ").split("; it is left out")[0] for line in ring.log("rk").splitlines()
                if "cannot serve llama-3.2-1b" in line and "left out of the memory" in line]
        assert len(said) == 1, ring.log("rk")[-3000:]
        t = time.perf_counter()
        status, body = chat(ring.url("plain", "/v1/chat/completions"), stream=False, model="llama-3.2-1b")
        elapsed = time.perf_counter() - t
        print(f"\nplain stock node's API, llama-3.2-1b that rk cannot plan: HTTP {status} in {elapsed:.1f} s: {body}")
        detail = " ".join(str(body.get("detail") if isinstance(body, dict) else body).split())
        reason = said[0].removeprefix("this node cannot serve llama-3.2-1b: ")
        assert status == 500 and "node rk: UnsupportedModelError: " in detail and reason in detail, body
        assert elapsed < 30
        assert re.search(r"ring for llama-3\.2-1b: rk \[0, [0-9.]+\), plain .*exo's partition over every node "
                         r"\(plain stock exo node in the ring: plain\)", ring.log("rk")), ring.log("rk")[-3000:]
        status, body = chat(ring.url("rk", "/v1/chat/completions"), stream=False, model="llama-3.2-1b")
        assert status == 404 and body["detail"] == said[0], body
    finally:
        ring.stop()
