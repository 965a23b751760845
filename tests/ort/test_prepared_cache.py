"""The prepared-slice cache (backends/prepared.py) looks after itself: what no start of this version can use is
pruned (other versions' entries unused past a grace period, crash leftovers, index records naming nothing) without
touching anything else, and an unchanged entry is trusted by its recorded stat instead of being hashed again, while
a changed one is still caught and rebuilt."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from exo_rknpu.backends import prepared
from exo_rknpu.backends.ort import native_layout
from exo_rknpu.backends.prepared import (INDEX_AFTER_S, MANIFEST_FILE, PRUNE_EVERY_S, PRUNE_STAMP, STALE_AFTER_S,
                                         TMP_AFTER_S, WEIGHTS_FILE, CacheVersion, PreparedCache, prepared_key)
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.artifacts import exporter_version
from helpers import SMALL_BUCKETS
from tiny_models import make_tiny_gguf, make_tiny_hf

PROMPT = np.array([[5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]])
N_LAYERS = 3
DAY = 86400.0
OURS = CacheVersion("exporter-now", "1.32.0", "layout-now")
OLDER = CacheVersion("exporter-before", "1.32.0", "layout-now")


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))


def _store(cache: PreparedCache, name: str, native: bool = False) -> Path:
    """A real entry (store writes it as a backend does); returns its folder."""
    key = prepared_key(name=name)
    return cache.store(key, _model(), {"w": np.arange(1000, dtype=np.float32)}, native=native).parent


def _age(path: Path, seconds: float, now: float) -> None:
    os.utime(path, (now - seconds, now - seconds), follow_symlinks=False)


def _file(cache: PreparedCache, source: str, entry: Path) -> Path:
    """An index record filing `entry` under the source key named `source`; returns the record's path."""
    source_key = prepared_key(source=source)
    cache.remember(source_key, entry.name, {"rows_apart": 0, "native": False})
    return cache._index_file(source_key)


# --------------------------------------------------------------------------- pruning


def test_another_versions_entry_unused_past_the_grace_period_goes_and_a_recently_used_one_stays(tmp_path):
    now = time.time()
    older = PreparedCache(tmp_path, OLDER)
    stale, recent = _store(older, "stale"), _store(older, "recent")
    _age(stale, STALE_AFTER_S + DAY, now)
    _age(recent, STALE_AFTER_S - DAY, now)  # used by the older version six days ago: it may be used again
    pruned = PreparedCache(tmp_path, OURS).prune(now)
    assert not stale.exists() and recent.is_dir() and pruned.entries == 1
    # and the older version, pruning in turn, never removes the entries the newer one uses (no ping-pong)
    ours = _store(PreparedCache(tmp_path, OURS), "ours")
    assert older.prune(now).entries == 0 and ours.is_dir() and recent.is_dir()


def test_the_current_versions_entries_stay_however_long_unused(tmp_path):
    now = time.time()
    cache = PreparedCache(tmp_path, OURS)
    plain, native = _store(cache, "plain"), _store(cache, "native", native=True)
    for entry in (plain, native):
        _age(entry, 10 * STALE_AFTER_S, now)
    assert cache.prune(now).entries == 0 and plain.is_dir() and native.is_dir()
    # a new native layout can never ask for the old layout's native entries; the others are still its own
    relaid = PreparedCache(tmp_path, CacheVersion(OURS.exporter, OURS.onnxruntime, "layout-next"))
    assert relaid.prune(now).entries == 1 and plain.is_dir() and not native.exists()


def test_entries_of_no_readable_version_go_once_unused_past_the_grace_period(tmp_path):
    """A format-1 entry (written before versions were recorded) and one whose manifest is damaged."""
    now = time.time()
    cache = PreparedCache(tmp_path, OURS)
    legacy, damaged, fresh = _store(cache, "legacy"), _store(cache, "damaged"), _store(cache, "fresh-legacy")
    for entry in (legacy, fresh):
        m = json.loads((entry / MANIFEST_FILE).read_text())
        (entry / MANIFEST_FILE).write_text(json.dumps({"format": 1, "key": m["key"], "files": m["files"]}))
    (damaged / MANIFEST_FILE).write_text("{not json")
    for entry in (legacy, damaged):
        _age(entry, STALE_AFTER_S + DAY, now)
    _age(fresh, DAY, now)
    assert cache.prune(now).entries == 2 and not legacy.exists() and not damaged.exists() and fresh.is_dir()


