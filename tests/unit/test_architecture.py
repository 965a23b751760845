"""The dependency direction of the package: native -> model -> slices -> backends -> runtime -> rknn -> engine -> exo -> bench -> cli.

Each module may import only from its own layer or layers to its left; only exo_rknpu/exo imports exo.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "exo_rknpu"
ORDER = ["errors", "config", "native", "model", "slices", "backends", "runtime", "rknn", "engine", "exo", "bench", "cli"]
SHARED = {"errors", "config", "fileio", "__init__"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_imports_point_one_way():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mine = layer_of(".".join(rel.parts))
        if mine in SHARED:
            continue
        for mod in imports(path):
            if not mod.startswith("exo_rknpu."):
                continue
            theirs = layer_of(mod)
            if theirs in SHARED:
                continue
            if ORDER.index(theirs) > ORDER.index(mine):
                bad.append(f"{rel} imports {mod}")
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_only_the_exo_adapter_imports_exo():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "exo":
            continue
        for mod in imports(path):
            if mod == "exo" or mod.startswith("exo."):
                bad.append(f"{rel} imports {mod}")
    assert not bad, "\n".join(bad)


def test_peer_libraries_are_imported_only_by_the_bench_worker():
    """torch, transformers and llama_cpp are benchmark peers, never runtime dependencies."""
    peers = ("torch", "transformers", "accelerate", "llama_cpp")
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.as_posix() == "bench/worker.py":
            continue
        for mod in imports(path):
            if mod.split(".")[0] in peers:
                bad.append(f"{rel} imports {mod}")
    assert not bad, "\n".join(bad)


def test_rknn_toolkit_and_runtime_are_imported_only_in_the_rknn_room():
    """All RKNN code lives in rknn/; backends/board.py's probe child (init_runtime on one file) is the exception."""
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("rknn/") or rel == "backends/board.py":
            continue
        bad += [f"{rel} imports {mod}" for mod in imports(path) if mod.split(".")[0] in ("rknn", "rknnlite")]
    assert not bad, "\n".join(bad)


def test_request_records_are_bounded_by_the_one_helper():
    """Maps that forget their oldest entries are runtime/requests.py::BoundedMap, not hand-written trimming loops."""
    bad = [path.relative_to(PKG).as_posix() for path in PKG.rglob("*.py")
           if "popitem(last=False)" in path.read_text() and path.relative_to(PKG).as_posix() != "runtime/requests.py"]
    assert not bad, bad
