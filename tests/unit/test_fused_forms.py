"""Fused forms enter the graph one way (slices/graph.py `Fused`, `Ops.fuses`): the graph calls a fused form only where
the Ops answers True, and composes it from the plain ops elsewhere. A numpy Ops that writes rotary, swiglu and
add_rms_norm as one call each (each what its composition computes) gets the reference's bits on every slice, whole
layers and every run of parts, with each residual sum handed to the norm that follows it in the same slice only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.inputs import layer_inputs
from exo_rknpu.slices.graph import NumpyOps, run_slice
from exo_rknpu.slices.spec import PARTS, SliceSpec, state_name, state_width
from tiny_models import make_tiny_hf


class FusingNumpyOps(NumpyOps):
    """NumpyOps answering True for every fused form but cached_attention, each written as one call and counted."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.asked: list[tuple[str, tuple]] = []

    def fuses(self, form, *weights):
        self.asked.append((form, weights))
        return form != "cached_attention"

    def rotary(self, x, cos, sin, head_dim):
        self.calls["rotary"] += 1
        return x * cos + self.rotate_half(x, head_dim) * sin

    def swiglu(self, x, gate, up):
        self.calls["swiglu"] += 1
        return self.silu(self.linear(x, gate)) * self.linear(x, up)

    def add_rms_norm(self, a, b, w, eps):
        self.calls["add_rms_norm"] += 1
        s = a + b
        return self.rms_norm(s, w, eps), s


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def shard(request, tmp_path_factory):
    folder = make_tiny_hf(tmp_path_factory.mktemp(request.param), arch=request.param, n_layers=3, seed=5,
                          tied=request.param == "qwen2")
    return load_shard(resolve_model(str(folder)), LayerRange.full(3), "fp32")


def inputs(spec: SliceSpec, a) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    seq, ctx = 4, 16
    out = layer_inputs(a, rng.standard_normal((1, seq, a.hidden_size)).astype(np.float32), 3, 5, ctx)
    del out["hidden"]
    out.update({state_name(k): rng.standard_normal((1, seq, state_width(a, k))).astype(np.float32)
                for k in spec.state_inputs()})
    for name in ("past_k", "past_v"):
        out[name] = rng.standard_normal((spec.n_layers, a.num_key_value_heads, ctx, a.head_dim)).astype(np.float32)
    return out


RUNS = [PARTS[i:j] for i in range(6) for j in range(i + 1, 7) if (i, j) != (0, 6)]


@pytest.mark.parametrize("spec", [SliceSpec("layers", 0, 3), SliceSpec("layers", 1, 2)]
                         + [SliceSpec("layers", 1, 2, blocks=run) for run in RUNS], ids=lambda s: s.name)
def test_fused_forms_give_the_composed_bits_and_each_residual_sum_meets_the_norm_after_it(shard, spec):
    ins = inputs(spec, shard.args)
    want = run_slice(NumpyOps(), spec, shard, ins)
    ops = FusingNumpyOps()
    got = run_slice(ops, spec, shard, ins)
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    parts = spec.parts * spec.n_layers
    # a residual sum is fused with the norm after it only where that norm runs in the same slice: o_proj then
    # mlp_norm in one layer, ffn then the next layer's attn_norm
    sums = sum(1 for p, q in zip(parts, parts[1:]) if (p, q) in (("o_proj", "mlp_norm"), ("ffn", "attn_norm")))
    assert ops.calls == Counter({"rotary": 2 * parts.count("attention"), "swiglu": parts.count("ffn"),
                                 "add_rms_norm": sums}) - Counter()
    # asked with the weights its answer may depend on: gate and up; the norm's own weight
    layers = [shard.layers[i] for i in range(spec.start, spec.stop)]
    norms = {id(w.post_norm) for w in layers} | {id(w.input_norm) for w in layers}
    for form, weights in ops.asked:
        if form == "swiglu":
            assert tuple(map(id, weights)) in {(id(w.gate_proj), id(w.up_proj)) for w in layers}
        elif form == "add_rms_norm":
            assert len(weights) == 1 and id(weights[0]) in norms
        else:
            assert weights == ()
