"""Input/output marshalling for compiled RKNN slices, shared by the board backend (RKNNLite) and the
simulator (rknn-toolkit2, in the toolkit's own venv).

numpy and the standard library only: the toolkit worker imports this module inside a numpy<=1.26 venv
without onnx/onnxruntime, and the board imports it next to rknnlite.

Conventions (checked in the simulator, see docs/compiler.md):
- inputs are passed in the ONNX graph's order, each in the dtype and layout the compiled file records for it
  (`io`, read from the .rknn at compile time by `read_io`: float16 for fp16 builds; 4-D inputs "NHWC", others
  "UNDEFINED"). A 4-D input is handed over as NHWC (data_format 'nhwc'); when its channel axis is 1 (the NPU form's
  cos/sin/mask) NCHW and NHWC are the same bytes, so that is a view, not a transpose;
- without recorded attributes (older callers), inputs go as float32 with data_format 'nchw';
- outputs come back in graph order; they are reshaped to the slice's output shapes (float32 copies).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import json
import re

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
                names: Sequence[str] | None = None, io: Mapping[str, Mapping[str, str]] | None = None,
                ) -> tuple[list[np.ndarray], list[str]]:
    """Named inputs -> (arrays in graph order, data_format list) for RKNN(Lite).inference.

    `shapes` (name -> shape) are the shapes the compiled file accepts for this bucket (graph order, NCHW); a
    mismatch raises MarshalError naming the input, the shape given and the shape expected. `names`: the graph's
    input order when neither the kind nor `shapes` gives it. `io` (name -> {"dtype", "layout"}): what the compiled
    file records for each input; each array is converted to that dtype (no copy when it already is) and a 4-D
    "NHWC" input is handed over in NHWC.
    """
    names = slice_names(kind, names if names is not None else shapes, SLICE_INPUTS)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise MarshalError(f"{kind} slice needs inputs {list(names)}; missing {missing}")
    arrays: list[np.ndarray] = []
    formats: list[str] = []
    for n in names:
        a = np.asarray(inputs[n])
        rec = (io or {}).get(n)
        want = np.int64 if n in INT_INPUTS else np.dtype(rec["dtype"]) if rec else np.float32
        a = np.ascontiguousarray(a, dtype=want)
        if shapes is not None and tuple(a.shape) != tuple(shapes[n]):
            raise MarshalError(f"input {n!r} has shape {tuple(a.shape)}, the compiled slice expects {tuple(shapes[n])}")
        fmt = DATA_FORMAT
        if rec and rec.get("layout") == "NHWC" and a.ndim == 4:
            # one channel: NCHW and NHWC are the same bytes (a view); otherwise RKNNLite would transpose it anyway
            a = a.reshape(a.shape[0], a.shape[2], a.shape[3], 1) if a.shape[1] == 1 else np.ascontiguousarray(a.transpose(0, 2, 3, 1))
            fmt = "nhwc"
        arrays.append(a)
        formats.append(fmt)
    return arrays, formats


def data_types(arrays: Sequence[np.ndarray]) -> list[str]:
    """RKNNLite's per-input `data_type` names of packed arrays (float16, float32, int8, uint8, int16)."""
    return [a.dtype.name for a in arrays]


_IO_BLOCK = re.compile(rb'\{"[^"]+": \{"dtype": "[a-z0-9]+", "layout": "[A-Z]+"\}(?:, "[^"]+": \{"dtype": "[a-z0-9]+", "layout": "[A-Z]+"\})*\}')


def read_io(rknn_bytes: bytes, inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, dict[str, dict[str, str]]]:
    """The dtype and layout a compiled .rknn records for each input and output (two JSON blocks in the file, e.g.
    {"past_k": {"dtype": "float16", "layout": "UNDEFINED"}, ...}). MarshalError if the file has no such blocks."""
    found: dict[str, dict[str, dict[str, str]]] = {}
    for m in _IO_BLOCK.finditer(rknn_bytes):
        block = json.loads(m.group(0))
        for side, names in (("inputs", inputs), ("outputs", outputs)):
            if set(block) == set(names):
                found[side] = {n: block[n] for n in names}
    if set(found) != {"inputs", "outputs"}:
        raise MarshalError(f"the compiled file records no input/output attributes for {list(inputs)} -> {list(outputs)}")
    return found


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
