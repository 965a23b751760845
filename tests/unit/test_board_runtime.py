"""The board's runtime as it really is: rknn-toolkit-lite2 2.3.x and 2.5.x, the librknnrt the compiled files need,
the SoC and driver facts doctor reports, and doctor's verdict: "ready" only after init_runtime succeeded on a compiled
slice (the probe, in a child process running a stand-in rknnlite). The stand-in RKNNLite classes carry the exact `inference` signatures of the
2.3.2 and 2.5.0 wheels (rknnlite/api/rknn_lite.py, read from the cp311 aarch64 wheels on PyPI)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.backends import board
from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.loader import resolve_model
from exo_rknpu.rknn.npu import NpuRunner, librknnrt_needed
from exo_rknpu.slices.spec import SliceSpec


class Lite232:
    """rknn-toolkit-lite2 2.3.2's RKNNLite as far as the npu backend calls it."""

    calls: list[dict] = []

    def __init__(self, verbose=False, verbose_file=None):
        pass

    def load_rknn(self, path):
        return 0

    def init_runtime(self, target=None, device_id=None, async_mode=False, core_mask=0):
        return 0

    def inference(self, inputs, data_type=None, data_format=None, inputs_pass_through=None, get_frame_id=False):
        type(self).calls.append({"data_format": data_format})
        return [np.full((1, 1, 8), 0.5, np.float32)]

    def release(self):
        pass


class Lite250(Lite232):
    def load_rknn(self, path, key_path=None):
        return 0

    def inference(self, inputs, data_type=None, data_format=None, inputs_pass_through=None, get_frame_id=False,
                  reuse_outputs=False):
        type(self).calls.append({"data_format": data_format, "reuse_outputs": reuse_outputs})
        return [np.full((1, 1, 8), 0.5, np.float32)]


@pytest.mark.parametrize("cls, options", [(Lite232, {}), (Lite250, {"reuse_outputs": True})])
def test_reuse_outputs_is_passed_only_to_a_lite2_that_has_it(monkeypatch, tmp_path, cls, options):
    api = types.ModuleType("rknnlite.api")
    api.RKNNLite = cls
    monkeypatch.setitem(sys.modules, "rknnlite", types.ModuleType("rknnlite"))
    monkeypatch.setitem(sys.modules, "rknnlite.api", api)
    cls.calls = []
    shapes = {"seq": 1, "ctx": None, "inputs": {"hidden": [1, 1, 4]}, "outputs": {"logits": [1, 1, 8]}}
    io = {"inputs": {"hidden": {"dtype": "float32", "layout": "UNDEFINED"}}}  # as compile records a head's input
    args = ModelArgs("llama", 4, 8, 1, 1, 1, 8, 4)
    runner = NpuRunner(SliceSpec("head"), tmp_path, {"files": [{"file": "head.rknn", "shapes": [shapes], "io": io}]}, 0,
                       args)
    out = runner.run({"hidden": np.zeros((1, 1, 4), np.float32)})  # 2.3.2 would raise TypeError on reuse_outputs
    runner.close()
    assert board.inference_options(cls) == options
    assert out["logits"].shape == (1, 1, 8) and cls.calls == [{"data_format": ["nchw"], **options}]


@pytest.mark.parametrize("version, problem", [
    ("2.3.2", None), ("2.3.0", None), ("2.5.0", None),
    ("2.2.0", "rknn-toolkit-lite2 2.2.0 is not supported; install 2.3.x or 2.5.x"),
    ("2.6.0", "rknn-toolkit-lite2 2.6.0 is not supported"),
    (None, "rknn-toolkit-lite2 is not installed"),
])
def test_lite2_versions_outside_the_supported_series_are_refused_naming_the_version(version, problem):
    got = board.lite2_problem(version)
    assert (got is None) if problem is None else (problem in got), got


