"""Slice manifests: the JSON next to each compiled slice that says what it is and how to check it.

Fields (format 1):
  format, key, created, slice {name, kind, start, stop, blocks}, layers [global indices],
  model_fingerprint, weights_digest (sha256 of the slice's tensors), model_args,
  dtype ("fp16" | "w8a8"), platform ("rk3588"), toolkit_version, exporter_version,
  buckets {seq, context, batch (only when there are batch buckets)},
  files [{file, sha256, bytes, shapes: [{seq, ctx, batch (batch graphs), inputs {name: shape}, outputs {name: shape}}],
          io, inputs [graph order], outputs [graph order]}],
  build {seconds, cpu_ops, fallbacks, cycles, internal_kb, weight_kb, errors},
  quantization {recipe, slice_dtype, summary, recipe_key, calibration_sha256, samples_per_bucket} (w8a8 only),
  verify {cos_<output>: min over buckets, cos_delta: residual-update cosine, ...} (with --verify).

These are the facts the board checks before running a slice (rknn/npu.py::check_manifest), from this file and
the .rknn files alone: `key` must equal the cache key recomputed from the recorded facts (artifacts.manifest_key),
which ties `weights_digest` to the entry without reading any weights on the board.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exo_rknpu.errors import ArtifactError
from exo_rknpu.fileio import atomic_write_text, sha256_file

MANIFEST = "manifest.json"
FORMAT = 1


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load and structurally check a manifest; ArtifactError says what is wrong."""
    path = folder / MANIFEST
    if not path.exists():
        raise ArtifactError(f"no {MANIFEST} in {folder}: not a compiled slice (or an unfinished one); recompile it")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); delete {folder} and recompile") from None
    for k in ("format", "key", "slice", "model_fingerprint", "dtype", "platform", "files"):
        if k not in m:
            raise ArtifactError(f"{path} lacks field {k!r}; delete {folder} and recompile")
    if m["format"] != FORMAT:
        raise ArtifactError(f"{path} has format {m['format']}, this version reads {FORMAT}; recompile")
    return m


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file listed exists with the recorded size and sha256 (tampered or truncated files are refused)."""
    for f in manifest["files"]:
        p = folder / f["file"]
        if not p.exists():
            raise ArtifactError(f"{p} is listed in the manifest but missing; recompile this slice")
        if p.stat().st_size != f["bytes"]:
            raise ArtifactError(f"{p} has {p.stat().st_size} bytes, the manifest says {f['bytes']}: truncated or replaced; recompile")
        if sha256_file(p) != f["sha256"]:
            raise ArtifactError(f"{p} does not match the sha256 in its manifest (modified or corrupt); recompile this slice")


def load_checked(folder: Path) -> dict[str, Any]:
    m = read_manifest(folder)
    check_files(folder, m)
    return m
