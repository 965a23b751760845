"""The ONNX export of a slice: static or symbolic shapes, and both attention forms computing the same thing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.inputs import layer_inputs
from exo_rknpu.slices.graph import NumpyOps, run_slice
from exo_rknpu.slices.onnx_export import build_onnx
from exo_rknpu.slices.spec import SliceSpec
from helpers import nmse


def run(model: onnx.ModelProto, inputs: dict) -> dict:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, inputs)))


@pytest.fixture
def two_layers(tiny_llama):
    w = load_shard(resolve_model(str(tiny_llama)), LayerRange(1, 3, 5), weights="fp32")
    rng = np.random.default_rng(0)
    a, seq, ctx, n_past = w.args, 4, 16, 5
    inputs = layer_inputs(a, rng.standard_normal((1, seq, a.hidden_size)).astype(np.float32), 3, n_past, ctx)
    for name in ("past_k", "past_v"):
        inputs[name] = rng.standard_normal((2, a.num_key_value_heads, ctx, a.head_dim)).astype(np.float32)
    return w, SliceSpec("layers", 1, 3), inputs


@pytest.mark.parametrize("form", ["sdpa", "split"])
@pytest.mark.parametrize("static", [True, False])
def test_export_matches_numpy_for_each_attention_form_and_shape_mode(two_layers, form, static):
    w, spec, inputs = two_layers
    model = build_onnx(spec, w, seq=4 if static else None, ctx=16 if static else None, attention_form=form)
    onnx.checker.check_model(model)
    got = run(model, inputs)
    ref = run_slice(NumpyOps(), spec, w, inputs)
    for name in ("hidden_out", "k_new", "v_new"):
        assert got[name].shape == ref[name].shape
        assert nmse(got[name], ref[name]) <= 1e-10, name


def test_static_export_fixes_every_input_dimension(two_layers):
    w, spec, _ = two_layers
    model = build_onnx(spec, w, seq=1, ctx=16)
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["mask"] == [1, 1, 1, 17] and dims["past_k"] == [2, 2, 16, 16]
    assert {o.name for o in model.graph.output} == {"hidden_out", "k_new", "v_new"}
