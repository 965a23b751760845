"""`exo-rknpu doctor`: what this machine offers the NPU backend (SoC, driver, runtime, RAM, cores, DDR governor)."""

from __future__ import annotations

import argparse
import glob
import json
import platform
from pathlib import Path

from exo_rknpu.config import librknnrt_path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check this machine for the RK3588 NPU runtime", description=__doc__)
    p.add_argument("--json", action="store_true", help="print every finding as one JSON object instead of a table")
    p.set_defaults(func=run)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _librknnrt_version(lib: Path) -> str | None:
    try:
        data = lib.read_bytes()
    except OSError:
        return None
    i = data.find(b"librknnrt version: ")
    return data[i + 19 : data.find(b"\0", i)].decode(errors="replace").strip() if i >= 0 else "unknown"


def collect() -> dict:
    from exo_rknpu.backends.board import board_problems, npu_driver_version
    from exo_rknpu.rknn import toolkit

    lib = librknnrt_path()
    info: dict = {"machine": platform.machine(), "soc": _read("/proc/device-tree/compatible"),
                  "npu_driver": npu_driver_version(), "librknnrt": _librknnrt_version(lib) if lib.exists() else None}
    try:
        import rknnlite  # noqa: F401
        info["rknnlite"] = True
    except ImportError:
        info["rknnlite"] = False
    mem = _read("/proc/meminfo") or ""
    info["ram_gb"] = round(int(mem.split()[1]) / 1e6, 1) if mem.startswith("MemTotal") else None
    info["npu_cores"] = 3 if info["soc"] and "rk3588" in info["soc"] else None
    govs = {p: _read(p) for p in glob.glob("/sys/class/devfreq/*dmc*/governor")}
    info["ddr_governor"] = next(iter(govs.values()), None)
    info["npu_governor"] = next((_read(p) for p in glob.glob("/sys/class/devfreq/*npu*/governor")), None)
    info["problems"] = board_problems()
    st = toolkit.status()
    info["toolkit"] = {"ok": st.ok, "versions": st.versions, "problem": st.problem}
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info))
        return 0
    unseen = "cannot see it here"
    print(f"machine       {info['machine']}")
    print(f"SoC           {info['soc'] or unseen + ' (no /proc/device-tree/compatible)'}")
    print(f"NPU driver    {info['npu_driver'] or unseen + ' (no /sys/kernel/debug/rknpu/version; needs root on a board)'}")
    print(f"librknnrt     {info['librknnrt'] or unseen + ' (no /usr/lib/librknnrt.so)'}")
    print(f"rknnlite      {'installed' if info['rknnlite'] else 'not installed'}")
    print(f"RAM           {info['ram_gb']} GB")
    print(f"NPU cores     {info['npu_cores'] or unseen}")
    gov = info["ddr_governor"]
    print(f"DDR governor  {gov or unseen + ' (no /sys/class/devfreq/*dmc*)'}"
          + (" -- WARNING: decode speed depends on DDR frequency; set it to 'performance'" if gov and gov != "performance" else ""))
    tk = info["toolkit"]
    print(f"toolkit       {'ok ' + tk['versions'].get('rknn', '') if tk['ok'] else tk['problem']}")
    if info["problems"]:
        print("npu backend   unavailable: " + "; ".join(info["problems"]))
    else:
        print("npu backend   ready")
    return 0
