"""Runs INSIDE the rknn-toolkit2 venv (python -m exo_rknpu.rknn.venv.worker JOB.json), started by compile.py.

Imports only the standard library, numpy, rknn and exo_rknpu.rknn.io (numpy-only). Everything it
needs comes in the job file; everything it produces goes to files named there:

  job = {"result": path, "builds": [{
      "name", "kind", "onnx", "out" (where to write the .rknn), "log", "workdir", "platform",
      "dtype": "fp16" | "w8a8",
      "dynamic_input": [[shape per input] per bucket] | null,   # null: static ONNX shapes
      "calib": [[abs .npy path per input] per sample],          # w8a8 only
      "verify": [[inputs .npz, outputs .npz to write], ...],
      "out_shapes": [{output name: shape}, ...] (one per verify sample)}]}

Native compiler output (the verbose layer table and warnings) is written to fd 1/2 by librknnc, so each build
redirects those file descriptors into its log file; the parent parses it (rknn/buildlog.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _redirect(path: str):
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = (os.dup(1), os.dup(2))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore(saved) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def _check(ret, what: str) -> None:
    if ret != 0:
        raise RuntimeError(f"{what} returned {ret}")


# w8a8 hybrid policies (which ops stay int8; every other op is float16). See docs/compiler.md for the figures.
#   "linear":           every linear layer (rknn's Conv from a MatMul, named matmul_*) in int8
#   "linear-fp16-down": the same, but the MLP down-projection (the linear layer fed by the gate*up product,
#                       whose input carries the model's outlier activations) stays float16
#   "mlp-gate-up":      only the MLP gate and up projections (the Convs whose output feeds the SiLU/Mul) in int8
#   "linear-fp16-gate-down": like "linear-fp16-down", and the MLP gate projection (the Conv feeding the SiLU) also
#                       stays float16: its output carries outliers that no weight transform can move (SiLU follows)
# Other Convs the compiler makes (e.g. repeat_kv's Gather->Conv over the KV cache) are never quantized.
# The policy names are slices/recipe.py::POLICIES (stdlib-only module, importable in the toolkit venv); the policy
# itself always comes from the job (the w8a8 recipe), never from a default here.
from exo_rknpu.slices.recipe import POLICIES as QUANT_POLICIES  # noqa: E402


def _int8_convs(m, policy: str) -> set[str]:
    """Names of the Conv nodes quantized to int8 under `policy` (step 1's .model graph)."""
    if policy not in QUANT_POLICIES:
        raise ValueError(f"unknown quantization policy {policy!r}; choose one of {', '.join(QUANT_POLICIES)}")
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = set()
    for n in m.graph.node:
        if n.op_type != "Conv" or not n.name.startswith("matmul"):
            continue
        src = producer.get(n.input[0])
        if policy in ("linear-fp16-down", "mlp-gate-up", "linear-fp16-gate-down") and src is not None and src.op_type == "Mul":
            continue  # down_proj: its input is silu(gate) * up
        if policy == "linear-fp16-gate-down" and any(c.op_type in ("exSwish", "Sigmoid") for c in consumers.get(n.output[0], [])):
            continue  # gate_proj: its output goes through the SiLU
        if policy == "mlp-gate-up" and not any(c.op_type in ("Mul", "exSwish", "Sigmoid") for c in consumers.get(n.output[0], [])):
            continue  # q/k/v (-> Reshape) and o_proj (-> Add): float16
        out.add(n.name)
    return out


def _hybrid_cfg(model_path: str, cfg_path: str, out_path: str, policy: str) -> tuple[list[str], list[list[int]]]:
    """Write step 2's config: every op output float16 except the int8 linear layers that `policy` picks.
    Returns the tensors kept float16 and the weight shapes of the int8 Convs ([out, in], sorted: what the
    manifest records, so a test can check the policy picked the recipe's linears)."""
    import onnx  # the toolkit venv has onnx (a toolkit dependency); the .model file of step 1 is ONNX

    m = onnx.load(model_path)
    int8 = _int8_convs(m, policy)
    dims = {t.name: list(t.dims[:2]) for t in m.graph.initializer}
    shapes = sorted(dims.get(n.input[1], []) for n in m.graph.node if n.name in int8)
    keep = [n.output[0] for n in m.graph.node if n.op_type != "exDataConvert" and n.name not in int8]
    text = open(cfg_path).read()
    head = "custom_quantize_layers: {}\n"
    if head not in text:
        raise RuntimeError(f"unexpected hybrid quantization config format in {cfg_path}")
    body = "custom_quantize_layers:\n" + "".join(f"    '{n}': float16\n" for n in keep) if keep else head
    with open(out_path, "w") as f:
        f.write(text.replace(head, body, 1))
    return keep, shapes


def build_rknn(b: dict, res: dict):
    """config + load_onnx + build (fp16) or hybrid quantization (w8a8) of build spec `b`: the one recipe used by
    the compiler (build_one below) and by the rknn-sim backend's worker (rknn/venv/sim_server.py).

    Changes the cwd to b["workdir"] (hybrid_quantization_step1 writes there). Returns the RKNN object, built and
    ready for export_rknn / init_runtime; fills res["build_s"] (and res["fp16_tensors"], res["int8_convs"] for w8a8).
    """
    from rknn.api import RKNN

    t0 = time.monotonic()
    os.makedirs(b["workdir"], exist_ok=True)
    os.chdir(b["workdir"])
    rk = RKNN(verbose=True)
    try:
        cfg: dict = {"target_platform": b["platform"]}
        if b.get("dynamic_input"):
            cfg["dynamic_input"] = b["dynamic_input"]
        if b["dtype"] == "w8a8" and b.get("quantized_algorithm"):
            cfg["quantized_algorithm"] = b["quantized_algorithm"]  # rknn: normal (min/max, default) | mmse | kl_divergence
        _check(rk.config(**cfg), "config")
        _check(rk.load_onnx(b["onnx"]), "load_onnx")
        if b["dtype"] == "fp16":
            _check(rk.build(do_quantization=False), "build")
        elif b["dtype"] == "w8a8":
            ds = os.path.join(b["workdir"], "dataset.txt")
            with open(ds, "w") as f:  # absolute paths: relative ones resolve against the dataset's folder
                f.write("".join(" ".join(sample) + "\n" for sample in b["calib"]))
            _check(rk.hybrid_quantization_step1(dataset=ds), "hybrid_quantization_step1")
            stem = os.path.splitext(os.path.basename(b["onnx"]))[0]
            policy = b["quant_policy"]  # from the w8a8 recipe
            keep, res["int8_convs"] = _hybrid_cfg(f"{stem}.model", f"{stem}.quantization.cfg", "hybrid.cfg", policy)
            res["fp16_tensors"], res["quant_policy"] = len(keep), policy
            rk.release()
            rk = RKNN(verbose=True)
            _check(rk.hybrid_quantization_step2(model_input=f"{stem}.model", data_input=f"{stem}.data",
                                                model_quantization_cfg="hybrid.cfg"), "hybrid_quantization_step2")
        else:
            raise ValueError(f"unknown dtype {b['dtype']!r}")
    except BaseException:
        rk.release()
        raise
    res["build_s"] = time.monotonic() - t0
    return rk


def build_one(b: dict) -> dict:
    import numpy as np

    from exo_rknpu.rknn import io as rknn_io

    res: dict = {"name": b["name"], "ok": False}
    t0 = time.monotonic()
    saved = _redirect(b["log"])
    try:
        rk = build_rknn(b, res)
        _check(rk.export_rknn(b["out"]), "export_rknn")
        if b.get("verify"):
            _check(rk.init_runtime(), "init_runtime (simulator)")
            t1 = time.monotonic()
            with open(b["out"], "rb") as f:  # inputs go in as the exported file records them, as on the board
                io = rknn_io.read_io(f.read(), b["inputs"], list(b["out_shapes"][0]))["inputs"]
            for (inp, outp), shapes in zip(b["verify"], b["out_shapes"]):
                with np.load(inp) as z:
                    arrays, fmt = rknn_io.pack_inputs(b["kind"], {k: z[k] for k in z.files}, names=b.get("inputs"), io=io)
                outs = rk.inference(inputs=arrays, data_format=fmt)
                if outs is None:
                    raise RuntimeError("simulator inference returned None (see the log)")
                named = rknn_io.unpack_outputs(b["kind"], outs, shapes)
                np.savez(outp, **named)
            res["sim_s"] = time.monotonic() - t1
        rk.release()
        res["ok"] = True
    except BaseException as e:  # reported to the parent, which raises CompileError with the log's tail
        res["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        _restore(saved)
    res["total_s"] = time.monotonic() - t0
    return res


def exit_with_parent(interval: float = 1.0) -> None:
    """Daemon thread: end this process (os._exit) as soon as its parent is gone, so no orphan keeps building."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(job_path: str) -> int:
    exit_with_parent()
    with open(job_path) as f:
        job = json.load(f)
    results = []
    for b in job["builds"]:
        results.append(build_one(b))
        tmp = job["result"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"results": results}, f)
        os.replace(tmp, job["result"])
        if not results[-1]["ok"]:
            break
    return 0 if all(r["ok"] for r in results) else 1


def build_for_simulator(b: dict) -> tuple:
    """The rknn-sim worker's build step: the compiler's recipe, then init_runtime() (simulator); logs to b["log"]."""
    res: dict = {"ok": True}
    saved = _redirect(b["log"])
    try:
        rk = build_rknn(b, res)
        t = time.monotonic()
        try:
            out = os.path.join(b["workdir"], "model.rknn")  # exported only to read what it records for each input
            _check(rk.export_rknn(out), "export_rknn")
            from exo_rknpu.rknn import io as rknn_io

            with open(out, "rb") as f:
                res["io"] = rknn_io.read_io(f.read(), b["inputs"], b["outputs"])
            os.unlink(out)
            _check(rk.init_runtime(), "init_runtime (simulator)")
        except BaseException:
            rk.release()
            raise
        res["init_s"] = time.monotonic() - t
        res.setdefault("quant_policy", None)
        return rk, res
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        _restore(saved)


def serve_simulator() -> int:
    """`python -m exo_rknpu.rknn.venv.worker --serve`: the long-lived process of the rknn-sim backend."""
    from exo_rknpu.rknn.venv import sim_server

    exit_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stderr is the worker log: native compiler/simulator output goes there, never into the protocol
    sim_server.serve(sys.stdin.buffer, out, build_for_simulator)
    return 0


if __name__ == "__main__":
    sys.exit(serve_simulator() if sys.argv[1:] == ["--serve"] else main(sys.argv[1]))
