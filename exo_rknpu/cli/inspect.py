"""`exo-rknpu inspect PATH`: what a compiled slice folder (or a whole cache) holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show compiled slices: layers, buckets, dtype, sizes, CPU-placed ops, cycles")
    p.add_argument("path", type=Path, help="a slice folder (holding manifest.json), a .rknn inside one, or a cache folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _summary(folder: Path) -> dict:
    from exo_rknpu.slices import manifest as mf
    from exo_rknpu.errors import ArtifactError

    m = mf.read_manifest(folder)
    try:
        mf.check_files(folder, m)
        integrity = "ok"
    except ArtifactError as e:
        integrity = str(e)
    b = m.get("build", {})
    return {"folder": str(folder), "slice": m["slice"]["name"], "layers": m.get("layers", []), "dtype": m["dtype"],
            "platform": m["platform"], "buckets": m.get("buckets"), "files": [(f["file"], f["bytes"]) for f in m["files"]],
            "bytes": sum(f["bytes"] for f in m["files"]), "cpu_ops": b.get("cpu_ops", []), "fallbacks": b.get("fallbacks", []),
            "est_cycles": b.get("cycles", []), "weight_kb": b.get("weight_kb"), "internal_kb": b.get("internal_kb"),
            "build_seconds": b.get("seconds"), "verify": {k: v for k, v in m.get("verify", {}).items() if k.startswith("cos")},
            "model_fingerprint": m["model_fingerprint"][:16], "integrity": integrity}


def run(args: argparse.Namespace) -> int:
    from exo_rknpu.errors import ArtifactError

    p = args.path.expanduser()
    if p.is_file():
        p = p.parent
    folders = [p] if (p / "manifest.json").exists() else sorted(x.parent for x in p.glob("slices/*/*/manifest.json"))
    if not folders:
        raise ArtifactError(f"{args.path} holds no compiled slice (no manifest.json found); compile with: exo-rknpu compile ...")
    rows = [_summary(f) for f in folders]
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        cyc = f"{min(r['est_cycles']):,}-{max(r['est_cycles']):,}" if r["est_cycles"] else "?"
        cpu = ", ".join(r["cpu_ops"] + r["fallbacks"]) or "none"
        print(f"{r['slice']:<12} {r['dtype']:<5} {r['platform']} {r['bytes'] / 1e6:7.1f} MB in {len(r['files'])} file(s)  "
              f"seq {r['buckets']['seq']} ctx {r['buckets']['context']}  est. cycles {cyc}  CPU ops: {cpu}  "
              f"verify {r['verify'] or '-'}  [{r['integrity']}]  {r['folder']}")
    return 0 if all(r["integrity"] == "ok" for r in rows) else 1
