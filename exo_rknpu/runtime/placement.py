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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from exo_rknpu.backends.base import Backend, backend_class, declared_support, get_backend
from exo_rknpu.errors import UsageError
from exo_rknpu.model.base import LayerRange, ModelArgs
from exo_rknpu.model.loader import load_args, load_shard
from exo_rknpu.model.quant import check_mode
from exo_rknpu.model.zoo import ModelSource
from exo_rknpu.runtime.requests import RequestLimits
from exo_rknpu.runtime.shard import ShardRunner, SliceObserver
from exo_rknpu.slices.spec import PART_BLOCK, PARTS, PLACEMENT_BLOCKS, WHOLE_LAYER, Buckets, SliceSpec, npu_buckets, plan_slices

DEVICES = ("cpu", "npu", "npu0", "npu1", "npu2")
# Placement blocks -> the layer parts they cover (slices/spec.py): attention is rotary, scores, softmax and values
# over the KV cache; projections q/k/v and o; mlp gate/up/down; norm the two RMSNorms; embedding and head whole slices.
BLOCKS: dict[str, tuple[str, ...]] = {b: tuple(p for p in PARTS if PART_BLOCK[p] == b) for b in PLACEMENT_BLOCKS}
CPU_BACKENDS = ("onnx", "numpy")
# npu0/npu1/npu2 pin a core (RKNNLite core masks, rknn/npu.py); npu lets the driver choose.
CORE_MASK = {"npu": "auto", "npu0": "0", "npu1": "1", "npu2": "2"}


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


# ---------------------------------------------------------------- resolving a plan


@dataclass(frozen=True)
class PlacedSlice:
    """One slice of a resolved plan."""

    spec: SliceSpec
    device: str  # cpu | npu | npu0..2, or the default backend's name for layers no range names
    backend: str  # the backend that runs it here
    emulated: bool  # an NPU device run by a CPU backend (no NPU on this machine)
    weight_bytes: int  # estimated bytes of the weights it holds on its device


@dataclass
class ResolvedPlan:
    """Every slice of a shard with its device, in call order."""

    plan: PlacementPlan | None
    layer_range: LayerRange
    slices: list[PlacedSlice]
    buckets: Buckets
    npu_dtype: str = "fp16"
    backends: dict[str, str] = field(default_factory=dict)  # device -> backend name

    @property
    def emulated(self) -> bool:
        return any(s.emulated for s in self.slices)

    @property
    def specs(self) -> list[SliceSpec]:
        return [s.spec for s in self.slices]

    def on_npu(self) -> list[SliceSpec]:
        """The slices the plan puts on an NPU core: what `compile --placement` builds."""
        return [s.spec for s in self.slices if s.device.startswith("npu")]

    def npu_files(self, spec: SliceSpec) -> int:
        """Shape sets (one compiled file each under w8a8) a static-shape NPU slice needs: every seq bucket, and every
        context bucket too when it reads the cache."""
        return len(self.buckets.seq) * (len(self.buckets.context) if spec.has_attention else 1)

    def bucket_text(self, s: PlacedSlice) -> str:
        if s.device.startswith("npu") or backend_class(s.backend).static_shapes:
            seq = len(self.buckets.seq)
            if s.spec.has_attention:
                return f"{seq} seq x {len(self.buckets.context)} ctx = {self.npu_files(s.spec)}"
            return f"{seq} seq (no ctx) = {self.npu_files(s.spec)}"
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
        npu = [s for s in self.slices if s.device.startswith("npu")]
        if npu:
            lines.append(f"  NPU: {len(npu)} slices, {sum(self.npu_files(s.spec) for s in npu)} shape sets, "
                         f"{_mb(sum(s.weight_bytes for s in npu))} of {self.npu_dtype} weights")
        if self.emulated:
            lines.append("  emulated: no NPU here; NPU slices run the same graphs on the CPU backend (no NPU speed is claimed)")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def part_params(args: ModelArgs, part: str) -> int:
    """Weights (parameter count) one layer part holds."""
    H, hd, nh, nkv, ffn = args.hidden_size, args.head_dim, args.num_attention_heads, args.num_key_value_heads, args.intermediate_size
    bias = (nh + 2 * nkv) * hd if args.attention_bias else 0
    return {"attn_norm": H, "mlp_norm": H, "attention": 0, "qkv": H * (nh + 2 * nkv) * hd + bias,
            "o_proj": nh * hd * H, "ffn": 3 * H * ffn}[part]


