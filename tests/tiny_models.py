"""Tiny random llama/qwen2/qwen3 models written to disk, for fast tests that need no network.

    hf_dir = make_tiny_hf(tmp_path / "hf", arch="qwen2", n_layers=3)
    gguf_path = make_tiny_gguf(tmp_path / "m.gguf", hf_dir)   # same weights and tokenizer, as GGUF

Weights are seeded random float32 (scaled so activations stay sane). The tokenizer is a byte-level BPE
trained deterministically on a fixed text, padded with filler special tokens up to the model's vocab.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TRAINING_TEXT = (
    "The capital of France is Paris. The capital of Germany is Berlin. Once upon a time there was a tiny model "
    "that ran on a Rockchip board with an NPU, split into layer ranges across three nodes. "
    "It counted 0 1 2 3 4 5 6 7 8 9 10 100 2024 and said hello, world! Café naïve 日本語 ü ß. "
    "def main():\n    return 42\n\nQuestions? Answers: yes, no, maybe; (parentheses) [brackets] {braces}.\n"
)


def qwen2_pretokenize_regex() -> str | None:
    """Qwen2's pre-tokenizer regex as transformers defines it (an independent reference for the one under test),
    or None when transformers is not installed."""
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    except ImportError:
        return None
    return PRETOKENIZE_REGEX


def train_tokenizer(vocab_size: int, arch: str = "llama") -> Any:
    """A deterministic byte-level BPE with exactly `vocab_size` ids (needs >= 262)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIALS) + 3:
        raise ValueError("vocab_size must be at least 262 (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    qwen2_re = qwen2_pretokenize_regex() if arch in ("qwen2", "qwen3") else None
    if qwen2_re:  # Qwen2's pre-tokenizer (Qwen3 uses the same), regex taken from transformers (GGUF pre "qwen2")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(qwen2_re), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # SmolLM2's: GGUF pre "smollm" (also qwen2's stand-in when transformers is absent)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    tok.decoder = decoders.ByteLevel()
    n_fill = 3  # a few filler specials always exist, so the id layout does not depend on training luck
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_fill, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, min_frequency=1,
    )
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    have = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True, normalized=False)
                            for i in range(vocab_size - have)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def _random_weights(rng: np.random.Generator, cfg: dict[str, Any], arch: str, tied: bool) -> dict[str, np.ndarray]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((v, h))).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = lin(q, h)
        w[p + "self_attn.k_proj.weight"] = lin(kv, h)
        w[p + "self_attn.v_proj.weight"] = lin(kv, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, q)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = (0.1 * rng.standard_normal(q)).astype(np.float32)
            w[p + "self_attn.k_proj.bias"] = (0.1 * rng.standard_normal(kv)).astype(np.float32)
            w[p + "self_attn.v_proj.bias"] = (0.1 * rng.standard_normal(kv)).astype(np.float32)
        if arch == "qwen3":  # per-head q/k RMSNorm weights
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = lin(f, h)
        w[p + "mlp.up_proj.weight"] = lin(f, h)
        w[p + "mlp.down_proj.weight"] = lin(h, f)
    w["model.norm.weight"] = norm(h)
    if not tied:
        w["lm_head.weight"] = lin(v, h)
    return w


def _encode_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16)
    raise ValueError(dtype)


