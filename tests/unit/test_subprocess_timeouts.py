"""Every subprocess the package waits for has a time limit, and running into it is a clear error, not a hang."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import exo_rknpu
from exo_rknpu.errors import CompileError, ToolkitMissingError

PACKAGE = Path(exo_rknpu.__file__).parent
WAITING_CALLS = {"run", "call", "check_call", "check_output"}
# Popen users bound every wait themselves; the reason is written here, next to the exemption.
POPEN_ALLOWED = {
    "rknn/sim.py": "SimWorker reads every reply against a deadline (start_timeout / run_timeout / build_timeout)",
}


def subprocess_calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"):
                yield path.relative_to(PACKAGE).as_posix(), node


def test_every_waited_for_subprocess_has_a_timeout():
    missing = [f"{rel}:{node.lineno} subprocess.{node.func.attr}" for rel, node in subprocess_calls()
               if node.func.attr in WAITING_CALLS and not any(k.arg == "timeout" for k in node.keywords)]
    assert not missing, missing


def test_popen_is_used_only_where_waits_are_bounded_by_hand():
    users = {rel for rel, node in subprocess_calls() if node.func.attr == "Popen"}
    assert users <= set(POPEN_ALLOWED), users - set(POPEN_ALLOWED)


def hanging_python(tmp_path: Path) -> Path:
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\nexec sleep 30\n")
    exe.chmod(0o755)
    return exe


def test_a_hung_compiler_worker_is_a_compile_error(tmp_path):
    from exo_rknpu.rknn.compile import _run_worker

    job = {"builds": [{"name": "layers.4", "log": str(tmp_path / "b.log")}], "result": str(tmp_path / "r.json")}
    with pytest.raises(CompileError, match="did not finish within 0.5 s"):
        _run_worker(hanging_python(tmp_path), job, tmp_path, timeout_per_build=0.5)


def test_a_hung_toolkit_install_step_is_a_toolkit_error(tmp_path):
    from exo_rknpu.rknn.toolkit import _run

    with pytest.raises(ToolkitMissingError, match="did not finish within"):
        _run([str(hanging_python(tmp_path))], lambda m: None, timeout=0.5)