def _lib(tmp_path: Path, version: str | None) -> Path:
    """A file shaped like librknnrt.so where the version matters: its NUL-terminated version string."""
    lib = tmp_path / "librknnrt.so"
    body = b"\x7fELF" + b"\0" * 64
    if version is not None:
        body += b"librknnrt version: " + version.encode() + b"\0more"
    lib.write_bytes(body)
    return lib


def test_librknnrt_older_than_the_compiling_toolkit_is_refused(tmp_path):
    lib = _lib(tmp_path, "2.3.2 (429f97ae6b@2025-04-09T09:09:27)")
    have = board.librknnrt_version(lib)
    assert have == "2.3.2 (429f97ae6b@2025-04-09T09:09:27)"
    assert board.librknnrt_problem(have, "2.3.2", lib) is None
    assert board.librknnrt_problem(have, "2.3.0", lib) is None
    why = board.librknnrt_problem(have, "2.5.0", lib)
    assert why == (f"{lib} is librknnrt 2.3.2 (429f97ae6b@2025-04-09T09:09:27); the compiled slices need 2.5.0 or "
                   "newer (they were built by rknn-toolkit2 2.5.0): install librknnrt 2.5.0 there")
    assert "no " + str(tmp_path / "absent.so") in board.librknnrt_problem(None, "2.5.0", tmp_path / "absent.so")
    assert board.librknnrt_version(_lib(tmp_path, None)) == "unknown"
    assert "need 2.5.0" in board.librknnrt_problem("unknown", "2.5.0", lib)
    # manifests record what they need; older ones are read from the toolkit that built them
    assert librknnrt_needed({"librknnrt_min": "2.5.0", "toolkit_version": "2.5.0"}) == "2.5.0"
    assert librknnrt_needed({"toolkit_version": "2.3.2"}) == "2.3.2"


def test_board_facts_name_every_blocker_and_read_the_soc_where_rknnlite_does(tmp_path):
    soc = tmp_path / "compatible"
    soc.write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    drv = tmp_path / "version"
    drv.write_text("RKNPU driver: v0.9.8\n")
    lib = _lib(tmp_path, "2.5.0 (abc@2025)")
    f = board.board_facts(machine="aarch64", soc_path=soc, lib=lib, driver_paths=(drv,))
    assert f.soc == "radxa,rock-5b rockchip,rk3588" and f.driver == "0.9.8" and f.librknnrt == "2.5.0 (abc@2025)"
    assert all("lite2" in p for p in f.problems)  # only the (absent here) rknn-toolkit-lite2 is missing
    soc.write_bytes(b"rockchip,rk3568\0")
    drv.write_text("RKNPU driver: v0.8.2\n")
    f = board.board_facts("2.5.0", machine="x86_64", soc_path=soc, lib=tmp_path / "none.so", driver_paths=(drv,))
    text = "; ".join(f.problems)
    for part in ("this machine is x86_64, not aarch64", "the SoC is 'rockchip,rk3568'", f"no {tmp_path / 'none.so'}",
                 "the rknpu driver is 0.8.2"):
        assert part in text, text
    f = board.board_facts(machine="aarch64", soc_path=tmp_path / "absent", lib=lib, driver_paths=())
    assert f.driver is None and any(p.startswith(f"no {tmp_path / 'absent'}: RKNNLite reads the SoC there") for p in f.problems)
    assert not any("driver" in p for p in f.problems)  # an unseen driver is left to init_runtime


def test_version_numbers_compare_as_numbers():
    assert board.version_tuple("2.10.0") > board.version_tuple("2.9.9")
    assert board.version_tuple("v0.9.8") == (0, 9, 8) and board.version_tuple("2.3.2 (429f97ae6b@...)") == (2, 3, 2)
    assert board.version_tuple("") == () and board.version_tuple("unknown") == ()


