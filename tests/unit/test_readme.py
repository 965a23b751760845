"""The README's first lines are the commands a newcomer runs; CI runs the same test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines()[:8] if l.startswith("python3 -m venv")]
    assert len(lines) == 2, "README must start with the main-job command and the test command"
    main_job, tests = lines
    assert "generate --model smollm2-135m --split" in main_job
    assert tests in (ROOT / ".ci" / "run").read_text()


def _unexpanded_tildes(cmd: str) -> list[int]:
    """Offsets of each `~` in `cmd` that bash leaves as it is: inside quotes, or not at the start of a word
    (bash's tilde expansion: an unquoted `~` starting a word, or after `=` / `:` in an assignment)."""
    bad, quote = [], None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
            bad += [i] if ch == "~" else []
        elif ch in "'\"":
            quote = ch
        elif ch == "~" and i > 0 and cmd[i - 1] not in " \t=:":
            bad.append(i)
    return bad


def test_no_documented_command_quotes_a_tilde():
    """Issue 17: `pip install -e '~/exo-rknpu[board]'` failed on the board because the shell does not expand a quoted
    `~` (pip then looked for a folder literally named `~`). No command line in the docs has one."""
    import re

    assert _unexpanded_tildes("pip install -e '~/exo-rknpu[board]'") == [16]
    assert _unexpanded_tildes("pip install -e ~/exo-rknpu'[board]' && cd ~ && X=~/a") == []
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    lines = [(p.name, ln) for p in docs for ln in p.read_text().splitlines()
             if re.match(r"\s*(\S+/)?(pip|python3?|exo-rknpu|cd|sudo|rsync|scp|\.)\s", ln) and "~" in ln]
    assert any("[board]" in ln for _, ln in lines), "the board install line is among the lines checked"
    for name, ln in lines:
        assert not _unexpanded_tildes(ln.split(" #", 1)[0]), f"{name}: {ln.strip()!r}: the shell does not expand this ~"
