"""Content-addressed cache of compiled slices.

  ROOT/slices/<key[:2]>/<key>/      one finished slice: *.rknn, build.log, manifest.json (written last)
  ROOT/index/<fingerprint>/<dtype>-<platform>/<slice name>.json   -> {"key": ...}, for loaders (npu backend)
  ROOT/tmp/                         builds in progress; a finished build is moved into slices/ with one rename

key = sha256 of (slice weights digest, model fingerprint, slice spec, buckets, dtype, platform, toolkit version,
exporter version, calibration digest). A key folder exists only once complete, so an interrupted compile leaves
nothing that looks finished and the next run rebuilds exactly the missing keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from exo_rknpu.slices import manifest as mf
from exo_rknpu.errors import ArtifactError
from exo_rknpu.fileio import atomic_write_text
from exo_rknpu.model.weights import ShardWeights, hash_weight
from exo_rknpu.slices.spec import Buckets, SliceSpec

_SOURCES = ("slices/graph.py", "slices/onnx_export.py", "model/quant.py", "slices/npu_form.py", "rknn/venv/worker.py", "rknn/io.py")


def exporter_version() -> str:
    """Changes whenever the graph definition, the ONNX exporter or the build recipe changes."""
    pkg = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update(rel.encode())
        h.update((pkg / rel).read_bytes())
    return h.hexdigest()[:16]


def slice_digest(spec: SliceSpec, weights: ShardWeights) -> str:
    """sha256 identifying the tensors a slice is built from."""
    h = hashlib.sha256()
    if spec.kind == "layers":
        for i in range(spec.start, spec.stop):
            h.update(f"layer{i}:{weights.layers[i].digest()};".encode())
    else:
        arrays = {"embed": [weights.embed_tokens], "head": [weights.final_norm, weights.lm_head]}[spec.kind]
        for a in arrays:
            if a is None:
                raise ArtifactError(f"slice {spec.name} needs tensors this shard did not load")
            hash_weight(h, a)
    return h.hexdigest()


def spec_dict(spec: SliceSpec) -> dict[str, Any]:
    return {"name": spec.name, "kind": spec.kind, "start": spec.start, "stop": spec.stop, "blocks": list(spec.blocks),
            "kv_layout": spec.kv_layout}


def cache_key(*, weights_digest: str, fingerprint: str, spec: SliceSpec | dict[str, Any], buckets: Buckets | dict[str, Any],
              dtype: str, platform: str, toolkit_version: str, exporter: str, calibration: str = "") -> str:
    payload = {
        "weights": weights_digest, "model": fingerprint, "slice": spec if isinstance(spec, dict) else spec_dict(spec),
        "buckets": _bucket_facts(buckets) if isinstance(buckets, dict) else buckets.describe(),
        "dtype": dtype, "platform": platform, "toolkit": toolkit_version, "exporter": exporter,
        "calibration": calibration if dtype != "fp16" else "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _bucket_facts(recorded: dict[str, Any]) -> dict[str, Any]:
    """A manifest's recorded buckets as Buckets.describe() gives them (batch only when there is one)."""
    out = {"seq": list(recorded["seq"]), "context": list(recorded["context"])}
    if recorded.get("batch"):
        out["batch"] = list(recorded["batch"])
    return out


def manifest_key(m: dict[str, Any]) -> str:
    """The cache key recomputed from a manifest's own recorded facts (weights digest, fingerprint, slice, buckets,
    dtype, platform, toolkit, exporter, calibration). Equal to m["key"] for every manifest the compiler commits (it
    checks so before committing), so a hand-edited or stale fact is caught without reading any weights."""
    q = m.get("quantization") or {}
    calibration = q.get("recipe_key") or ""  # a w8a8 build's recipe, as compile_range keys it (rknn/recipe.py)
    return cache_key(weights_digest=m.get("weights_digest", ""), fingerprint=m["model_fingerprint"], spec=m["slice"],
                     buckets=m.get("buckets", {"seq": [], "context": []}), dtype=m["dtype"], platform=m["platform"],
                     toolkit_version=m.get("toolkit_version", ""), exporter=m.get("exporter_version", ""),
                     calibration=calibration)


class SliceCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / "slices" / key[:2] / key

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The checked manifest of a finished entry, None if absent. A damaged entry is removed (never reused)."""
        folder = self.entry(key)
        if not folder.exists():
            return None
        try:
            m = mf.load_checked(folder)
            if m["key"] != key:
                raise ArtifactError(f"{folder} holds key {m['key']}")
            return m
        except ArtifactError:
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def staging(self) -> Path:
        p = self.root / "tmp" / f"build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        p.mkdir(parents=True)
        return p

    def commit(self, staging: Path, manifest: dict[str, Any]) -> Path:
        """Write the manifest (last file) into the staging folder and move it into place atomically."""
        mf.write_manifest(staging, manifest)
        mf.check_files(staging, manifest)
        dest = self.entry(manifest["key"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # a concurrent compile finished the same key first; identical content by construction
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging, dest)
        self._index(manifest)
        return dest

    def _index(self, m: dict[str, Any]) -> None:
        d = self.root / "index" / m["model_fingerprint"] / f"{m['dtype']}-{m['platform']}"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / f"{m['slice']['name']}.json", json.dumps({"key": m["key"]}))

    def find(self, fingerprint: str, dtype: str, platform: str, slice_name: str, check_files: bool = True,
             hint: str = "exo-rknpu compile --model M --layers A-B") -> tuple[Path, dict[str, Any]]:
        """Locate a slice by model/dtype/platform/name and check its manifest (and, with check_files, every file's
        size and sha256); ArtifactError explains what is missing or wrong and ends with `run: <hint>`."""
        idx = self.root / "index" / fingerprint / f"{dtype}-{platform}" / f"{slice_name}.json"
        if not idx.exists():
            have = sorted(p.name for p in (self.root / "index" / fingerprint).glob("*")) if (self.root / "index" / fingerprint).exists() else []
            raise ArtifactError(
                f"no compiled {dtype} slice {slice_name} for {platform} of this model in {self.root}"
                + (f" (compiled variants of this model: {', '.join(have)})" if have else " (nothing compiled for this model)")
                + f"; run: {hint}"
            )
        key = json.loads(idx.read_text())["key"]
        folder = self.entry(key)
        try:
            m = mf.load_checked(folder) if check_files else mf.read_manifest(folder)
        except ArtifactError as e:
            raise ArtifactError(f"{e}; run: {hint}") from None
        return folder, m

    def clean_tmp(self) -> None:
        """Drop staging folders of builds that died (only those not owned by a live process)."""
        tmp = self.root / "tmp"
        if not tmp.exists():
            return
        for p in tmp.iterdir():
            try:
                pid = int(p.name.split("-")[1])
                os.kill(pid, 0)
                continue  # still running
            except (IndexError, ValueError, ProcessLookupError):
                pass
            except PermissionError:
                continue
            shutil.rmtree(p, ignore_errors=True)