# RKNNLite 2.5.0's output when init_runtime fails, as captured: in the arm64 emulation (no device tree), and on a
# board with an old librknnrt (github.com/airockchip/rknn-toolkit2 issue 254, lite2 2.3.0, librknnrt 1.3.0)
NO_DEVICE_TREE = """W rknn-toolkit-lite2 version: 2.5.0
E Catch exception when init runtime!
E Traceback (most recent call last):
  File "/root/venv/lib/python3.11/site-packages/rknnlite/api/rknn_lite.py", line 168, in init_runtime
    self.rknn_runtime = RKNNRuntime(root_dir=self.root_dir, target=target, device_id=device_id,
  File "rknnlite/api/rknn_runtime.py", line 490, in rknnlite.api.rknn_runtime.RKNNRuntime._get_target_soc
Exception: Please specify the target in init_runtime!"""
OLD_RUNTIME = """W rknn-toolkit-lite2 version: 2.3.0
I RKNN: [21:32:53.643] RKNN Runtime Information: librknnrt version: 1.3.0 (c193be371@2022-05-04T20:16:33)
I RKNN: [21:32:53.643] RKNN Driver Information: version: 0.7.2
E RKNN: [21:32:53.643] 6, 1
E RKNN: [21:32:53.643] Invalid RKNN model version 6
E RKNN: [21:32:53.643] rknn_init, load model failed!
E Catch exception when init runtime!
E Traceback (most recent call last):
  File "/usr/local/lib/python3.8/dist-packages/rknnlite/api/rknn_lite.py", line 157, in init_runtime
    self.rknn_runtime.build_graph(self.rknn_data, self.load_model_in_npu)
  File "rknnlite/api/rknn_runtime.py", line 921, in rknnlite.api.rknn_runtime.RKNNRuntime.build_graph
Exception: RKNN init failed. error code: RKNN_ERR_FAIL"""


def test_the_probe_reports_rknnlites_cause_in_one_line():
    assert board.rknnlite_reason(NO_DEVICE_TREE.splitlines()) == "Exception: Please specify the target in init_runtime!"
    got = board.rknnlite_reason(OLD_RUNTIME.splitlines())
    assert got == ("6, 1; Invalid RKNN model version 6; rknn_init, load model failed!; "
                   "Exception: RKNN init failed. error code: RKNN_ERR_FAIL")
    assert got.endswith("Exception: RKNN init failed. error code: RKNN_ERR_FAIL") and "\n" not in got


@pytest.mark.parametrize("lr, layers", [((0, 3, 5), "0-2"), ((3, 5, 5), "3-4")])
def test_missing_slices_name_the_one_compile_command_for_the_whole_shard(tiny_llama, tmp_path, lr, layers):
    """Not `--layers 0-0` for the first slice found missing: every layer of the shard (and the head on the last)."""
    from exo_rknpu.errors import ArtifactError
    from exo_rknpu.model.base import LayerRange
    from exo_rknpu.runtime.placement import open_shard
    from exo_rknpu.slices.spec import Buckets

    with pytest.raises(ArtifactError) as e:
        open_shard(resolve_model(str(tiny_llama)), LayerRange(*lr), "npu", Buckets(seq=(1,), context=(64,)),
                   backend_options={"cache_dir": tmp_path, "check_board": False})
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(
        f"run: exo-rknpu compile --model MODEL --layers {layers} --dtype fp16 --platform rk3588 --seq 1 --context 64 --batch 1"), msg


# A stand-in rknnlite package for doctor's probe child process (python -m exo_rknpu.backends.board FILE MASK): its
# RKNNLite returns what the env var says, and on failure prints RKNNLite 2.5.0's own output as captured (NO_DEVICE_TREE).
STAND_IN_RKNNLITE = '''
import os, sys
OUTPUT = {output!r}


class RKNNLite:
    def __init__(self, verbose=False, verbose_file=None):
        pass

    def load_rknn(self, path, key_path=None):
        assert os.path.exists(path), path
        return 0 if os.environ["STAND_IN_LOAD"] == "ok" else -1

    def init_runtime(self, target=None, device_id=None, async_mode=False, core_mask=0):
        if os.environ["STAND_IN_INIT"] == "ok":
            return 0
        print(OUTPUT)
        return -1

    def release(self):
        pass
'''


