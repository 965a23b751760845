"""Facts about the RK3588 board this process runs on: is an NPU usable here, which driver, which core masks.

Numpy-free and toolkit-free, so the planner (runtime/placement.py) and `doctor` can ask without importing the
npu backend (rknn/npu.py), which uses them too.
"""

from __future__ import annotations

import os
import platform as _platform
from pathlib import Path

from exo_rknpu.config import librknnrt_path

DEVICE_TREE = Path("/proc/device-tree/compatible")
CORE_MASKS = {"auto": 0, "0": 1, "1": 2, "2": 4, "0_1": 3, "0_1_2": 7, "all": 0xFFFF}


def board_problems(librknnrt: Path | None = None, machine: str | None = None) -> list[str]:
    """What stops the NPU backend on this machine (empty when nothing does)."""
    problems = []
    machine = machine or _platform.machine()
    if machine not in ("aarch64", "arm64"):
        problems.append(f"this machine is {machine}, not aarch64: the NPU backend runs only on an RK3588 board")
    try:
        import rknnlite.api  # noqa: F401
    except ImportError:
        problems.append("rknn-toolkit-lite2 is not installed (pip install 'exo-rknpu[board]' on the board; aarch64 wheels only)")
    lib = librknnrt or librknnrt_path()
    if not lib.exists():
        problems.append(f"no {lib}: install Rockchip's librknnrt.so (rknpu2 runtime) on the board")
    drv = npu_driver_version()
    if drv is None:
        problems.append("no RKNPU driver visible (/sys/kernel/debug/rknpu/version or /proc/device-tree): is this an RK3588 with the rknpu driver?")
    elif tuple(int(x) for x in drv.split(".")[:2] if x.isdigit()) < (0, 9):
        problems.append(f"RKNPU driver {drv} is too old; rknn 2.5 needs >= 0.9 (update the board's kernel)")
    return problems


def npu_driver_version() -> str | None:
    for p in (Path("/sys/kernel/debug/rknpu/version"), Path("/sys/module/rknpu/version")):
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        return text.split(":")[-1].strip().lstrip("v") or None
    return None


# The RK3588's NPU as placement devices: "npu" lets the driver pick cores, npu0..npu2 pin one (RKNNLite core masks).
NPU_CORES = {"npu": "auto", "npu0": "0", "npu1": "1", "npu2": "2"}


def host_memory() -> int | None:
    """Physical memory of this machine in bytes (the RK3588's NPU has none of its own: it reads the same DDR)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
