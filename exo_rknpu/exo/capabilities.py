"""What this node tells exo's partitioner: board, chip, memory, and TOPS.

exo's RingMemoryWeightedPartitioningStrategy splits layers in proportion to `memory` (MB) alone; FLOPS are only
displayed. A stock node reports its RAM (or VRAM) and keeps its weights as its checkpoint stores them: float16 or
bfloat16 for the Hugging Face repos exo's tinygrad cards name (tinygrad keeps them in 2 bytes on a GPU). So exo's
`memory` is, in effect, "MB of float16 weights this node holds" (STOCK_BYTES_PER_WEIGHT). An exo-rknpu node keeps a
different form (int4/int8/fp32 on a CPU, compiled fp16/int8 slices on the NPU), so it reports its memory in exo's
unit: the float16 size of the layers it can really keep, for the models it serves (`MemoryRule`):

    budget   = MemTotal - 512 MB runtime reserve - the backend's reserve           (what a shard may use)
    reported = min over served models of
               (budget - KV budget - max(embedding, head) - one layer) x (float16 bytes of a layer / bytes it keeps of one)
               capped by --memory-mb

What it keeps is engine.holding: the placement plan's estimates (runtime/placement.py spec_bytes at
bytes_per_weight), or on the npu backend the compiled slices' manifests (NpuBackend.resident_bytes); the models are
those it serves whose files are here at start (without any: the weight form's bytes per weight; one it cannot plan
is left out and named, MemoryRule.unplanned, left out of its mark, and its requests refused with that reason).
Holding back the larger end slice and one layer is what makes exo's share fit: a node reporting R in a ring whose
reported total covers the model's float16 size gets at most R/(float16 bytes of a layer) + 1 layers (exo rounds the
split to whole layers), and whichever end it takes. A shard that still needs more than the budget (a ring too small
for the model) is refused before it loads (engine.check_fits). The rule uses only fixed quantities, so the same
machine reports the same number on every start (MemAvailable would not). On the RK3588 the NPU works out of the same
system RAM, so there is no separate NPU memory to add.

Every node started by `exo-rknpu node` (an exo-rknpu node, or a stock exo engine it starts) ends its reported
`model` with the launcher's mark, `(exo-rknpu, <engine>; serves <model id>,<model id>,...)`: exo's topology says
nothing else about a peer's engine, and the mark travels with the capabilities (UDP discovery, CollectTopology) to
every node, so all nodes can derive the same ring from it (ring_members.py).

Nothing here imports exo at module import; `to_exo()` builds exo's DeviceCapabilities.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_rknpu.engine import Holding
from exo_rknpu.errors import ExoRknpuError
from exo_rknpu.exo.availability import local_model
from exo_rknpu.exo.cards import CARDS
from exo_rknpu.exo.options import NodeOptions
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.runtime.placement import spec_bytes
from exo_rknpu.slices.spec import SliceSpec

RUNTIME_RESERVE_MB = 512  # python, exo, gRPC buffers, numpy scratch: any backend
# What a backend's runtime adds on top (estimates, not measured on a board): onnxruntime's arenas; librknnrt's
# DMA buffers for inputs/outputs plus the onnx fallback for the embedding.
BACKEND_RESERVE_MB = {"numpy": 0, "onnx": 256, "npu": 512}
STOCK_BYTES_PER_WEIGHT = 2.0  # float16/bfloat16: what a stock node keeps per weight of the repos exo's cards name
RK3588_NPU_INT8_TOPS = 6.0  # Rockchip's figure: 3 NPU cores x 2 TOPS int8
RK3588_NPU_FP16_TFLOPS = 1.5  # int8/4, the RKNPU2 fp16 rate commonly quoted; not measured by us


_MARK = re.compile(r" ?\(exo-rknpu, ([^;()]+); serves ([^()]*)\)$")


@dataclass(frozen=True)
class LauncherMark:
    """What a node started by the launcher says about itself: its engine and the models it can serve."""

    engine: str  # "rknpu/<backend>" for an exo-rknpu node, "tinygrad" / "mlx" for a stock engine
    models: tuple[str, ...]

    def text(self) -> str:
        return f"(exo-rknpu, {self.engine}; serves {','.join(self.models)})"

    def serves(self, model_id: str) -> bool:
        return model_id in self.models


def read_mark(reported_model: str) -> LauncherMark | None:
    """The launcher's mark in a node's reported DeviceCapabilities.model, or None (a plain stock exo node, or a
    peer that has not reported yet: exo shows it as "Unknown Model")."""
    m = _MARK.search(reported_model)
    if m is None:
        return None
    return LauncherMark(m.group(1).strip(), tuple(x for x in m.group(2).split(",") if x))


def with_mark(reported_model: str, mark: LauncherMark) -> str:
    """`reported_model` with the mark at its end (replacing a mark already there)."""
    return f"{_MARK.sub('', reported_model)} {mark.text()}".strip()


@dataclass(frozen=True)
class NodeCapabilities:
    model: str  # board
    chip: str
    memory: int  # MB reported to exo's partitioner (MemoryRule)
    fp32: float = 0.0  # TFLOPS (display only in exo)
    fp16: float = 0.0
    int8: float = 0.0

    def to_exo(self) -> Any:
        from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

        return DeviceCapabilities(model=self.model, chip=self.chip, memory=int(self.memory),
                                  flops=DeviceFlops(fp32=self.fp32, fp16=self.fp16, int8=self.int8))


def _read_dt(proc_root: Path, name: str) -> str:
    """A device-tree string property (NUL-separated list) as text, '' if absent."""
    try:
        raw = (proc_root / "proc/device-tree" / name).read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\x00", b"\n").decode("utf-8", "replace").strip()


def rockchip_soc(proc_root: Path = Path("/")) -> str | None:
    """'RK3588' / 'RK3588S' if the device tree's compatible list names one, else None."""
    compat = _read_dt(proc_root, "compatible").lower().split("\n")
    for c in compat:
        if c.startswith("rockchip,rk35"):
            return c.split(",", 1)[1].upper()
    return None