@pytest.fixture
def board_here(tmp_path, monkeypatch):
    """This machine as an RK3588 board with every fact right (aarch64, rk3588 in the device tree, driver 0.9.8,
    librknnrt 2.5.0, lite2 2.5.0), a compiled slice in a cache, and the stand-in rknnlite on the probe's path."""
    import functools

    soc = tmp_path / "compatible"
    soc.write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    drv = tmp_path / "version"
    drv.write_text("RKNPU driver: v0.9.8\n")
    facts = functools.partial(board.board_facts, machine="aarch64", soc_path=soc, lib=_lib(tmp_path, "2.5.0 (abc@2025)"),
                              driver_paths=(drv,))
    monkeypatch.setattr(board, "board_facts", facts)
    monkeypatch.setattr(board, "lite2_version", lambda: "2.5.0")
    pkg = tmp_path / "site" / "rknnlite" / "api"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(STAND_IN_RKNNLITE.format(output=NO_DEVICE_TREE))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}:{':'.join(sys.path)}")
    cache = tmp_path / "compiled"
    folder = cache / "slices" / "layers.29" / "abc"
    folder.mkdir(parents=True)
    (folder / "layers.29.s1.c256.rknn").write_bytes(b"RKNN" + bytes(64))
    (folder / "manifest.json").write_text('{"librknnrt_min": "2.5.0", "toolkit_version": "2.5.0"}')
    return cache


def _doctor(cache, capsys) -> tuple[int, list[str]]:
    from exo_rknpu.cli.main import main

    code = main(["doctor", "--cache", str(cache)])
    return code, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("load, init, verdict", [
    ("ok", "ok", "npu backend   ready"),
    ("ok", "fail", "npu backend   unavailable: probe: init_runtime failed: Exception: Please specify the target in "
                   "init_runtime!"),
    ("fail", "ok", "npu backend   unavailable: probe: load_rknn failed: "),
])
def test_doctor_says_ready_only_when_init_runtime_succeeded_on_a_compiled_slice(board_here, capsys, monkeypatch, load,
                                                                                  init, verdict):
    """Every fact right is not enough: "ready" (exit 0) needs RKNNLite's load_rknn + init_runtime to succeed on a
    compiled slice, run in a child process; otherwise exit 1 with RKNNLite's own reason in one line."""
    monkeypatch.setenv("STAND_IN_LOAD", load)
    monkeypatch.setenv("STAND_IN_INIT", init)
    code, out = _doctor(board_here, capsys)
    assert code == (0 if verdict.endswith("ready") else 1)
    assert out[-1].startswith(verdict), out
    assert [ln for ln in out if ln.startswith("probe")] == [
        f"probe         init_runtime ok on {next(board_here.glob('slices/*/*/*.rknn'))}" if code == 0 else
        f"probe         init_runtime on {next(board_here.glob('slices/*/*/*.rknn'))}: {out[-1].split('probe: ')[1]}"]


def test_doctor_is_not_ready_without_a_compiled_slice_or_with_any_fact_wrong(board_here, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("STAND_IN_LOAD", "ok")
    monkeypatch.setenv("STAND_IN_INIT", "ok")
    code, out = _doctor(tmp_path / "empty", capsys)  # nothing to probe: the facts alone never say ready
    assert code == 1 and out[-1] == (f"npu backend   unavailable: probe: no compiled slice in {tmp_path / 'empty'}: "
                                     "compile one and copy it here (docs/board.md, step 3)")
    (tmp_path / "compatible").write_bytes(b"rockchip,rk3568\0")  # init_runtime would succeed; the SoC is wrong
    code, out = _doctor(board_here, capsys)
    assert code == 1 and out[-1].startswith("npu backend   unavailable: the SoC is 'rockchip,rk3568'"), out
