"""Placement plans: parsing (inline and TOML), refusals with their messages, and the planner's cut of a model."""

from __future__ import annotations

import pytest

from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import PlacementError, PlacementPlan, RangeRule, resolve
from exo_rknpu.slices.spec import WHOLE_LAYER, Buckets
from tests.tiny_models import make_tiny_hf

BUCKETS = Buckets(seq=(1, 16, 64), context=(256, 512, 1024, 2048))


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return load_args(resolve_model(str(make_tiny_hf(tmp_path_factory.mktemp("p") / "m", n_layers=5))))


def test_inline_plans_parse_into_ranges_and_blocks():
    p = PlacementPlan.parse("0-9=npu0,10-19=npu1,20-29=npu2")
    assert p.ranges == (RangeRule(0, 9, "npu0"), RangeRule(10, 19, "npu1"), RangeRule(20, 29, "npu2")) and p.blocks == ()
    p = PlacementPlan.parse("0-29=npu;attention=cpu")
    assert p.ranges == (RangeRule(0, 29, "npu"),) and p.blocks == (("attention", "cpu"),)
    assert PlacementPlan.parse("attention=cpu,mlp=npu").blocks == (("attention", "cpu"), ("mlp", "npu"))
    assert PlacementPlan.parse("3=npu").ranges == (RangeRule(3, 3, "npu"),)


def test_toml_plan_is_the_same_plan(tmp_path):
    f = tmp_path / "plan.toml"
    f.write_text('[ranges]\n"0-9" = "npu0"\n"10-19" = "npu1"\n[blocks]\nattention = "cpu"\n')
    assert PlacementPlan.load(str(f)) == PlacementPlan.parse("0-9=npu0,10-19=npu1;attention=cpu")


@pytest.mark.parametrize("text,message", [
    ("0-9=gpu", r"unknown device 'gpu' in '0-9=gpu'; devices: cpu, npu, npu0, npu1, npu2"),
    ("0-9=npu3", r"unknown device 'npu3'"),
    ("0-9=npu0,5-12=npu1", r"placement ranges 0-9=npu0 and 5-12=npu1 overlap \(layer 5\)"),
    ("9-0=npu", r"layer range '9-0' is reversed; write 0-9"),
    ("0-9", r"needs the form RANGE=DEVICE"),
    ("a-b=npu", r"'a-b' in 'a-b=npu' is not a layer range"),
    ("0-9=npu;softmax=cpu", r"unknown block 'softmax' in 'softmax=cpu'; blocks: embedding, attention, projections, mlp, norm, head"),
    ("attention=cpu,0-9=npu", r"'attention=cpu' is a block rule; blocks go after a ';'"),
    ("0-9=npu;attention=cpu,attention=npu", r"names block 'attention' twice"),
    ("0-9=npu,,10-19=cpu", r"has an empty item"),
    ("", r"--placement is empty"),
])
def test_malformed_plans_are_refused_in_one_line(text, message):
    with pytest.raises(PlacementError, match=message) as e:
        PlacementPlan.parse(text)
    assert "\n" not in str(e.value)


def test_bad_toml_is_refused(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[ranges]\n0-9 = npu\n")
    with pytest.raises(PlacementError, match="is not valid TOML"):
        PlacementPlan.load(str(f))
    f.write_text('[layers]\n"0-9" = "npu"\n')
    with pytest.raises(PlacementError, match=r"unknown table\(s\) \['layers'\]"):
        PlacementPlan.load(str(f))


def test_impossible_plans_are_refused_against_the_model(args):
    full = LayerRange.full(5)
    with pytest.raises(PlacementError, match=r"placement range 0-9=npu is outside the model: it has layers 0-4"):
        resolve(PlacementPlan.parse("0-9=npu"), args, full, "onnx", BUCKETS)
    with pytest.raises(PlacementError, match=r"embedding=npu0: the npu backend cannot run the embedding block \(it runs attention, "):
        resolve(PlacementPlan.parse("0-4=cpu;embedding=npu0"), args, full, "onnx", BUCKETS)


def test_npu_devices_without_a_usable_npu_are_refused_with_the_reason_unless_emulated(args):
    why = "this machine is x86_64, not aarch64"
    with pytest.raises(PlacementError, match=r"puts slices on npu0, npu1, but the NPU cannot run here: this machine is "
                                             r"x86_64, not aarch64; add --emulate"):
        resolve(PlacementPlan.parse("0-1=npu0,2-4=npu1"), args, LayerRange.full(5), "onnx", BUCKETS, npu_unavailable=why)
    # a shard outside the plan's NPU ranges runs nothing emulated: nothing to refuse
    r = resolve(PlacementPlan.parse("0-1=npu0"), args, LayerRange(2, 5, 5), "onnx", BUCKETS, npu_unavailable=why)
    assert not r.emulated
    # a usable NPU, or the simulator as the default backend, runs them for real
    assert not resolve(PlacementPlan.parse("0-4=npu"), args, LayerRange.full(5), "onnx", BUCKETS, npu_available=True).emulated
    assert {s.backend for s in resolve(PlacementPlan.parse("0-4=npu"), args, LayerRange.full(5), "rknn-sim", BUCKETS).slices
            if s.spec.kind == "layers"} == {"rknn-sim"}


def test_attention_on_cpu_cuts_each_layer_in_three_and_npu_slices_need_no_context_buckets(args):
    r = resolve(PlacementPlan.parse("0-4=npu;attention=cpu"), args, LayerRange.full(5), "onnx", BUCKETS, emulate=True)
    names = [s.spec.name for s in r.slices]
    assert names[:4] == ["embed", "layers.0.attn_norm+qkv", "layers.0.attention", "layers.0.o_proj+mlp"]
    assert names[-1] == "head" and len(names) == 2 + 3 * 5
    npu = [s for s in r.slices if s.device == "npu"]
    assert all(not s.spec.has_attention and r.npu_files(s.spec) == 3 for s in npu)  # seq buckets only
    assert all(s.device == "cpu" and s.spec.has_attention for s in r.slices if "attention" in s.spec.name)
    assert all(s.emulated for s in npu) and r.emulated  # no NPU on this machine
    text = r.explain()
    assert "layers.0.attention" in text and "(emulated)" in text and "no NPU speed is claimed" in text


def test_ranges_on_cores_keep_whole_layers_one_per_graph_and_a_shard_takes_its_part(args):
    plan = PlacementPlan.parse("0-1=npu0,2-3=npu1,4=npu2")
    r = resolve(plan, args, LayerRange(2, 5, 5), "onnx", BUCKETS, emulate=True)
    assert [(s.spec.name, s.device) for s in r.slices] == [("layers.2", "npu1"), ("layers.3", "npu1"),
                                                           ("layers.4", "npu2"), ("head", "npu2")]
    assert all(s.spec.blocks == WHOLE_LAYER and r.npu_files(s.spec) == 12 for s in r.slices if s.spec.kind == "layers")


def test_unnamed_layers_run_on_the_default_backend(args):
    r = resolve(PlacementPlan.parse("3-4=npu"), args, LayerRange.full(5), "numpy", BUCKETS, emulate=True)
    assert [(s.spec.name, s.backend) for s in r.slices][:2] == [("embed", "numpy"), ("layers.0-2", "numpy")]