def test_crash_leftovers_in_tmp_go_once_hours_old_and_a_store_in_progress_stays(tmp_path):
    now = time.time()
    cache = PreparedCache(tmp_path, OURS)
    left, writing = tmp_path / "tmp" / "0123456789abcdef-99-deadbeef", tmp_path / "tmp" / "fedcba9876543210-98-feedf00d"
    for d in (left, writing):
        d.mkdir(parents=True)
        (d / WEIGHTS_FILE).write_bytes(b"half")
        _age(d / WEIGHTS_FILE, TMP_AFTER_S + 60, now)
        _age(d, TMP_AFTER_S + 60, now)
    _age(writing / WEIGHTS_FILE, 5, now)  # its weights are still being written: the folder's own mtime is old
    stray = tmp_path / "tmp" / "stray-file"
    stray.write_bytes(b"x")
    _age(stray, TMP_AFTER_S + 60, now)
    assert cache.prune(now).tmp == 2
    assert not left.exists() and not stray.exists() and (writing / WEIGHTS_FILE).read_bytes() == b"half"


def test_an_index_record_naming_a_pruned_entry_goes_too_and_one_naming_a_kept_entry_stays(tmp_path):
    now = time.time()
    older, ours = PreparedCache(tmp_path, OLDER), PreparedCache(tmp_path, OURS)
    stale, mine = _store(older, "stale"), _store(ours, "mine")
    stale_record, my_record = _file(older, "a", stale), _file(ours, "b", mine)
    young_dangling = _file(ours, "c", tmp_path / ("e" * 64))  # filed just now for an entry being rebuilt
    old_dangling = _file(ours, "d", tmp_path / ("f" * 64))
    half_written = my_record.parent / f".{my_record.name}.x1y2z3.tmp"  # what a killed atomic write leaves
    half_written.write_text('{"sou')
    _age(stale, STALE_AFTER_S + DAY, now)
    for path in (stale_record, my_record, old_dangling):
        _age(path, INDEX_AFTER_S + 60, now)
    _age(half_written, TMP_AFTER_S + 60, now)
    pruned = ours.prune(now)
    assert (pruned.entries, pruned.index) == (1, 3)
    assert not stale_record.exists() and not old_dangling.exists() and not half_written.exists()
    assert my_record.is_file() and young_dangling.is_file()
    assert ours.recall(prepared_key(source="b")) is not None


def test_pruning_never_follows_a_symlink_nor_removes_a_name_it_does_not_define(tmp_path):
    now = time.time()
    root, outside = tmp_path / "prepared", tmp_path / "outside"
    older = PreparedCache(root, OLDER)
    victim = _store(older, "victim")  # an older version's entry outside the root, reachable only through links
    outside.mkdir()
    (outside / "ab").mkdir()
    os.replace(victim, outside / "ab" / victim.name)
    victim = outside / "ab" / victim.name
    (outside / "keep.txt").write_text("mine")
    (outside / "index").mkdir()
    links = {root / "ab" / ("a" * 64): victim,          # an entry that is a link to a folder outside
             root / "cd": outside / "ab",               # a bucket that is a link
             root / "tmp" / "link": outside,            # a tmp leftover that is a link
             root / "index" / "ef": outside / "index",  # an index bucket that is a link
             root / "index" / "00" / f"{'0' * 64}.json": outside / "keep.txt"}  # a record that is a link
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    (root / "notes.txt").write_text("the user's")
    (root / "ab" / "notes").mkdir()
    for path in [victim, outside / "keep.txt", root / "notes.txt", root / "ab" / "notes", *links]:
        _age(path, 10 * STALE_AFTER_S, now)
    pruned = PreparedCache(root, OURS).prune(now)
    assert (pruned.entries, pruned.tmp, pruned.index) == (0, 0, 0)
    assert (victim / WEIGHTS_FILE).is_file() and (outside / "keep.txt").read_text() == "mine"
    assert all(link.is_symlink() for link in links) and (root / "notes.txt").is_file() and (root / "ab" / "notes").is_dir()


