"""What an RK3588 board offers the `npu` backend, read from the files RKNNLite itself reads.

Facts from rknn-toolkit-lite2 2.3.2 and 2.5.0 (their aarch64 wheels' Python and strings, docs/board.md):
* RKNNLite finds the SoC in /proc/device-tree/compatible (init_runtime fails "Please specify the target" without an
  RK35xx there) and loads the runtime library from /usr/lib/librknnrt.so.
* librknnrt prints its version ("librknnrt version: 2.3.2 (...)"), a string inside the library file.
* A .rknn file made by a newer rknn-toolkit2 than the runtime is refused by rknn_init ("Invalid RKNN model version");
  so the compiler records its version as the oldest librknnrt the files need (`librknnrt_min` in the manifest).
* `inference(..., reuse_outputs=...)` exists from 2.5.0 on; 2.3.x raises TypeError on it.

`probe` runs load_rknn + init_runtime on one compiled file in a child process (a broken runtime may crash it).
Numpy-free and toolkit-free, so the planner (runtime/placement.py) and `doctor` can ask without importing the npu
backend (rknn/npu.py), which uses them too.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import platform as _platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SOC_PATH = Path("/proc/device-tree/compatible")
LIBRKNNRT = Path("/usr/lib/librknnrt.so")  # where RKNNLite loads it from (docs/board.md)
DRIVER_PATHS = (Path("/sys/kernel/debug/rknpu/version"), Path("/sys/module/rknpu/version"))
MIN_DRIVER = (0, 9)  # rknn 2.x runtimes need the rknpu driver >= 0.9
# rknn-toolkit-lite2 release series whose Python API this backend was written against (pyproject's `board` extra)
LITE2_SERIES = ((2, 3), (2, 5))
LITE2_PACKAGE = "rknn-toolkit-lite2"
PROBE_TIMEOUT_S = 120.0
CORE_MASKS = {"auto": 0, "0": 1, "1": 2, "2": 4, "0_1": 3, "0_1_2": 7, "all": 0xFFFF}  # RKNNLite.NPU_CORE_*
# The RK3588's NPU as placement devices: "npu" lets the driver pick cores, npu0..npu2 pin one (RKNNLite core masks).
NPU_CORES = {"npu": "auto", "npu0": "0", "npu1": "1", "npu2": "2"}


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.3.2 (429f97ae6b@...)' -> (2, 3, 2); digits of the leading dotted number only."""
    head = text.strip().split()[0] if text.strip() else ""
    parts = []
    for p in head.lstrip("v").split("."):
        digits = "".join(ch for ch in p if ch.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def read_soc(path: Path = SOC_PATH) -> str | None:
    """The device tree's compatible list ('radxa,rock-5b rockchip,rk3588'), None without one."""
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip() or None
    except OSError:
        return None


def librknnrt_version(lib: Path = LIBRKNNRT) -> str | None:
    """The version string librknnrt carries ('2.3.2 (429f97ae6b@2025-04-09T09:09:27)'); None if the file is absent,
    'unknown' if it holds no version string."""
    try:
        data = lib.read_bytes()
    except OSError:
        return None
    i = data.find(b"librknnrt version: ")
    if i < 0:
        return "unknown"
    return data[i + 19 : data.find(b"\0", i)].decode(errors="replace").strip() or "unknown"


def npu_driver_version(paths: tuple[Path, ...] = DRIVER_PATHS) -> str | None:
    """The rknpu driver's version ('0.9.8'), from debugfs (root) or the module's sysfs entry; None if unseen."""
    for p in paths:
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        return text.split(":")[-1].strip().lstrip("v") or None
    return None


def host_memory() -> int | None:
    """Physical memory of this machine in bytes (the RK3588's NPU has none of its own: it reads the same DDR)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def lite2_version() -> str | None:
    """The installed rknn-toolkit-lite2's version, None if it is not installed (its module is looked for first:
    off the board every start plans shards, and importlib.metadata costs ~3 MiB resident)."""
    if importlib.util.find_spec("rknnlite") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LITE2_PACKAGE)
    except PackageNotFoundError:
        return None


def lite2_problem(version: str | None) -> str | None:
    """Why this rknn-toolkit-lite2 cannot be used (None: it can)."""
    if version is None:
        return f"{LITE2_PACKAGE} is not installed (on the board: pip install -e '.[board]'; aarch64 wheels only)"
    if version_tuple(version)[:2] not in LITE2_SERIES:
        series = " or ".join(f"{a}.{b}.x" for a, b in LITE2_SERIES)
        return f"{LITE2_PACKAGE} {version} is not supported; install {series} (pip install '{LITE2_PACKAGE}>=2.3,<2.6')"
    return None


def librknnrt_problem(have: str | None, need: str | None, lib: Path = LIBRKNNRT) -> str | None:
    """Why this librknnrt cannot run files that need `need` (None: it can, or nothing is asked of it yet)."""
    if have is None:
        return (f"no {lib}: install Rockchip's runtime there (rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so "
                f"of rknn-toolkit2 {need or '2.5.0'}; docs/board.md)")
    if need and (have == "unknown" or version_tuple(have) < version_tuple(need)):
        return (f"{lib} is librknnrt {have}; the compiled slices need {need} or newer (they were built by "
                f"rknn-toolkit2 {need}): install librknnrt {need} there")
    return None


def inference_options(rknnlite_cls: Any) -> dict[str, Any]:
    """Keyword arguments for RKNNLite.inference this version accepts: reuse_outputs=True where it exists (2.5.0 on:
    outputs are views of staging buffers, copied out before the next call), nothing on 2.3.x."""
    params = inspect.signature(rknnlite_cls.inference).parameters
    return {"reuse_outputs": True} if "reuse_outputs" in params else {}


@dataclass
class BoardFacts:
    """Everything `doctor` and the npu backend read about this machine."""

    machine: str
    soc: str | None
    driver: str | None
    librknnrt: str | None
    lite2: str | None
    problems: list[str] = field(default_factory=list)  # what stops the npu backend (empty: nothing seen)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def board_facts(need_librknnrt: str | None = None, machine: str | None = None, soc_path: Path = SOC_PATH,
                lib: Path = LIBRKNNRT, driver_paths: tuple[Path, ...] = DRIVER_PATHS) -> BoardFacts:
    """Read the machine, SoC, driver, librknnrt and lite2 versions; `problems` lists every blocker found.

    An unseen driver version is not a blocker (debugfs needs root; init_runtime is what proves the driver), an old
    one is. `need_librknnrt`: the oldest runtime the compiled files ask for (their manifests' librknnrt_min).
    """
    f = BoardFacts(machine or _platform.machine(), read_soc(soc_path), npu_driver_version(driver_paths),
                   librknnrt_version(lib), lite2_version())
    if f.machine not in ("aarch64", "arm64"):
        f.problems.append(f"this machine is {f.machine}, not aarch64: the npu backend runs only on an RK3588 board")
    if f.soc is None:
        f.problems.append(f"no {soc_path}: RKNNLite reads the SoC there (not an RK3588 board, or a container "
                          f"without it mapped)")
    elif "rk3588" not in f.soc.lower():
        f.problems.append(f"the SoC is {f.soc!r} ({soc_path}), not an RK3588")
    for problem in (lite2_problem(f.lite2), librknnrt_problem(f.librknnrt, need_librknnrt, lib)):
        if problem:
            f.problems.append(problem)
    if f.driver is not None and version_tuple(f.driver)[:2] < MIN_DRIVER:
        f.problems.append(f"the rknpu driver is {f.driver}; rknn 2.x needs >= {'.'.join(map(str, MIN_DRIVER))} "
                          "(update the board's kernel)")
    return f


def board_problems(need_librknnrt: str | None = None) -> list[str]:
    """What stops the npu backend on this machine (empty when nothing that can be seen without running it does;
    init_runtime, doctor's probe, is the final word)."""
    return board_facts(need_librknnrt).problems


@dataclass(frozen=True)
class ProbeResult:
    """init_runtime on one compiled file: ok, or the reason in one line (RKNNLite's own error lines)."""

    file: str
    ok: bool
    reason: str = ""


def probe(rknn_file: Path, core_mask: int = 0, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """load_rknn + init_runtime + release on `rknn_file` in a child process; never raises."""
    try:
        p = subprocess.run([sys.executable, "-m", "exo_rknpu.backends.board", str(rknn_file), str(core_mask)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(str(rknn_file), False, f"init_runtime did not return within {timeout:g} s")
    lines = (p.stdout + "\n" + p.stderr).splitlines()
    try:
        res = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
        ok, step = bool(res["ok"]), res["step"]
    except (StopIteration, ValueError, KeyError):
        ok, step = False, f"the probe process exited {p.returncode}"
    if ok:
        return ProbeResult(str(rknn_file), True)
    return ProbeResult(str(rknn_file), False, f"{step} failed: {rknnlite_reason(lines)}")


def rknnlite_reason(lines: list[str]) -> str:
    """The cause in RKNNLite's output, in one line: librknnrt's error lines ("E RKNN: [time] Invalid RKNN model
    version 6") and the exception RKNNLite caught ("Exception: Please specify the target in init_runtime!")."""
    runtime = [re.sub(r"^E RKNN:\s*(\[[^\]]*\]\s*)?", "", ln).strip() for ln in lines if ln.startswith("E RKNN:")]
    raised = [ln.strip() for ln in lines if re.match(r"^[\w.]*(Exception|Error)\b[^:]*: ", ln)]
    logged = [ln[2:].strip() for ln in lines
              if ln.startswith("E ") and "Traceback" not in ln and "Catch exception" not in ln]
    parts = (runtime + raised[-1:]) or logged[-1:] or [ln.strip() for ln in lines if ln.strip()][-1:]
    return "; ".join(parts) or "no output"


def _probe_main(path: str, core_mask: int) -> int:
    """The child of `probe`: prints one JSON line {"ok": ..., "step": ...} last."""
    from rknnlite.api import RKNNLite

    rk = RKNNLite(verbose=False)
    step = "load_rknn"
    try:
        if rk.load_rknn(path) == 0:
            step = "init_runtime"
            if rk.init_runtime(core_mask=core_mask) == 0:
                step = ""
    finally:
        rk.release()
    sys.stdout.flush()
    print(json.dumps({"ok": step == "", "step": step}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1], int(sys.argv[2])))

