"""On-disk cache of slices prepared for onnxruntime: the graph and its compact weights, mapped on the next start.

  ROOT/<key[:2]>/<key>/   model.onnx (graph only; initializers point into weights.bin), weights.bin, manifest.json
  ROOT/tmp/               entries being written (and entries being removed); a finished entry is moved into place
                          with one rename, so a half-written file never appears under a key
  ROOT/prune.json         when the cache was last pruned, and where the next pruning goes on

key = sha256 of (the slice's weights digest -- which covers the compact bytes, so the --weights mode --, the slice
spec, the attention form, the exporter version, MatMulNBits' accuracy level, the onnxruntime version). An entry is
used only if its manifest names the same key and every file has the recorded size and sha256; anything else is
removed and rebuilt. onnxruntime maps weights.bin (its offsets are page-aligned) instead of reading it into memory.

Integrity without re-reading hundreds of MB on every start: the manifest also records each file's stat (size,
mtime_ns, inode, ctime_ns) as it was when its bytes were last hashed (when the entry was written, or a later full
check). A start whose stat of a file matches skips its hash; any other stat (a file rewritten, touched, copied or
restored: writing a file or setting its times always moves its ctime) hashes it in full again, and a mismatch
removes the entry.

  ROOT/index/<source[:2]>/<source>.json   {"source": .., "key": .., "facts": {..}}

The key needs the slice's compact weights (their digest), which are what a start wants not to build when a prepared
slice already holds them. So each stored entry is also filed under its source key: sha256 of the same parts with
the weights digest replaced by the stamp of the files and mode they were built from (model/weights.py SourceStamp).
A start finds the key there (`recall`) and builds none of that slice's weights; the entry it names is checked as
above, and a missing or damaged one sends the start back to building (which files it again). `facts` are what the
runner needs to know of the weights it no longer sees.

Pruning (`prune_if_due`, once a day at most, when a backend is made): an entry's folder mtime is its last use (a
start that uses it sets it). Removed: entries written by another version (exporter, onnxruntime or native layout:
its keys can never be asked for by this one) or of no readable version (a format-1 entry this version uses is
recorded as its own), once unused for STALE_AFTER_S -- so two versions sharing the cache keep each other's entries
that are in use; ROOT/tmp leftovers older than TMP_AFTER_S; index records naming no entry. The current version's
entries are kept. Never followed or removed: symlinks, and any name the layout above does not define.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exo_rknpu.errors import ArtifactError
from exo_rknpu.fileio import atomic_write_text

if TYPE_CHECKING:  # onnx is imported only to store a slice (backends/ort.py)
    import onnx

    from exo_rknpu.slices.onnx_export import PendingPack

MODEL_FILE, WEIGHTS_FILE, MANIFEST_FILE = "model.onnx", "weights.bin", "manifest.json"
INDEX_DIR, TMP_DIR, PRUNE_STAMP = "index", "tmp", "prune.json"
ALIGN = 4096  # page-aligned offsets let onnxruntime map each tensor
MANIFEST_FORMAT = 2  # 1: no version, no verified stats (hashed in full once, then recorded as the user's version)

# Another version's entry unused this long is removed: long enough that two versions installed side by side (a
# venv per release) keep the entries each of them uses; short enough that an upgrade's leftovers (a 1B model's
# slices are ~0.6 GB per version) go within days.
STALE_AFTER_S = 7 * 86400
TMP_AFTER_S = 6 * 3600  # a staging folder untouched this long was left by a crash (a 1B slice is written in seconds)
INDEX_AFTER_S = 600  # a record naming no entry goes once this old (not one filed while its entry is rebuilt)
PRUNE_EVERY_S = 86400  # a start prunes at most this often (every start checks one stamp's mtime)
# What one pruning may cost: a huge cache is pruned over several starts, each bounded. Names examined (each a stat,
# an old entry also a small read: ~0.1 ms), and bytes removed (dropping a file's cached pages is what an unlink
# costs: 61 ms for 200 MB just written, measured here; 2 GiB is ~3 versions of a 1B model's slices per start).
PRUNE_BUDGET = 2048
PRUNE_BYTES = 2 << 30
_KEY = re.compile(r"[0-9a-f]{64}")  # an entry folder's or an index record's name


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
class CacheVersion:
    """What decides, besides the slice itself, which keys a version of exo-rknpu asks for: the exporter's version,
    onnxruntime's and the native kernel's packed layout (None in an entry whose slice does not run on it)."""

    exporter: str
    onnxruntime: str
    native: str | None

    def of_entry(self, native: bool) -> "CacheVersion":
        """The version recorded in an entry this version writes (the layout only if the slice runs natively)."""
        return replace(self, native=self.native if native else None)

    def asks_for(self, entry: "CacheVersion | None") -> bool:
        """Whether an entry written with version `entry` can be one of this version's keys."""
        return (entry is not None and (entry.exporter, entry.onnxruntime) == (self.exporter, self.onnxruntime)
                and entry.native in (None, self.native))


