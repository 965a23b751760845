"""What a node reports is what it can hold: the range exo's own partition gives it fits.

A node's reported memory (capabilities.MemoryRule) goes into exo's real RingMemoryWeightedPartitioningStrategy and
map_partitions_to_shards beside a stock node of stated memory; the range exo gives the exo-rknpu node must fit what
it keeps, by a reference that is not the rule: on a board, NpuBackend.resident_bytes over that range from the
compiled slices' manifests; on a CPU, the bytes of the weights the loader really returns for that range. Plus the
KV budget; within MemTotal less the runtime's reserves. The manifests of the board are written here, in the layout
rknn/compile.py writes (slices/artifacts.py), with .rknn sizes of float16 layers plus 6 % (what a compiled file
carries besides its weights): inputs, as a board's compile would leave them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exo_helpers import needs_exo, write_unsupported_model
from exo_rknpu.engine import EngineConfig, ShardEngine, holding
from exo_rknpu.errors import ExoRknpuError, ShardTooLargeError
from exo_rknpu.exo.capabilities import STOCK_BYTES_PER_WEIGHT, budget_bytes, detect, memory_rule
from exo_rknpu.exo.options import NodeOptions
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_header, load_shard, resolve_model, source_fingerprint
from exo_rknpu.runtime.placement import default_buckets, part_params, spec_bytes
from exo_rknpu.runtime.requests import RequestLimits
from exo_rknpu.slices.spec import PARTS, SliceSpec

MODEL = "smollm2-135m"
KV = RequestLimits(max_requests=2, max_bytes=64 << 20)  # small, so that the weights decide
RKNN_OVERHEAD = 1.06


@pytest.fixture(scope="module")
def smollm2():
    src = resolve_model(MODEL)
    return src, load_args(src)


@pytest.fixture(scope="module")
def fingerprint(smollm2):
    return source_fingerprint(load_header(smollm2[0]))


def fp16_model_mb(args) -> int:
    """The whole model as a stock node keeps it (float16, rounded up to MB): exo's unit."""
    L = args.num_hidden_layers
    specs = [SliceSpec("embed"), SliceSpec("layers", 0, L), SliceSpec("head")]
    return -(-sum(spec_bytes(args, s, STOCK_BYTES_PER_WEIGHT) for s in specs) >> 20)


def proc_root(tmp_path: Path, total_mb: int, board: bool) -> Path:
    root = tmp_path / f"root-{total_mb}"
    dt = root / "proc/device-tree"
    dt.mkdir(parents=True)
    if board:
        (dt / "compatible").write_bytes(b"radxa,rock-5b\x00rockchip,rk3588\x00")
        (dt / "model").write_bytes(b"Radxa ROCK 5B\x00")
    (root / "proc/meminfo").write_text(f"MemTotal: {total_mb * 1024} kB\nMemAvailable: 1000 kB\n")
    return root


def write_compiled(cache: Path, fingerprint: str, args) -> None:
    """Manifests of every fp16 slice of the model (layers and head), as compile would leave them in `cache`."""
    layer_bytes = int(sum(part_params(args, p) for p in PARTS) * 2 * RKNN_OVERHEAD)
    head_bytes = int(args.vocab_size * args.hidden_size * 2 * RKNN_OVERHEAD)
    names = [SliceSpec("layers", i, i + 1).name for i in range(args.num_hidden_layers)] + ["head"]
    for n, name in enumerate(names):
        key = f"{n:02d}" + "k" * 62
        entry = cache / "slices" / key[:2] / key
        entry.mkdir(parents=True)
        manifest = {"format": 1, "key": key, "slice": {"name": name}, "model_fingerprint": fingerprint, "dtype": "fp16",
                    "platform": "rk3588", "build": {"internal_kb": 1024},
                    "files": [{"file": f"{name}.rknn", "bytes": head_bytes if name == "head" else layer_bytes}]}
        (entry / "manifest.json").write_text(json.dumps(manifest))
        index = cache / "index" / fingerprint / "fp16-rk3588"
        index.mkdir(parents=True, exist_ok=True)
        (index / f"{name}.json").write_text(json.dumps({"key": key}))


@pytest.fixture(scope="module")
def board_cache(tmp_path_factory, smollm2, fingerprint):
    cache = tmp_path_factory.mktemp("compiled")
    write_compiled(cache, fingerprint, smollm2[1])
    return cache


def npu_options(cache: Path) -> NodeOptions:
    return NodeOptions(engine=EngineConfig(backend="npu", limits=KV, backend_options={"cache_dir": str(cache)}))


def cpu_options(weights: str) -> NodeOptions:
    return NodeOptions(engine=EngineConfig(backend="onnx", weights=weights, limits=KV))


