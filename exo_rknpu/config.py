"""Settings. This is the only module that reads environment variables, and only when asked."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's core count): the default thread
    count of onnxruntime's intra-op pool and of every bench contender (decode is memory-bound, and a pool larger
    than the cores only adds spinning)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def toolkit_threads() -> int:
    """OpenMP threads of the processes run in the rknn-toolkit2 venv (compile's build worker, rknn-sim's server):
    this process's OMP_NUM_THREADS when set to a positive number (bench sets it per contender), else 2 (the
    toolkit's pools otherwise take every core of a machine the host process shares)."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 2


def default_home() -> Path:
    """Root of the user cache: models, compiled slices, the toolkit environment.

    EXO_RKNPU_HOME overrides it; otherwise $XDG_CACHE_HOME/exo-rknpu or ~/.cache/exo-rknpu.
    """
    env = os.environ.get("EXO_RKNPU_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "exo-rknpu"


@dataclass(frozen=True)
class Paths:
    """Where things live under the cache home."""

    home: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(default_home())

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def compiled(self) -> Path:
        return self.home / "compiled"

    @property
    def prepared(self) -> Path:
        """Slices prepared for onnxruntime (graph + compact weights), content-addressed."""
        return self.home / "prepared"

    @property
    def native(self) -> Path:
        """The native kernel's shared libraries, built on first use (exo_rknpu/native/build.py)."""
        return self.home / "native"

    @property
    def toolkit(self) -> Path:
        return self.home / "toolkit"

    @property
    def toolkit_venv(self) -> Path:
        """The rknn-toolkit2 venv made by `exo-rknpu toolkit install`."""
        return self.toolkit / "venv"

    @property
    def toolkit_python(self) -> Path:
        return self.toolkit_venv / "bin" / "python"

    @property
    def toolkit_stamp(self) -> Path:
        """Written last by the install: its presence means the install finished."""
        return self.toolkit_venv / "exo-rknpu-toolkit.json"
