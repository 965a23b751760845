"""`exo-rknpu doctor`: can the npu backend run on this machine? SoC, NPU driver, the librknnrt RKNNLite loads and its
version, rknn-toolkit-lite2's version, then RKNNLite's init_runtime on a compiled slice (the probe). "ready" only
when every check passes and init_runtime succeeded; exit status 0 then, 1 otherwise. Also: RAM, DDR governor, and
the rknn-toolkit2 environment used to compile on this machine."""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from exo_rknpu.backends import board
from exo_rknpu.config import Paths


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check this machine for the RK3588 NPU runtime", description=__doc__)
    p.add_argument("--json", action="store_true", help="print every finding as one JSON object instead of a table")
    p.add_argument("--probe", type=Path, default=None, metavar="FILE",
                   help="the .rknn file to run init_runtime on (default: the smallest compiled slice in --cache)")
    p.add_argument("--cache", type=Path, default=None,
                   help="compiled slices to probe (default: ~/.cache/exo-rknpu/compiled)")
    p.set_defaults(func=run)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def smallest_slice(cache: Path) -> tuple[Path, str] | None:
    """The smallest compiled .rknn file in `cache` and the librknnrt its manifest asks for (None: nothing compiled)."""
    files = sorted(cache.glob("slices/*/*/*.rknn"), key=lambda p: p.stat().st_size)
    if not files:
        return None
    try:
        m = json.loads((files[0].parent / "manifest.json").read_text())
    except (OSError, ValueError):
        m = {}
    return files[0], str(m.get("librknnrt_min") or m.get("toolkit_version") or "")


def collect(probe_file: Path | None = None, cache: Path | None = None) -> dict:
    """Every finding as a dict; "ready" is True only when nothing blocks and init_runtime succeeded on a slice."""
    from exo_rknpu.rknn import toolkit

    cache = cache or Paths.from_env().compiled
    found = (probe_file, "") if probe_file else smallest_slice(cache)
    facts = board.board_facts(need_librknnrt=found[1] or None if found else None)
    info: dict = facts.to_dict()
    info["librknnrt_path"] = str(board.LIBRKNNRT)
    if found is None:
        info["probe"] = {"file": None, "ok": False,
                         "reason": f"no compiled slice in {cache}: compile one and copy it here (docs/board.md, step 3)"}
    elif facts.machine not in ("aarch64", "arm64") or board.lite2_problem(facts.lite2):
        info["probe"] = {"file": str(found[0]), "ok": False, "reason": "not run: RKNNLite cannot run on this machine"}
    else:
        r = board.probe(found[0])
        info["probe"] = {"file": r.file, "ok": r.ok, "reason": r.reason}
    info["ready"] = not facts.problems and info["probe"]["ok"]
    mem = _read("/proc/meminfo") or ""
    info["ram_gb"] = round(int(mem.split()[1]) / 1e6, 1) if mem.startswith("MemTotal") else None
    info["ddr_governor"] = next((_read(p) for p in glob.glob("/sys/class/devfreq/*dmc*/governor")), None)
    info["npu_governor"] = next((_read(p) for p in glob.glob("/sys/class/devfreq/*npu*/governor")), None)
    st = toolkit.status()
    info["toolkit"] = {"ok": st.ok, "versions": st.versions, "problem": st.problem}
    return info


def run(args: argparse.Namespace) -> int:
    info = collect(args.probe, args.cache)
    if args.json:
        print(json.dumps(info))
        return 0 if info["ready"] else 1
    unseen = "cannot see it here"
    print(f"machine       {info['machine']}")
    print(f"SoC           {info['soc'] or unseen + ' (no ' + str(board.SOC_PATH) + ')'}")
    print(f"NPU driver    {info['driver'] or unseen + ' (/sys/kernel/debug/rknpu/version needs root; the probe checks it)'}")
    print(f"librknnrt     {info['librknnrt'] or 'missing'} ({info['librknnrt_path']}, where RKNNLite loads it from)")
    print(f"rknnlite      {info['lite2'] or 'not installed'}")
    probe = info["probe"]
    if probe["ok"]:
        print(f"probe         init_runtime ok on {probe['file']}")
    else:
        print(f"probe         init_runtime on {probe['file'] or '(no compiled slice)'}: {probe['reason']}")
    print(f"RAM           {info['ram_gb']} GB")
    gov = info["ddr_governor"]
    print(f"DDR governor  {gov or unseen + ' (no /sys/class/devfreq/*dmc*)'}"
          + (" -- WARNING: decode speed depends on DDR frequency; set it to 'performance'" if gov and gov != "performance" else ""))
    tk = info["toolkit"]
    print(f"toolkit       {'ok ' + tk['versions'].get('rknn', '') if tk['ok'] else tk['problem']} (compiling here)")
    if info["ready"]:
        print("npu backend   ready")
    else:
        why = info["problems"] + ([] if probe["ok"] else [f"probe: {probe['reason']}"])
        print("npu backend   unavailable: " + "; ".join(why))
    return 0 if info["ready"] else 1
