"""The w8a8 recipe (slices/recipe.py, rknn/recipe.py) and the rotation (rknn/rotation.py).

- rotation is an exact re-parametrisation: the rotated model's logits equal Hugging Face transformers' on the
  original tiny model (relative max error <= 1e-4; fp32 everywhere, float64 transforms);
- the recipe round-trips through JSON and through a compiled manifest;
- a changed recipe is a cache miss (and keeping another layer in fp16 is not);
- the named recipes (`compile --recipe`) select the layers, head and linears docs/compiler.md states, and the
  compiler's own graph makes exactly those linears int8; recipe flags without `--dtype w8a8` are refused.
Numpy tests need no toolkit; the compile test skips without it (one tiny layer, one bucket)."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.backends.base import get_backend
from exo_rknpu.rknn import rotation as rot
from exo_rknpu.rknn import toolkit
from exo_rknpu.rknn.recipe import RecipeBuild, cache_text
from exo_rknpu.runtime.shard import ShardRunner
from exo_rknpu.slices.recipe import DEFAULT_RECIPE, NAMED_RECIPES, QuantRecipe, named_recipe
from exo_rknpu.slices.spec import Buckets, SliceSpec

from tiny_models import make_tiny_hf

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]
BUCKETS = Buckets(seq=(1, 16), context=(64,))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _numpy_logits(ws, observe=None) -> np.ndarray:
    r = ShardRunner(ws, get_backend("numpy"), BUCKETS, layers_per_slice=1, on_slice=observe)
    try:
        return r.forward("t", np.asarray([PROMPT], np.int64), logits="all")
    finally:
        r.close()


def _hf_logits(path: Path) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits.numpy()


@pytest.mark.parametrize("n", [4, 12, 20, 48, 64, 576])
def test_hadamard_matrices_are_orthogonal_sign_matrices(n):
    h = rot.hadamard(n)
    assert set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_matrix_is_orthogonal_and_seeded(kind):
    q = rot.rotation_matrix(64, kind, seed=1)
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-12)
    assert np.array_equal(q, rot.rotation_matrix(64, kind, seed=1)) and not np.array_equal(q, rot.rotation_matrix(64, kind, seed=2))


def test_no_hadamard_of_an_unsupported_order_is_a_clear_error():
    with pytest.raises(ValueError, match="orthogonal"):
        rot.hadamard(6)  # no Hadamard matrix of order 6 exists


def test_rotate_refuses_unfolded_norms(tmp_path):
    ws = RecipeBuild(make_tiny_hf(tmp_path / "m", n_layers=1, seed=2), QuantRecipe()).runtime_weights()
    with pytest.raises(ValueError, match="fold_norms"):
        rot.rotate(ws, np.eye(ws.args.hidden_size))


@pytest.mark.parametrize("arch,tied,kind", [("llama", False, "hadamard"), ("qwen2", True, "orthogonal")])  # qwen2: biases, tied head
def test_rotated_and_smoothed_model_computes_the_original_logits(tmp_path, arch, tied, kind):
    """fold + rotate (+ smoothing on top, as the recipe applies them): same logits as transformers' original model,
    and every hidden state between slices is the original one times Q."""
    path = make_tiny_hf(tmp_path / "m", arch=arch, n_layers=3, tied=tied, seed=3)
    recipe = QuantRecipe(rotation=kind, smooth_alpha=0.5, calibration_text="The capital of France is Paris. " * 8,
                         fp16_layers=(), head="w8a8")
    rb = RecipeBuild(path, recipe)
    orig = RecipeBuild(path, QuantRecipe(smooth_alpha=None)).runtime_weights()
    rotated, smoothed, q = rb.runtime_weights(), rb.smoothed_weights(), rb.rotation_matrix()
    assert q is not None and not np.allclose(rotated.embed_tokens, orig.embed_tokens)
    assert not np.allclose(smoothed.layers[0].q_proj, rotated.layers[0].q_proj)  # smoothing really changed weights
    if tied:
        assert np.array_equal(orig.lm_head, orig.embed_tokens)  # the original table is never modified in place
    want = _hf_logits(path)
    hid_o: list[np.ndarray] = []
    hid_r: list[np.ndarray] = []
    got_o = _numpy_logits(orig, lambda s, i, o: hid_o.append(o["hidden_out"]) if s.kind == "layers" else None)
    got_r = _numpy_logits(rotated, lambda s, i, o: hid_r.append(o["hidden_out"]) if s.kind == "layers" else None)
    got_s = _numpy_logits(smoothed)
    assert _rel(got_o, want) <= 1e-4
    assert _rel(got_r, want) <= 1e-4, _rel(got_r, want)
    assert _rel(got_s, want) <= 1e-4, _rel(got_s, want)
    for a, b in zip(hid_o, hid_r):
        assert _rel(b, (a.astype(np.float64) @ q).astype(np.float32)) <= 1e-4


def test_recipe_round_trips_through_json_and_validates():
    r = QuantRecipe(policy="linear", algorithm="mmse", smooth_alpha=0.5, rotation="hadamard", rotation_seed=3,
                    calibration_text="some text", calibration_samples=2, fp16_layers=(29, 0, 0), head="fp16")
    back = QuantRecipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.fp16_layers == (0, 29)
    assert QuantRecipe.from_dict(json.loads(json.dumps(DEFAULT_RECIPE.to_dict()))) == DEFAULT_RECIPE
    for bad in ({"policy": "all"}, {"algorithm": "best"}, {"smooth_alpha": 1.5}, {"rotation": "spin"}, {"head": "int4"},
                {"calibration_samples": 0}, {"fp16_layers": (-1,)}, {"down_basis": "x"}):
        with pytest.raises(ValueError):
            DEFAULT_RECIPE.but(**bad)
    with pytest.raises(ValueError, match="unknown recipe fields"):
        QuantRecipe.from_dict({"policy": "linear", "colour": "red"})
    assert r.slice_dtype("layers.29") == "fp16" and r.slice_dtype("layers.5") == "w8a8" and r.slice_dtype("head") == "fp16"
    assert r.int8_linears("layers.5") == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_every_recipe_field_is_in_the_cache_key_but_other_slices_precision_is_not():
    base = cache_text(DEFAULT_RECIPE, "layers.3")
    changed = {"policy": "linear", "algorithm": "mmse", "smooth_alpha": 0.5, "smooth_groups": ("qkv",),
               "down_basis": "down", "rotation": "hadamard", "rotation_seed": 1, "calibration_text": "other text",
               "calibration_samples": 3, "decode_samples": 5, "fp16_layers": (3,)}
    assert set(changed) | {"head"} == {f.name for f in fields(QuantRecipe)}  # a new field must be added here too
    for k, v in changed.items():
        assert cache_text(DEFAULT_RECIPE.but(**{k: v}), "layers.3") != base, k
    assert cache_text(DEFAULT_RECIPE.but(fp16_layers=(4,), head="fp16"), "layers.3") == base  # another slice's precision
    assert cache_text(DEFAULT_RECIPE.but(head="w8a8"), "head") != cache_text(DEFAULT_RECIPE, "head")


# The named recipes as docs/compiler.md ("Recipes to pick") states them for smollm2-135m (30 layers), the model they
# were measured on: the decoder layers in w8a8 (the rest fp16) and the head's dtype. The specification the code and
# the documentation are both checked against.
DOCUMENTED_RECIPES = {
    "default": (tuple(range(2, 30)), "fp16"),
    "agree98": ((7, 14), "fp16"),
    "int8-layers": (tuple(range(30)), "w8a8"),
}
# the default policy's int8 linears, as docs/compiler.md states them ("q/k/v/o/up int8, gate/down fp16")
DOCUMENTED_INT8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")
COMPILER_MD = Path(__file__).resolve().parents[2] / "docs" / "compiler.md"


def _documented_table() -> dict[str, tuple[tuple[int, ...], str]]:
    """docs/compiler.md's "Recipes to pick" table, column "w8a8 layers (rest fp16)", per `--recipe` name:
    "7, 14; head fp16", "2–29; head fp16", "0–29 and the head" -> (layers, head dtype)."""
    lines = COMPILER_MD.read_text().split("### Recipes to pick", 1)[1].splitlines()
    top = next(k for k, line in enumerate(lines) if line.startswith("| recipe | w8a8 layers"))
    rows: dict[str, tuple[tuple[int, ...], str]] = {}
    for line in lines[top + 2:]:
        if not line.startswith("|"):
            break  # the end of the table
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.search(r"`([a-z0-9-]+)`", cells[0])
        if not name or "--dtype" in cells[0] or "64-token" in cells[0]:  # fp16 and a re-measure of default
            continue
        layers_text, _, head_text = cells[1].replace(" and the head", "; head w8a8").partition(";")
        layers: list[int] = []
        for a, b in re.findall(r"(\d+)(?:[–-](\d+))?", layers_text):
            layers += range(int(a), int(b or a) + 1)
        rows[name.group(1)] = (tuple(layers), head_text.split()[-1])
    return rows


def test_the_documented_recipes_table_states_the_recipes_this_test_specifies():
    assert _documented_table() == DOCUMENTED_RECIPES
    assert "q/k/v/o/up int8, gate/down fp16" in COMPILER_MD.read_text()


def test_named_recipes_select_the_documented_layers_and_head():
    """`compile --recipe NAME` on a 30-layer model: exactly the documented layers are w8a8 (with the documented
    policy's linears int8), every other layer and the head as documented; the names offered are the documented ones."""
    n = 30
    assert set(NAMED_RECIPES) == set(DOCUMENTED_RECIPES)
    for name, (int8_layers, head) in DOCUMENTED_RECIPES.items():
        got = named_recipe(name, n)
        assert tuple(i for i in range(n) if got.slice_dtype(f"layers.{i}") == "w8a8") == int8_layers, name
        assert got.slice_dtype("head") == head, name
        for i in range(n):
            want = DOCUMENTED_INT8_LINEARS if i in int8_layers else ()
            assert got.int8_linears(f"layers.{i}") == want, (name, i)
        assert got.int8_linears("head") == (("lm_head",) if head == "w8a8" else ()), name
    assert named_recipe("default", n) == DEFAULT_RECIPE  # --dtype w8a8 without --recipe builds the default recipe
    with pytest.raises(ValueError, match="choose one of"):
        named_recipe("best", n)
    with pytest.raises(ValueError, match="has 2 layers"):  # a model without the recipe's layers: refused, not ignored
        named_recipe("agree98", 2)


RECIPE_FLAG_VALUES = [["--recipe", "agree98"], ["--fp16-layers", "0,head"], ["--quant-policy", "linear"],
                      ["--smooth-alpha", "0"], ["--rotation", "none"], ["--quant-algorithm", "mmse"],
                      ["--calibration-text", "CAL"]]


@pytest.mark.parametrize("mode", [["--layers", "0-0"], ["--layers", "0-0", "--dtype", "fp16"], ["--agreement"],
                                  ["--placement", "0-1=npu", "--explain"]])
@pytest.mark.parametrize("flag", RECIPE_FLAG_VALUES, ids=lambda f: f[0])
def test_recipe_flags_without_dtype_w8a8_are_refused_before_anything_is_built(tmp_path, capsys, mode, flag):
    """An fp16 build has no recipe: a recipe flag without --dtype w8a8 is a one-line error (exit 2), not ignored;
    nothing is compiled or measured, and nothing is written to the cache."""
    from exo_rknpu.cli.main import main

    tiny = make_tiny_hf(tmp_path / "m", n_layers=2, seed=8)
    (tmp_path / "cal.txt").write_text("The capital of France is Paris. " * 8)
    flag = [str(tmp_path / "cal.txt") if v == "CAL" else v for v in flag]
    cache = tmp_path / "cache"
    assert main(["compile", "--model", str(tiny), "--cache", str(cache), *mode, *flag]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert err == [f"exo-rknpu: error: {flag[0]} is a w8a8 recipe setting; add --dtype w8a8 (--dtype fp16 has no recipe)"]
    assert not cache.exists() or not any(cache.iterdir())
    assert "layers." not in out.out  # no plan printed, no slice reported


def test_recipe_build_refuses_another_model(tmp_path):
    a = make_tiny_hf(tmp_path / "a", n_layers=1, seed=1)
    b = make_tiny_hf(tmp_path / "b", n_layers=2, seed=2)
    other = RecipeBuild(b).runtime_weights()
    with pytest.raises(ValueError, match="not the model being built"):
        RecipeBuild(a).build_weights(SliceSpec("layers", 0, 1), other)


_st = toolkit.status()


@pytest.mark.toolkit
@pytest.mark.skipif(not _st.ok, reason=f"rknn-toolkit2 environment missing ({_st.problem})")
def test_w8a8_compile_records_the_recipe_and_a_changed_recipe_is_a_cache_miss(tmp_path):
    from exo_rknpu.rknn.compile import compile_range
    from exo_rknpu.errors import CompileError

    tiny = make_tiny_hf(tmp_path / "m", n_layers=2, seed=5)
    kw = dict(buckets=Buckets(seq=(1,), context=(64,)), dtype="w8a8", verify=True, cache_dir=tmp_path / "c", progress=False)
    a = DEFAULT_RECIPE.but(smooth_alpha=0.5, calibration_samples=2, decode_samples=3, fp16_layers=(), head="w8a8")
    first = compile_range(str(tiny), "0-0", recipe=a, **kw)
    m = json.loads((Path(first[0].folder) / "manifest.json").read_text())
    assert QuantRecipe.from_dict(m["quantization"]["recipe"]) == a
    assert m["quantization"]["slice_dtype"] == "w8a8" and m["quantization"]["samples_per_bucket"] == {"1": 3}
    # verify compares with the original slice on onnxruntime: the smoothed int8 build computes the same function
    assert first[0].verify["cos_hidden_out"] >= 0.999 and first[0].verify["cos_delta"] >= 0.99, first[0].verify
    kept = compile_range(str(tiny), "0-1", recipe=a.but(fp16_layers=(1,)), **kw)  # layer 1 kept in fp16
    assert [(r.name, r.status) for r in kept] == [("layers.0", "reused"), ("layers.1", "built"), ("head", "built")]
    assert kept[0].key == first[0].key
    m1 = json.loads((Path(kept[1].folder) / "manifest.json").read_text())
    assert m1["dtype"] == "w8a8" and m1["quantization"]["slice_dtype"] == "fp16"
    assert [f["file"] for f in m1["files"]] == ["layers.1.s1.c64.rknn"]  # one file per bucket, like the w8a8 slices
    assert kept[1].verify["cos_hidden_out"] >= 0.9999, kept[1].verify  # fp16: near exact
    changed = compile_range(str(tiny), "0-0", recipe=a.but(smooth_alpha=None), **kw)
    assert changed[0].status == "built" and changed[0].key != first[0].key
    with pytest.raises(CompileError, match="rotat"):  # measured only: the runtime does not run a rotated embedding
        compile_range(str(tiny), "0-0", recipe=a.but(rotation="hadamard"), **kw)


@pytest.mark.toolkit
@pytest.mark.skipif(not _st.ok, reason=f"rknn-toolkit2 environment missing ({_st.problem})")
def test_agreement_measures_any_text_in_prefill_and_decode_mode_with_per_layer_cosines(tmp_path):
    from exo_rknpu.rknn.agreement import measure_agreement

    tiny = make_tiny_hf(tmp_path / "m", n_layers=2, seed=6)
    text = "Once upon a time there was a tiny model that ran on a board. " * 2
    recipe = DEFAULT_RECIPE.but(calibration_text="The capital of France is Paris. " * 12, calibration_samples=2, decode_samples=4,
                                fp16_layers=(), head="w8a8")
    for seq, n in ((4, 8), (1, 4)):  # prefill chunks of 4, then decode (one token per call)
        r = measure_agreement(str(tiny), "w8a8", text=text, recipe=recipe, seq=seq, max_tokens=n, log=lambda m: None)
        assert r["tokens"] == n and r["seq"] == seq and QuantRecipe.from_dict(r["recipe"]) == recipe
        assert 0.0 <= r["top1_agreement"] <= 1.0 and r["cos_logits"] > 0.95
        assert sorted(r["layers"]) == ["layers.0", "layers.1"]
        for f in r["layers"].values():  # the layer's own error and the accumulated one, against onnxruntime fp32
            assert f["dtype"] == "w8a8" and 0.9 < f["cos_delta"] <= 1.0 and 0.95 < f["cos_hidden_acc"] <= 1.0, f
        assert sorted(r["build_names"]) == [f"head.s{seq}", f"layers.0.s{seq}.c256", f"layers.1.s{seq}.c256"]  # only the buckets used


def test_fake_quant_error_is_at_most_half_a_step_inside_the_range():
    from exo_rknpu.rknn.emulate import fake_quant, fake_quant_weight

    x = np.random.default_rng(0).uniform(-3.0, 5.0, 1000).astype(np.float32)
    step = 8.0 / 255
    assert np.abs(fake_quant(x, -3.0, 5.0) - x).max() <= step / 2 + 1e-6
    assert np.unique(fake_quant(x, -3.0, 5.0)).size <= 256
    w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    assert np.all(np.abs(fake_quant_weight(w) - w) <= np.abs(w).max(axis=1, keepdims=True) / 127 / 2 + 1e-7)


def test_emulated_recipe_is_exact_when_everything_is_fp16_and_lossy_otherwise(tmp_path):
    from exo_rknpu.rknn.emulate import emulate_agreement

    tiny = make_tiny_hf(tmp_path / "m", n_layers=2, seed=7)
    text = "Once upon a time there was a tiny model that ran on a board. " * 2
    cal = "The capital of France is Paris. " * 12
    off = emulate_agreement(tiny, QuantRecipe(fp16_layers=(0, 1), head="fp16", calibration_text=cal), text)
    assert off["top1_agreement"] == 1.0 and off["cos_logits"] > 0.99999
    smooth = emulate_agreement(tiny, QuantRecipe(policy="mlp-gate-up", calibration_text=cal, fp16_layers=(), head="w8a8"), text)
    assert 0.9 < smooth["cos_logits"] < 0.99999, smooth  # int8 gate/up and head: lossy, not broken
    rotated = emulate_agreement(tiny, QuantRecipe(fp16_layers=(0, 1), head="fp16", rotation="hadamard", calibration_text=cal), text)
    assert rotated["top1_agreement"] == 1.0 and rotated["cos_logits"] > 0.99999  # measured against the unrotated model


@pytest.mark.parametrize("flags,message", [
    (["--agreement-text", "/nonexistent/text.txt"], "--agreement-text: cannot read"),
    (["--calibration-text", "/nonexistent/calib.txt"], "--calibration-text: cannot read"),
    (["--smooth-alpha", "1.5"], "in [0, 1]"),
    (["--fp16-layers", "0,99"], "outside layers"),
    (["--agreement-seq", "0"], "integer >= 1"),
])
def test_agreement_flags_are_validated_before_anything_heavy(tmp_path, capsys, flags, message):
    from exo_rknpu.cli.main import main

    tiny = make_tiny_hf(tmp_path / "m", n_layers=2, seed=8)
    try:
        code = main(["compile", "--model", str(tiny), "--agreement", "--dtype", "w8a8", *flags])
    except SystemExit as e:  # argparse's own type checks
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_agreement_on_a_text_too_short_is_a_one_line_error(tmp_path, capsys):
    from exo_rknpu.cli.main import main

    tiny = make_tiny_hf(tmp_path / "m", n_layers=2, seed=8)
    (tmp_path / "t.txt").write_text("a")
    assert main(["compile", "--model", str(tiny), "--agreement", "--agreement-text", str(tmp_path / "t.txt")]) == 1
    assert "needs at least 2" in capsys.readouterr().err


def test_decode_calibration_starts_at_the_first_token_and_prefill_samples_are_real_chunks(tmp_path):
    from exo_rknpu.model.rope import cos_sin

    tiny = make_tiny_hf(tmp_path / "m", n_layers=1, seed=9)
    rb = RecipeBuild(tiny, QuantRecipe(calibration_text="The capital of France is Paris. " * 12, calibration_samples=3,
                                       decode_samples=5))
    ws = rb.runtime_weights()
    spec = SliceSpec("layers", 0, 1)
    decode = rb.calibration(spec, ws, BUCKETS, 1, None)
    prefill = rb.calibration(spec, ws, BUCKETS, 16, None)
    args = ws.args
    # positions from the rotary inputs: decode steps 0, then after the history; prefill chunks 0-15, 16-31, 32-47
    assert np.allclose(decode[0]["cos"], cos_sin(args, np.arange(1))[0])
    assert len(decode) == 5 and len(prefill) == 3
    assert np.allclose(decode[1]["cos"], cos_sin(args, np.arange(16, 17))[0])
    for i, s in enumerate(prefill):
        assert np.allclose(s["cos"], cos_sin(args, np.arange(16 * i, 16 * i + 16))[0]), i


@pytest.mark.toolkit
@pytest.mark.skipif(not _st.ok, reason=f"rknn-toolkit2 environment missing ({_st.problem})")
def test_a_named_mix_builds_its_int8_layers_with_the_policys_linears_and_the_others_in_fp16(tmp_path):
    """The compiler's step-1 graph, not the recipe, says which Convs went int8: their weight shapes must be exactly
    the documented linears (q/k/v/o/up for the default policy; tiny shapes q,o 64x64, k,v 32x64, up 128x64, gate 128x64,
    down 64x128 tell them apart) in agree98's first w8a8 layer, and none in its fp16 neighbour."""
    from exo_rknpu.rknn.compile import compile_range

    int8_layers = DOCUMENTED_RECIPES["agree98"][0]
    i = int8_layers[0]
    j = i + 1 if i + 1 not in int8_layers else i - 1  # an fp16 neighbour
    n = max(int8_layers) + 2
    tiny = make_tiny_hf(tmp_path / "m", n_layers=n, seed=11)
    recipe = named_recipe("agree98", n).but(calibration_text="The capital of France is Paris. " * 12, calibration_samples=2,
                                decode_samples=3)
    lo, hi = min(i, j), max(i, j)
    got = {r.name: r for r in compile_range(str(tiny), f"{lo}-{hi}", buckets=Buckets(seq=(1,), context=(64,)), dtype="w8a8",
                                            recipe=recipe, cache_dir=tmp_path / "c", progress=False)}
    ws = RecipeBuild(tiny, recipe).runtime_weights()
    want = sorted(list(getattr(ws.layers[i], name).shape) for name in DOCUMENTED_INT8_LINEARS)
    m_int8 = json.loads((Path(got[f"layers.{i}"].folder) / "manifest.json").read_text())
    m_fp16 = json.loads((Path(got[f"layers.{j}"].folder) / "manifest.json").read_text())
    assert m_int8["quantization"]["slice_dtype"] == "w8a8" and m_fp16["quantization"]["slice_dtype"] == "fp16"
    assert sorted(m_int8["build"]["int8_convs"]) == want, (m_int8["build"]["int8_convs"], want)
    assert "int8_convs" not in m_fp16["build"]
    assert m_int8["files"][0]["bytes"] < m_fp16["files"][0]["bytes"]  # int8 weights: the smaller file
