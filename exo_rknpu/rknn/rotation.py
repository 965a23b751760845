"""Orthogonal rotation of the residual stream (QuaRot / SpinQuant style), folded into the weights.

Per-tensor int8 activations lose the small channels when a few channels (or a few tokens' channels) are huge.
Rotating the residual stream by an orthogonal Q (x' = x Q) spreads every outlier over all channels; it is exact
in fp32 because every reader and writer of the residual stream is linear, once the RMSNorm weights are folded
into the linears that follow them (a weightless RMSNorm commutes with Q: ||x Q|| = ||x||):

- fold:   q/k/v columns * input_norm, gate/up columns * post_norm, lm_head columns * final_norm; norms = 1
- rotate: embedding E Q; readers (q/k/v, gate/up, lm_head) W Q; writers (o_proj, down_proj) Q^T W

The hidden state between slices is then in the rotated basis: every slice of the model must come from the same
rotated weights (the recipe is part of every cache key and manifest). The head gets an untied copy of lm_head;
the embedding table is rotated (a new array), never modified in place.

Q is a randomized Hadamard matrix (H diag(±1) / sqrt(n), Kronecker products of Sylvester and Paley-I orders:
576 = 12 x 48) or, kind "orthogonal", a seeded random orthogonal matrix (QR of a Gaussian).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from exo_rknpu.model.weights import LayerWeights, ShardWeights

KINDS = ("hadamard", "orthogonal")


def _paley_orders(limit: int) -> dict[int, int]:
    """Hadamard orders q+1 from Paley's first construction (q prime, q % 4 == 3), q+1 <= limit."""
    out = {}
    for q in range(3, limit):
        if q % 4 == 3 and all(q % d for d in range(2, int(q**0.5) + 1)):
            out[q + 1] = q
    return out


def _paley(q: int) -> np.ndarray:
    """Paley I: H = I + S, S = [[0, 1^T], [-1, Q]], Q[i, j] = legendre(j - i mod q); order q + 1, entries +-1."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if d in squares else -1 for d in range(1, q)], np.float64)
    qm = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = qm
    return np.eye(q + 1) + s


def hadamard(n: int) -> np.ndarray:
    """An n x n matrix of +-1 with H H^T = n I (Sylvester 2^k times one Paley-I order); ValueError if none found."""
    pow2 = n & -n
    rest = n // pow2
    core = np.ones((1, 1))
    if rest > 1:
        paley = _paley_orders(n + 1)
        # rest * 2^j = q + 1 for some j <= k (the remaining power of two goes to Sylvester)
        m = next((rest * (1 << j) for j in range(0, pow2.bit_length()) if rest * (1 << j) in paley), None)
        if m is None:
            # a product of two Paley orders (576 = 12 * 48)
            pair = next(((a, n // a) for a in sorted(paley) if n % a == 0 and n // a in paley), None)
            if pair is None:
                raise ValueError(f"no Hadamard matrix of order {n} from Sylvester/Paley-I products; use rotation kind 'orthogonal'")
            h = np.kron(_paley(paley[pair[0]]), _paley(paley[pair[1]]))
            assert np.allclose(h @ h.T, n * np.eye(n))
            return h
        core = _paley(paley[m])
        pow2 = n // m
    h = core
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    assert h.shape == (n, n) and np.allclose(h @ h.T, n * np.eye(n))
    return h


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> np.ndarray:
    """An orthogonal n x n float64 matrix: randomized Hadamard (random signs, seeded) or random orthogonal."""
    rng = np.random.default_rng(seed)
    if kind == "hadamard":
        signs = rng.choice([-1.0, 1.0], size=n)
        return hadamard(n) * signs[None, :] / np.sqrt(n)
    if kind == "orthogonal":
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))[None, :]
    raise ValueError(f"unknown rotation kind {kind!r}; choose one of {', '.join(KINDS)}")


def fold_norms(ws: ShardWeights) -> ShardWeights:
    """RMSNorm weights folded into the linears they feed; every norm weight becomes 1 (same fp32 function)."""
    f32 = np.float32
    layers = {}
    for i, lw in ws.layers.items():
        a, p = lw.input_norm.astype(np.float64), lw.post_norm.astype(np.float64)
        layers[i] = replace(lw, input_norm=np.ones_like(lw.input_norm), post_norm=np.ones_like(lw.post_norm),
                            q_proj=(lw.q_proj * a[None, :]).astype(f32), k_proj=(lw.k_proj * a[None, :]).astype(f32),
                            v_proj=(lw.v_proj * a[None, :]).astype(f32), gate_proj=(lw.gate_proj * p[None, :]).astype(f32),
                            up_proj=(lw.up_proj * p[None, :]).astype(f32))
    final_norm, lm_head = ws.final_norm, ws.lm_head
    if final_norm is not None and lm_head is not None:
        lm_head = (lm_head * final_norm.astype(np.float64)[None, :]).astype(f32)  # a new array: a tied table is untouched
        final_norm = np.ones_like(final_norm)
    return replace(ws, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _rotate_layer(lw: LayerWeights, q: np.ndarray) -> LayerWeights:
    f32 = np.float32
    read = {n: (getattr(lw, n).astype(np.float64) @ q).astype(f32) for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
    write = {n: (q.T @ getattr(lw, n).astype(np.float64)).astype(f32) for n in ("o_proj", "down_proj")}
    return replace(lw, **read, **write)


def rotate(ws: ShardWeights, q: np.ndarray) -> ShardWeights:
    """The residual stream rotated by `q` (orthogonal [H, H]): embedding, every layer and the head.

    Needs weightless norms (`fold_norms` first); raises ValueError otherwise, since a norm weight does not
    commute with the rotation."""
    norms = [lw.input_norm for lw in ws.layers.values()] + [lw.post_norm for lw in ws.layers.values()]
    if ws.final_norm is not None:
        norms.append(ws.final_norm)
    if any(not np.all(n == 1) for n in norms):
        raise ValueError("rotate() needs the RMSNorm weights folded into the linears first (fold_norms)")
    f32 = np.float32
    layers = {i: _rotate_layer(lw, q) for i, lw in ws.layers.items()}
    embed = None if ws.embed_tokens is None else (ws.embed_tokens.astype(np.float64) @ q).astype(f32)
    lm_head = None if ws.lm_head is None else (ws.lm_head.astype(np.float64) @ q).astype(f32)
    return replace(ws, layers=layers, embed_tokens=embed, lm_head=lm_head)
