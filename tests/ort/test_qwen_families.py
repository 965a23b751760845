"""Qwen2 and Qwen3 against Hugging Face transformers, on tiny random models that transformers itself builds and saves
(its own config.json and tensor names, so nothing here is written by the code under test).

* logits of the whole prompt: numpy and onnx, one shard and split, within nmse 1e-9 and max |diff| 1e-4 of
  transformers (float32 both sides), and the same argmax at every position;
* `exo-rknpu generate` (split and unsplit, numpy and onnx): the prompt ids transformers' tokenizer gives for the
  text, then the same greedy tokens as transformers' `generate`, stopping at generation_config's eos ids;
* GGUF files of the same models (written with the `gguf` package, llama.cpp tensor names, no Q/K permutation for
  qwen2/qwen3 as in llama.cpp's converter) load to exactly the weights transformers holds, and run to its logits.

Skipped when transformers/torch (the `bench` extra) are not installed; the runtime never needs them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from exo_rknpu.cli.main import main as cli_main
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_args, load_shard
from exo_rknpu.model.registry import hf_layer_name
from exo_rknpu.model.zoo import resolve_model
from helpers import nmse, ring
from tiny_models import make_tiny_gguf, train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 320, 64, 4, 2, 128, 4
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]
TEXT = "The capital of France is"
EOS_IDS = [2, 0]  # <|im_end|>, <|endoftext|>: Qwen's generation_config lists both

# (family, tied head, head_dim): qwen3's head_dim differs from hidden/heads = 16, as in Qwen3-0.6B (128, not 1024/16).
MODELS = {
    "qwen2-tied": ("qwen2", True, None),
    "qwen3-untied-hd32": ("qwen3", False, 32),
    "qwen3-tied-hd128": ("qwen3", True, 128),
}


def build(path, family: str, tied: bool, head_dim: int | None, seed: int = 0):
    """A random Qwen2/Qwen3ForCausalLM saved by transformers, plus a tiny byte-level BPE tokenizer and Qwen's
    generation_config stop ids. Weights are re-drawn at a scale where logits are O(1) (the default init gives
    near-zero logits that would hide errors)."""
    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    cfg = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim or HIDDEN // HEADS,
                     tie_word_embeddings=tied, max_position_embeddings=512, rms_norm_eps=1e-6,
                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(path)
    model.generation_config.eos_token_id = EOS_IDS
    model.generation_config.save_pretrained(path)
    train_tokenizer(VOCAB, "qwen2").save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}))
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def qwen(request, tmp_path_factory):
    family, tied, head_dim = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param) / "hf"
    model = build(path, family, tied, head_dim)
    return family, path, model


def head_dim(config) -> int:
    """Qwen2Config has no head_dim attribute (hidden/heads); Qwen3Config has one."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def reference_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.numpy()


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
@pytest.mark.parametrize("split", [None, "0-0,1-2,3-3"])
def test_logits_match_transformers(qwen, backend, split):
    family, path, model = qwen
    args = load_args(resolve_model(str(path)))
    assert args.architecture == family and args.qk_norm == (family == "qwen3")
    assert args.attention_bias == (family == "qwen2")
    ours = ring(path, split, backend).forward("r", np.array([PROMPT]), logits="all")
    ref = reference_logits(model, PROMPT)
    assert nmse(ours, ref) <= 1e-9
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("plan", ["0-3=npu;attention=cpu", "1-2=npu;projections=cpu", "0-1=npu0,2-3=npu1"])
def test_placement_plans_match_transformers(qwen, plan):
    """Layers cut into per-block slices by a placement plan (qwen3's q/k norms inside the attention part, q and k
    handed across the host between slices) still give transformers' logits."""
    from exo_rknpu.runtime.placement import PlacementPlan

    _, path, model = qwen
    ours = ring(path, None, "onnx", placement=PlacementPlan.parse(plan), emulate=True).forward("r", np.array([PROMPT]), logits="all")
    ref = reference_logits(model, PROMPT)
    assert nmse(ours, ref) <= 1e-9
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("backend,split", [("numpy", None), ("onnx", None), ("onnx", "0-1,2-3"), ("numpy", "0-2,3-3")])
def test_generate_cli_gives_transformers_greedy_tokens(qwen, backend, split, capsys):
    family, path, model = qwen
    # float32 weights: transformers runs the float model; the compact default would diverge on random weights
    argv = ["generate", "--model", str(path), "--backend", backend, "--prompt", TEXT, "--max-tokens", "12", "--json",
            "--weights", "fp32"]
    assert cli_main(argv + (["--split", split] if split else [])) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert out["prompt_ids"] == hf_tok(TEXT, add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        gen = model.generate(torch.tensor([out["prompt_ids"]]), max_new_tokens=12, do_sample=False)
    want = gen[0, len(out["prompt_ids"]):].tolist()
    for i, t in enumerate(want):  # transformers pads after the first stop id; ours ends there
        if t in EOS_IDS:
            want = want[: i + 1]
            break
    assert out["token_ids"] == want
    assert out["text"] == hf_tok.decode(want, skip_special_tokens=True)


def test_generation_stops_at_every_eos_id_of_generation_config(qwen):
    _, path, _ = qwen
    from exo_rknpu.model.loader import load_tokenizer

    tok = load_tokenizer(resolve_model(str(path)))
    gc = transformers.GenerationConfig.from_pretrained(str(path))
    assert tok.eos_token_ids == frozenset(gc.eos_token_id) == frozenset(EOS_IDS)


# ---------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def qwen_gguf(qwen, tmp_path_factory):
    family, path, model = qwen
    gguf_path = make_tiny_gguf(tmp_path_factory.mktemp("gguf") / f"tiny-{family}.gguf", path)
    return family, path, model, gguf_path


def test_gguf_loads_the_weights_transformers_holds(qwen_gguf):
    family, _, model, gguf_path = qwen_gguf
    shard = load_shard(resolve_model(str(gguf_path)), LayerRange.full(LAYERS), weights="fp32")
    assert shard.args.architecture == family
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for i, layer in shard.layers.items():
        for field, ours in layer.arrays().items():
            np.testing.assert_array_equal(ours, state[hf_layer_name(i, field)], err_msg=f"layer {i} {field}")
        assert (layer.q_norm is not None) == (family == "qwen3") and (layer.q_bias is not None) == (family == "qwen2")
    np.testing.assert_array_equal(shard.embed_tokens, state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(shard.final_norm, state["model.norm.weight"])
    np.testing.assert_array_equal(shard.lm_head, state["lm_head.weight"])  # tied: transformers' copy is the embedding
    assert shard.args.head_dim == head_dim(model.config)


def test_gguf_tensors_as_gguf_reader_sees_them(qwen_gguf):
    """The file itself, read by the gguf package's reader: llama.cpp's qwen names, q/k norms of head_dim, and the
    rows of attn_q/attn_k stored unpermuted (equal to transformers' q_proj/k_proj)."""
    import gguf

    family, _, model, gguf_path = qwen_gguf
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    hd = head_dim(model.config)
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], state["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], state["model.layers.1.self_attn.k_proj.weight"])
    if family == "qwen3":
        assert tensors["blk.0.attn_q_norm.weight"].shape == tensors["blk.0.attn_k_norm.weight"].shape == (hd,)
        assert not any(name.endswith("attn_q.bias") for name in tensors)
    else:
        assert not any("attn_q_norm" in name for name in tensors)
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[0]]).decode() == family


