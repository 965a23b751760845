"""The README's first lines are the commands a newcomer runs; CI runs the same test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines()[:8] if l.startswith("python3 -m venv")]
    assert len(lines) == 2, "README must start with the main-job command and the test command"
    main_job, tests = lines
    assert "generate --model smollm2-135m --split" in main_job
    assert tests in (ROOT / ".ci" / "run").read_text()
