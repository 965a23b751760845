"""Session fixtures of the mixed-ring tests: smollm2-135m for stock exo nodes, and its answers alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

QUESTIONS = ("What is the capital of France?", "What is 2+2?")


@dataclass(frozen=True)
class StockHome:
    """EXO_HOME and TMPDIR in which exo's downloader finds smollm2-135m as Hugging Face safetensors, offline."""

    exo_home: Path
    exo_tmp: Path

    def env(self) -> dict[str, str]:
        from stock_exo import offline_env

        return offline_env(self.exo_home, self.exo_tmp)


@pytest.fixture(scope="session")
def stock_home(tmp_path_factory) -> StockHome:
    from exo_helpers import EXO_OK, EXO_WHY

    if not EXO_OK:
        pytest.skip(EXO_WHY)
    if shutil.which("clang") is None:  # tinygrad's CPU backend compiles every kernel with clang
        why = "clang is not installed: stock exo's tinygrad engine compiles its CPU kernels with it (apt-get install clang)"
        if os.environ.get("EXO_LEGACY_REQUIRED") == "1":  # CI (.ci/run installs it): a missing clang is an error
            pytest.fail(why)
        pytest.skip(why)
    from stock_exo import write_stock_model

    from exo_rknpu.model.zoo import resolve_model

    root = tmp_path_factory.mktemp("stock-exo")
    home = StockHome(root / "exo-home", root / "tmp")
    write_stock_model(resolve_model("smollm2-135m").path, home.exo_home, home.exo_tmp)
    return home


@pytest.fixture(scope="session")
def references() -> dict[str, str]:
    """question -> the answer of `exo-rknpu generate --chat --weights fp32` alone (one process, no exo)."""
    out = {}
    for q in QUESTIONS:
        run = subprocess.run([sys.executable, "-m", "exo_rknpu.cli.main", "generate", "--chat", "--weights", "fp32",
                              "--prompt", q, "--json"], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ))
        assert run.returncode == 0, run.stderr[-2000:]
        out[q] = json.loads(run.stdout)["text"]
    return out
