"""Which device runs which slice: placement plans as data, and the planner that resolves them.

A plan is `RANGE=DEVICE[,RANGE=DEVICE...][;BLOCK=DEVICE...]` (or the same as TOML, see `PlacementPlan.load`):

    0-9=npu0,10-19=npu1,20-29=npu2      three NPU cores, ten layers each
    0-29=npu;attention=cpu              every layer on the NPU except scores/softmax/values over the cache

Ranges are inclusive layer numbers of the model (a shard applies the part inside its own range); layers no range
names run on the default backend. A block rule moves that block of every layer (in the shard) to its device.
The planner (`resolve`) checks a plan against the model and the backends before anything loads and turns it into
slices, each with its device and backend; `open_shard` loads the shard's weights and prepares them into a
`ShardRunner`, which runs them (`runtime/stages.py` pipelines them per device).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from exo_rknpu.backends.base import Backend, backend_class, declared_support, get_backend, option_names
from exo_rknpu.backends.board import NPU_CORES, board_problems, host_memory
from exo_rknpu.errors import UsageError
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.loader import ModelHeader, ShardSource, header_of, load_header
from exo_rknpu.model.quant import AUTO_MAX_BYTES_PER_WEIGHT, DEFAULT_WEIGHTS, check_mode
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.runtime.requests import RequestLimits
from exo_rknpu.runtime.shard import ShardRunner, SliceObserver
from exo_rknpu.slices.spec import PART_BLOCK, PARTS, PLACEMENT_BLOCKS, WHOLE_LAYER, Buckets, SliceSpec, NPU_BATCH, npu_buckets

DEVICES = ("cpu", *NPU_CORES)  # what a plan may name: the host CPU and the board's NPU (backends/board.py)
# Placement blocks -> the layer parts they cover (slices/spec.py): attention is rotary, scores, softmax and values
# over the KV cache; projections q/k/v and o; mlp gate/up/down; norm the two RMSNorms; embedding and head whole slices.
BLOCKS: dict[str, tuple[str, ...]] = {b: tuple(p for p in PARTS if PART_BLOCK[p] == b) for b in PLACEMENT_BLOCKS}
# The backend of "cpu" devices, and of NPU devices emulated without an NPU, unless the default backend is a CPU one.
CPU_FALLBACK = "onnx"


class PlacementError(UsageError):
    """A plan that cannot be run as written (one line: what is wrong and how to fix it)."""


@dataclass(frozen=True)
class RangeRule:
    first: int  # inclusive layer numbers, as written
    last: int
    device: str

    def __str__(self) -> str:
        layers = f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"
        return f"{layers}={self.device}"


@dataclass(frozen=True)
class PlacementPlan:
    ranges: tuple[RangeRule, ...] = ()
    blocks: tuple[tuple[str, str], ...] = ()  # (block, device)

    @property
    def device_names(self) -> list[str]:
        """The devices it names, sorted."""
        return sorted({r.device for r in self.ranges} | {d for _, d in self.blocks})

    def __str__(self) -> str:
        text = ",".join(map(str, self.ranges))
        return text + (";" + ",".join(f"{b}={d}" for b, d in self.blocks) if self.blocks else "")

    @classmethod
    def parse(cls, text: str) -> "PlacementPlan":
        """`RANGE=DEVICE,...;BLOCK=DEVICE,...`; ranges before the `;`, blocks after it."""
        text = text.strip()
        if not text:
            raise PlacementError("--placement is empty; write e.g. 0-9=npu0,10-19=npu1 or 0-29=npu;attention=cpu")
        head, sep, tail = text.partition(";")
        if not sep and all(i.partition("=")[0].strip() in BLOCKS for i in head.split(",")):
            head, sep, tail = "", ";", head  # blocks only: the default backend keeps every layer
        if ";" in tail:
            raise PlacementError(f"placement {text!r} has more than one ';' (ranges go before it, blocks after it)")
        ranges = [_range_rule(item) for item in _items(head, text)] if head.strip() or not sep else []
        blocks = [_block_rule(item) for item in _items(tail, text)] if sep else []
        return cls._checked(tuple(ranges), tuple(blocks))

    @classmethod
    def from_toml(cls, path: Path) -> "PlacementPlan":
        """A TOML file: a [ranges] table ("0-9" = "npu0") and a [blocks] table (attention = "cpu")."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise PlacementError(f"cannot read placement file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise PlacementError(f"placement file {path} is not valid TOML: {e}") from None
        unknown = sorted(set(data) - {"ranges", "blocks"})
        if unknown:
            raise PlacementError(f"placement file {path}: unknown table(s) {unknown}; use [ranges] and [blocks]")
        for table in ("ranges", "blocks"):
            if not isinstance(data.get(table, {}), dict) or not all(isinstance(v, str) for v in data.get(table, {}).values()):
                raise PlacementError(f"placement file {path}: [{table}] maps names to device strings, e.g. {_example(table)}")
        ranges = tuple(_range_rule(f"{k}={v}") for k, v in data.get("ranges", {}).items())
        blocks = tuple(_block_rule(f"{k}={v}") for k, v in data.get("blocks", {}).items())
        if not ranges and not blocks:
            raise PlacementError(f"placement file {path} places nothing; add a [ranges] or [blocks] table")
        return cls._checked(ranges, blocks)

    @classmethod
    def load(cls, value: str) -> "PlacementPlan":
        """--placement: a .toml path, or an inline plan."""
        return cls.from_toml(Path(value)) if value.strip().endswith(".toml") else cls.parse(value)

    @classmethod
    def _checked(cls, ranges: tuple[RangeRule, ...], blocks: tuple[tuple[str, str], ...]) -> "PlacementPlan":
        ordered = sorted(ranges, key=lambda r: r.first)
        for a, b in zip(ordered, ordered[1:]):
            if b.first <= a.last:
                raise PlacementError(f"placement ranges {a} and {b} overlap (layer {b.first}); give each layer one device")
        seen: dict[str, str] = {}
        for block, device in blocks:
            if block in seen:
                raise PlacementError(f"placement names block {block!r} twice ({seen[block]} and {device})")
            seen[block] = device
        return cls(tuple(ordered), blocks)