def bytes_per_weight(device: str, backend: str, weights: str, npu_dtype: str) -> float:
    """Bytes per linear weight on a device: fp16 or int8 on the NPU; the --weights form on the CPU (int8/int4 carry
    one float32 scale per block of 32; auto is counted as int8, what it gives for Hugging Face and most GGUF types)."""
    if device.startswith("npu") or backend in ("npu", "rknn-sim"):
        return 1.0 if npu_dtype == "w8a8" else 2.0
    return {"fp32": 4.0, "int8": 1.125, "int4": 0.625}.get(weights, 1.125)


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
    weights: str = "auto",
    npu_dtype: str = "fp16",
    emulate: bool = False,
    npu_unavailable: str = "",
) -> ResolvedPlan:
    """Check `plan` against the model and the backends and cut `layer_range` into placed slices.

    Refuses (PlacementError, one line) a range outside the model, a block a device's backend cannot run, and a plan
    that leaves a slice without a backend that supports it. Nothing is loaded.
    NPU devices run on the npu backend when `npu_available`, on rknn-sim when that is the default backend, and
    otherwise on a CPU backend, marked emulated — only when `emulate` is asked for (--emulate); else the plan is
    refused with `npu_unavailable`, the reason the NPU cannot run here (never a silent CPU run).
    """
    plan = plan or PlacementPlan()
    L = args.num_hidden_layers
    for r in plan.ranges:
        if r.last >= L:
            raise PlacementError(f"placement range {r} is outside the model: it has layers 0-{L - 1}")
    cpu_backend = default_backend if default_backend in CPU_BACKENDS else "onnx"

    def backend_for(device: str) -> tuple[str, bool]:
        if device == "cpu":
            return cpu_backend, False
        if device.startswith("npu"):
            if npu_available:
                return "npu", False
            if default_backend == "rknn-sim":
                return "rknn-sim", False
            return cpu_backend, True
        return device, False  # the default backend's own name

    default_device = default_backend
    block_device = dict(plan.blocks)
    for block, device in plan.blocks:
        # an NPU device is held to what the npu backend declares, emulated or not (the plan must work on a board)
        for name in {backend_for(device)[0]} | ({"npu"} if device.startswith("npu") else set()):
            runs = backend_class(name).blocks
            if block not in runs:
                raise PlacementError(f"{block}={device}: the {name} backend cannot run the {block} block "
                                     f"(it runs {', '.join(b for b in PLACEMENT_BLOCKS if b in runs)})")

    def layer_device(i: int) -> str:
        return next((r.device for r in plan.ranges if r.first <= i <= r.last), default_device)

    part_block = {p: b for b, parts in BLOCKS.items() for p in parts}
    # (layer, parts, device) units: a layer whose parts all share a device is one whole-layer unit
    units: list[tuple[int, tuple[str, ...], str]] = []
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

    placed: list[tuple[SliceSpec, str]] = []
    if layer_range.is_first:
        placed.append((SliceSpec("embed"), block_device.get("embedding", default_device)))
    j = 0
    while j < len(units):
        i, blocks, device = units[j]
        if blocks != WHOLE_LAYER:
            placed.append((SliceSpec("layers", i, i + 1, _named(blocks)), device))
            j += 1
            continue
        k = j
        while k < len(units) and units[k][1] == WHOLE_LAYER and units[k][2] == device:
            k += 1
        # an NPU device is cut as the npu backend cuts it (one graph per layer), emulated or not: the same slices
        name = "npu" if device.startswith("npu") else backend_for(device)[0]
        step = layers_per_slice or _default_layers_per_slice(name, args, bytes_per_weight(device, name, weights, npu_dtype))
        for a in range(units[j][0], units[k - 1][0] + 1, step or (k - j)):
            placed.append((SliceSpec("layers", a, min(a + (step or (k - j)), units[k - 1][0] + 1)), device))
        j = k
    if layer_range.is_last:
        placed.append((SliceSpec("head"), block_device.get("head", layer_device(layer_range.stop - 1))))

    slices: list[PlacedSlice] = []
    backends: dict[str, str] = {}
    for spec, device in placed:
        name, emulated = backend_for(device)
        cls = backend_class(name)
        spec = replace(spec, kv_layout=cls.kv_layout) if spec.kind == "layers" else spec
        if not _runs(device, cls, spec):
            if spec.kind == "embed" and "embedding" not in block_device:
                device, (name, emulated) = "cpu", backend_for("cpu")  # the embedding lookup stays on the host
                cls = backend_class(name)
            else:
                raise PlacementError(f"the {name} backend ({device}) cannot run slice {spec.name}; place it elsewhere")
        backends[device] = name
        slices.append(PlacedSlice(spec, device, name, emulated,
                                  spec_bytes(args, spec, bytes_per_weight(device, name, weights, npu_dtype))))
    emulated = sorted({s.device for s in slices if s.emulated})
    if emulated and not emulate:
        raise PlacementError(npu_refusal(emulated, npu_unavailable))
    return ResolvedPlan(plan if plan.ranges or plan.blocks else None, layer_range, slices, buckets, npu_dtype, backends)