def test_pruning_runs_at_most_once_a_day_and_a_huge_cache_is_pruned_over_several_bounded_starts(tmp_path,
                                                                                                monkeypatch):
    now = time.time()
    older = PreparedCache(tmp_path, OLDER)
    stale = [_store(older, f"stale-{i}") for i in range(12)]
    for entry in stale:
        _age(entry, STALE_AFTER_S + DAY, now)
    cache = PreparedCache(tmp_path, OURS)
    monkeypatch.setattr(prepared, "PRUNE_BUDGET", 5)  # names examined per pruning
    removed = []
    for start in range(10):
        pruned = cache.prune_if_due(now + start)
        removed.append(0 if pruned is None else pruned.entries)
        if pruned is not None and pruned.next == 0:
            break
    assert max(removed) <= 5 and sum(removed) == 12 and not any(e.exists() for e in stale)
    assert cache.prune_if_due(now + 20) is None  # the round is done: not due again for a day
    assert cache.prune_if_due(now + PRUNE_EVERY_S + 60) is not None
    assert json.loads((tmp_path / PRUNE_STAMP).read_text()) == {"next": 0}


def test_one_pruning_removes_a_bounded_number_of_bytes_and_the_next_start_goes_on(tmp_path, monkeypatch):
    now = time.time()
    older = PreparedCache(tmp_path, OLDER)
    stale = [_store(older, f"stale-{i}") for i in range(6)]
    size = sum(f.stat().st_size for f in stale[0].iterdir())
    for entry in stale:
        _age(entry, STALE_AFTER_S + DAY, now)
    monkeypatch.setattr(prepared, "PRUNE_BYTES", 2 * size)  # two entries' worth
    cache, removed = PreparedCache(tmp_path, OURS), []
    while (pruned := cache.prune_if_due(now)) is not None:
        removed.append(pruned.entries)
        assert pruned.bytes <= 2 * size
    assert removed == [2, 2, 2, 0]  # the last one finds nothing left and finishes the round
    assert not any(e.exists() for e in stale)


def test_a_missing_cache_is_not_made_by_pruning(tmp_path):
    assert PreparedCache(tmp_path / "never-used", OURS).prune_if_due() is None
    assert not (tmp_path / "never-used").exists()


# --------------------------------------------------------------------------- real starts


def _logits(path: Path, root: Path) -> np.ndarray:
    """Open the whole model as every command does (open_plan, 2 layers per slice) and run PROMPT."""
    shard = open_shard(resolve_model(str(path)), LayerRange.full(N_LAYERS), "onnx", SMALL_BUCKETS, layers_per_slice=2,
                       backend_options={"cache_dir": root, "threads": 1})
    try:
        return shard.forward("a", PROMPT, logits="all")
    finally:
        shard.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prepared-cache")
    return make_tiny_gguf(d / "q4_0.gguf", make_tiny_hf(d / "hf", n_layers=N_LAYERS, seed=5), qtype="Q4_0")


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*") if p.is_dir())


