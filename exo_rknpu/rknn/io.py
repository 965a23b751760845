"""Input/output marshalling for compiled RKNN slices, shared by the board backend (RKNNLite) and the
simulator (rknn-toolkit2, in the toolkit's own venv).

numpy and the standard library only: the toolkit worker imports this module inside a numpy<=1.26 venv
without onnx/onnxruntime, and the board imports it next to rknnlite.

Conventions (checked in the simulator, see docs/compiler.md):
- inputs are passed in the ONNX graph's order, as C-contiguous float32 (token ids int64);
- every input gets data_format 'nchw': RKNN otherwise takes 4-D inputs as NHWC and rejects or transposes them;
- outputs come back float32 (fp16 models) in graph order; they are reshaped to the slice's output shapes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# Same names and order as slices/spec.py (LAYER_INPUTS/LAYER_OUTPUTS) and the ONNX graphs of build_onnx;
# repeated here so this module imports nothing but numpy. tests/toolkit checks they agree.
SLICE_INPUTS: dict[str, tuple[str, ...]] = {
    "embed": ("token_ids",),
    "head": ("hidden",),
    "layers": ("hidden", "cos", "sin", "mask", "past_k", "past_v"),
}
SLICE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "embed": ("hidden",),
    "head": ("logits",),
    "layers": ("hidden_out", "k_new", "v_new"),
}
INT_INPUTS = frozenset({"token_ids"})
DATA_FORMAT = "nchw"


class MarshalError(ValueError):
    """Inputs do not match what the compiled slice expects."""


def slice_names(kind: str, shapes: Mapping[str, Sequence[int]] | Sequence[str] | None, known: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Graph order of a slice's inputs or outputs: the fixed names of its kind, or (a slice of some blocks of a
    layer, slices/spec.py) the order of its compiled shapes."""
    if shapes is None or set(shapes) == set(known[kind]):
        return known[kind]
    return tuple(shapes)


def pack_inputs(kind: str, inputs: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]] | None = None,
                names: Sequence[str] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Named inputs -> (arrays in graph order, data_format list) for RKNN(Lite).inference.

    `shapes` (name -> shape) are the shapes the compiled file accepts for this bucket; when given, a mismatch
    raises MarshalError naming the input, the shape given and the shape expected. `names`: the graph's input
    order when neither the kind nor `shapes` gives it.
    """
    names = slice_names(kind, names if names is not None else shapes, SLICE_INPUTS)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise MarshalError(f"{kind} slice needs inputs {list(names)}; missing {missing}")
    arrays: list[np.ndarray] = []
    for n in names:
        a = np.asarray(inputs[n])
        want = np.int64 if n in INT_INPUTS else np.float32
        a = np.ascontiguousarray(a, dtype=want)
        if shapes is not None and tuple(a.shape) != tuple(shapes[n]):
            raise MarshalError(f"input {n!r} has shape {tuple(a.shape)}, the compiled slice expects {tuple(shapes[n])}")
        arrays.append(a)
    return arrays, [DATA_FORMAT] * len(arrays)


def unpack_outputs(kind: str, outputs: Sequence[np.ndarray], shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """RKNN output list (graph order) -> named float32 arrays of the slice's output shapes."""
    names = slice_names(kind, shapes, SLICE_OUTPUTS)
    if len(outputs) != len(names):
        raise MarshalError(f"{kind} slice returned {len(outputs)} outputs, expected {len(names)} ({list(names)})")
    out: dict[str, np.ndarray] = {}
    for n, a in zip(names, outputs):
        a = np.asarray(a)
        shape = tuple(shapes[n])
        if a.size != int(np.prod(shape)):
            raise MarshalError(f"output {n!r} has {a.size} values ({a.shape}); expected shape {shape}")
        # copy: RKNNLite(reuse_outputs=True) hands out views of buffers the next call overwrites
        out[n] = np.array(a.reshape(shape), dtype=np.float32, copy=True)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity in float64 (1.0 for two all-zero arrays)."""
    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return float(x @ y / (nx * ny))


def shape_key(shapes: Mapping[str, Sequence[int]], kind: str) -> str:
    """Stable text key of one bucket's input shapes, e.g. 'hidden=1x16x576;cos=...'."""
    return ";".join(f"{n}={'x'.join(str(d) for d in shapes[n])}" for n in SLICE_INPUTS[kind])