def _items(part: str, whole: str) -> list[str]:
    items = [i.strip() for i in part.split(",")]
    if any(not i for i in items):
        raise PlacementError(f"placement {whole!r} has an empty item (a stray ',' or ';')")
    return items


def _device(device: str, item: str) -> str:
    device = device.strip()
    if device not in DEVICES:
        raise PlacementError(f"unknown device {device!r} in {item!r}; devices: {', '.join(DEVICES)}")
    return device


def _range_rule(item: str) -> RangeRule:
    lhs, eq, device = item.partition("=")
    lhs = lhs.strip()
    if not eq:
        raise PlacementError(f"placement item {item!r} needs the form RANGE=DEVICE (e.g. 0-9=npu0)")
    if lhs in BLOCKS:
        raise PlacementError(f"{item!r} is a block rule; blocks go after a ';' (e.g. 0-29=npu;{item})")
    a, dash, b = lhs.partition("-")
    if not (a.strip().isdigit() and (not dash or b.strip().isdigit())):
        raise PlacementError(f"{lhs!r} in {item!r} is not a layer range; write FIRST-LAST (inclusive, e.g. 0-9) or one layer")
    first, last = int(a), int(b) if dash else int(a)
    if last < first:
        raise PlacementError(f"layer range {lhs!r} is reversed; write {last}-{first}")
    return RangeRule(first, last, _device(device, item))


def _block_rule(item: str) -> tuple[str, str]:
    block, eq, device = item.partition("=")
    block = block.strip()
    if not eq:
        raise PlacementError(f"placement item {item!r} needs the form BLOCK=DEVICE (e.g. attention=cpu)")
    if block not in BLOCKS:
        raise PlacementError(f"unknown block {block!r} in {item!r}; blocks: {', '.join(BLOCKS)}")
    return block, _device(device, item)