class Hashes:
    """Counts the files the cache hashes (prepared.sha256_file: the check's only reader of file bytes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: list[str] = []
        real = prepared.sha256_file

        def counted(path: Path, *a, **kw) -> str:
            self.files.append(Path(path).name)
            return real(path, *a, **kw)

        monkeypatch.setattr(prepared, "sha256_file", counted)


def test_a_start_after_pruning_maps_its_own_entries_and_builds_nothing(model, tmp_path, monkeypatch):
    root, now = tmp_path / "prepared", time.time()
    expected = _logits(model, root)
    mine = _entries(root)
    version = CacheVersion(exporter_version(), onnxruntime.__version__, native_layout())
    assert {json.loads((e / MANIFEST_FILE).read_text())["version"]["exporter"] for e in mine} == {version.exporter}
    stale = _store(PreparedCache(root, CacheVersion("exporter-before", version.onnxruntime, version.native)), "stale")
    for entry in [*mine, stale]:
        _age(entry, STALE_AFTER_S + DAY, now)  # all unused for over a week
    pruned = PreparedCache(root, version).prune(now)
    assert pruned.entries == 1 and not stale.exists() and _entries(root) == mine

    from exo_rknpu.model import gguf as gguf_reader

    built = []
    real_linear = gguf_reader.GGUFFile.linear
    monkeypatch.setattr(gguf_reader.GGUFFile, "linear", lambda g, *a: built.append(a) or real_linear(g, *a))
    maps: list[str] = []
    real_session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda f, *a, **kw: maps.append(f) or real_session(f, *a, **kw))
    assert np.array_equal(_logits(model, root), expected)
    assert built == [] and sorted(Path(f).parent for f in maps) == mine  # every slice opened from its own entry
    assert all(now - e.stat().st_mtime < 60 for e in mine)  # and each marked as used now


def test_an_unchanged_entry_is_trusted_by_its_stat_and_not_hashed_again(model, tmp_path, monkeypatch):
    root = tmp_path / "prepared"
    expected = _logits(model, root)
    hashes = Hashes(monkeypatch)
    assert np.array_equal(_logits(model, root), expected)
    assert hashes.files == []


def test_a_weights_file_changed_in_place_is_caught_by_its_stat_and_rebuilt(model, tmp_path, monkeypatch):
    """Same size, one byte flipped, even with its modification time set back: its ctime moved, so it is hashed,
    refused and rebuilt; the other entries are still not hashed."""
    root = tmp_path / "prepared"
    expected = _logits(model, root)
    weights = _entries(root)[0] / WEIGHTS_FILE
    st, data = weights.stat(), bytearray(weights.read_bytes())
    good = bytes(data)
    data[len(data) // 2] ^= 0xFF
    with open(weights, "r+b") as f:
        f.write(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    hashes = Hashes(monkeypatch)
    assert np.array_equal(_logits(model, root), expected)
    assert hashes.files == [WEIGHTS_FILE]  # the changed file alone was read (and found wrong)
    assert weights.read_bytes() == good  # rebuilt


def test_a_copied_entry_is_hashed_once_then_trusted(model, tmp_path, monkeypatch):
    """A cache restored from a backup (new inodes and times, same bytes) is checked in full once, then its stats
    are recorded and later starts hash nothing."""
    root = tmp_path / "prepared"
    expected = _logits(model, root)
    shutil.copytree(root, tmp_path / "restored", symlinks=True)
    shutil.rmtree(root)
    os.replace(tmp_path / "restored", root)
    hashes = Hashes(monkeypatch)
    assert np.array_equal(_logits(model, root), expected)
    assert sorted(hashes.files) == sorted([WEIGHTS_FILE, "model.onnx"] * len(_entries(root)))
    hashes.files.clear()
    assert np.array_equal(_logits(model, root), expected)
    assert hashes.files == []


def test_an_entry_of_no_recorded_version_that_a_start_uses_becomes_its_own(model, tmp_path):
    """An entry written before versions were recorded (format 1) and asked for by this version's key is checked in
    full once and recorded as this version's: pruning keeps it however long it then goes unused."""
    root = tmp_path / "prepared"
    expected = _logits(model, root)
    for entry in _entries(root):
        m = json.loads((entry / MANIFEST_FILE).read_text())
        files = {name: {"bytes": r["bytes"], "sha256": r["sha256"]} for name, r in m["files"].items()}
        (entry / MANIFEST_FILE).write_text(json.dumps({"format": 1, "key": m["key"], "files": files}))
    assert np.array_equal(_logits(model, root), expected)
    version = CacheVersion(exporter_version(), onnxruntime.__version__, native_layout())
    now = time.time()
    for entry in _entries(root):
        assert json.loads((entry / MANIFEST_FILE).read_text())["version"]["exporter"] == version.exporter
        _age(entry, 10 * STALE_AFTER_S, now)
    assert PreparedCache(root, version).prune(now).entries == 0
