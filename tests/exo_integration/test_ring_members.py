"""ring_members: every node the launcher starts derives one partition, the same on every node; with a plain stock
node in the topology it is exactly stock exo's.

The reference is exo's own RingMemoryWeightedPartitioningStrategy (and map_partitions_to_shards) at 5f18faec; the
mark that tells launcher-started nodes apart is the one capabilities.detect / stock_engines write.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from exo_helpers import needs_exo
from exo_rknpu.exo.capabilities import LauncherMark, MemoryRule, Unplanned, detect, read_mark, with_mark
from exo_rknpu.exo.ring_members import layer_ranges, ring_members

RK = LauncherMark("rknpu/onnx", ("smollm2-135m", "llama-3.2-1b")).text()
TG = LauncherMark("tinygrad", ("llama-3.2-1b", "smollm2-135m")).text()
TG_NO_SMOL = LauncherMark("tinygrad", ("llama-3.2-1b",)).text()


@dataclass(frozen=True)
class Caps:  # the fields of exo's DeviceCapabilities that ring_members reads
    model: str
    memory: int = 1000


@pytest.mark.parametrize("backend", ["numpy", "onnx", "npu"])
def test_every_report_of_an_exo_rknpu_node_carries_the_mark_with_its_models(backend, tmp_path: Path):
    rule = MemoryRule(backend, 0, 2.0, memory_mb=100)
    mark = read_mark(detect(rule, models=("smollm2-135m", "qwen-3-0.6b")).model)  # this machine
    assert mark == LauncherMark(f"rknpu/{backend}", ("smollm2-135m", "qwen-3-0.6b"))
    board = tmp_path / "proc/device-tree"
    board.mkdir(parents=True)
    (board / "compatible").write_bytes(b"radxa,rock-5b\x00rockchip,rk3588\x00")
    (board / "model").write_bytes(b"Radxa ROCK 5B\x00")
    caps = detect(rule, proc_root=tmp_path, models=("smollm2-135m",))
    assert caps.model.startswith("Radxa ROCK 5B (exo-rknpu, ") and read_mark(caps.model).serves("smollm2-135m")


def test_a_stock_engines_report_keeps_exos_text_and_gets_the_mark():
    marked = with_mark("Linux Box (NVIDIA GEFORCE RTX 4090)", LauncherMark("tinygrad", ("llama-3.2-1b",)))
    assert marked == "Linux Box (NVIDIA GEFORCE RTX 4090) (exo-rknpu, tinygrad; serves llama-3.2-1b)"
    assert with_mark(marked, LauncherMark("tinygrad", ("a",))).endswith("(NVIDIA GEFORCE RTX 4090) (exo-rknpu, tinygrad; serves a)")


@pytest.mark.parametrize("stock_report", [
    "Linux Box (Device: CLANG)",  # stock exo on a Linux CPU (exo/topology/device_capabilities.py)
    "Linux Box (NVIDIA GEFORCE RTX 4090)",
    "MacBook Pro",
    "Unknown Model",  # exo's UNKNOWN_DEVICE_CAPABILITIES, what a peer has before it reports
    "Linux x86_64 (exo-rknpu, onnx)",  # an older exo-rknpu's mark, without its models: treated as plain
])
def test_plain_stock_reports_carry_no_mark(stock_report):
    assert read_mark(stock_report) is None


def test_members_are_every_node_when_a_plain_node_is_present():
    nodes = [("rk", Caps(RK)), ("tg", Caps(TG_NO_SMOL)), ("gpu", Caps("Linux Box (NVIDIA GEFORCE RTX 4090)"))]
    assert ring_members(nodes, "smollm2-135m") == nodes


def test_members_are_the_serving_nodes_when_every_node_is_marked():
    nodes = [("rk", Caps(RK)), ("tg", Caps(TG_NO_SMOL)), ("tg2", Caps(TG))]
    assert [n for n, _ in ring_members(nodes, "smollm2-135m")] == ["rk", "tg2"]
    assert [n for n, _ in ring_members(nodes, "llama-3.2-1b")] == ["rk", "tg", "tg2"]
    assert [n for n, _ in ring_members(nodes, "qwen-3-4b")] == ["rk", "tg", "tg2"]  # nobody serves it: exo's rule


def exo_caps(model: str, memory: int):
    from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

    return DeviceCapabilities(model=model, chip="x", memory=memory, flops=DeviceFlops(fp32=0, fp16=0, int8=0))


def topology(nodes: dict):
    from exo.topology.topology import Topology

    topo = Topology()
    for nid, (model, memory) in nodes.items():
        topo.update_node(nid, exo_caps(model, memory))
    return topo


PLAIN_CPU, PLAIN_GPU = "Linux Box (Device: CLANG)", "Linux Box (NVIDIA GEFORCE RTX 4090)"
MIXED_TOPOLOGIES = [
    {"rk": (RK, 7000), "gpu": (PLAIN_GPU, 24000)},
    {"rk": (RK, 24000), "gpu": (PLAIN_GPU, 8000)},
    {"rk-a": (RK, 7000), "rk-b": (RK, 7000), "mac": ("MacBook Pro", 16384)},  # a tie: exo orders by node id
    {"rk-a": (RK, 3000), "tg": (TG_NO_SMOL, 3000), "cpu": (PLAIN_CPU, 24105), "rk-b": (RK, 1)},
    {"b": (RK, 5000), "a": (PLAIN_CPU, 5000), "c": (TG, 5000)},  # every memory equal
]


@needs_exo
@pytest.mark.exo
@pytest.mark.parametrize("nodes", MIXED_TOPOLOGIES, ids=lambda n: "+".join(n))
@pytest.mark.parametrize("model, n_layers", [("smollm2-135m", 30), ("llama-3.2-1b", 16), ("qwen-2.5-0.5b", 24)])
def test_with_a_plain_stock_node_every_launched_node_derives_stock_exos_partition(nodes, model, n_layers):
    from exo.topology.partitioning_strategy import map_partitions_to_shards
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    from exo_rknpu.exo.ring_members import MixedRingPartitioning

    topo = topology(nodes)
    stock = RingMemoryWeightedPartitioningStrategy().partition(topo)
    for self_id in nodes:  # whichever node computes it
        ours = MixedRingPartitioning(RingMemoryWeightedPartitioningStrategy(), self_id).partition(topo, model)
        assert ours == stock
        assert map_partitions_to_shards(ours, n_layers, model) == map_partitions_to_shards(stock, n_layers, model)


def assert_every_node_leaves_out(nodes: dict, left_out: str, model: str, served_by_all: str) -> None:
    """Whichever node computes it, the ring for `model` is exo's own strategy over every node but `left_out`, and
    for `served_by_all` over every node."""
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    from exo_rknpu.exo.ring_members import MixedRingPartitioning

    exo = RingMemoryWeightedPartitioningStrategy()
    for self_id in nodes:
        ours = MixedRingPartitioning(exo, self_id)
        assert ours.partition(topology(nodes), model) == exo.partition(
            topology({k: v for k, v in nodes.items() if k != left_out}))
        assert ours.partition(topology(nodes), served_by_all) == exo.partition(topology(nodes))
        assert ours.unservable(topology(nodes), model, 30) is None


@needs_exo
@pytest.mark.exo
def test_without_plain_nodes_the_ring_leaves_out_nodes_that_cannot_serve_the_model(capsys):
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    from exo_rknpu.exo.ring_members import MixedRingPartitioning

    nodes = {"rk-a": (RK, 7000), "tg": (TG_NO_SMOL, 24000), "rk-b": (RK, 3000)}
    assert_every_node_leaves_out(nodes, "tg", "smollm2-135m", served_by_all="llama-3.2-1b")
    exo = RingMemoryWeightedPartitioningStrategy()
    smol_only = {"rk-a": (RK, 7000), "tg": (LauncherMark("tinygrad", ("smollm2-135m",)).text(), 24000), "rk-b": (RK, 3000)}
    ours = MixedRingPartitioning(exo, "rk-b")
    capsys.readouterr()
    for _ in range(3):
        ours.partition(topology(smol_only), "llama-3.2-1b")
    lines = [line for line in capsys.readouterr().out.splitlines() if "node rk-b: ring for llama-3.2-1b" in line]
    assert lines == ["[exo-rknpu] node rk-b: ring for llama-3.2-1b: rk-a [0, 0.7), rk-b [0.7, 1) = layers rk-a 0-10, "
                     "rk-b 11-15; nodes that serve llama-3.2-1b (left out, they cannot: tg)"]  # once per change


@needs_exo
@pytest.mark.exo
def test_layer_ranges_are_exos_shards():
    from exo.topology.partitioning_strategy import map_partitions_to_shards
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    for memories in itertools.product([1, 500, 7000], repeat=3):
        topo = topology({f"n{i}": (RK, m) for i, m in enumerate(memories)})
        partitions = RingMemoryWeightedPartitioningStrategy().partition(topo)
        for n in (1, 2, 16, 30):
            shards = [s for s in map_partitions_to_shards(partitions, n, "m")]
            assert sorted(layer_ranges(partitions, n).values()) == sorted((s.start_layer, s.end_layer) for s in shards)


@needs_exo
@pytest.mark.exo
def test_a_plain_stock_node_without_a_card_is_named_before_the_request_runs():
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    from exo_rknpu.exo.ring_members import MixedRingPartitioning

    ours = MixedRingPartitioning(RingMemoryWeightedPartitioningStrategy(), "rk")
    topo = topology({"rk": (RK, 2000), "cpu": (PLAIN_CPU, 24105)})
    problem = ours.unservable(topo, "smollm2-135m", 30)
    assert problem.startswith("exo's partition gives node cpu layers 0-26 of smollm2-135m, but cpu is a plain stock "
                              "exo node") and "stock exo has no card for smollm2-135m" in problem
    assert ours.unservable(topo, "llama-3.2-1b", 16) is None  # stock exo has that card: its engine is not known
    marked = topology({"rk": (RK, 2000), "tg": (TG_NO_SMOL, 3000), "cpu": (PLAIN_CPU, 100)})
    assert "but tg (tinygrad) does not serve smollm2-135m: its mark lists llama-3.2-1b" in ours.unservable(
        marked, "smollm2-135m", 30)


def unplannable_mark(model_id: str) -> str:
    """The mark of an exo-rknpu node that serves every card but has files of `model_id` it cannot plan."""
    rule = MemoryRule("onnx", 0, 2.0, memory_mb=100,
                      unplanned=(Unplanned(model_id, f"this node cannot serve {model_id}: model type 'gemma'"),))
    return detect(rule, models=("llama-3.2-1b", "smollm2-135m")).model


def test_a_model_the_node_cannot_plan_is_left_out_of_its_mark():
    assert read_mark(unplannable_mark("smollm2-135m")) == LauncherMark("rknpu/onnx", ("llama-3.2-1b",))


@needs_exo
@pytest.mark.exo
def test_a_ring_of_marked_nodes_gives_a_model_one_cannot_plan_to_the_others():
    """The reference: exo's own strategy over the nodes that can plan it."""
    nodes = {"rk-a": (unplannable_mark("smollm2-135m"), 7000), "rk-b": (RK, 3000), "tg": (TG, 2000)}
    assert_every_node_leaves_out(nodes, "rk-a", "smollm2-135m", served_by_all="llama-3.2-1b")


