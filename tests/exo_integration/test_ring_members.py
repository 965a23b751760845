"""ring_members: an exo-rknpu node splits layers among the exo-rknpu nodes of exo's topology only.

The reference is exo's own RingMemoryWeightedPartitioningStrategy run on a topology that holds only the exo-rknpu
nodes; the mark that tells them apart is the one capabilities.detect writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from exo_helpers import needs_exo
from exo_rknpu.exo.capabilities import detect
from exo_rknpu.exo.ring_members import is_rknpu_node, rknpu_members


@dataclass(frozen=True)
class Caps:  # the field of exo's DeviceCapabilities that ring_members reads
    model: str


@pytest.mark.parametrize("backend", ["numpy", "onnx", "npu"])
def test_every_report_of_an_exo_rknpu_node_carries_the_mark(backend, tmp_path: Path):
    assert is_rknpu_node(detect(backend, 0, memory_mb=100).model)  # this machine
    board = tmp_path / "proc/device-tree"
    board.mkdir(parents=True)
    (board / "compatible").write_bytes(b"radxa,rock-5b\x00rockchip,rk3588\x00")
    (board / "model").write_bytes(b"Radxa ROCK 5B\x00")
    assert is_rknpu_node(detect(backend, 0, memory_mb=100, proc_root=tmp_path).model)  # a board


@pytest.mark.parametrize("stock_report", [
    "Linux Box (Device: CLANG)",  # stock exo on a Linux CPU (exo/topology/device_capabilities.py)
    "Linux Box (NVIDIA GEFORCE RTX 4090)",
    "MacBook Pro",
    "Unknown Model",  # exo's UNKNOWN_DEVICE_CAPABILITIES, what a peer has before it reports
])
def test_stock_exo_reports_are_not_exo_rknpu_nodes(stock_report):
    assert not is_rknpu_node(stock_report)


def test_members_keep_this_node_even_before_its_report_is_known():
    nodes = [("rk1", Caps("Linux x86_64 (exo-rknpu, onnx)")), ("mac", Caps("MacBook Pro")), ("me", Caps("Unknown Model"))]
    assert [nid for nid, _ in rknpu_members(nodes, "me")] == ["rk1", "me"]


@needs_exo
@pytest.mark.exo
def test_partition_is_exos_strategy_over_the_exo_rknpu_nodes(capsys):
    from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy
    from exo.topology.topology import Topology

    from exo_rknpu.exo.ring_members import RknpuRingPartitioning

    def caps(model: str, memory: int) -> DeviceCapabilities:
        return DeviceCapabilities(model=model, chip="x", memory=memory, flops=DeviceFlops(fp32=0, fp16=0, int8=0))

    rk = {"rk-a": caps("Radxa ROCK 5B (exo-rknpu, npu)", 7000), "rk-b": caps("Linux x86_64 (exo-rknpu, onnx)", 3000)}
    full, only_rk = Topology(), Topology()
    for nid, c in rk.items():
        full.update_node(nid, c)
        only_rk.update_node(nid, c)
    full.update_node("gpu", caps("Linux Box (NVIDIA GEFORCE RTX 4090)", 24000))  # the most memory: exo puts it first

    exo = RingMemoryWeightedPartitioningStrategy()
    ours = RknpuRingPartitioning(exo, "rk-b")
    assert exo.partition(full)[0].node_id == "gpu"
    assert ours.partition(full) == exo.partition(only_rk)
    assert [p.node_id for p in ours.partition(full)] == ["rk-a", "rk-b"]

    ours.partition(full)
    lines = [line for line in capsys.readouterr().out.splitlines() if "ring of exo-rknpu nodes" in line]
    assert lines == ["[exo-rknpu] node rk-b: ring of exo-rknpu nodes: rk-a [0, 0.7), rk-b [0.7, 1); "
                     "stock exo nodes given no layers: gpu"]  # logged once per change, not per call