@dataclass(frozen=True)
class FileStat:
    """A file's stat as far as a later start compares it: any write or copy changes one of these (ctime cannot be
    set back by a user), so an equal stat means the bytes last hashed are still there."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileStat":
        """The stat of `path` itself (a symlink is not followed: ArtifactError, like anything not a regular file)."""
        try:
            st = os.lstat(path)
        except OSError:
            raise ArtifactError(f"{path} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path} is not a regular file")
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True)
class FileRecord:
    """What an entry's manifest says of one of its files: its size and sha256, and `verified`, the stat it had when
    those bytes were last hashed (None: never recorded, so the next check hashes it)."""

    bytes: int
    sha256: str
    verified: FileStat | None = None


@dataclass(frozen=True)
class Manifest:
    """An entry's manifest.json: the key it was stored under, its files, and the version that wrote it."""

    key: str
    files: dict[str, FileRecord]
    version: CacheVersion | None  # None: written before versions were recorded (format 1)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        """The manifest of `folder`; ArtifactError if it is missing or not one."""
        try:
            m = json.loads((folder / MANIFEST_FILE).read_text())
            files = {name: FileRecord(int(r["bytes"]), str(r["sha256"]),
                                      FileStat(**r["verified"]) if r.get("verified") else None)
                     for name, r in m["files"].items()}
            version = CacheVersion(**m["version"]) if m.get("version") else None
            return cls(str(m["key"]), files, version)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ArtifactError(f"{folder}: unreadable manifest ({e!r})") from None

    def write(self, folder: Path) -> None:
        version = None if self.version is None else asdict(self.version)
        files = {name: asdict(r) for name, r in self.files.items()}
        atomic_write_text(folder / MANIFEST_FILE, json.dumps(
            {"format": MANIFEST_FORMAT, "key": self.key, "version": version, "files": files}, indent=1))


def verify_file(path: Path, rec: FileRecord) -> FileStat:
    """The stat to record for `path` once it is known to hold `rec`'s bytes; ArtifactError if it does not. A stat
    equal to the one recorded skips the hash (nothing has written the file since); any other hashes it in full."""
    before = FileStat.of(path)
    if before.size != rec.bytes:
        raise ArtifactError(f"{path} has {before.size} bytes, not {rec.bytes} (truncated or modified)")
    if before == rec.verified:
        return before
    if sha256_file(path) != rec.sha256:
        raise ArtifactError(f"{path} does not match its manifest (modified)")
    if FileStat.of(path) != before:
        raise ArtifactError(f"{path} changed while it was checked")
    return before


@dataclass(frozen=True)
class Recalled:
    """A checked entry found by its source key: its model file and the facts filed with it."""

    model_file: Path
    facts: dict[str, Any]