def exo_ranges(reports: dict[str, int], n_layers: int) -> dict[str, LayerRange]:
    """node id -> the layers exo's own partition gives it, in ring order (the first node first)."""
    from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
    from exo.topology.partitioning_strategy import map_partitions_to_shards
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy
    from exo.topology.topology import Topology

    topo = Topology()
    for nid, memory in reports.items():
        topo.update_node(nid, DeviceCapabilities(model="m", chip="c", memory=memory, flops=DeviceFlops(fp32=0, fp16=0, int8=0)))
    partitions = RingMemoryWeightedPartitioningStrategy().partition(topo)
    shards = map_partitions_to_shards(partitions, n_layers, MODEL)
    return {p.node_id: LayerRange(s.start_layer, s.end_layer + 1, n_layers) for p, s in zip(partitions, shards)}


def board_report(tmp_path, cache, total_mb) -> int:
    options = npu_options(cache)
    return detect(memory_rule(options, (MODEL,)), proc_root(tmp_path, total_mb, board=True)).memory


def board_keeps(args, fingerprint: str, cache: Path, lr: LayerRange) -> int:
    """The reference: what the npu backend says the range needs, from the manifests."""
    from exo_rknpu.rknn.npu import NpuBackend

    mem = NpuBackend(cache_dir=cache, check_board=False).resident_bytes(
        fingerprint, args, lr, default_buckets(args).max_context, KV.max_requests, KV.max_bytes)
    return mem.total


@needs_exo
@pytest.mark.exo
@pytest.mark.parametrize("total_mb, stock_mb, first", [
    (1360, 250, "gpu"),  # a small board beside a bigger stock node: the board takes the last layers and the head
    (1700, 200, "rk"),  # a board that reports more than the stock node takes the first layers and the embedding
])
def test_the_range_exo_gives_a_board_fits_its_compiled_slices(tmp_path, smollm2, fingerprint, board_cache, total_mb, stock_mb, first):
    _, args = smollm2
    reported = board_report(tmp_path, board_cache, total_mb)
    assert reported + stock_mb >= fp16_model_mb(args)  # the ring can hold the model in exo's unit
    ranges = exo_ranges({"rk": reported, "gpu": stock_mb}, args.num_hidden_layers)
    assert list(ranges)[0] == first
    assert board_keeps(args, fingerprint, board_cache, ranges["rk"]) <= budget_bytes(total_mb, "npu")


def stock_nodes(reported: int, model_mb: int) -> list[int]:
    """Stock nodes for a ring with this node: from the smallest that lets the ring hold the model (the largest share
    exo can give this node, the hardest case) to one much larger than this node."""
    least = max(1, model_mb - reported)
    return sorted({least, least + 1, least + 7, least + 40, least + 150, 2 * model_mb, 8000})


@needs_exo
@pytest.mark.exo
@pytest.mark.parametrize("node", ["board fp16", "cpu auto", "cpu int4", "cpu int8"])
def test_every_ring_that_can_hold_the_model_gives_a_node_a_range_that_fits(tmp_path, smollm2, fingerprint, board_cache,
                                                                            node):
    """Boards from 1150 MB to 3 GB (CPU nodes the same), each beside stock nodes from the smallest that completes
    the ring upwards, in both orders; the reference for a board is the manifests (resident_bytes), for a CPU node
    the plan's estimate (the loader's own bytes: the next test)."""
    _, args = smollm2
    model_mb = fp16_model_mb(args)
    board = node.startswith("board")
    options = npu_options(board_cache) if board else cpu_options(node.split()[1])
    rule = memory_rule(options, (MODEL,))
    orders, checked = set(), 0
    for total_mb in range(1150, 3000, 25):
        reported = detect(rule, proc_root(tmp_path, total_mb, board)).memory
        for stock_mb in stock_nodes(reported, model_mb):
            ranges = exo_ranges({"ours": reported, "stock": stock_mb}, args.num_hidden_layers)
            if "ours" not in ranges:
                continue  # exo gives it no layer
            lr = ranges["ours"]
            need = (board_keeps(args, fingerprint, board_cache, lr) if board else
                    holding(args, lr, options.engine).total)
            assert need <= budget_bytes(total_mb, "npu" if board else "onnx"), (total_mb, reported, stock_mb, lr)
            orders.add(list(ranges)[0])
            checked += 1
    assert checked > 300 and orders == {"ours", "stock"}


@needs_exo
@pytest.mark.exo
@pytest.mark.parametrize("weights", ["auto", "int4"])
@pytest.mark.parametrize("stock_mb", [40, 400])
def test_the_range_exo_gives_a_cpu_node_fits_the_weights_it_loads(tmp_path, smollm2, weights, stock_mb):
    src, args = smollm2
    total_mb = {"auto": 1600, "int4": 1250}[weights]  # about half of the model fits, so exo's share matters
    reported = detect(memory_rule(cpu_options(weights), (MODEL,)), proc_root(tmp_path, total_mb, board=False)).memory
    assert reported + stock_mb >= fp16_model_mb(args)
    lr = exo_ranges({"cpu": reported, "gpu": stock_mb}, args.num_hidden_layers)["cpu"]
    assert 0 < len(lr) < args.num_hidden_layers  # a real split
    loaded = load_shard(src, lr, weights).nbytes  # the reference: what the loader really returns for the range
    assert loaded + KV.max_bytes <= budget_bytes(total_mb, "onnx")


