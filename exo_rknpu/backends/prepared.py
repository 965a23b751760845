"""On-disk cache of slices prepared for onnxruntime: the graph and its compact weights, mapped on the next start.

  ROOT/<key[:2]>/<key>/   model.onnx (graph only; initializers point into weights.bin), weights.bin, manifest.json
  ROOT/tmp/               entries being written; a finished entry is moved into place with one rename

key = sha256 of (the slice's weights digest -- which covers the compact bytes, so the --weights mode --, the slice
spec, the attention form, the exporter version, MatMulNBits' accuracy level, the onnxruntime version). An entry is
used only if its manifest names the same key and every file has the recorded size and sha256; anything else is
removed and rebuilt. onnxruntime maps weights.bin (its offsets are page-aligned) instead of reading it into memory.

  ROOT/index/<source[:2]>/<source>.json   {"source": .., "key": .., "facts": {..}}

The key needs the slice's compact weights (their digest), which are what a start wants not to build when a prepared
slice already holds them. So each stored entry is also filed under its source key: sha256 of the same parts with
the weights digest replaced by the stamp of the files and mode they were built from (model/weights.py SourceStamp).
A start finds the key there (`recall`) and builds none of that slice's weights; the entry it names is checked as
above, and a missing or damaged one sends the start back to building (which files it again). `facts` are what the
runner needs to know of the weights it no longer sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exo_rknpu.errors import ArtifactError
from exo_rknpu.fileio import atomic_write_text

if TYPE_CHECKING:  # onnx is imported only to store a slice (backends/ort.py)
    import onnx

    from exo_rknpu.slices.onnx_export import PendingPack

MODEL_FILE, WEIGHTS_FILE, MANIFEST_FILE = "model.onnx", "weights.bin", "manifest.json"
INDEX_DIR = "index"
ALIGN = 4096  # page-aligned offsets let onnxruntime map each tensor


def prepared_key(**parts: object) -> str:
    """sha256 of the JSON of `parts` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file read through one reused buffer: unlike hashing a mapping of it, the file's pages never count
    in this process's resident memory (a prepared slice is hundreds of MB, checked while the shard's weights are
    loaded: a mapping made the check the load's peak)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class Recalled:
    """A checked entry found by its source key: its model file and the facts filed with it."""

    model_file: Path
    facts: dict[str, Any]


class PreparedCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _index_file(self, source_key: str) -> Path:
        return self.root / INDEX_DIR / source_key[:2] / f"{source_key}.json"

    def remember(self, source_key: str, key: str, facts: dict[str, Any]) -> None:
        """File the entry `key` under `source_key` (replacing what was filed there), with `facts`."""
        path = self._index_file(source_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format": 1, "source": source_key, "key": key, "facts": facts}))

    def recall(self, source_key: str) -> Recalled | None:
        """The checked entry filed under `source_key`, or None (nothing filed, an unreadable record, or an entry
        that is gone or fails `check`: `lookup` removes a damaged one, and building it again files it again)."""
        try:
            record = json.loads(self._index_file(source_key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("source") != source_key or not isinstance(record.get("key"), str):
            return None
        model_file = self.lookup(record["key"])
        return None if model_file is None else Recalled(model_file, dict(record.get("facts") or {}))

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> Path | None:
        """The model file of a checked entry, or None. A damaged, tampered or mislabelled entry is removed."""
        folder = self.entry(key)
        if not folder.exists():
            return None
        try:
            self.check(folder, key)
        except ArtifactError:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return folder / MODEL_FILE

    @staticmethod
    def check(folder: Path, key: str) -> None:
        """ArtifactError unless the manifest names `key` and every file matches its recorded size and sha256."""
        try:
            m = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{folder}: unreadable manifest ({e})") from None
        if m.get("key") != key:
            raise ArtifactError(f"{folder} holds key {m.get('key')}, not {key}")
        for name, rec in m.get("files", {}).items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != rec.get("bytes") or sha256_file(p) != rec.get("sha256"):
                raise ArtifactError(f"{p} does not match its manifest (modified, truncated or missing)")
        if set(m.get("files", {})) != {MODEL_FILE, WEIGHTS_FILE}:
            raise ArtifactError(f"{folder}: manifest lists {sorted(m.get('files', {}))}")

    def store(self, key: str, model: "onnx.ModelProto", external: "dict[str, np.ndarray | PendingPack]") -> Path:
        """Write `model` with its in-memory external initializers moved into weights.bin; returns the model file.
        A PendingPack is packed as it is written (one at a time: a slice's packed bytes are never all in memory)."""
        from exo_rknpu.slices.onnx_export import MEMORY_LOCATION, external_tensor, materialize

        staging = self.root / "tmp" / f"{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            offsets: dict[str, int] = {}
            wh = hashlib.sha256()
            pos = 0
            with open(staging / WEIGHTS_FILE, "wb") as f:
                for name, arr in external.items():
                    pad = (-pos) % ALIGN
                    f.write(b"\0" * pad)
                    wh.update(b"\0" * pad)
                    pos += pad
                    offsets[name] = pos
                    view = memoryview(np.ascontiguousarray(materialize(arr))).cast("B")
                    f.write(view)
                    wh.update(view)
                    pos += view.nbytes
                    del view  # before the next tensor is packed
            inits = model.graph.initializer
            for i, t in enumerate(inits):
                if t.name in offsets and any(e.key == "location" and e.value == MEMORY_LOCATION for e in t.external_data):
                    inits[i].CopyFrom(external_tensor(t.name, external[t.name], WEIGHTS_FILE, offsets[t.name]))
            model_bytes = model.SerializeToString()
            (staging / MODEL_FILE).write_bytes(model_bytes)
            files = {MODEL_FILE: {"bytes": len(model_bytes), "sha256": hashlib.sha256(model_bytes).hexdigest()},
                     WEIGHTS_FILE: {"bytes": pos, "sha256": wh.hexdigest()}}
            atomic_write_text(staging / MANIFEST_FILE, json.dumps({"format": 1, "key": key, "files": files}, indent=1))
            dest = self.entry(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():  # another process finished the same key; the content is the same by construction
                shutil.rmtree(staging, ignore_errors=True)
            else:
                os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest / MODEL_FILE