@needs_exo
@pytest.mark.exo
def test_beside_a_plain_stock_node_a_node_that_cannot_plan_the_model_is_named_before_the_request_runs():
    """exo's partition over every node gives it layers (a model stock exo has a card for): refused at once, naming
    the node and why; and with no node that serves the model, the same."""
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    from exo_rknpu.exo.ring_members import MixedRingPartitioning

    ours = MixedRingPartitioning(RingMemoryWeightedPartitioningStrategy(), "rk-b")
    mixed = topology({"rk-a": (unplannable_mark("llama-3.2-1b"), 7000), "rk-b": (RK, 3000), "cpu": (PLAIN_CPU, 9000)})
    problem = ours.unservable(mixed, "llama-3.2-1b", 16)
    assert problem.startswith("exo's partition gives node rk-a layers 7-12 of llama-3.2-1b (plain stock exo node in "
                              "the ring: cpu; exo's partition then covers every node), but rk-a (rknpu/onnx) does not "
                              "serve llama-3.2-1b: its mark lists smollm2-135m"), problem
    assert "whose files it has but cannot plan" in problem and "Fix: keep the plain stock node(s) out" in problem
    alone = topology({"rk-a": (unplannable_mark("llama-3.2-1b"), 7000)})
    problem = ours.unservable(alone, "llama-3.2-1b", 16)
    assert "(no node's mark lists llama-3.2-1b), but rk-a (rknpu/onnx) does not serve" in problem
    assert problem.endswith("Fix: add a node that serves llama-3.2-1b to the ring"), problem


