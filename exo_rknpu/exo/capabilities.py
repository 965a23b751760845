"""What this node tells exo's partitioner: board, chip, memory usable for weights, and TOPS.

exo's RingMemoryWeightedPartitioningStrategy splits layers in proportion to `memory` (MB) alone; FLOPS are only
displayed. So `memory` is the RAM this node can give to weights, by a fixed rule that gives the same number on
every start of the same machine (MemAvailable would not: it changes with page cache and other processes, and a
restarted ring got a different partition):

    memory = MemTotal - the KV-cache budget (--max-kv-mb) - the backend's runtime reserve, capped by --memory-mb

On the RK3588 the NPU works out of the same system RAM, so there is no separate NPU memory to add.

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

RUNTIME_RESERVE_MB = 512  # python, exo, gRPC buffers, numpy scratch: any backend
# What a backend's runtime adds on top (estimates, not measured on a board): onnxruntime's arenas; librknnrt's
# DMA buffers for inputs/outputs plus the onnx fallback for the embedding.
BACKEND_RESERVE_MB = {"numpy": 0, "onnx": 256, "npu": 512}
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
    memory: int  # MB usable for weights
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


def usable_memory_mb(total_mb: int, kv_budget_bytes: int, backend: str, memory_mb: int | None = None) -> int:
    """The memory reported to exo (see the module docstring); at least 1 MB (exo divides by the ring's total)."""
    rule = total_mb - kv_budget_bytes // (1 << 20) - RUNTIME_RESERVE_MB - BACKEND_RESERVE_MB.get(backend, 0)
    if memory_mb is not None:
        rule = min(rule, memory_mb) if total_mb > 0 else memory_mb
    return max(1, rule)


def detect(backend: str, kv_budget_bytes: int, memory_mb: int | None = None,
           proc_root: Path = Path("/"), models: tuple[str, ...] = ()) -> NodeCapabilities:
    """This machine's capabilities as exo should see them; `models`: the model ids this node serves (its mark)."""
    mark = LauncherMark(f"rknpu/{backend}", tuple(models)).text()
    memory = usable_memory_mb(mem_total_mb(proc_root), kv_budget_bytes, backend, memory_mb)
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
