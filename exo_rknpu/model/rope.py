"""Rotary position tables, computed on the host so graphs stay free of position logic."""

from __future__ import annotations

import math

import numpy as np

from exo_rknpu.model.base import ModelArgs


def inv_freq(args: ModelArgs) -> np.ndarray:
    """Inverse frequencies [hd/2], with llama3-style scaling when the model asks for it."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    s = args.rope_scaling
    if s is None:
        return freqs
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between (as in HF transformers).
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_mid, mid, scaled)


def cos_sin(args: ModelArgs, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [1,1,len(positions),hd] (float32), HF rotate-half layout."""
    f = np.outer(positions.astype(np.float64), inv_freq(args))
    emb = np.concatenate([f, f], axis=-1)
    return (np.cos(emb).astype(np.float32)[None, None], np.sin(emb).astype(np.float32)[None, None])
