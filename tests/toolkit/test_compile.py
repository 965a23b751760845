"""Compile + verify in the rknn-toolkit2 simulator. Skipped (with the command to run) when the toolkit is absent;
.ci/run installs it with `exo-rknpu toolkit install`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from exo_rknpu.rknn.compile import compile_range
from exo_rknpu.errors import ArtifactError, CompileError
from exo_rknpu.slices.spec import Buckets

from toolkit_common import BUCKETS, NEEDS_TOOLKIT

pytestmark = NEEDS_TOOLKIT


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rknn-cache")


@pytest.fixture(scope="module")
def first(tiny, cache_dir):
    return compile_range(str(tiny), "0-1", buckets=BUCKETS, verify=True, cache_dir=cache_dir, progress=False)


def test_tiny_slices_compile_and_verify(first, cache_dir):
    assert [r.name for r in first] == ["layers.0", "layers.1"]  # the embedding stays on the host
    for r in first:
        assert r.status == "built" and not r.cpu_ops and not r.fallbacks
        for k in ("cos_hidden_out", "cos_k_new", "cos_v_new"):
            assert r.verify[k] >= 0.9999, (r.name, k, r.verify[k])
        m = json.loads((Path(r.folder) / "manifest.json").read_text())
        assert m["dtype"] == "fp16" and m["platform"] == "rk3588" and m["toolkit_version"] == "2.5.0"
        assert m["librknnrt_min"] == "2.5.0"  # the board's runtime must be at least the compiling toolkit's version
        assert m["layers"] == [int(r.name.split(".")[1])]
        shapes = m["files"][0]["shapes"]
        assert {(s["seq"], s["ctx"]) for s in shapes} == {(1, 64), (16, 64), (1, 128), (16, 128)}  # one file, dynamic_input
        assert len(m["files"][0]["sha256"]) == 64 and m["files"][0]["bytes"] == Path(r.files[0]).stat().st_size


def test_cache_reuses_finished_slices(first, tiny, cache_dir):
    again = compile_range(str(tiny), "1-2", buckets=BUCKETS, verify=False, cache_dir=cache_dir, progress=False)
    assert [(r.name, r.status) for r in again] == [("layers.1", "reused"), ("layers.2", "built")]


def _compile_workers() -> list[int]:
    """pids of this process's compiler workers (python -m exo_rknpu.rknn.venv.worker)."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().split(") ")[-1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"exo_rknpu.rknn.venv.worker" in cmd:
            out.append(int(d.name))
    return out


def test_interrupted_compile_resumes(first, tiny, cache_dir):
    """The compiler's worker process is killed in the middle of building the head: the run fails with a clear
    error, leaves nothing that looks finished, and the next run reuses what was committed and builds the rest."""
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            for pid in _compile_workers():
                job = next((cache_dir / "tmp").glob("work-*/head.rknn.log"), None)
                if job is not None and job.stat().st_size > 0:  # the head's build has started writing its log
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(CompileError, match="head"):
        compile_range(str(tiny), "2-3", buckets=BUCKETS, cache_dir=cache_dir, progress=False)
    t.join(5)
    assert killed, "the head build finished before it could be interrupted"
    assert not any((cache_dir / "tmp").rglob("manifest.json"))  # nothing half-done looks finished
    assert not list((cache_dir / "tmp").glob("build-*"))  # the dead build's staging folder is gone
    done = compile_range(str(tiny), "2-3", buckets=BUCKETS, cache_dir=cache_dir, progress=False)
    assert [(r.name, r.status) for r in done] == [("layers.2", "reused"), ("layers.3", "reused"), ("head", "built")]