def _named(parts: tuple[str, ...]) -> tuple[str, ...]:
    """Parts as SliceSpec blocks, a whole attention half as "attn" and a whole MLP half as "mlp" (shorter names)."""
    rest = list(parts)
    for half, name in ((PARTS[:4], "attn"), (PARTS[4:], "mlp")):
        if all(p in rest for p in half):
            i = rest.index(half[0])
            rest[i : i + len(half)] = [name]
    return tuple(rest)


def _runs(device: str, cls: type, spec: SliceSpec) -> bool:
    """Declared support of the backend, and for an NPU device (emulated too) of the npu backend."""
    ok = declared_support(cls.blocks, spec)
    return ok and (not device.startswith("npu") or declared_support(backend_class("npu").blocks, spec))


def _default_layers_per_slice(backend: str, args: ModelArgs, per_weight: float) -> int | None:
    """The backend's own grouping (attribute layers_per_slice), or its weight budget per slice (max_slice_bytes)."""
    cls = backend_class(backend)
    if cls.layers_per_slice is not None:
        return cls.layers_per_slice
    budget = getattr(cls, "max_slice_bytes", None)
    if not budget:
        return None
    per_layer = sum(part_params(args, p) for p in PARTS) * per_weight
    return max(1, int(budget // max(per_layer, 1)))


def npu_problems() -> list[str]:
    """What stops an RK3588 NPU with its runtime here (backends/board.py board_problems); empty: it can run."""
    from exo_rknpu.backends.board import board_problems

    return board_problems()


def require_npu(plan: PlacementPlan, why: str) -> None:
    """Refuse a plan that names an NPU device on a machine where the NPU cannot run (`why`), unless emulated."""
    named = sorted({r.device for r in plan.ranges} | {d for _, d in plan.blocks})
    npu = [d for d in named if d.startswith("npu")]
    if npu:
        raise PlacementError(npu_refusal(npu, why))


def npu_refusal(devices: list[str], why: str) -> str:
    return (f"the plan puts slices on {', '.join(devices)}, but the NPU cannot run here: {why or 'no usable NPU'}; "
            "add --emulate to run them on the CPU backend instead (no NPU speed is claimed)")


def backend_picker(resolved: ResolvedPlan, make: Callable[[str, str], Backend]) -> Callable[[SliceSpec], Backend]:
    """SliceSpec -> Backend for ShardRunner: one backend instance per device (`make(device, backend_name)`), so each
    device (an NPU core, or its emulation) has its own sessions and can run as its own pipeline stage."""
    instances: dict[str, Backend] = {}
    by_name = {s.spec.name: s for s in resolved.slices}

    def pick(spec: SliceSpec) -> Backend:
        s = by_name[spec.name]
        if s.device not in instances:
            instances[s.device] = make(s.device, s.backend)
        return instances[s.device]

    pick.devices = {s.spec.name: s.device for s in resolved.slices}  # type: ignore[attr-defined]
    return pick


def fallback_placement(primary: Backend, fallback: Backend) -> Callable[[SliceSpec], Backend]:
    """`primary` for every slice it supports, `fallback` for the rest (e.g. the embedding lookup of npu/rknn-sim
    goes to onnx on the host CPU)."""

    def place(spec: SliceSpec) -> Backend:
        return primary if primary.supports(spec) else fallback

    place.primary, place.fallback = primary, fallback  # type: ignore[attr-defined]
    return place


# ---------------------------------------------------------------- opening a shard

DEFAULT_MAX_CONTEXT = 2048
# Slices a backend cannot run (the npu/rknn-sim embedding lookup) go to this one.
FALLBACK_BACKEND = "onnx"


def default_buckets(args: ModelArgs, max_context: int | None = None) -> Buckets:
    """Context buckets doubling from 256 up to max_context (default: 2048, capped by the model's own limit).

    A max_context below 1 or beyond the model's limit (max_position_embeddings) is refused: past its limit a
    model's rotary positions are untrained, so the answers would be wrong.
    """
    if max_context is not None and not 1 <= max_context <= args.max_position_embeddings:
        raise UsageError(f"--max-context {max_context} is out of range; this model allows 1 to "
                         f"{args.max_position_embeddings} positions")
    limit = max_context or min(DEFAULT_MAX_CONTEXT, args.max_position_embeddings)
    return Buckets.up_to(limit)


def open_shard(
    src: ModelSource,
    layer_range: LayerRange,
    backend: str = "onnx",
    buckets: Buckets | None = None,
    layers_per_slice: int | None = None,
    limits: RequestLimits = RequestLimits(),
    on_slice: SliceObserver | None = None,
    backend_options: dict | None = None,
    weights: str = "auto",
    progress: Callable[[str], None] | None = None,
    placement: PlacementPlan | None = None,
    emulate: bool = False,
) -> ShardRunner:
    """Load only `layer_range`'s weights from `src` (in the form `weights` asks: auto | int4 | int8 | fp32) and
    prepare its slices on `backend`; `progress` gets one-line messages while that takes time.

    Slices `backend` does not support (the embedding, for npu and rknn-sim) run on FALLBACK_BACKEND. A backend
    that wants one graph per layer (attribute layers_per_slice, e.g. npu/rknn-sim) gets it unless asked otherwise.
    `emulate`: a placement's NPU devices may run on the CPU backend when the NPU cannot run here (else refused).
    """
    check_mode(weights)
    if placement is not None:
        return _open_placed(src, layer_range, placement, backend, buckets, layers_per_slice, limits, on_slice,
                            backend_options, weights, progress, emulate)
    primary = get_backend(backend, **(backend_options or {}))
    if weights == "auto" and getattr(primary, "float_weights", False):
        weights = "fp32"  # compiled backends: the same float32 tensors (and digests) the compiler built from
    if layers_per_slice is None:
        layers_per_slice = getattr(primary, "layers_per_slice", None)
    placed = primary
    lr = layer_range
    plan = plan_slices(lr.start, lr.stop, lr.is_first, lr.is_last, layers_per_slice)
    off_primary = [s for s in plan if not primary.supports(s)]
    if off_primary:
        placed = fallback_placement(primary, get_backend(FALLBACK_BACKEND))
    # A backend running its slices from compiled files (npu) needs no layer/head weights, unless a slice it
    # cannot run (other than the embedding, always loaded) lands on the fallback.
    layers = getattr(primary, "needs_layer_weights", True) or any(s.kind != "embed" for s in off_primary)
    shard = load_shard(src, layer_range, weights, layers=layers, progress=progress)
    budget = getattr(primary, "max_slice_bytes", None)
    if layers_per_slice is None and budget and shard.layers:
        # bounded slices bound the peak while a runtime packs weights (source and packed copy of one slice)
        layers_per_slice = max(1, budget // max(lw.nbytes for lw in shard.layers.values()))
    buckets = buckets or default_buckets(shard.args)
    if getattr(primary, "kv_layout", "seq") == "npu":  # the NPU form's prefill chunks are bounded (slices/spec.py)
        buckets = npu_buckets(buckets, shard.args)
    return ShardRunner(
        shard,
        placed,
        buckets,
        layers_per_slice=layers_per_slice,
        limits=limits,
        on_slice=on_slice,
        progress=progress,
        release_weights=True,
    )


def resolve_placement(src: ModelSource, layer_range: LayerRange, placement: PlacementPlan | None, backend: str,
                      buckets: Buckets | None = None, layers_per_slice: int | None = None, weights: str = "auto",
                      npu_dtype: str = "fp16", emulate: bool = False) -> ResolvedPlan:
    """The plan for one shard, checked against the model's config and the backends here (nothing is loaded); NPU
    devices on a machine without a usable NPU are refused with the reason unless `emulate`."""
    args = load_args(src)
    problems = npu_problems()
    return resolve(placement, args, layer_range, backend, buckets or default_buckets(args), layers_per_slice=layers_per_slice,
                   npu_available=not problems, weights=weights, npu_dtype=npu_dtype, emulate=emulate,
                   npu_unavailable="; ".join(problems))


def _open_placed(src, layer_range, placement, backend, buckets, layers_per_slice, limits, on_slice, backend_options,
                 weights, progress, emulate) -> ShardRunner:
    """open_shard for a placement plan: one backend instance per device, the slices the planner cut."""
    opts = backend_options or {}
    resolved = resolve_placement(src, layer_range, placement, backend, buckets, layers_per_slice, weights,
                                 opts.get("dtype", "fp16"), emulate)
    classes = {s.backend: backend_class(s.backend) for s in resolved.slices}
    if weights == "auto" and any(getattr(c, "float_weights", False) for c in classes.values()):
        weights = "fp32"  # a compiled backend is among them: the float32 tensors (and digests) the compiler built from
    # layer and head weights are loaded unless every slice reading them runs from compiled files (npu)
    need_layers = any(getattr(classes[s.backend], "needs_layer_weights", True) for s in resolved.slices if s.spec.kind != "embed")
    shard = load_shard(src, layer_range, weights, layers=need_layers, progress=progress)

    emulated = {s.device for s in resolved.slices if s.emulated}

    def make(device: str, name: str):
        own = dict(opts) if name == backend else {}
        if device in emulated and name == "onnx":
            own["threads"] = 1  # an emulated NPU core is one CPU thread
        if name == "npu":
            own["core_mask"] = CORE_MASK[device] if device in CORE_MASK else own.get("core_mask", "auto")
        return get_backend(name, **own)

    buckets = resolved.buckets
    if any(getattr(c, "kv_layout", "seq") == "npu" for c in classes.values()):  # the NPU form's prefill chunks are bounded
        buckets = npu_buckets(buckets, shard.args)
    runner = ShardRunner(shard, backend_picker(resolved, make), buckets, limits=limits, on_slice=on_slice,
                         progress=progress, release_weights=True, specs=resolved.specs)
    runner.placement = resolved
    return runner
