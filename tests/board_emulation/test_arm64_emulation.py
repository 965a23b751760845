"""The board quick-start (docs/board.md) on an emulated RK3588 user space: scripts/arm64-emulation.sh.

Too slow for CI's 45-minute budget (measured here: see docs/board.md, "Tested in emulation"), so it runs only when
asked: EXO_RKNPU_ARM64_EMULATION=1, as root, with network access (Debian mirror, PyPI) and the rknn toolkit
installed for this python (`exo-rknpu toolkit install`). The script itself holds every assertion: aarch64 greedy
token ids equal x86's at the default --weights native (exo-rknpu's own kernel, built in the root by its gcc), at fp32
and at auto (smollm2's Q4_1 file, and native and auto on the same model re-encoded as Q8_0, so that split8 runs in
every layer under auto); native's logits are compared bit for bit and printed (not a condition: they differ,
docs/board.md "Answers across CPUs"); `doctor` runs RKNNLite's init_runtime on a compiled slice and reports its
failure in one line, `generate --backend npu` refuses in one line, `--emulate` says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "arm64-emulation.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EXO_RKNPU_ARM64_EMULATION") != "1",
                       reason="arm64 emulation takes 15-35 min (docs/board.md): set EXO_RKNPU_ARM64_EMULATION=1 (root, network)"),
]


def test_the_board_quick_start_passes_on_an_emulated_cortex_a76():
    env = dict(os.environ, X86_PY=os.environ.get("X86_PY", sys.executable))
    p = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=3 * 3600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "PASS:" in p.stdout and "tokens default (native) same, fp32 same, auto same" in p.stdout, p.stdout[-4000:]
    assert "Q8_0 at native same, Q8_0 at auto (split8) same" in p.stdout, p.stdout[-4000:]
