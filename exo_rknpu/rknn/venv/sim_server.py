"""Runs INSIDE the rknn-toolkit2 venv: the long-lived simulator process of the `rknn-sim` backend.

    python -m exo_rknpu.rknn.venv.worker --serve      (rknn/venv/worker.py::serve_simulator calls `serve` below)

Started by rknn/sim.py with stdin/stdout as pipes and stderr going to a log file. The build step is the
compiler's own recipe (rknn/venv/worker.py::build_rknn), handed to `serve`, so the simulator runs exactly what
`exo-rknpu compile` would export. This module imports only the standard library and numpy.

The protocol's messages (both directions) are framed by `send`/`recv` below: a 4-byte little-endian length, a
JSON header, then the raw C-order bytes of each array listed in header["arrays"] ([{dtype, shape}]). Raw bytes
rather than pickle: the parent runs numpy 2, this venv numpy 1.26.

Requests:  {"op": "build", "id": h, "build": {compiler build spec}}   -> {"ok", "build_s", "init_s", ...}
           {"op": "run", "id": h, "data_format": [...]} + input arrays  -> {"ok"} + output arrays
           {"op": "release", "id": h} | {"op": "exit"} | {"op": "ping"}
Failures answer {"ok": false, "error": "..."}; the process keeps serving.

Native output of librknnc/the simulator goes to fd 1/2, so fd 1 is moved to the log file at start-up and the
protocol uses a private duplicate of the original stdout. The process exits when stdin closes or its parent dies.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, BinaryIO, Callable

_LEN = struct.Struct("<I")


def _read_exact(f: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def send(f: BinaryIO, header: dict[str, Any], arrays: list | None = None) -> None:
    import numpy as np

    arrays = [np.ascontiguousarray(a) for a in (arrays or [])]
    header = dict(header, arrays=[{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays])
    body = json.dumps(header).encode()
    f.write(_LEN.pack(len(body)) + body)
    for a in arrays:
        f.write(a.tobytes())
    f.flush()


def recv(f: BinaryIO) -> tuple[dict[str, Any], list] | None:
    """One message, or None at end of stream."""
    import numpy as np

    head = _read_exact(f, _LEN.size)
    if head is None:
        return None
    body = _read_exact(f, _LEN.unpack(head)[0])
    if body is None:
        return None
    header = json.loads(body)
    arrays = []
    for spec in header.get("arrays", []):
        dt = np.dtype(spec["dtype"])
        n = int(np.prod(spec["shape"], dtype=np.int64)) * dt.itemsize
        raw = _read_exact(f, n)
        if raw is None:
            return None
        arrays.append(np.frombuffer(raw, dt).reshape(spec["shape"]).copy())
    return header, arrays


def serve(inp: BinaryIO, out: BinaryIO, build: Callable[[dict], tuple[Any, dict]]) -> None:
    """Answer requests until "exit" or end of input. `build(spec) -> (RKNN ready for inference, result dict)` is
    the compiler's recipe (rknn/venv/worker.py::build_for_simulator), passed in so this module stays below it."""
    models: dict[str, Any] = {}
    send(out, {"ok": True, "op": "ready", "pid": os.getpid()})
    while True:
        msg = recv(inp)
        if msg is None:
            break
        req, arrays = msg
        op = req.get("op")
        try:
            if op == "exit":
                send(out, {"ok": True})
                break
            if op == "ping":
                send(out, {"ok": True, "pid": os.getpid()})
            elif op == "build":
                rk, res = build(req["build"])
                old = models.pop(req["id"], None)
                if old is not None:
                    old.release()
                models[req["id"]] = rk
                send(out, res)
            elif op == "run":
                rk = models.get(req["id"])
                if rk is None:
                    raise KeyError(f"no model {req['id']!r} built in this worker")
                outs = rk.inference(inputs=arrays, data_format=req["data_format"])
                if outs is None:
                    raise RuntimeError("simulator inference returned None (see the worker log)")
                send(out, {"ok": True}, list(outs))
            elif op == "release":
                rk = models.pop(req["id"], None)
                if rk is not None:
                    rk.release()
                send(out, {"ok": True})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:
            send(out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
    for rk in models.values():
        rk.release()