def _save_bf16(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Write a safetensors file with BF16 tensors by hand (numpy has no bfloat16). Values are truncated."""
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    off = 0
    for name, a in tensors.items():
        raw = (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hdr = json.dumps(header).encode()
    hdr += b" " * (-len(hdr) % 8)
    with open(path, "wb") as f:
        f.write(len(hdr).to_bytes(8, "little"))
        f.write(hdr)
        for b in blobs:
            f.write(b)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """What a float32 array reads back as after being stored as BF16 by this module (truncation)."""
    return ((np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16) << 16).view(np.float32)


def _write_tensors(tensors: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    if dtype == "bfloat16":
        _save_bf16(tensors, path)
    else:
        save_file({k: _encode_dtype(v, dtype) for k, v in tensors.items()}, str(path))


def shard_file_name(part: int, total: int) -> str:
    return f"model-{part:05d}-of-{total:05d}.safetensors"


def make_tiny_hf(
    dir: Path,
    arch: str = "llama",
    n_layers: int = 3,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    vocab: int = 320,
    tied: bool = False,
    sharded: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    rope_scaling: dict[str, Any] | None = None,
    rope_style: str = "top_level",
    head_dim: int | None = None,
) -> Path:
    """Write a tiny HF model folder and return it.

    sharded=True writes one file for the embedding, one per layer, and one for norm+head (with an index),
    so tests can tell exactly which files a partial load touched: file 1 = embedding, file 2+i = layer i,
    last file = model.norm (+ lm_head). dtype: float32 | float16 | bfloat16.
    rope_style: "top_level" (rope_theta at the top, transformers 4) or "rope_parameters" (transformers 5).
    head_dim: defaults to hidden // heads; qwen3 models set it independently (Qwen3-0.6B: 128 with 1024 / 16 heads).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "architectures": [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(arch, "LlamaForCausalLM")],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim or hidden // heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "hidden_act": "silu",
    }
    theta = 10000.0
    if rope_style == "rope_parameters":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})}
    else:
        cfg["rope_theta"] = theta
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
    (dir / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = _random_weights(np.random.default_rng(seed), cfg, arch, tied)
    if sharded:
        groups: list[dict[str, np.ndarray]] = [{"model.embed_tokens.weight": weights["model.embed_tokens.weight"]}]
        for i in range(n_layers):
            groups.append({k: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")})
        groups.append({k: v for k, v in weights.items() if k in ("model.norm.weight", "lm_head.weight")})
        weight_map: dict[str, str] = {}
        for part, group in enumerate(groups, start=1):
            fname = shard_file_name(part, len(groups))
            _write_tensors(group, dir / fname, dtype)
            weight_map.update({k: fname for k in group})
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in weights.values()))}, "weight_map": weight_map}
        (dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        _write_tensors(weights, dir / "model.safetensors", dtype)
    train_tokenizer(vocab, arch).save(str(dir / "tokenizer.json"))
    tc = {
        "add_bos_token": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    return dir


def read_hf_tensors(dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a tiny HF folder as float32 (bf16 widened), for building the matching GGUF."""
    from exo_rknpu.model.hf import TensorSource

    with TensorSource(Path(dir)) as src:
        return {name: src.get(name) for name in src.map}


def q6_k_blocks(d: np.ndarray, sc: np.ndarray, q: np.ndarray) -> np.ndarray:
    """GGUF Q6_K bytes [rows, K/256 * 210] of fp16 d [rows, K/256], int8 sc [rows, K/16] and 6-bit q [rows, K] (value
    d * sc * (q - 32)), in ggml's block_q6_K layout (ql[128], qh[64], scales[16], d): per half of 128, l < 32, ql[l]
    holds q[l] and q[l+64] (low nibbles), ql[l+32] q[l+32] and q[l+96], qh[l] the high 2 bits of q[l], q[l+32], q[l+64],
    q[l+96]. gguf-py decodes but does not encode Q6_K; gguf.quants.dequantize checks these bytes in the tests."""
    rows, k = q.shape
    q = q.astype(np.uint8).reshape(rows, k // 256, 2, 4, 32)  # block, half, quarter (q[l + 32 * quarter]), l
    ql = np.concatenate([(q[:, :, :, 0] & 15) | ((q[:, :, :, 2] & 15) << 4),
                         (q[:, :, :, 1] & 15) | ((q[:, :, :, 3] & 15) << 4)], axis=-1)  # [rows, nb, 2, 64]
    qh = (q[:, :, :, 0] >> 4) | ((q[:, :, :, 1] >> 4) << 2) | ((q[:, :, :, 2] >> 4) << 4) | ((q[:, :, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64),
                          sc.astype(np.int8).view(np.uint8).reshape(rows, -1, 16),
                          d.astype("<f2").view(np.uint8).reshape(rows, -1, 2)], axis=-1)
    return out.reshape(rows, -1)


def quantize_q6_k(a: np.ndarray) -> np.ndarray:
    """float32 [rows, K] (K a multiple of 256) -> Q6_K bytes, llama.cpp's way in outline: a scale per sub-block of
    16 (its largest |value| / 31), an fp16 d per super-block with the largest scale's sc at -128, codes rounded."""
    rows, k = a.shape
    x = a.astype(np.float32).reshape(rows, k // 256, 16, 16)
    scale = np.abs(x).max(-1) / np.float32(31)  # [rows, nb, 16]
    d = (-scale.max(-1) / np.float32(128)).astype(np.float16)  # [rows, nb]
    df = d.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.where(df != 0, np.rint(scale / df), 0), -128, 127).astype(np.int8)
        s = (df * sc)[..., None]
        q = np.clip(np.where(s != 0, np.rint(x / s), 0) + 32, 0, 63).astype(np.uint8)
    return q6_k_blocks(d, sc.reshape(rows, -1), q.reshape(rows, k))


def make_tiny_gguf(path: Path, hf_dir: Path, arch: str | None = None, qtype: str = "F32",
                   embed_qtype: str | None = None) -> Path:
    """Write a GGUF holding exactly the weights and tokenizer of the tiny HF model in `hf_dir`.

    F32 tensors (or `qtype`, e.g. "Q8_0", quantized with gguf-py), llama.cpp names; `embed_qtype` for token_embd and
    output (e.g. "Q6_K", as llama.cpp keeps them in a Q4_0 file: quantize_q6_k). Tensors are written as they
    are, Q/K rows included: a llama GGUF stores Q/K rows in llama.cpp's interleaved order, so for llama the GGUF
    is a *different* model from `hf_dir` (a reader un-permutes those rows). What a GGUF should load as comes from
    independent readers (transformers' `from_pretrained(gguf_file=...)`, gguf.GGUFReader), never from this
    project's permutation. A tied model gets no output.weight.
    """
    import gguf
    hf_dir, path = Path(hf_dir), Path(path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tokj = json.loads((hf_dir / "tokenizer.json").read_text())
    arch = arch or cfg["model_type"]
    w = read_hf_tensors(hf_dir)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-" + arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    if cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]:  # as llama.cpp's converter writes head_dim
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(0 if qtype == "F32" else int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]))

    # Tokenizer: same vocab/merges; added tokens become CONTROL (3).
    vocab: dict[str, int] = dict(tokj["model"]["vocab"])
    for t in tokj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    assert all(t is not None for t in tokens)
    added = {t["content"] for t in tokj["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokj["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    # The pre-tokenizer train_tokenizer used: a regex Split is Qwen2's, otherwise SmolLM2's.
    splits = tokj.get("pre_tokenizer", {}).get("pretokenizers", [{}])[0].get("type") == "Split"
    writer.add_tokenizer_pre("qwen2" if splits else "smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges(merges)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        if tc.get(key) is not None:  # Qwen's tokenizer_config has bos_token null and no unk_token
            add(vocab[tc[key]])
    writer.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    if tc.get("chat_template"):
        writer.add_chat_template(tc["chat_template"])

    names = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    def add(name: str, a: np.ndarray, kind: str = qtype) -> None:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if kind == "F32" or a.ndim < 2:  # llama.cpp keeps norms and biases in F32
            writer.add_tensor(name, a)
        else:
            q = gguf.GGMLQuantizationType[kind]
            blocks = quantize_q6_k(a) if kind == "Q6_K" else gguf.quants.quantize(a, q)
            writer.add_tensor(name, blocks, raw_dtype=q)

    add("token_embd.weight", w["model.embed_tokens.weight"], embed_qtype or qtype)
    for i in range(cfg["num_hidden_layers"]):
        for hf_suffix, gg_suffix in names.items():
            a = w.get(f"model.layers.{i}.{hf_suffix}")
            if a is None:
                continue
            add(f"blk.{i}.{gg_suffix}", a)
    add("output_norm.weight", w["model.norm.weight"])
    if "lm_head.weight" in w:
        add("output.weight", w["lm_head.weight"], embed_qtype or qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