@needs_exo
@pytest.mark.exo
def test_a_disagreement_names_the_node_both_ranges_and_why():
    from exo.inference.shard import Shard
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    from exo_rknpu.exo.ring_members import MixedRingPartitioning

    nodes = {"rk": (RK, 2000), "tg": (TG_NO_SMOL, 3000), "rk2": (RK, 1000)}
    ours = MixedRingPartitioning(RingMemoryWeightedPartitioningStrategy(), "rk")
    topo = topology(nodes)
    ours.observe(topo)  # the topology just changed: settling
    text = ours.explain_mismatch(topo, Shard("smollm2-135m", 10, 24, 30), (0, 19))
    assert text.startswith("node rk refuses the step: the sender expects it to hold layers 10-24 of smollm2-135m "
                           "(30 layers), its own partition gives it layers 0-19")
    assert "still settling (rk, rk2, tg joined 0 s ago)" in text and "retry" in text
    ours._changed_at -= 60  # long settled: no "retry"; the sender's range is stock exo's over every node
    text = ours.explain_mismatch(topo, Shard("smollm2-135m", 15, 23, 30), (0, 19))
    assert "retry" not in text and "node tg (tinygrad via exo-rknpu) cannot serve smollm2-135m" in text
    text = ours.explain_mismatch(topo, Shard("smollm2-135m", 3, 4, 30), (0, 19))
    assert "the sender sees a different ring" in text and "compare /v1/topology" in text
    text = ours.explain_mismatch(topo, Shard("llama-3.2-1b", 10, 20, 21), None)
    assert "its own partition gives it no layers" in text
    assert "the sender's card for llama-3.2-1b has 21 layers, this node's has 16" in text
