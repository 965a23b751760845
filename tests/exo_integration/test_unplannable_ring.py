"""A served model that one node has files of but cannot plan, in a real two-node ring (manual discovery, onnx,
--weights fp32, smollm2-135m). node-a's --model-dir holds smollm2-135m with an architecture exo-rknpu does not
support; node-b has the bundled model.

Specification:
- node-a's launcher mark leaves the model out (capabilities.detect), so both nodes give every layer of it to node-b
  (the rule "every node carries the mark: over the nodes whose mark lists the model"), and a request through
  node-b's API answers as `generate` alone would; node-a is never given a shard of it;
- node-a's own API refuses it with the reason it gave at start (404);
- given layers of it anyway (alone, no node's mark lists it: what exo's partition over every node does beside a
  plain stock node), a prompt sent the way a plain stock node sends it (exo's own GRPCPeerHandle, a request no
  exo-rknpu API announced) fails at once at the sender, naming node-a and the reason, instead of the sender's API
  waiting for its response timeout.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from exo_helpers import Ring, chat, get_json, needs_exo, write_unsupported_model

pytestmark = [needs_exo, pytest.mark.exo, pytest.mark.slow]

MODEL, N_LAYERS = "smollm2-135m", 30
ANSWER = "The capital of France is Paris."
FP32 = ["--weights", "fp32"]


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    from exo_rknpu.model.zoo import resolve_model

    resolve_model(MODEL)
    tmp = tmp_path_factory.mktemp("unplannable-ring")
    write_unsupported_model(tmp / "models" / MODEL)
    r = Ring(tmp, {
        "node-a": {"backend": "onnx", "memory": 3000, "extra": [*FP32, "--model-dir", str(tmp / "models")]},
        "node-b": {"backend": "onnx", "memory": 2000, "extra": FP32},
    })
    try:
        r.start()
        yield r
    finally:
        r.stop()


def start_line(ring: Ring) -> str:
    said = [line for line in ring.log("node-a").splitlines()
            if f"cannot serve {MODEL}" in line and "left out of the memory this node reports and of its mark" in line]
    assert len(said) == 1, said  # once, at start
    return said[0].removeprefix("[exo-rknpu] ").split("; it is left out")[0]


def test_its_mark_leaves_the_model_out_and_the_ring_gives_every_layer_to_the_other_node(ring):
    from exo_rknpu.exo.capabilities import read_mark

    nodes = get_json(ring.url("node-b", "/v1/topology"))["nodes"]
    assert not read_mark(nodes["node-a"]["model"]).serves(MODEL) and read_mark(nodes["node-a"]["model"]).serves(
        "llama-3.2-1b")  # only the model it cannot plan is left out
    assert read_mark(nodes["node-b"]["model"]).serves(MODEL)
    status, body = chat(ring.url("node-b", "/v1/chat/completions"), stream=False)
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER, body
    for nid in ring.nodes:
        assert (f"node {nid}: ring for {MODEL}: node-b [0, 1) = layers node-b 0-29; nodes that serve {MODEL} "
                f"(left out, they cannot: node-a)") in ring.log(nid), ring.log(nid)[-2000:]
    assert "failed" not in ring.log("node-a")  # it was never given a shard


def test_its_own_api_refuses_it_with_the_reason_it_gave_at_start(ring):
    reason = start_line(ring)
    assert "'gemma'" in reason
    t = time.perf_counter()
    status, body = chat(ring.url("node-a", "/v1/chat/completions"), stream=False)
    assert status == 404 and body["detail"] == reason, body
    assert time.perf_counter() - t < 5


def test_given_its_layers_a_prompt_from_a_plain_stock_sender_fails_at_once_naming_the_node_and_why(ring):
    """Last in this module: node-b is stopped, so node-a is the whole ring and exo's partition gives it every layer."""
    import grpc
    from exo.inference.shard import Shard
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle

    ring.procs["node-b"].terminate()
    ring.procs["node-b"].wait(timeout=30)
    deadline = time.time() + 90
    while set(get_json(ring.url("node-a", "/v1/topology"))["nodes"]) != {"node-a"}:
        assert time.time() < deadline, "node-b did not leave node-a's topology"
        time.sleep(1)
    reason = start_line(ring).removeprefix(f"this node cannot serve {MODEL}: ")

    async def send() -> grpc.aio.AioRpcError:
        from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES

        peer = GRPCPeerHandle("node-a", f"127.0.0.1:{ring.nodes['node-a']['grpc']}", "test",
                              UNKNOWN_DEVICE_CAPABILITIES)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:  # exo's forward_prompt raises this in the sender's API
                await peer.send_prompt(Shard(MODEL, 0, N_LAYERS - 1, N_LAYERS), "What is the capital of France?",
                                       request_id=str(uuid.uuid4()))
            return e.value
        finally:
            await peer.disconnect()

    t = time.perf_counter()
    error = asyncio.run(send())
    elapsed = time.perf_counter() - t
    details = error.details()
    print(f"\nplain stock sender: {error.code()} in {elapsed:.1f} s: {details}")
    assert "node node-a: " in details and reason in " ".join(details.split()), details
    assert "\n" not in details and elapsed < 10
    log = ring.log("node-a")
    assert log.count(f"refused a prompt from a peer, raised back to it: {details.split(': ', 1)[1]}") == 1, log[-3000:]
    assert "raise SentBack" not in log  # one line, not exo's gRPC server's traceback
