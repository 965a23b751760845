"""Make the Llama-3.2-1B-shaped models the issue-19 figures use (random weights, nothing downloaded but the
llama.cpp source):

  1. an HF folder, bf16 safetensors, made by transformers: 16 layers, hidden 2048, 32 heads, 8 kv heads,
     intermediate 8192, tied embedding; vocab 49152 with smollm2-135m's tokenizer (the only tokenizer here);
  2. GGUF F16 by llama.cpp's own converter (`convert_hf_to_gguf.py` from llama-cpp-python's source archive,
     `vendor/llama.cpp`, run with PYTHONPATH=gguf-py:.),
  3. Q4_0 and Q8_0 by llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp && tar -C /tmp/lcp -xzf /tmp/lcp/*.tar.gz
    python docs/perf/make_1b.py OUT_DIR --llama-cpp-src /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from pathlib import Path


def make_hf(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from exo_rknpu.model.zoo import resolve_model

    folder = out / "llama-1b-shape"
    if (folder / "config.json").exists():
        return folder
    gguf = resolve_model("smollm2-135m").path
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=len(tok), tie_word_embeddings=True,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def convert(hf: Path, out: Path, src: Path) -> Path:
    f16 = out / "llama-1b-shape-F16.gguf"
    if not f16.exists():
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src), os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                        "--outfile", str(f16)], check=True, env=env)
    return f16


def quantize(f16: Path, out: Path, qtype: str) -> Path:
    import llama_cpp

    dst = out / f"llama-1b-shape-{qtype}.gguf"
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed ({rc}) for {qtype}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--llama-cpp-src", type=Path, required=True, help="vendor/llama.cpp of llama-cpp-python's sdist")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    hf = make_hf(a.out)
    f16 = convert(hf, a.out, a.llama_cpp_src)
    for q in ("Q4_0", "Q8_0"):
        print(quantize(f16, a.out, q))


if __name__ == "__main__":
    main()