def _example(table: str) -> str:
    return '"0-9" = "npu0"' if table == "ranges" else 'attention = "cpu"'


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """Where slices run: a name the plan uses, the backend that runs it here, and what that backend declares."""

    name: str  # cpu | npu | npu0..2 (a plan's devices), or the default backend's name for layers no rule names
    backend: str  # the backend that runs its slices on this machine
    npu: bool  # an NPU device (emulated or not): cut and held to what the npu backend declares, so plans port to a board
    core_mask: str | None = None  # the npu backend's core_mask option it pins (NPU_CORES); None: the user's choice
    emulated: bool = False  # an NPU device run by a CPU backend (no NPU on this machine)
    memory: int | None = None  # bytes it can hold (NPU devices: the board's DDR, which it shares with the CPU)


def devices_here(default_backend: str, npu_available: bool) -> dict[str, Device]:
    """Every device a plan may name, and the default device, as this machine runs them.

    NPU devices run on the npu backend when `npu_available`; otherwise on the default backend when it computes on
    an NPU itself (rknn-sim; npu without a board then refuses to open, naming what is missing); otherwise on a CPU
    backend, marked emulated."""
    default = backend_class(default_backend)
    cpu = default_backend if default.processor == "cpu" else CPU_FALLBACK
    on_npu, emulated = ("npu", False) if npu_available else (default_backend, False) if default.processor == "npu" else (cpu, True)
    memory = host_memory()
    out = {"cpu": Device("cpu", cpu, npu=False, memory=memory)}
    out.update({n: Device(n, on_npu, npu=True, core_mask=mask, emulated=emulated, memory=memory) for n, mask in NPU_CORES.items()})
    # the default device: the default backend under its own name (an NPU backend's is an NPU device, never emulated)
    out[default_backend] = Device(default_backend, default_backend, npu=default.processor == "npu", memory=memory)
    return out


def npu_problems() -> list[str]:
    """What stops an RK3588 NPU with its runtime here (backends/board.py board_problems); empty: it can run."""
    return board_problems()


def check_emulation(on: list[Device], emulate: bool, why: str) -> None:
    """No silent CPU: NPU devices this machine emulates (`Device.emulated`) are refused with `why`, the reason the
    NPU cannot run here, unless `emulate` (--emulate) asks for them."""
    emulated = sorted({d.name for d in on if d.emulated})
    if emulated and not emulate:
        raise PlacementError(f"the plan puts slices on {', '.join(emulated)}, but the NPU cannot run here: "
                             f"{why or 'no usable NPU'}; add --emulate to run them on the CPU backend instead (no NPU "
                             "speed is claimed)")


def check_plan_here(plan: PlacementPlan, default_backend: str, emulate: bool) -> None:
    """Refuse now what every shard of `plan` would refuse (check_emulation over the devices it names): the exo node
    checks at start, not at the first request."""
    problems = npu_problems()
    devices = devices_here(default_backend, not problems)
    check_emulation([devices[d] for d in plan.device_names], emulate, "; ".join(problems))


# ---------------------------------------------------------------- resolving a plan


@dataclass(frozen=True)
class PlacedSlice:
    """One slice of a resolved plan."""

    spec: SliceSpec
    on: Device
    weight_bytes: int  # estimated bytes of the weights it holds on its device

    @property
    def device(self) -> str:
        return self.on.name

    @property
    def backend(self) -> str:
        return self.on.backend

    @property
    def emulated(self) -> bool:
        return self.on.emulated