@needs_exo
@pytest.mark.exo
@pytest.mark.parametrize("node, total_mb, stock_mb, first", [
    ("board fp16", 8192, 12288, "stock"),  # a board with 8 GB beside a 12 GB GPU: the GPU first, the board last
    ("board fp16", 8192, 8192, "ours"),  # beside an 8 GB GPU the board goes first: it keeps float16 layers too, and
    # exo charges a layer its share of the embedding and head as well (the board keeps only one end)
    ("cpu int4", 8192, 16384, "ours"),  # int4 weights hold 3x the layers of float16: 8 GB goes before 16 GB
    ("cpu fp32", 16384, 16384, "stock"),  # float32 weights hold half as many: 16 GB go after 16 GB of float16
    ("cpu auto", 8192, 16384, "ours"),  # auto's compact forms (at most 1.28 bytes per weight) hold more than float16:
    # 8 GB go before 16 GB
    ("cpu auto", 8192, 20480, "stock"),  # ... but not 2.5x as much: 8 GB go after 20 GB
])
def test_the_order_in_a_mixed_ring_follows_what_each_node_holds(tmp_path, smollm2, board_cache, node, total_mb,
                                                                  stock_mb, first):
    options = npu_options(board_cache) if node.startswith("board") else cpu_options(node.split()[1])
    reported = detect(memory_rule(options, (MODEL,)), proc_root(tmp_path, total_mb, node.startswith("board"))).memory
    assert list(exo_ranges({"ours": reported, "stock": stock_mb}, 30))[0] == first


def test_a_rule_without_the_served_models_files_falls_back_to_the_weight_form(tmp_path):
    options = NodeOptions(engine=EngineConfig(backend="onnx", weights="fp32", limits=KV))
    rule = memory_rule(options, ("llama-3.2-3b",))  # not downloaded here
    assert rule.models == () and rule.per_weight == 4.0
    budget = budget_bytes(4096, "onnx")
    assert rule.reported_mb(4096) == (budget - KV.max_bytes) // 2 >> 20


async def test_a_range_that_does_not_fit_is_refused_in_one_line_before_anything_loads(smollm2):
    src, args = smollm2
    lr = LayerRange(0, 30, 30)
    config = EngineConfig(backend="onnx", weights="fp32", limits=KV)
    need = holding(args, lr, config)
    opened = []

    async def source(model_id: str, layer_range: LayerRange):
        return src

    def runner(*a):
        opened.append(a)
        raise AssertionError("the runner must not be opened")

    engine = ShardEngine(EngineConfig(backend="onnx", weights="fp32", limits=KV, memory_bytes=need.total - 1),
                         source, runner)
    try:
        with pytest.raises(ShardTooLargeError) as e:
            await engine.ensure(MODEL, lr)
        text = str(e.value)
        assert "\n" not in text and f"needs {need.total >> 20} MB" in text and "weights by the plan" in text
        assert opened == []
        engine.config = EngineConfig(backend="onnx", weights="fp32", limits=KV, memory_bytes=need.total)
        with pytest.raises(AssertionError, match="must not be opened"):  # it fits: the runner is opened
            await engine.ensure(MODEL, lr)
    finally:
        await engine.aclose()


async def test_a_served_model_it_cannot_plan_is_named_with_the_reason_loading_its_shard_gives(tmp_path):
    """Left out of the reported memory, but never silently: the rule names it with the error the engine raises
    when exo gives this node a shard of it (the reference: ShardEngine.ensure on the same files)."""
    path = write_unsupported_model(tmp_path / "models" / MODEL)
    options = NodeOptions(engine=EngineConfig(backend="onnx", weights="fp32", limits=KV), model_dir=tmp_path / "models")
    rule = memory_rule(options, (MODEL,))
    assert rule.models == () and [u.model_id for u in rule.unplanned] == [MODEL]
    reason = rule.unplanned[0].reason
    assert "\n" not in reason and reason.startswith(f"this node cannot serve {MODEL}: ") and "'gemma'" in reason
    assert "none it can plan" in rule.explain(4096)

    async def source(model_id: str, layer_range: LayerRange):
        return resolve_model(str(path))

    engine = ShardEngine(options.engine, source)
    try:
        with pytest.raises(ExoRknpuError) as e:
            await engine.ensure(MODEL, LayerRange(0, 30, 30))
        assert reason.split(": ", 1)[1] in str(e.value)
    finally:
        await engine.aclose()
