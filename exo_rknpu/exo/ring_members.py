"""Which nodes of exo's topology take layers of a model: one partition, derived identically by every node.

What exo does: every node partitions every model over every node in its topology
(`RingMemoryWeightedPartitioningStrategy`: nodes sorted by (memory, node id) descending, each taking a share of the
layers in proportion to its reported memory). It never asks whether a node's engine can run the model, and stock
exo cannot be changed. So a ring that holds a plain stock exo node must use exactly that partition, on every node,
or the nodes disagree about who holds which layers.

The rule applied by every node the launcher starts (exo-rknpu nodes, and stock engines started by
`exo-rknpu node --engine ...`):
* a plain stock node (no launcher mark in its reported `model`, capabilities.read_mark) is in the topology ->
  exo's own strategy over every node: stock exo's partition, the same on every node;
* every node carries the mark -> exo's own strategy over the nodes whose mark says they serve the requested model
  (all of them if none does); every node reads the same marks from the same topology, so all derive the same ring.
  An exo-rknpu node's mark lists only the models it can plan (capabilities.detect), so a model whose files it has
  but cannot plan goes to the others.

`MixedRingPartitioning` is that strategy (its `partition` takes the model id); `patch_node_partitioning` makes exo's
Node ask it with the model of the shard at hand. The module imports exo only inside functions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from exo_rknpu.exo.capabilities import read_mark
from exo_rknpu.exo.cards import plain_stock_card_missing
from exo_rknpu.exo.patching import replace_methods

SETTLE_S = 15.0  # a disagreement this soon after the topology changed is the ring settling: retry helps


def ring_members(nodes: Iterable[tuple[str, Any]], model_id: str | None) -> list[tuple[str, Any]]:
    """The (node id, capabilities) pairs that take layers of `model_id` under the rule above."""
    nodes = list(nodes)
    marks = [read_mark(str(caps.model)) for _, caps in nodes]
    if model_id is None or any(m is None for m in marks):
        return nodes
    serving = [n for n, m in zip(nodes, marks) if m.serves(model_id)]
    return serving or nodes


def layer_ranges(partitions: list, n_layers: int) -> dict[str, tuple[int, int]]:
    """node id -> (first, last) layer (inclusive) as exo's map_partitions_to_shards gives them; nodes whose range
    is empty are left out, as exo leaves them out."""
    out = {}
    for i, p in enumerate(partitions):
        start, end = int(p.start * n_layers), int(p.end * n_layers) - 1
        if i == len(partitions) - 1:
            end = n_layers - 1
        if start <= end:
            out[p.node_id] = (start, end)
    return out


def samples_like_rknpu(reported_model: str) -> bool:
    """True if a node that holds the last layers samples with exo_rknpu.runtime.sampling under each request's own
    parameters (and encodes prompts from the ids the API sends): every node the launcher started (exo-rknpu nodes
    and stock engines started by `exo-rknpu node --engine`, stock_engines.py). A plain stock exo node samples only
    at its --default-temp."""
    return read_mark(reported_model) is not None


def _describe(caps: Any) -> str:
    mark = read_mark(str(caps.model))
    return f"{mark.engine} via exo-rknpu" if mark is not None else f"plain stock exo, reports {caps.model!r}"


class MixedRingPartitioning:
    """exo's partitioning strategy under the rule of the module docstring. Logs each ring it derives once per
    change (per model), and remembers when the topology last changed (for disagreement errors)."""

    def __init__(self, inner: Any, self_id: str) -> None:
        self.inner = inner
        self.self_id = self_id
        self._logged: dict[str | None, tuple] = {}
        self._seen: tuple = ()
        self._changed_at = 0.0
        self._change = ""

    # ------------------------------------------------------------------ partitions

    def partition(self, topology: Any, model_id: str | None = None) -> list:
        from exo.topology.topology import Topology

        nodes = list(topology.all_nodes())
        members = Topology()
        for nid, caps in ring_members(nodes, model_id):
            members.update_node(nid, caps)
        partitions = self.inner.partition(members)
        if model_id is not None:
            self._log(model_id, nodes, partitions)
        return partitions

    def stock_partition(self, topology: Any) -> list:
        """What a plain stock exo node derives from the same topology."""
        return self.inner.partition(topology)

    def _log(self, model_id: str, nodes: list, partitions: list) -> None:
        left_out = sorted(nid for nid, _ in nodes if nid not in {p.node_id for p in partitions})
        key = (tuple((p.node_id, p.start, p.end) for p in partitions), tuple(left_out))
        if self._logged.get(model_id) == key:
            return
        self._logged[model_id] = key
        split = ", ".join(f"{p.node_id} [{p.start:g}, {p.end:g})" for p in partitions)
        n_layers = _card_layers(model_id)
        if n_layers:
            split += " = layers " + ", ".join(f"{nid} {a}-{b}" for nid, (a, b) in layer_ranges(partitions, n_layers).items())
        plain = sorted(nid for nid, caps in nodes if read_mark(str(caps.model)) is None)
        if plain:
            how = f"exo's partition over every node (plain stock exo node in the ring: {', '.join(plain)})"
        elif left_out:
            how = f"nodes that serve {model_id} (left out, they cannot: {', '.join(left_out)})"
        else:
            how = "exo's partition over every node"
        print(f"[exo-rknpu] node {self.self_id}: ring for {model_id}: {split}; {how}", flush=True)

    # ------------------------------------------------------------------ topology changes

    def observe(self, topology: Any) -> None:
        """Called after every topology collection: remember when the nodes or what they report last changed."""
        seen = tuple(sorted((nid, str(caps.model), int(caps.memory)) for nid, caps in topology.all_nodes()))
        if seen != self._seen:
            before, after = {s[0] for s in self._seen}, {s[0] for s in seen}
            parts = [f"{', '.join(sorted(after - before))} joined" if after - before else "",
                     f"{', '.join(sorted(before - after))} left" if before - after else ""]
            self._change = "; ".join(p for p in parts if p) or "a node's report changed"
            self._seen, self._changed_at = seen, time.monotonic()

    def settling(self) -> str | None:
        """'<what> <n> s ago' if the topology changed within SETTLE_S, else None."""
        age = time.monotonic() - self._changed_at
        return f"{self._change} {age:.0f} s ago" if self._changed_at and age < SETTLE_S else None

    # ------------------------------------------------------------------ explanations

    def explain_mismatch(self, topology: Any, sent: Any, own: tuple[int, int] | None) -> str:
        """Why a step for `sent` (the shard a peer expects this node to hold) reached a node whose own partition
        gives it `own` (None: no layers), and what to do about it."""
        model, n = sent.model_id, int(sent.n_layers)
        mine = f"layers {own[0]}-{own[1]}" if own is not None else "no layers"
        head = (f"node {self.self_id} refuses the step: the sender expects it to hold layers "
                f"{sent.start_layer}-{sent.end_layer} of {model} ({n} layers), its own partition gives it {mine}")
        card = _card_layers(model)
        if card and card != n:
            return (f"{head}. Why: the sender's card for {model} has {n} layers, this node's has {card}. Fix: give "
                    f"every node the same card (start every node with `exo-rknpu node`, which corrects exo's cards)")
        settling = self.settling()
        if settling is not None:
            return f"{head}. Why: the ring is still settling ({settling}). Fix: retry in a few seconds"
        nodes = list(topology.all_nodes())
        stock = layer_ranges(self.stock_partition(topology), n).get(self.self_id)
        if stock == (sent.start_layer, sent.end_layer):
            ours = {p.node_id for p in self.partition(topology, model)}
            why = "; ".join(f"node {nid} ({_describe(caps)}) cannot serve {model}" for nid, caps in nodes if nid not in ours)
            return (f"{head}. Why: the sender partitions over every node, as stock exo does (it sees a plain stock "
                    f"node this node does not, or runs an older exo-rknpu), while this node leaves out: {why}. Fix: "
                    f"every node must see the same nodes and run the same exo-rknpu (compare /v1/topology on each)")
        view = ", ".join(f"{nid} ({caps.memory} MB, {_describe(caps)})" for nid, caps in nodes)
        return (f"{head}. Why: the sender sees a different ring than this node, which sees {view}. Fix: every node "
                f"must see the same nodes with the same memory: compare /v1/topology on each (discovery, "
                f"--node-id-filter, a firewall)")

    def unservable(self, topology: Any, model_id: str, n_layers: int) -> str | None:
        """Why the ring cannot serve `model_id` (a node that gets layers of it cannot run them), or None.

        Known without asking the node: a node whose mark does not list the model, and a plain stock node when legacy
        exo has no card for the model. A plain stock node's engine is not known (exo does not report it), so a stock
        card is taken to mean the node can serve it."""
        nodes = dict(topology.all_nodes())
        plain = sorted(nid for nid, caps in nodes.items() if read_mark(str(caps.model)) is None)
        for nid, (a, b) in layer_ranges(self.partition(topology, model_id), n_layers).items():
            caps = nodes.get(nid)
            mark = read_mark(str(caps.model)) if caps is not None else None
            where = f"exo's partition gives node {nid} layers {a}-{b} of {model_id}"
            if mark is None and caps is not None and plain_stock_card_missing(model_id):
                return (f"{where}, but {nid} is a plain stock exo node (it reports {caps.model!r}, no exo-rknpu "
                        f"mark) and stock exo has no card for {model_id}: it cannot run them. Fix: start {nid} with "
                        f"`exo-rknpu node --engine tinygrad -- ...` (it adds the card), or keep it out of this ring "
                        f"(`--node-id-filter` with the other nodes' ids, on every node)")
            if mark is not None and not mark.serves(model_id):
                why = (f"plain stock exo node in the ring: {', '.join(plain)}; exo's partition then covers every node"
                       if plain else f"no node's mark lists {model_id}")
                fix = (f"keep the plain stock node(s) out of this ring, or start them with `exo-rknpu node`, so the "
                       f"ring can leave {nid} out" if plain else f"add a node that serves {model_id} to the ring")
                return (f"{where} ({why}), but {nid} ({mark.engine}) does not serve {model_id}: its mark lists "
                        f"{', '.join(mark.models) or 'nothing'} (a node leaves out a model it has no card for, or "
                        f"whose files it has but cannot plan: it names the model and the reason at start, and its "
                        f"API answers requests for it with that reason). Fix: {fix}")
        return None


def _card_layers(model_id: str) -> int | None:
    """The layer count of exo's card for `model_id` in this process (patched by the launcher), or None."""
    from exo.models import model_cards

    layers = model_cards.get(model_id, {}).get("layers")
    return int(layers) if layers else None


