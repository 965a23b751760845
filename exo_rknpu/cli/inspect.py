"""`exo-rknpu inspect PATH`: what a compiled slice folder (or a whole cache) holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exo_rknpu.cli.report import count, format_buckets, format_cpu, slice_order, worst_cos


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show compiled slices: layers, buckets, dtype, sizes, CPU-placed ops, cycles",
                              description=__doc__ + " One row per slice, in layer order; --json gives every field in full.")
    p.add_argument("path", type=Path, help="a slice folder (holding manifest.json), a .rknn inside one, or a cache folder")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per slice, with everything in full (every CPU-placed op and "
                        "compiler warning, all verify figures, file list)")
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
            "per_bucket": b.get("per_bucket", {}),
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
    rows = sorted((_summary(f) for f in folders), key=lambda r: (r["model_fingerprint"], r["dtype"], r["platform"], slice_order(r["slice"])))
    if args.json:
        print(json.dumps(rows))
        return 0
    for line in format_rows(rows):
        print(line)
    print(f"({len(rows)} slice(s) under {p}; every field in full, folders included: --json)")
    return 0 if all(r["integrity"] == "ok" for r in rows) else 1


def _bucket_counts(per_bucket: dict) -> str:
    """" (CPU ops in s16c256: 2, ...; compiler errors in ...)" for the buckets that have any; "" when none does."""
    cpu = [f"{k}: {v['cpu']}" for k, v in per_bucket.items() if v.get("cpu")]
    err = [f"{k}: {v['errors']}" for k, v in per_bucket.items() if v.get("errors")]
    parts = ([f"CPU ops in {', '.join(cpu)}"] if cpu else []) + ([f"compiler errors in {', '.join(err)}"] if err else [])
    return f" ({'; '.join(parts)})" if parts else ""


def format_rows(rows: list[dict]) -> list[str]:
    """A header, then one line per slice (plus a line under any slice whose files fail their check)."""
    out = [f"{'model':<8} {'slice':<11} {'dtype':<5} {'platform':<8} {'size':>9}  {'seq':<8} {'context':<10} "
           f"{'est. cycles':<11} {'min cos':<8} {'files':<5} CPU-placed"]
    for r in rows:
        cyc = r["est_cycles"]
        cycles = f"{count(min(cyc))}-{count(max(cyc))}" if cyc else "?"
        b = r["buckets"] or {}
        ctx = b.get("context") or []
        out.append(f"{r['model_fingerprint'][:8]:<8} {r['slice']:<11} {r['dtype']:<5} {r['platform']:<8} "
                   f"{r['bytes'] / 1e6:6.1f} MB  {format_buckets(b.get('seq', [])):<8} "
                   f"{(f'{ctx[0]}-{ctx[-1]}' if ctx else '?'):<10} {cycles:<11} {worst_cos(r['verify']):<8} "
                   f"{'ok' if r['integrity'] == 'ok' else 'BAD':<5} {format_cpu(r['cpu_ops'], r['fallbacks'])}"
                   + _bucket_counts(r["per_bucket"]))
        if r["integrity"] != "ok":
            out.append(f"  ^ {r['integrity']}")
    return out