@dataclass
class ResolvedPlan:
    """Every slice of a shard with its device, in call order, and the weights it needs: what `open_plan` opens."""

    plan: PlacementPlan | None
    layer_range: LayerRange
    slices: list[PlacedSlice]
    buckets: Buckets
    npu_dtype: str = "fp16"
    weights: str = DEFAULT_WEIGHTS  # the form the loader gives linear weights (check_mode), after the rule of `weights_for`
    backend: str = "onnx"  # the default backend (the user's backend options are its)

    @property
    def emulated(self) -> bool:
        return any(s.emulated for s in self.slices)

    @property
    def specs(self) -> list[SliceSpec]:
        return [s.spec for s in self.slices]

    @property
    def devices(self) -> dict[str, Device]:
        """The devices its slices run on, by name, in call order."""
        return {s.device: s.on for s in self.slices}

    @property
    def backends(self) -> dict[str, str]:
        """device name -> backend name."""
        return {name: d.backend for name, d in self.devices.items()}

    @property
    def needs_layer_weights(self) -> bool:
        """Layer and head weights are loaded unless every slice reading them runs from compiled files (npu)."""
        return any(backend_class(s.backend).needs_layer_weights for s in self.slices if s.spec.kind != "embed")

    def on_npu(self) -> list[SliceSpec]:
        """The slices the plan puts on an NPU core: what `compile --placement` builds."""
        return [s.spec for s in self.slices if s.on.npu]

    def npu_files(self, spec: SliceSpec) -> int:
        """Shape sets (one compiled file each under w8a8) a static-shape NPU slice needs: every seq bucket, and every
        context bucket too when it reads the cache; fp16 batch buckets (slices/spec.py::bucket_shapes) add a batch
        graph per (batch, context) to a slice reading the cache in the NPU form, and join the seq buckets of others."""
        seq, ctx = len(self.buckets.seq), len(self.buckets.context)
        npu_form = all(s.spec.kv_layout == "npu" for s in self.slices if s.spec.kind == "layers")  # runtime/shard.py
        batch = self.buckets.batch if self.npu_dtype == "fp16" and npu_form else ()
        if spec.has_attention:
            return (seq + (len(batch) if spec.kv_layout == "npu" else 0)) * ctx
        return len(set(self.buckets.seq) | set(batch))

    def bucket_text(self, s: PlacedSlice) -> str:
        if s.on.npu or backend_class(s.backend).static_shapes:
            seq, n = len(self.buckets.seq), self.npu_files(s.spec)
            if s.spec.has_attention:
                batch = n // len(self.buckets.context) - seq
                return f"{seq} seq" + (f" + {batch} batch" if batch else "") + f" x {len(self.buckets.context)} ctx = {n}"
            return f"{seq} seq" + (f" + {n - seq} batch" if n > seq else "") + f" (no ctx) = {n}"
        return "dynamic S, C" if s.spec.has_attention else "dynamic S"

    def explain(self) -> str:
        """The resolved plan, one line per slice: name, device, backend, buckets, estimated weight bytes."""
        lr = self.layer_range
        title = f"placement {self.plan or '(none)'} for layers {lr.start}-{lr.stop - 1} of {lr.n_layers}"
        rows = [("slice", "device", "backend", "buckets (shape sets)", "weights (est.)")]
        for s in self.slices:
            backend = s.backend + (" (emulated)" if s.emulated else "")
            rows.append((s.spec.name, s.device, backend, self.bucket_text(s), _mb(s.weight_bytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [title] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        npu = [s for s in self.slices if s.on.npu]
        if npu:
            lines.append(f"  NPU: {len(npu)} slices, {sum(self.npu_files(s.spec) for s in npu)} shape sets, "
                         f"{_mb(sum(s.weight_bytes for s in npu))} of {self.npu_dtype} weights")
        if self.emulated:
            lines.append("  emulated: no NPU here; NPU slices run the same graphs on the CPU backend (no NPU speed is claimed)")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def weights_for(weights: str, backends: set[str]) -> str:
    """The form linear weights load in: `weights` as asked, except that auto (or native) becomes fp32 when a compiled
    backend (float_weights) is among `backends`: the float32 tensors, and digests, the compiler builds from."""
    check_mode(weights)
    if weights in ("auto", "native") and any(backend_class(b).float_weights for b in backends):
        return "fp32"
    return weights


def part_params(args: ModelArgs, part: str) -> int:
    """Weights (parameter count) one layer part holds."""
    H, hd, nh, nkv, ffn = args.hidden_size, args.head_dim, args.num_attention_heads, args.num_key_value_heads, args.intermediate_size
    bias = (nh + 2 * nkv) * hd if args.attention_bias else 0
    return {"attn_norm": H, "mlp_norm": H, "attention": 0, "qkv": H * (nh + 2 * nkv) * hd + bias,
            "o_proj": nh * hd * H, "ffn": 3 * H * ffn}[part]


def bytes_per_weight(device: Device, weights: str, npu_dtype: str) -> float:
    """Bytes per linear weight on a device: fp16 or int8 on an NPU (or its simulator); the --weights form on the CPU
    (int8/int4 carry one float32 scale and at most one uint8 zero point per block of 32, model/quant.py QTensor:
    an upper bound, measured 1.143 and 0.641 on smollm2-135m; auto is counted at its largest form, GGUF Q8_0's 8-bit
    blocks of 32 split into two 4-bit ones (quant.AUTO_MAX_BYTES_PER_WEIGHT): GGUF Q4_0 and Q4_1 files take about half that)."""
    if device.npu or backend_class(device.backend).processor == "npu":
        return 1.0 if npu_dtype == "w8a8" else 2.0
    # native: its own largest form is Q8_0 (34 bytes per 32), but K-quant files keep auto's forms there
    return {"fp32": 4.0, "int8": 1 + 5 / 32, "int4": 0.5 + 5 / 32, "auto": AUTO_MAX_BYTES_PER_WEIGHT,
            "native": AUTO_MAX_BYTES_PER_WEIGHT}.get(weights, 4.0)


def default_bytes_per_weight(backend: str, weights: str, npu_dtype: str) -> float:
    """bytes_per_weight on the default device of `backend`, in the form weights_for gives it."""
    return bytes_per_weight(devices_here(backend, False)[backend], weights_for(weights, {backend}), npu_dtype)


def spec_bytes(args: ModelArgs, spec: SliceSpec, per_weight: float) -> int:
    if spec.kind == "embed":
        return int(args.vocab_size * args.hidden_size * per_weight)
    if spec.kind == "head":
        return int((args.vocab_size + 1) * args.hidden_size * per_weight)
    return int(spec.n_layers * sum(part_params(args, p) for p in spec.parts) * per_weight)


def resolve(
    plan: PlacementPlan | None,
    args: ModelArgs,
    layer_range: LayerRange,
    default_backend: str,
    buckets: Buckets,
    *,
    layers_per_slice: int | None = None,
    npu_available: bool = False,
    weights: str = DEFAULT_WEIGHTS,
    npu_dtype: str = "fp16",
    emulate: bool = False,
    npu_unavailable: str = "",
) -> ResolvedPlan:
    """The one planner: check `plan` (None: every layer on the default backend) against the model and the backends
    and cut `layer_range` into placed slices. Nothing is loaded.

    Refuses (PlacementError, one line) a range outside the model, a block a device's backend cannot run, and a plan
    that leaves a slice without a backend that supports it. The embedding goes to the host CPU when the default
    backend cannot run it (npu, rknn-sim) and no block rule places it.
    No silent CPU: NPU devices this machine emulates (devices_here) are refused with `npu_unavailable`, the reason
    the NPU cannot run here, unless `emulate` (--emulate) asks for them.
    """
    plan = plan or PlacementPlan()
    L = args.num_hidden_layers
    for r in plan.ranges:
        if r.last >= L:
            raise PlacementError(f"placement range {r} is outside the model: it has layers 0-{L - 1}")
    devices = devices_here(default_backend, npu_available)
    default = devices[default_backend]
    block_device = {b: devices[d] for b, d in plan.blocks}
    for block, device in block_device.items():
        _check_block(block, device)

    def layer_device(i: int) -> Device:
        return next((devices[r.device] for r in plan.ranges if r.first <= i <= r.last), default)

    placed: list[tuple[SliceSpec, Device]] = []
    if layer_range.is_first:
        placed.append((SliceSpec("embed"), block_device.get("embedding", default)))
    placed += _cut_layers(_units(layer_range, block_device, layer_device), args, layers_per_slice, weights, npu_dtype)
    if layer_range.is_last:
        placed.append((SliceSpec("head"), block_device.get("head", layer_device(layer_range.stop - 1))))

    slices = [_placed(spec, device, devices["cpu"], "embedding" in block_device, args, weights, npu_dtype)
              for spec, device in placed]
    _check_memory(slices)
    check_emulation([s.on for s in slices], emulate, npu_unavailable)
    mode = weights_for(weights, {s.backend for s in slices})
    layouts = [getattr(backend_class(s.backend), "kv_layout", "seq") for s in slices if s.spec.kind == "layers"]
    if "npu" in layouts:
        buckets = npu_buckets(buckets, args)  # the NPU form bounds the prefill chunks (slices/spec.py); one set per shard
        if "seq" in layouts:  # a batch graph needs every layer slice in the NPU form (runtime/shard.py::rows_batch)
            buckets = replace(buckets, batch=())
    return ResolvedPlan(plan if plan.ranges or plan.blocks else None, layer_range, slices, buckets, npu_dtype, mode,
                        default_backend)


def _placed(spec: SliceSpec, device: Device, cpu: Device, embedding_placed: bool, args: ModelArgs, weights: str,
            npu_dtype: str) -> PlacedSlice:
    """`spec` on `device`, in the KV layout of its backend; the embedding falls back to the host `cpu` when the
    device cannot run it and no block rule placed it there."""
    cls = backend_class(device.backend)
    spec = replace(spec, kv_layout=cls.kv_layout) if spec.kind == "layers" else spec
    if not _runs(device, cls, spec):
        if spec.kind != "embed" or embedding_placed:
            raise PlacementError(f"the {device.backend} backend ({device.name}) cannot run slice {spec.name}; "
                                 f"place it elsewhere")
        device = cpu  # the embedding lookup stays on the host
    return PlacedSlice(spec, device, spec_bytes(args, spec, bytes_per_weight(device, weights, npu_dtype)))


def _check_block(block: str, device: Device) -> None:
    """A block rule's device must run the block; an NPU device, emulated or not, as the npu backend would (the plan
    must work on a board)."""
    for name in {device.backend} | ({"npu"} if device.npu else set()):
        runs = backend_class(name).blocks
        if block not in runs:
            raise PlacementError(f"{block}={device.name}: the {name} backend cannot run the {block} block "
                                 f"(it runs {', '.join(b for b in PLACEMENT_BLOCKS if b in runs)})")


def _units(layer_range: LayerRange, block_device: dict[str, Device],
           layer_device: Callable[[int], Device]) -> list[tuple[int, tuple[str, ...], Device]]:
    """(layer, parts, device) units in call order: a layer whose parts all share a device is one whole-layer unit,
    otherwise one unit per run of consecutive parts on one device."""
    part_block = {p: b for b, parts in BLOCKS.items() for p in parts}
    units: list[tuple[int, tuple[str, ...], Device]] = []
    for i in range(layer_range.start, layer_range.stop):
        devs = [block_device.get(part_block[p], layer_device(i)) for p in PARTS]
        if len(set(devs)) == 1:
            units.append((i, WHOLE_LAYER, devs[0]))
            continue
        run: list[str] = []
        for p, d in zip(PARTS, devs):
            if run and d != devs[PARTS.index(run[0])]:
                units.append((i, tuple(run), devs[PARTS.index(run[0])]))
                run = []
            run.append(p)
        units.append((i, tuple(run), devs[PARTS.index(run[0])]))
    return units


def _cut_layers(units: list[tuple[int, tuple[str, ...], Device]], args: ModelArgs, layers_per_slice: int | None,
                weights: str, npu_dtype: str) -> list[tuple[SliceSpec, Device]]:
    """Layer slices from the units: a part-run is a slice of its own; consecutive whole layers on one device are
    grouped `layers_per_slice` at a time (default: as the device's backend groups them)."""
    out: list[tuple[SliceSpec, Device]] = []
    j = 0
    while j < len(units):
        i, blocks, device = units[j]
        if blocks != WHOLE_LAYER:
            out.append((SliceSpec("layers", i, i + 1, _named(blocks)), device))
            j += 1
            continue
        k = j
        while k < len(units) and units[k][1] == WHOLE_LAYER and units[k][2] == device:
            k += 1
        # an NPU device is cut as the npu backend cuts it (one graph per layer), emulated or not: the same slices
        step = layers_per_slice or _default_layers_per_slice("npu" if device.npu else device.backend, args,
                                                             bytes_per_weight(device, weights, npu_dtype))
        last = units[k - 1][0] + 1
        for a in range(units[j][0], last, step or (k - j)):
            out.append((SliceSpec("layers", a, min(a + (step or (k - j)), last)), device))
        j = k
    return out


def _check_memory(slices: list[PlacedSlice]) -> None:
    """NPU devices load all their weights into the board's memory: a plan that cannot fit is refused up front."""
    per: dict[Device, int] = {}
    for s in slices:
        if s.on.npu and s.on.memory:
            per[s.on] = per.get(s.on, 0) + s.weight_bytes
    for d, n in per.items():
        if n > d.memory:  # type: ignore[operator]
            raise PlacementError(f"the plan puts {_mb(n)} of weights on {d.name}, more than this machine's "
                                 f"{_mb(d.memory or 0)}; spread the layers over more devices or use a smaller model")


def _named(parts: tuple[str, ...]) -> tuple[str, ...]:
    """Parts as SliceSpec blocks, a whole attention half as "attn" and a whole MLP half as "mlp" (shorter names)."""
    rest = list(parts)
    for half, name in ((PARTS[:4], "attn"), (PARTS[4:], "mlp")):
        if all(p in rest for p in half):
            i = rest.index(half[0])
            rest[i : i + len(half)] = [name]
    return tuple(rest)


def _runs(device: Device, cls: type, spec: SliceSpec) -> bool:
    """Declared support of the backend, and for an NPU device (emulated too) of the npu backend."""
    ok = declared_support(cls.blocks, spec)
    return ok and (not device.npu or declared_support(backend_class("npu").blocks, spec))


def _default_layers_per_slice(backend: str, args: ModelArgs, per_weight: float) -> int | None:
    """The backend's own grouping (attribute layers_per_slice), or its weight budget per slice (max_slice_bytes)."""
    cls = backend_class(backend)
    if cls.layers_per_slice is not None:
        return cls.layers_per_slice
    budget = cls.max_slice_bytes
    if not budget:
        return None
    per_layer = sum(part_params(args, p) for p in PARTS) * per_weight
    return max(1, int(budget // max(per_layer, 1)))


def plan_shards(plan: PlacementPlan | None, args: ModelArgs, ranges: list[LayerRange], default_backend: str,
                buckets: Buckets, *, layers_per_slice: int | None = None, weights: str = DEFAULT_WEIGHTS, npu_dtype: str = "fp16",
                emulate: bool = False) -> list[ResolvedPlan]:
    """Every shard's plan on this machine: `resolve` for each of `ranges`, with the board asked once whether its NPU
    can run (and why not)."""
    problems = npu_problems()
    return [resolve(plan, args, r, default_backend, buckets, layers_per_slice=layers_per_slice,
                    npu_available=not problems, weights=weights, npu_dtype=npu_dtype, emulate=emulate,
                    npu_unavailable="; ".join(problems)) for r in ranges]


# ---------------------------------------------------------------- opening a shard

DEFAULT_MAX_CONTEXT = 2048


def default_buckets(args: ModelArgs, max_context: int | None = None) -> Buckets:
    """Context buckets doubling from 256 up to max_context (default: 2048, capped by the model's own limit), and
    the NPU form's decode batch buckets (NPU_BATCH; backends that batch any size ignore them).

    A max_context below 1 or beyond the model's limit (max_position_embeddings) is refused: past its limit a
    model's rotary positions are untrained, so the answers would be wrong.
    """
    if max_context is not None and not 1 <= max_context <= args.max_position_embeddings:
        raise UsageError(f"--max-context {max_context} is out of range; this model allows 1 to "
                         f"{args.max_position_embeddings} positions")
    limit = max_context or min(DEFAULT_MAX_CONTEXT, args.max_position_embeddings)
    return replace(Buckets.up_to(limit), batch=NPU_BATCH)


def device_backends(plan: ResolvedPlan, options: dict | None = None) -> dict[str, Backend]:
    """One backend instance per device of `plan` (so each device, an NPU core or its emulation, has its own sessions
    and can be its own pipeline stage). `options`, the user's backend options, go to every device run by the default
    backend; an emulated NPU core is one CPU thread, and a pinned NPU core gets its core mask."""
    out: dict[str, Backend] = {}
    for d in plan.devices.values():
        own = dict(options or {}) if d.backend == plan.backend else {}
        if d.emulated and "threads" in option_names(d.backend):
            own["threads"] = 1
        if d.core_mask is not None and "core_mask" in option_names(d.backend):
            own["core_mask"] = d.core_mask
        out[d.name] = get_backend(d.backend, **own)
    return out


def open_plan(model: ModelSource | ModelHeader, plan: ResolvedPlan, limits: RequestLimits = RequestLimits(),
              on_slice: SliceObserver | None = None, backend_options: dict | None = None,
              progress: Callable[[str], None] | None = None) -> ShardRunner:
    """The one opener: load `plan`'s weights from `model` (only its layer range, in the plan's form, leaving out
    what runs from compiled files and what slices prepared earlier from the same files hold) and prepare every slice
    on its device's backend. `model`: its source, or its header (load_header) when the caller has read it: a start
    reads it once, and the tokenizer, the fingerprint and the loader all take it from there."""
    source = ShardSource(header_of(model), plan.layer_range, plan.weights, layers=plan.needs_layer_weights)
    devices = device_backends(plan, backend_options)
    return ShardRunner(source, None, plan.buckets, limits=limits, on_slice=on_slice, progress=progress,
                       release_weights=True, placed=[(s.spec, s.device, devices[s.device]) for s in plan.slices])


def open_shard(
    src: ModelSource,
    layer_range: LayerRange,
    backend: str = "onnx",
    buckets: Buckets | None = None,
    layers_per_slice: int | None = None,
    limits: RequestLimits = RequestLimits(),
    on_slice: SliceObserver | None = None,
    backend_options: dict | None = None,
    weights: str = DEFAULT_WEIGHTS,
    progress: Callable[[str], None] | None = None,
    placement: PlacementPlan | None = None,
    emulate: bool = False,
) -> ShardRunner:
    """Plan and open one shard (`plan_shards`, then `open_plan`): `layer_range` of `src` on `backend`, placed by
    `placement` when given, with linear weights in the form `weights` asks (auto | int4 | int8 | fp32); `emulate`:
    a placement's NPU devices may run on the CPU backend when the NPU cannot run here (else refused)."""
    header = load_header(src)
    args = header.args
    plan, = plan_shards(placement, args, [layer_range], backend, buckets or default_buckets(args),
                        layers_per_slice=layers_per_slice, weights=weights,
                        npu_dtype=(backend_options or {}).get("dtype", "fp16"), emulate=emulate)
    return open_plan(header, plan, limits, on_slice, backend_options, progress)