def test_gguf_tokenizer_encodes_and_stops_as_transformers(qwen_gguf):
    """The GGUF's tokenizer (pre-tokenizer "qwen2", as llama.cpp writes for Qwen2 and Qwen3) encodes like
    transformers' tokenizer of the HF folder, and stops where generation_config stops (<|im_end|>, <|endoftext|>)
    although the GGUF names only <|im_end|> as eos -- llama.cpp's end-of-generation rule."""
    from exo_rknpu.model.loader import load_tokenizer

    _, path, _, gguf_path = qwen_gguf
    ours = load_tokenizer(resolve_model(str(gguf_path)))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in (TEXT, "hello, world! 12345 Café 日本語\n\n", "<|im_start|>user\nhi<|im_end|>\n"):
        assert ours.encode(text, add_special_tokens=True) == hf_tok(text)["input_ids"], text
    assert ours.eos_token_ids == frozenset(transformers.GenerationConfig.from_pretrained(str(path)).eos_token_id)


@pytest.mark.parametrize("split", [None, "0-1,2-3"])
def test_gguf_logits_match_transformers(qwen_gguf, split):
    _, _, model, gguf_path = qwen_gguf
    ours = ring(gguf_path, split, "onnx").forward("r", np.array([PROMPT]), logits="all")
    ref = reference_logits(model, PROMPT)
    assert nmse(ours, ref) <= 1e-9 and np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_transformers_own_gguf_loader_agrees(qwen_gguf):
    """transformers reads qwen2/qwen3 GGUF itself (no Q/K un-permutation for these archs). It does not map
    `<arch>.attention.key_length`, so it takes head_dim from its config defaults (hidden/heads for qwen2, 128 for
    qwen3 -- Qwen3's real value); for such files its model from our GGUF gives the logits of the original."""
    family, _, model, gguf_path = qwen_gguf
    default_hd = transformers.Qwen3Config().head_dim if family == "qwen3" else HIDDEN // HEADS
    if head_dim(model.config) != default_hd:
        pytest.skip(f"transformers' GGUF loader ignores key_length: it reads {family} with head_dim {default_hd}, "
                    f"this file has {head_dim(model.config)}")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                               dtype=torch.float32).eval()
    assert type(loaded).__name__ == type(model).__name__
    np.testing.assert_allclose(reference_logits(loaded, PROMPT), reference_logits(model, PROMPT), rtol=0, atol=1e-5)
