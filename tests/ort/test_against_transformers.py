"""An independent oracle: Hugging Face transformers (torch) on the same tiny model folders.

Skipped when the `bench` extra (transformers + torch) is not installed; the runtime never needs it.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import nmse, ring
from tiny_models import make_tiny_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]


def hf_logits(path) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits.numpy()


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", {"n_layers": 5}),
        ("qwen2", {"n_layers": 3, "tied": True}),
        ("llama", {"n_layers": 2, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    ],
)
def test_split_onnx_logits_match_transformers(tmp_path, arch, kw):
    path = make_tiny_hf(tmp_path / arch, arch=arch, seed=7, **kw)
    ours = ring(path, f"0-0,1-{kw['n_layers'] - 1}", "onnx").forward("r", np.array([PROMPT]), logits="all")
    ref = hf_logits(path)
    assert nmse(ours, ref) <= 1e-9
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))
