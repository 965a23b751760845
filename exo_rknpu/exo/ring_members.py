"""Which nodes of exo's topology an exo-rknpu node gives layers to: only exo-rknpu nodes.

What exo does: every node partitions *every* model over *every* node in its topology
(`RingMemoryWeightedPartitioningStrategy`, by reported memory alone). It never asks whether a node's engine can run
the model: a stock node with exo's dummy engine would get a range of smollm2-135m and pass the hidden states on
unchanged (an HTTP 200 with a wrong answer), and one with tinygrad has no card for it. Nothing in exo's discovery
or topology says which engine a peer runs, but an exo-rknpu node's reported `model` carries the
`(exo-rknpu, <backend>)` mark (capabilities.detect), and the topology reaches every node with the same
capabilities, so every exo-rknpu node derives the same member list and the same partition.

What the launcher makes it do: the node's partitioning strategy sees only the exo-rknpu nodes of the topology
(exo's own strategy does the split among them). Stock nodes stay in the topology (both sides see each other) but
are never sent layers by an exo-rknpu node; a request to an exo-rknpu node's API is served by the exo-rknpu nodes
alone. Stock exo, unpatched, still counts exo-rknpu nodes in its own partitions (docs/exo.md §8).

The module imports exo only inside functions (it is exo-free at import, like capabilities).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

RKNPU_MARK = "(exo-rknpu, "  # capabilities.detect ends `model` with "(exo-rknpu, <backend>)"


def is_rknpu_node(reported_model: str) -> bool:
    """True if a node's reported DeviceCapabilities.model says it runs exo-rknpu."""
    return RKNPU_MARK in reported_model


def samples_like_rknpu(reported_model: str) -> bool:
    """True if a node that holds the last layers samples with exo_rknpu.runtime.sampling under each request's own
    parameters (and encodes prompts from the ids the API sends): every exo-rknpu node. A plain stock exo node
    samples only at its --default-temp."""
    return is_rknpu_node(reported_model)


def rknpu_members(nodes: Iterable[tuple[str, Any]], self_id: str) -> list[tuple[str, Any]]:
    """The (node id, capabilities) pairs that take layers: exo-rknpu nodes, and always this node."""
    return [(nid, caps) for nid, caps in nodes if nid == self_id or is_rknpu_node(str(caps.model))]


class RknpuRingPartitioning:
    """exo's partitioning strategy, applied to the exo-rknpu nodes of the topology only.

    Logs the members, the split and the nodes left out whenever they change (a one-line record per ring change
    that users and the discovery tests read).
    """

    def __init__(self, inner: Any, self_id: str) -> None:
        self.inner = inner
        self.self_id = self_id
        self._last: tuple | None = None

    def partition(self, topology: Any) -> list:
        from exo.topology.topology import Topology

        members = Topology()
        for nid, caps in rknpu_members(topology.all_nodes(), self.self_id):
            members.update_node(nid, caps)
        partitions = self.inner.partition(members)
        left_out = sorted(nid for nid, _ in topology.all_nodes() if nid not in members.nodes)
        key = (tuple((p.node_id, p.start, p.end) for p in partitions), tuple(left_out))
        if key != self._last:
            self._last = key
            split = ", ".join(f"{p.node_id} [{p.start:g}, {p.end:g})" for p in partitions)
            others = f"; stock exo nodes given no layers: {', '.join(left_out)}" if left_out else ""
            print(f"[exo-rknpu] node {self.self_id}: ring of exo-rknpu nodes: {split}{others}", flush=True)
        return partitions


def restrict_ring(node: Any) -> None:
    """Make `node` (exo's Node) give layers only to exo-rknpu nodes (idempotent)."""
    if not isinstance(node.partitioning_strategy, RknpuRingPartitioning):
        node.partitioning_strategy = RknpuRingPartitioning(node.partitioning_strategy, node.id)
