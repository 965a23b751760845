"""The repository holds source, tests, docs and small fixtures: no tracked file over 1 MB without a written reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOW_LIST = ROOT / "tests" / "large_files_allowed.txt"
LIMIT = 1 << 20


def allowed() -> dict[str, str]:
    """path -> reason, from the allow-list (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for line in ALLOW_LIST.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            path, _, reason = line.strip().partition(" ")
            out[path] = reason.strip()
    return out


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (no .git or no git): the tracked-file list is unknown")
    res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60, check=True)
    return [p for p in res.stdout.decode().split("\0") if p]


def test_no_tracked_file_is_over_1_mb_without_a_reason():
    reasons = allowed()
    big = {p: (ROOT / p).stat().st_size for p in tracked_files() if (ROOT / p).is_file() and (ROOT / p).stat().st_size > LIMIT}
    unexplained = [f"{p} ({n / 1e6:.1f} MB)" for p, n in big.items() if not reasons.get(p)]
    assert not unexplained, f"tracked files over 1 MB; remove them or give a reason in {ALLOW_LIST.name}: {unexplained}"


def test_every_allow_list_entry_has_a_reason_and_is_still_needed():
    big = {p for p in tracked_files() if (ROOT / p).is_file() and (ROOT / p).stat().st_size > LIMIT}
    for path, reason in allowed().items():
        assert reason, f"{ALLOW_LIST.name}: {path} needs a reason"
        assert path in big, f"{ALLOW_LIST.name}: {path} is no longer a tracked file over 1 MB; drop the entry"