def test_tampered_rknn_and_manifest_are_refused(first, tiny, cache_dir):
    from exo_rknpu.rknn.npu import NpuBackend
    from exo_rknpu.model.base import LayerRange
    from exo_rknpu.model.loader import load_shard, resolve_model
    from exo_rknpu.slices.spec import SliceSpec

    src = resolve_model(str(tiny))
    ws = load_shard(src, LayerRange(0, 2, 4), weights="fp32")
    be = NpuBackend(cache_dir=cache_dir, check_board=False)
    spec = SliceSpec("layers", 0, 1, kv_layout=NpuBackend.kv_layout)  # as the runtime asks for it
    folder, _ = be.locate(spec, ws, BUCKETS)  # intact: accepted
    rknn = next(folder.glob("*.rknn"))
    data = bytearray(rknn.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rknn.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        be.locate(spec, ws, BUCKETS)
    # the compiler never reuses the damaged entry: it rebuilds it
    again = compile_range(str(tiny), "0-0", buckets=BUCKETS, cache_dir=cache_dir, progress=False)
    assert again[0].status == "built"
    folder, _ = be.locate(spec, ws, BUCKETS)
    mp = folder / "manifest.json"
    m = json.loads(mp.read_text())
    m["model_fingerprint"] = "0" * 64
    mp.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="another model"):
        be.locate(spec, ws, BUCKETS)
    with pytest.raises(ArtifactError, match="lacks buckets"):
        m["model_fingerprint"] = ws.fingerprint
        mp.write_text(json.dumps(m))
        be.locate(spec, ws, Buckets(seq=(1, 16), context=(64, 128, 256)))


def test_bad_dtype_is_a_clear_error(tiny, cache_dir):
    with pytest.raises(CompileError, match="fp16, w8a8"):
        compile_range(str(tiny), "0-0", dtype="int4", cache_dir=cache_dir, progress=False)


@pytest.mark.slow
def test_smollm2_layer_runs_wholly_on_the_npu_at_every_default_bucket(tmp_path):
    """The NPU form (slices/npu_form.py): no CPU op, fallback or compiler error in any of the 16 default buckets
    (seq 1/16/32 and the decode batch of 4 x ctx 256..2048), inputs recorded as the host keeps them, and fp16-exact
    in the simulator."""
    res = compile_range("smollm2-135m", "4-4", verify=True, strict=True, cache_dir=tmp_path, progress=False)
    (r,) = res
    assert set(r.per_bucket) == {f"{b}c{c}" for b in ("s1", "s16", "s32", "b4") for c in (256, 512, 1024, 2048)}
    assert r.cpu_count == 0 and r.error_count == 0 and not r.cpu_ops and not r.fallbacks
    assert min(v for k, v in r.verify.items() if k.startswith("cos_") and k != "cos_delta") >= 0.9999
    io = json.loads((Path(r.folder) / "manifest.json").read_text())["files"][0]["io"]["inputs"]
    assert {n: (a["dtype"], a["layout"]) for n, a in io.items() if n in ("hidden", "past_k", "past_v")} == {
        "hidden": ("float16", "UNDEFINED"), "past_k": ("float16", "UNDEFINED"), "past_v": ("float16", "UNDEFINED")}


def test_strict_refuses_a_slice_with_cpu_ops_and_compile_counts_them_per_bucket(tmp_path):
    """A prefill bucket of 64 makes the folded queries [3*64, 64] too big for the NPU's Transpose: counted in that
    bucket only, and --strict refuses the slice, built or cached."""
    buckets = Buckets(seq=(1, 64), context=(256,))
    (r,) = compile_range("smollm2-135m", "4-4", buckets=buckets, cache_dir=tmp_path / "a", progress=False)
    assert r.per_bucket["s1c256"] == {"cpu": 0, "errors": 0} and r.per_bucket["s64c256"]["cpu"] > 0
    with pytest.raises(CompileError, match=r"--strict: slice layers.4 has CPU ops .*cached"):
        compile_range("smollm2-135m", "4-4", buckets=buckets, cache_dir=tmp_path / "a", progress=False, strict=True)
    with pytest.raises(CompileError, match="--strict: slice layers.4 has CPU ops"):
        compile_range("smollm2-135m", "4-4", buckets=buckets, cache_dir=tmp_path / "b", progress=False, strict=True)
    assert not list((tmp_path / "b").glob("slices/*/*/manifest.json"))  # nothing was cached