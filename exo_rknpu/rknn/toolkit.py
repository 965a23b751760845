"""The rknn-toolkit2 environment: a virtualenv under Paths.toolkit that this package creates and checks.

rknn-toolkit2 2.5.0 pins numpy<=1.26.4 and imports torch at module load, so it can never share the runtime's
environment. The compiler runs there as a subprocess (rknn/venv/worker.py); nothing here imports rknn.

Install recipe (see docs/compiler.md for why):
  python -m venv DIR
  pip install --no-deps rknn-toolkit2==2.5.0          # its torch<=2.4 pin would pull the 3 GB CUDA build
  pip install <its other requirements> torch==2.13.0 "setuptools<80.1.0"   # CPU torch; setuptools>=80.1 drops pkg_resources
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from exo_rknpu.config import Paths, toolkit_threads
from exo_rknpu.errors import ToolkitMissingError

TOOLKIT_VERSION = "2.5.0"
TOOLKIT_REQ = f"rknn-toolkit2=={TOOLKIT_VERSION}"
# rknn-toolkit2 2.5.0's own Requires-Dist, minus torch (installed separately, CPU build) and plus the setuptools pin.
TOOLKIT_DEPS = [
    "protobuf<=4.25.4,>=4.21.6",
    "psutil>=5.9.0",
    "ruamel.yaml>=0.17.21",
    "scipy>=1.9.3",
    "tqdm>=4.64.1",
    "opencv-python>=4.5.5.64",
    "fast-histogram>=0.11",
    "numpy<=1.26.4",
    "onnx<=1.18.0,>=1.16.1",
    "onnxruntime>=1.17.0",
    "torch==2.13.0",
    "setuptools<80.1.0",
]
INSTALL_HINT = "run: exo-rknpu toolkit install"
STAMP = Paths(Path()).toolkit_stamp.name  # written last by install: its presence means the install finished

# Printed by the probe inside the venv; it must import what the worker imports.
_PROBE = (
    "import json, numpy, onnx, onnxruntime\n"
    "from rknn.api import RKNN\n"
    "from importlib.metadata import version\n"
    "print(json.dumps({'rknn': version('rknn-toolkit2'), 'numpy': numpy.__version__, 'onnx': onnx.__version__,"
    " 'onnxruntime': onnxruntime.__version__, 'torch': version('torch'), 'setuptools': version('setuptools')}))\n"
)


@dataclass
class ToolkitStatus:
    path: str
    installed: bool
    ok: bool
    versions: dict
    problem: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def venv_dir(paths: Paths | None = None) -> Path:
    return (paths or Paths.from_env()).toolkit_venv


def venv_python(paths: Paths | None = None) -> Path:
    return (paths or Paths.from_env()).toolkit_python


def _run(cmd: list[str], log: Callable[[str], None], timeout: float = 1800) -> None:
    log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolkitMissingError(f"toolkit install step did not finish within {timeout:g} s: {' '.join(cmd)}; "
                                  "check network access to PyPI and retry") from None
    if p.returncode != 0:
        tail = "\n".join(p.stdout.strip().splitlines()[-15:])
        raise ToolkitMissingError(f"toolkit install step failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")


def install(paths: Paths | None = None, force: bool = False, log: Callable[[str], None] = lambda m: None) -> ToolkitStatus:
    """Create (or recreate with force) the toolkit venv. Idempotent: a finished, working install is kept."""
    paths = paths or Paths.from_env()
    vdir = venv_dir(paths)
    if not force:
        st = status(paths)
        if st.ok:
            log(f"toolkit already installed at {vdir} (rknn-toolkit2 {st.versions.get('rknn')})")
            return st
    # Build in a sibling temp dir and rename at the end, so an interrupted install never looks finished.
    tmp = vdir.with_name(vdir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(tmp)], log)
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(pip + ["--no-deps", TOOLKIT_REQ], log)
    _run(pip + TOOLKIT_DEPS, log)
    # venv scripts hold absolute paths: we only ever call bin/python -m ..., which works after the rename.
    shutil.rmtree(vdir, ignore_errors=True)
    os.replace(tmp, vdir)
    st = status(paths, probe=True)
    if not st.ok:
        raise ToolkitMissingError(f"toolkit installed at {vdir} but does not work: {st.problem}")
    (vdir / STAMP).write_text(json.dumps({"versions": st.versions, "install_seconds": round(time.monotonic() - t0, 1)}))
    log(f"toolkit installed in {time.monotonic() - t0:.0f} s: {st.versions}")
    return status(paths)


def status(paths: Paths | None = None, probe: bool = False) -> ToolkitStatus:
    """Is the toolkit venv there and does `from rknn.api import RKNN` work in it? probe=True always runs the import."""
    vdir = venv_dir(paths)
    py = venv_python(paths)
    if not py.exists():
        return ToolkitStatus(str(vdir), False, False, {}, f"no toolkit environment at {vdir}; {INSTALL_HINT}")
    stamp = vdir / STAMP
    if stamp.exists() and not probe:
        try:
            return ToolkitStatus(str(vdir), True, True, json.loads(stamp.read_text())["versions"])
        except (ValueError, KeyError):
            pass
    try:
        p = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return ToolkitStatus(str(vdir), True, False, {}, f"cannot run {py}: {e}; {INSTALL_HINT} --force")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return ToolkitStatus(str(vdir), True, False, {}, f"rknn does not import in {vdir}: {last}; {INSTALL_HINT} --force")
    versions = json.loads(p.stdout.strip().splitlines()[-1])
    if versions.get("rknn") != TOOLKIT_VERSION:
        return ToolkitStatus(str(vdir), True, False, versions,
                             f"rknn-toolkit2 {versions.get('rknn')} found, {TOOLKIT_VERSION} needed; {INSTALL_HINT} --force")
    return ToolkitStatus(str(vdir), True, True, versions)


def worker_env() -> dict[str, str]:
    """The environment of every process this package runs in the toolkit venv (compile's build worker, rknn-sim's
    server): this package on PYTHONPATH and nothing of the host venv, a minimal PATH, OpenMP at config.toolkit_threads."""
    pkg_root = Path(__file__).resolve().parent.parent.parent
    return {"PYTHONPATH": str(pkg_root), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
            "OMP_NUM_THREADS": str(toolkit_threads())}


def worker_argv(python: Path, *args: str) -> list[str]:
    """The command line of the toolkit worker (rknn/venv/worker.py): a job file, or --serve for rknn-sim."""
    return [str(python), "-m", "exo_rknpu.rknn.venv.worker", *args]


def require(paths: Paths | None = None) -> tuple[Path, dict]:
    """The toolkit python and its versions, or ToolkitMissingError naming the command to run."""
    st = status(paths)
    if not st.ok:
        raise ToolkitMissingError(f"the rknn-toolkit2 environment is not usable: {st.problem}")
    return venv_python(paths), st.versions
