"""A block-split placement compiles in the rknn-toolkit2 simulator and each of its NPU slices verifies (fp16)."""

from __future__ import annotations

import json
from pathlib import Path

from exo_rknpu.rknn.compile import compile_range
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import PlacementPlan, resolve

from toolkit_common import BUCKETS, NEEDS_TOOLKIT

pytestmark = NEEDS_TOOLKIT


def test_attention_on_cpu_compiles_only_npu_blocks_without_context_buckets_and_verifies(tiny, tmp_path):
    args = load_args(resolve_model(str(tiny)))
    plan = resolve(PlacementPlan.parse("0-3=npu;attention=cpu"), args, LayerRange(1, 2, 4), "onnx", BUCKETS, emulate=True)
    npu = plan.on_npu()
    assert [s.name for s in npu] == ["layers.1.attn_norm+qkv", "layers.1.o_proj+mlp"]
    results = compile_range(str(tiny), "1-1", buckets=BUCKETS, verify=True, cache_dir=tmp_path, progress=False,
                            specs=npu, cut=plan.specs)
    assert [r.name for r in results] == [s.name for s in npu]  # exactly the plan's NPU slices, nothing else
    for r in results:
        assert r.status == "built" and not r.cpu_ops and not r.fallbacks, (r.name, r.cpu_ops, r.fallbacks)
        cos = {k: v for k, v in r.verify.items() if k.startswith("cos_")}
        assert cos and min(cos.values()) >= 0.9999, (r.name, cos)
        m = json.loads((Path(r.folder) / "manifest.json").read_text())
        # no cache in these slices: one shape set per seq bucket, no context buckets
        assert {(s["seq"], s["ctx"]) for s in m["files"][0]["shapes"]} == {(1, None), (16, None)}
    assert set(results[0].verify) >= {"cos_q_out", "cos_k_out", "cos_v_out"}
    assert "cos_hidden_out" in results[1].verify