def mem_total_mb(proc_root: Path = Path("/")) -> int:
    """MemTotal (MB) from /proc/meminfo; 0 if unreadable."""
    try:
        for line in (proc_root / "proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key.strip() == "MemTotal" and rest.split():
                return int(rest.split()[0]) // 1024  # kB
    except (OSError, ValueError):
        pass
    return 0


def budget_bytes(total_mb: int, backend: str) -> int:
    """What a shard may keep on this node (weights and KV cache): MemTotal less the runtime's reserves."""
    return max(0, total_mb - RUNTIME_RESERVE_MB - BACKEND_RESERVE_MB.get(backend, 0)) << 20


@dataclass(frozen=True)
class ModelKeeps:
    """What this node keeps of one model it serves (engine.holding over every layer), and what exo's memory
    weighting charges per layer of it (stock_bytes_per_layer)."""

    model_id: str
    whole: Holding
    stock_per_layer: int

    def reported_bytes(self, budget: int) -> int:
        """exo's charge for the layers this node can keep beside the KV budget, its larger end slice and one layer
        of slack for exo's rounding (module docstring)."""
        layer = max(self.whole.layers)
        room = budget - self.whole.kv - max(self.whole.embed, self.whole.head) - layer
        return max(0, room) * self.stock_per_layer // max(layer, 1)


def stock_bytes_per_layer(args: ModelArgs) -> int:
    """What exo's memory weighting charges a node per layer of a model: its float16 size (embedding, layers and
    head, placement.spec_bytes at STOCK_BYTES_PER_WEIGHT) over its layers. A stock node reporting the model's
    float16 size is given every layer; one reporting k times this, k layers of it."""
    L = args.num_hidden_layers
    specs = (SliceSpec("embed"), SliceSpec("layers", 0, L), SliceSpec("head"))
    return -(-sum(spec_bytes(args, s, STOCK_BYTES_PER_WEIGHT) for s in specs) // L)


@dataclass(frozen=True)
class Unplanned:
    """A served model whose files are here but which this node cannot plan (an unsupported architecture, a broken
    file, a placement that does not fit it): left out of the reported memory, and its requests refused with `reason`."""

    model_id: str
    reason: str  # one line, naming the model


@dataclass(frozen=True)
class MemoryRule:
    """How this node derives the memory it reports (module docstring)."""

    backend: str
    kv_bytes: int  # the KV budget (--max-kv-mb), for the fallback
    per_weight: float  # bytes per weight of its form on the default device, for the fallback (no model known)
    models: tuple[ModelKeeps, ...] = ()
    memory_mb: int | None = None  # --memory-mb: a cap
    unplanned: tuple[Unplanned, ...] = ()

    def reported_mb(self, total_mb: int) -> int:
        """The memory reported to exo; at least 1 MB (exo divides by the ring's total)."""
        budget = budget_bytes(total_mb, self.backend)
        if self.models:
            rule = min(m.reported_bytes(budget) for m in self.models) >> 20
        else:
            rule = int(max(0, budget - self.kv_bytes) * STOCK_BYTES_PER_WEIGHT / self.per_weight) >> 20
        if self.memory_mb is not None:
            rule = min(rule, self.memory_mb) if total_mb > 0 else self.memory_mb
        return max(1, rule)

    def explain(self, total_mb: int) -> str:
        """One line: what is reported and from what."""
        how = (f"from what it keeps of {', '.join(f'{m.model_id} ({m.whole.source})' for m in self.models)}"
               if self.models else f"at {self.per_weight:g} bytes per weight (no served model's files are here"
               + (", or none it can plan)" if self.unplanned else ")"))
        cap = f", capped by --memory-mb {self.memory_mb}" if self.memory_mb is not None else ""
        return (f"reports {self.reported_mb(total_mb)} MB to exo's partitioner: float16 MB of layers it can keep in "
                f"{budget_bytes(total_mb, self.backend) >> 20} MB, {how}{cap}")


def memory_rule(options: NodeOptions, served: tuple[str, ...]) -> MemoryRule:
    """This node's MemoryRule: engine.holding for every served model whose files are here (config and tensor table
    only; nothing is loaded or downloaded). A model it cannot plan is left out and named in `unplanned`."""
    from exo_rknpu.runtime.placement import default_bytes_per_weight

    config = options.engine
    keeps, unplanned = [], []
    for model_id in served:
        try:
            kept = model_keeps(options, model_id)
        except ExoRknpuError as e:
            unplanned.append(Unplanned(model_id, cannot_plan(model_id, e)))
            continue
        if kept is not None:
            keeps.append(kept)
    per_weight = default_bytes_per_weight(config.backend, config.weights, config.backend_options.get("dtype", "fp16"))
    return MemoryRule(config.backend, config.limits.max_bytes, per_weight, tuple(keeps), options.memory_mb,
                      tuple(unplanned))


def model_keeps(options: NodeOptions, model_id: str) -> ModelKeeps | None:
    """What this node keeps of `model_id` (engine.holding over every layer), None if its files are not here;
    ExoRknpuError (what loading its shard would raise) if it cannot be planned."""
    from exo_rknpu.engine import holding
    from exo_rknpu.model.loader import load_header, resolve_model, source_fingerprint

    path = local_model(CARDS[model_id], options.model_dir) if model_id in CARDS else None
    if path is None:
        return None
    config = options.engine
    src = resolve_model(str(path))
    header = load_header(src)
    args = header.args
    fingerprint = source_fingerprint(header) if config.backend == "npu" else None
    whole = holding(args, LayerRange(0, args.num_hidden_layers, args.num_hidden_layers), config, fingerprint)
    return ModelKeeps(model_id, whole, stock_bytes_per_layer(args))


def cannot_plan(model_id: str, error: ExoRknpuError) -> str:
    """The one line that names a served model this node cannot plan, and why."""
    return f"this node cannot serve {model_id}: {' '.join(str(error).split())}"


def plan_problem(options: NodeOptions, model_id: str) -> str | None:
    """Why this node cannot plan `model_id` (its files are here), or None (planned, or its files are not here)."""
    try:
        model_keeps(options, model_id)
    except ExoRknpuError as e:
        return cannot_plan(model_id, e)
    return None


def detect(rule: MemoryRule, proc_root: Path = Path("/"), models: tuple[str, ...] = ()) -> NodeCapabilities:
    """This machine's capabilities as exo should see them; `models`: the model ids this node serves. Its mark lists
    those it can plan: one in rule.unplanned is left out, so a ring of marked nodes gives its layers to the others
    (ring_members.py) instead of to a node that would fail loading them."""
    unplanned = {u.model_id for u in rule.unplanned}
    mark = LauncherMark(f"rknpu/{rule.backend}", tuple(m for m in models if m not in unplanned)).text()
    memory = rule.reported_mb(mem_total_mb(proc_root))
    soc = rockchip_soc(proc_root)
    board = _read_dt(proc_root, "model").split("\n")[0]
    if soc is not None:
        npu = soc.startswith("RK3588")
        return NodeCapabilities(
            model=f"{board or 'Rockchip board'} {mark}",
            chip=f"Rockchip {soc}",
            memory=memory,
            fp16=RK3588_NPU_FP16_TFLOPS if npu else 0.0,
            int8=RK3588_NPU_INT8_TOPS if npu else 0.0,
        )
    cpu = _cpu_name(proc_root) or platform.machine() or "unknown CPU"
    return NodeCapabilities(model=f"{board or platform.system() + ' ' + platform.machine()} {mark}",
                            chip=cpu, memory=memory)


def _cpu_name(proc_root: Path) -> str:
    try:
        for line in (proc_root / "proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
