"""Tensors as they cross a ring: raw bytes + shape + numpy dtype string, exactly like exo's gRPC Tensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exo_rknpu.errors import TensorContractError

WIRE_DTYPES = ("float16", "float32", "int32", "int64")


@dataclass(frozen=True)
class WireTensor:
    data: bytes
    shape: tuple[int, ...]
    dtype: str


def to_wire(x: np.ndarray, dtype: str | None = None) -> WireTensor:
    """Serialize (optionally casting floats to `dtype`, e.g. "float16" to halve the hop)."""
    if dtype is not None and np.issubdtype(x.dtype, np.floating):
        x = x.astype(dtype)
    if str(x.dtype) not in WIRE_DTYPES:
        raise TensorContractError(f"dtype {x.dtype} cannot go on the wire; use one of {WIRE_DTYPES}")
    return WireTensor(np.ascontiguousarray(x).tobytes(), tuple(int(d) for d in x.shape), str(x.dtype))


def from_wire(t: WireTensor) -> np.ndarray:
    """Deserialize like exo's receiver does: a read-only view over the bytes."""
    try:
        dt = np.dtype(t.dtype)
    except TypeError:
        raise TensorContractError(f"unknown dtype {t.dtype!r} on the wire (expected one of {WIRE_DTYPES})") from None
    return np.frombuffer(t.data, dtype=dt).reshape(t.shape)
