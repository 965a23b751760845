"""Marshalling, build-log parsing, manifests and the npu backend's refusals: no toolkit needed."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from exo_rknpu.rknn import io as rknn_io
from exo_rknpu.backends.base import get_backend
from exo_rknpu.rknn.buildlog import parse_build_log
from exo_rknpu.rknn.calibration import repad
from exo_rknpu.errors import BackendUnavailableError
from exo_rknpu.slices.spec import LAYER_INPUTS, LAYER_OUTPUTS, MASK_VALUE


def test_names_match_slice_spec():
    assert rknn_io.SLICE_INPUTS["layers"] == LAYER_INPUTS
    assert rknn_io.SLICE_OUTPUTS["layers"] == LAYER_OUTPUTS


def test_pack_orders_casts_and_checks_shapes():
    inputs = {n: np.ones((1, 1, 2, 4), np.float64) for n in LAYER_INPUTS}
    inputs["hidden"] = np.arange(8, dtype=np.float16).reshape(1, 2, 4)
    arrays, fmt = rknn_io.pack_inputs("layers", inputs)
    assert fmt == ["nchw"] * 6
    assert [a.dtype for a in arrays] == [np.float32] * 6
    assert np.array_equal(arrays[0], inputs["hidden"].astype(np.float32))
    with pytest.raises(rknn_io.MarshalError, match="missing"):
        rknn_io.pack_inputs("layers", {"hidden": inputs["hidden"]})
    shapes = {n: a.shape for n, a in inputs.items()} | {"mask": (1, 1, 2, 9)}
    with pytest.raises(rknn_io.MarshalError, match="'mask' has shape"):
        rknn_io.pack_inputs("layers", inputs, shapes)
    ids, _ = rknn_io.pack_inputs("embed", {"token_ids": np.array([[1, 2]], np.int32)})
    assert ids[0].dtype == np.int64


def test_unpack_reshapes_and_copies():
    buf = np.arange(6, dtype=np.float32)
    out = rknn_io.unpack_outputs("head", [buf], {"logits": (1, 2, 3)})
    assert out["logits"].shape == (1, 2, 3)
    buf[:] = -1  # RKNNLite reuse_outputs overwrites its buffers: the result must not change
    assert out["logits"][0, 0, 1] == 1.0
    with pytest.raises(rknn_io.MarshalError, match="expected shape"):
        rknn_io.unpack_outputs("head", [buf], {"logits": (1, 2, 4)})


def test_repad_is_exact_for_attention():
    from exo_rknpu.slices.graph import NumpyOps

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 16 + 3, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 3, 19), np.float32)
    mask[..., 5:16] = MASK_VALUE  # 5 cached positions in a context of 16
    inp = {"past_k": k[:, :, :16], "past_v": k[:, :, :16], "mask": mask}
    big = repad(inp, 32)
    assert big["past_k"].shape == (1, 2, 32, 8) and big["mask"].shape == (1, 1, 3, 35)
    ops = NumpyOps()
    new = k[:, :, 16:]
    a = ops.attention(q, inp["past_k"], new, inp["past_v"], new, mask, 0.3, 1)
    b = ops.attention(q, big["past_k"], new, big["past_v"], new, big["mask"], 0.3, 1)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


LOG = """D RKNN: [23:58:22.810] ----------------------------------------------------------------------------------------------------
D RKNN: [23:58:22.810]                                                         Network Layer Information Table
D RKNN: [23:58:22.810] ----------------------------------------------------------------------------------------------------
D RKNN: [23:58:22.810] ID   OpType             DataType Target InputShape                               OutputShape            Cycles(DDR/NPU/Total)    RW(KB)       FullName
D RKNN: [23:58:22.810] ----------------------------------------------------------------------------------------------------
D RKNN: [23:58:22.810] 0    InputOperator      FLOAT16  CPU    \\                                        (1,1,576)              0/0/0                    0            InputOperator:hidden
D RKNN: [23:58:22.810] 12   exNorm             FLOAT16  NPU    (1,576,1,1),(1,576,1,1),(1,576,1,1)      (1,576,1,1)            0/0/0                    3            exNorm:reducemean_7_2rmsn
D RKNN: [23:58:22.810] 13   Conv               FLOAT16  NPU    (1,576,1,1),(576,576,1,1)                (1,576,1,1)            28150/10368/28150        649          Conv:matmul_15#2
D RKNN: [23:58:22.810] 37   Transpose          FLOAT16  CPU    (1,9,257,64)                             (9,64,1,257)           0/0/100                  514          Transpose:transpose_60
D RKNN: [23:58:22.810] 47   OutputOperator     FLOAT16  CPU    (1,1,576)                                \\                      0/0/0                    1            OutputOperator:hidden_out
D RKNN: [23:58:22.810] ----------------------------------------------------------------------------------------------------
W RKNN: [00:01:02.000] Warning: Transpose will fallback to CPU, because input shape has exceeded the max limit, height(2176) * width(64) = 139264, required product no larger than 8192!
D RKNN: [23:58:22.853] Total Internal Memory Size: 3029.06KB
D RKNN: [23:58:22.853] Total Weight Memory Size: 6920.25KB
"""


def test_build_log_reports_cpu_ops_and_fallbacks():
    r = parse_build_log(LOG)
    assert r.tables == 1 and r.ops == 5
    assert r.cpu_ops == ["Transpose:transpose_60"]  # Input/Output operators are always on the CPU: not reported
    assert len(r.fallbacks) == 1 and "Transpose will fallback to CPU" in r.fallbacks[0]
    assert r.cycles == [28250] and r.weight_kb == 6920.25 and not r.on_npu
    clean = parse_build_log(LOG.replace("Transpose          FLOAT16  CPU", "Transpose          FLOAT16  NPU").replace("will fallback to CPU", "ok"))
    assert clean.on_npu


def _table(mask: str, cpu: bool) -> str:
    target = "CPU" if cpu else "NPU"
    return f"""D RKNN: [0] Network Layer Information Table
