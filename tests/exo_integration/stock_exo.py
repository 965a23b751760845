"""What a stock exo node needs to serve smollm2-135m offline: its weights as a Hugging Face folder in EXO_HOME.

Stock exo's tinygrad engine loads Hugging Face safetensors through exo's downloader. The folder is written at test
time from the bundled GGUF (never committed): gguf-py (`gguf.GGUFReader`, `gguf.quants.dequantize`, an
implementation independent of exo-rknpu's own reader) dequantizes every tensor to float32, the Q/K rows get
llama.cpp's permutation undone, and the tokenizer comes from transformers' GGUF conversion. exo's downloader then
stays offline: the folder sits at `$EXO_HOME/downloads/<org>--<repo>/`, and exo's file-list cache and the
safetensors index sit in `$TMPDIR/exo/` where its downloader looks first (docs/exo.md, mixed cluster).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the repo the launcher's tinygrad card names

# llama.cpp tensor names -> Hugging Face names (per layer: "blk.{i}.<gguf>" -> "model.layers.{i}.<hf>")
LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permutation reshape(n_head, 2, d/2, cols).swapaxes(1, 2) of Q/K rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_tensors(gguf_path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(float32 tensors by Hugging Face name, a LlamaForCausalLM config.json) of a llama-architecture GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    n_head, n_kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape([int(d) for d in reversed(t.shape.tolist())])
        if t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if rest == "attn_q.weight":
                a = _unpermute(a, n_head)
            elif rest == "attn_k.weight":
                a = _unpermute(a, n_kv)
            tensors[f"model.layers.{i}.{LAYER_NAMES[rest]}"] = np.ascontiguousarray(a)
        elif t.name in GLOBAL_NAMES:
            tensors[GLOBAL_NAMES[t.name]] = np.ascontiguousarray(a)
        elif t.name == "output.weight":
            tensors["lm_head.weight"] = np.ascontiguousarray(a)
    dim = int(field("llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "intermediate_size": int(field("llama.feed_forward_length")), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "num_hidden_layers": int(field("llama.block_count")),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base")), "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "max_position_embeddings": int(field("llama.context_length")), "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in tensors, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    return tensors, config


def write_stock_model(gguf_path: Path, exo_home: Path, exo_tmp: Path, repo: str = SMOLLM2_REPO) -> Path:
    """Write `repo` as exo's downloader would have fetched it; returns the model folder."""
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    folder = exo_home / "downloads" / repo.replace("/", "--")
    folder.mkdir(parents=True, exist_ok=True)
    tensors, config = gguf_to_hf_tensors(gguf_path)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(folder))
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # exo's downloader: the index it fetches first (get_weight_map) and the repo's file list (cached per revision)
    (exo_tmp / "exo" / repo.replace("/", "--")).mkdir(parents=True, exist_ok=True)
    (exo_tmp / "exo" / repo.replace("/", "--") / "model.safetensors.index.json").write_text(json.dumps(index))
    files = [{"path": p.name, "size": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()]
    (exo_tmp / "exo" / f"{repo.replace('/', '--')}--main--file_list.json").write_text(json.dumps(files))
    return folder


def offline_env(exo_home: Path, exo_tmp: Path) -> dict[str, str]:
    """The environment of a node that must find the written model and never reach Hugging Face."""
    return dict(os.environ, EXO_HOME=str(exo_home), TMPDIR=str(exo_tmp), HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", PYTHONUNBUFFERED="1")