# ---------------------------------------------------------------------- exo's Node, asking with the model


def node_partitions(node: Any, model_id: str | None) -> list:
    strategy = node.partitioning_strategy
    if isinstance(strategy, MixedRingPartitioning):
        return strategy.partition(node.topology, model_id)
    return strategy.partition(node.topology)


def patch_node_partitioning(Node: Any) -> None:
    """exo's Node asks the partitioning strategy with the model of the shard at hand (exo's own methods ask without
    it). Each replacement does what exo's method does, with `node_partitions(self, model_id)` for the partition."""
    from exo.topology.partitioning_strategy import map_partitions_to_shards

    original_collect = Node.collect_topology

    def get_partition_index(self: Any, offset: int = 0, model_id: str | None = None) -> int:
        partitions = node_partitions(self, model_id)
        index = next((i for i, p in enumerate(partitions) if p.node_id == self.id), None)
        if index is None:
            raise ValueError(f"node {self.id} takes no layers of {model_id} in its ring "
                             f"({', '.join(p.node_id for p in partitions)})")
        return (index + offset) % len(partitions)

    def get_current_shard(self: Any, base_shard: Any, index: int | None = None) -> Any:
        if index is None:
            index = self.get_partition_index(model_id=base_shard.model_id)
        partitions = node_partitions(self, base_shard.model_id)
        return map_partitions_to_shards(partitions, base_shard.n_layers, base_shard.model_id)[index]

    def target(self: Any, base_shard: Any, target_index: int) -> tuple[str, Any]:
        target_id = node_partitions(self, base_shard.model_id)[target_index].node_id
        return target_id, self.get_current_shard(base_shard, target_index)

    def peer(self: Any, target_id: str, target_index: int) -> Any:
        found = next((p for p in self.peers if p.id() == target_id), None)
        if found is None:
            raise ValueError(f"peer {target_id} (partition {target_index}) is not connected to node {self.id}")
        return found

    async def hand_on(self: Any, kind: str, base_shard: Any, data: Any, request_id: str, target_index: int,
                      inference_state: Any) -> None:
        """exo's forward_prompt / forward_tensor (kind "prompt" / "tensor"): to this node's own process_<kind>, or
        to the target peer's send_<kind>."""
        target_id, next_shard = target(self, base_shard, target_index)
        if target_id == self.id:
            await getattr(self, f"process_{kind}")(next_shard, data, request_id, inference_state)
        else:
            await getattr(peer(self, target_id, target_index), f"send_{kind}")(
                next_shard, data, request_id=request_id, inference_state=inference_state)

    async def forward_prompt(self: Any, base_shard: Any, prompt: str, request_id: str, target_index: int,
                             inference_state: Any = None) -> None:
        await hand_on(self, "prompt", base_shard, prompt, request_id, target_index, inference_state)

    async def forward_tensor(self: Any, base_shard: Any, tensor: Any, request_id: str, target_index: int,
                             inference_state: Any = None) -> None:
        await hand_on(self, "tensor", base_shard, tensor, request_id, target_index, inference_state)

    async def collect_topology(self: Any, visited: set, max_depth: int = 4) -> Any:
        topology = await original_collect(self, visited, max_depth)
        if isinstance(self.partitioning_strategy, MixedRingPartitioning):
            self.partitioning_strategy.observe(topology)
        return topology

    replace_methods(Node, get_partition_index, get_current_shard, forward_prompt, forward_tensor, collect_topology)


def use_mixed_ring(node: Any) -> None:
    """Give `node` (exo's Node) the mixed-ring partitioning (idempotent)."""
    if not isinstance(node.partitioning_strategy, MixedRingPartitioning):
        node.partitioning_strategy = MixedRingPartitioning(node.partitioning_strategy, node.id)