D RKNN: [0] ID   OpType             DataType Target InputShape                               OutputShape            Cycles(DDR/NPU/Total)    RW(KB)       FullName
D RKNN: [0] 3    InputOperator      FLOAT16  CPU    \\                                        ({mask})             0/0/0                    0            InputOperator:mask
D RKNN: [0] 30   Transpose          FLOAT16  {target}    (1,3,64,64)                              (3,64,1,64)            0/0/10                   64           Transpose:t_1
D RKNN: [0] -----------------------------------------------------------------------------------------------------------
"""


def test_cpu_ops_and_errors_are_counted_per_bucket():
    """Warnings and errors are printed while a shape set compiles, before its table; tables are matched to buckets
    by their input shapes (a dynamic_input build prints them in its own order)."""
    from exo_rknpu.rknn.compile import placement_per_bucket

    log = ("W RKNN: [0] Transpose will fallback to CPU, because input shape has exceeded the max limit\n"
           + _table("1,1,272,48", cpu=False)
           + "E RKNN: [0] REGTASK: The bit width of field value exceeds the limit\n" + _table("1,1,257,3", cpu=True))
    r = parse_build_log(log)
    assert [(t.inputs["mask"], t.cpu_count, len(t.errors)) for t in r.per_table] == [((1, 1, 272, 48), 1, 0), ((1, 1, 257, 3), 1, 1)]
    group = [{"seq": s, "ctx": 256, "inputs": {"mask": [1, 1, 256 + s, 3 * s]}} for s in (1, 16)]
    assert placement_per_bucket([r], [group]) == {"s16c256": {"cpu": 1, "errors": 0}, "s1c256": {"cpu": 1, "errors": 1}}


def test_pack_hands_inputs_over_as_the_compiled_file_records_them():
    io = {"hidden": {"dtype": "float16", "layout": "UNDEFINED"}, "mask": {"dtype": "float16", "layout": "NHWC"},
          "past_k": {"dtype": "float16", "layout": "NHWC"}}
    cache = np.arange(24, dtype=np.float16).reshape(1, 2, 3, 4)
    inputs = {"hidden": np.ones((1, 2, 4), np.float32), "mask": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
              "past_k": cache}
    arrays, fmt = rknn_io.pack_inputs("layers", inputs, names=list(io), io=io)
    assert fmt == ["nchw", "nhwc", "nhwc"] and rknn_io.data_types(arrays) == ["float16"] * 3
    # one channel: NHWC is the same bytes as NCHW, only the shape changes
    assert arrays[1].shape == (1, 2, 3, 1) and arrays[1].tobytes() == inputs["mask"].astype(np.float16).tobytes()
    assert np.array_equal(arrays[2], cache.transpose(0, 2, 3, 1))  # several channels: NHWC


def test_read_io_finds_what_a_compiled_file_records():
    blob = (b"\x00junk{\"hidden_out\": {\"dtype\": \"float16\", \"layout\": \"NCHW\"}}\x01"
            b"{\"hidden\": {\"dtype\": \"float16\", \"layout\": \"UNDEFINED\"}, \"past_k\": {\"dtype\": \"float16\", \"layout\": \"UNDEFINED\"}}")
    io = rknn_io.read_io(blob, ["hidden", "past_k"], ["hidden_out"])
    assert io["inputs"]["past_k"] == {"dtype": "float16", "layout": "UNDEFINED"} and io["outputs"]["hidden_out"]["layout"] == "NCHW"
    with pytest.raises(rknn_io.MarshalError, match="records no input/output attributes"):
        rknn_io.read_io(blob, ["hidden", "mask"], ["hidden_out"])


@pytest.mark.skipif(platform.machine() == "aarch64", reason="checks the refusal on machines without an NPU")
def test_npu_backend_says_what_is_missing():
    with pytest.raises(BackendUnavailableError, match="not aarch64") as e:
        get_backend("npu")
    assert "librknnrt" in str(e.value) and "rknn-toolkit-lite2" in str(e.value)


def test_rknn_sim_without_toolkit_names_the_install_command(tmp_path):
    from exo_rknpu.config import Paths
    from exo_rknpu.errors import ToolkitMissingError

    with pytest.raises(ToolkitMissingError, match="exo-rknpu toolkit install"):
        get_backend("rknn-sim", paths=Paths(tmp_path))
    with pytest.raises(BackendUnavailableError, match="fp16, w8a8"):
        get_backend("rknn-sim", dtype="int4", paths=Paths(tmp_path))
    with pytest.raises(BackendUnavailableError, match="RecipeBuild"):  # w8a8 without a recipe is refused up front
        get_backend("rknn-sim", dtype="w8a8", python="/bin/false")


def test_fallback_placement_puts_unsupported_slices_on_the_fallback(tiny_llama):
    # the one planner's default plan: what the backend cannot run (the embedding lookup) goes to the host CPU
    from exo_rknpu.model.base import LayerRange
    from exo_rknpu.model.loader import load_args, resolve_model
    from exo_rknpu.runtime.placement import resolve
    from exo_rknpu.slices.spec import Buckets

    args = load_args(resolve_model(str(tiny_llama)))
    plan = resolve(None, args, LayerRange.full(args.num_hidden_layers), "rknn-sim", Buckets.up_to(256))
    place = {s.spec.kind: s.backend for s in plan.slices}
    assert place["embed"] == "onnx"
    assert place["layers"] == "rknn-sim"
    assert place["head"] == "rknn-sim"


def test_sim_worker_framing_round_trips_arrays():
    import io

    from exo_rknpu.rknn.venv.sim_server import recv, send

    buf = io.BytesIO()
    arrays = [np.arange(6, dtype=np.float32).reshape(1, 2, 3), np.array([[7, 8]], np.int64), np.zeros((0, 4), np.float16)]
    send(buf, {"op": "run", "id": "x"}, arrays)
    send(buf, {"op": "exit"})
    buf.seek(0)
    head, got = recv(buf)
    assert head["op"] == "run" and [a.dtype for a in got] == [a.dtype for a in arrays]
    for a, b in zip(got, arrays):
        assert np.array_equal(a, b) and a.shape == b.shape
    assert recv(buf)[0]["op"] == "exit"
    assert recv(buf) is None  # end of stream
    # a truncated stream (worker died mid-message) reads as the end, never as a short array
    assert recv(io.BytesIO(b"\x05\x00")) is None