class PreparedCache:
    def __init__(self, root: Path, version: CacheVersion) -> None:
        """`version`: the version of the process using it (what its entries record, and what pruning keeps)."""
        self.root = Path(root)
        self.version = version

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
        """The model file of a checked entry, or None. A damaged, tampered or mislabelled entry is removed. A found
        entry's folder mtime is set to now: its last use, which keeps it from pruning by another version."""
        folder = self.entry(key)
        if not folder.exists():
            return None
        try:
            self.check(folder, key)
        except ArtifactError:
            self._discard(folder)
            return None
        try:
            os.utime(folder)
        except OSError:
            pass  # a read-only cache is used as it is (and pruned by whoever may write it)
        return folder / MODEL_FILE

    def check(self, folder: Path, key: str) -> None:
        """ArtifactError unless the manifest names `key` and every file holds the bytes it records (`verify_file`:
        hashed only if its stat differs from the one recorded; the stats of a full check are recorded). An entry of
        no recorded version (format 1) that this version asked for by its key is recorded as this version's (with
        the native layout, which such a manifest cannot say it does not depend on)."""
        m = Manifest.read(folder)
        if m.key != key:
            raise ArtifactError(f"{folder} holds key {m.key}, not {key}")
        if set(m.files) != {MODEL_FILE, WEIGHTS_FILE}:
            raise ArtifactError(f"{folder}: manifest lists {sorted(m.files)}")
        files = {name: replace(rec, verified=verify_file(folder / name, rec)) for name, rec in m.files.items()}
        if files != m.files or m.version is None:
            try:
                replace(m, files=files, version=m.version or self.version).write(folder)
            except OSError:
                pass  # a read-only cache: the next start hashes again

    def _discard(self, folder: Path) -> None:
        """Remove an entry (or staging) folder: first moved into ROOT/tmp with one rename, so no start sees it
        half-removed under its key. A process that has weights.bin mapped keeps its pages: on Linux an unlinked
        file lives until its last mapping goes."""
        doomed = self.root / TMP_DIR / f"discard-{folder.name[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            doomed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, doomed)
        except OSError:
            doomed = folder  # (another process removed or moved it first, or tmp cannot be made: remove in place)
        shutil.rmtree(doomed, ignore_errors=True)  # rmtree never follows a symlink

    def store(self, key: str, model: "onnx.ModelProto", external: "dict[str, np.ndarray | PendingPack]",
              native: bool = False) -> Path:
        """Write `model` with its in-memory external initializers moved into weights.bin; returns the model file.
        A PendingPack is packed as it is written (one at a time: a slice's packed bytes are never all in memory).
        `native`: the slice runs on the native kernel (its packed layout is part of the version it records)."""
        from exo_rknpu.slices.onnx_export import MEMORY_LOCATION, external_tensor, materialize

        staging = self.root / TMP_DIR / f"{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
            # the bytes were hashed as they were written, so their stat now is a verified one (renaming the folder
            # into place changes none of it)
            files = {MODEL_FILE: FileRecord(len(model_bytes), hashlib.sha256(model_bytes).hexdigest(),
                                            FileStat.of(staging / MODEL_FILE)),
                     WEIGHTS_FILE: FileRecord(pos, wh.hexdigest(), FileStat.of(staging / WEIGHTS_FILE))}
            Manifest(key, files, self.version.of_entry(native)).write(staging)
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

    # ------------------------------------------------------------------ pruning

    def prune_if_due(self, now: float | None = None) -> "Pruned | None":
        """`prune`, unless the last pruning finished its round less than PRUNE_EVERY_S ago (then: one stat and one
        small read), or the cache does not exist yet or cannot be written. Called once when a backend is made,
        before any slice is looked up (never while a shard runs)."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            return None  # (a read-only cache is pruned by whoever may write it, not tried on every start)
        now = time.time() if now is None else now
        stamp = self.root / PRUNE_STAMP
        try:
            start, age = int(json.loads(stamp.read_text())["next"]), now - stamp.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            start, age = 0, float("inf")
        if start == 0 and age < PRUNE_EVERY_S:
            return None
        return self.prune(now, start)

    def prune(self, now: float | None = None, start: int = 0) -> "Pruned":
        """Remove what no start of this version can use (module docstring, "Pruning"), from the `start`-th folder
        on (ROOT/tmp, the entry folders, the index folders), examining at most PRUNE_BUDGET names and removing at
        most about PRUNE_BYTES; records in ROOT/prune.json where the next pruning goes on (0: this one finished the
        round; a folder it stopped in is examined again from its start)."""
        now = time.time() if now is None else now
        units = ([(self.root / TMP_DIR, self._prune_tmp, "tmp")]
                 + [(self.root / f"{i:02x}", self._prune_entry, "entries") for i in range(256)]
                 + [(self.root / INDEX_DIR / f"{i:02x}", self._prune_record, "index") for i in range(256)])
        pruned, budget, i = Pruned(), PRUNE_BUDGET, start
        while i < len(units) and budget > 0 and pruned.bytes < PRUNE_BYTES:
            folder, judge, kind = units[i]
            for e in _scan(folder, budget):
                budget -= 1
                try:
                    freed = judge(e, now)
                except OSError:
                    continue  # (removed by another process meanwhile, or not ours to remove: left as it is)
                if freed is not None:
                    setattr(pruned, kind, getattr(pruned, kind) + 1)
                    pruned.bytes += freed
                if pruned.bytes >= PRUNE_BYTES:
                    break
            # a folder stopped in (budget or bytes spent) is examined again next time, unless this pruning began
            # there: always moving on, so a folder too full for one budget cannot hold the round up
            if (budget > 0 and pruned.bytes < PRUNE_BYTES) or i == start:
                i += 1
        pruned.next = i % len(units)
        try:
            atomic_write_text(self.root / PRUNE_STAMP, json.dumps({"next": pruned.next}))
        except OSError:
            pass  # a read-only cache is never pruned by this process
        return pruned

    def _prune_entry(self, e: os.DirEntry, now: float) -> int | None:
        """Remove an entry of another version (or of none readable: a format-1 or damaged one) unused for
        STALE_AFTER_S; the bytes it held, or None if kept. The current version's entries stay: any of them may be
        asked for again."""
        if not (_KEY.fullmatch(e.name) and e.is_dir(follow_symlinks=False)):
            return None
        if now - e.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
            return None  # used lately (by whichever version): kept, so versions sharing the cache never ping-pong
        try:
            version = Manifest.read(Path(e.path)).version
        except ArtifactError:
            version = None
        if self.version.asks_for(version):
            return None
        freed = _bytes_in(e)
        self._discard(Path(e.path))
        return freed

    def _prune_tmp(self, e: os.DirEntry, now: float) -> int | None:
        """Remove a staging (or discarded) folder, or a stray file, nothing in which changed for TMP_AFTER_S (what a
        crashed or killed process left); the bytes it held, or None if kept."""
        if e.is_symlink() or now - _newest_mtime(e) < TMP_AFTER_S:
            return None
        freed = _bytes_in(e)
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            os.unlink(e.path)
        return freed

    def _prune_record(self, e: os.DirEntry, now: float) -> int | None:
        """Remove an index record naming no entry (pruned, or damaged and not rebuilt) or unreadable, once
        INDEX_AFTER_S old (a younger one may be filed right now for an entry being rebuilt), and a leftover of an
        interrupted atomic write once TMP_AFTER_S old; the bytes it held, or None if kept."""
        if not e.is_file(follow_symlinks=False):
            return None
        st = e.stat(follow_symlinks=False)
        age = now - st.st_mtime
        if e.name.startswith(".") and e.name.endswith(".tmp"):  # fileio.atomic_write_text's temp files
            gone = age >= TMP_AFTER_S
        elif e.name.endswith(".json") and _KEY.fullmatch(e.name[: -len(".json")]):
            gone = age >= INDEX_AFTER_S and not self._names_entry(Path(e.path))
        else:
            return None
        if not gone:
            return None
        os.unlink(e.path)
        return st.st_size

    def _names_entry(self, record: Path) -> bool:
        """Whether the index record at `record` names an entry that is there."""
        try:
            key = json.loads(record.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return isinstance(key, str) and bool(_KEY.fullmatch(key)) and self.entry(key).is_dir()


@dataclass
class Pruned:
    """What one pruning removed, and the folder the next one starts from (0: this one finished its round)."""

    entries: int = 0
    tmp: int = 0
    index: int = 0
    bytes: int = 0
    next: int = 0


def _scan(folder: Path, limit: int) -> list[os.DirEntry]:
    """Up to `limit` names in `folder`; none if it is missing or a symlink (never followed out of the cache)."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    try:
        with os.scandir(folder) as it:
            return list(itertools.islice(it, limit))
    except OSError:
        return []


def _bytes_in(e: os.DirEntry) -> int:
    """The bytes of a file, or of the files directly in a folder (entries and staging folders are flat)."""
    if not e.is_dir(follow_symlinks=False):
        return e.stat(follow_symlinks=False).st_size
    return sum(c.stat(follow_symlinks=False).st_size for c in _scan(Path(e.path), PRUNE_BUDGET)
               if c.is_file(follow_symlinks=False))


def _newest_mtime(e: os.DirEntry) -> float:
    """The latest mtime of `e` and, for a folder, of the names in it (a staging folder's files are written long
    after the folder is made). Symlinks are not followed."""
    newest = e.stat(follow_symlinks=False).st_mtime
    if e.is_dir(follow_symlinks=False):
        for child in _scan(Path(e.path), PRUNE_BUDGET):
            newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
    return newest
