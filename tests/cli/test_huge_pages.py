"""The program re-runs itself once with glibc's huge-page heap (cli/main.py HUGE_PAGES_TUNABLE), keeping any
GLIBC_TUNABLES the user set, and only where glibc can take it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from exo_rknpu.cli.main import HUGE_PAGES_TUNABLE, huge_pages_env

ROOT = Path(__file__).resolve().parents[2]


def test_the_tunable_is_added_to_the_environment():
    env = huge_pages_env({"PATH": "/bin"}, ("glibc", "2.36"))
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}


def test_tunables_the_user_set_are_kept():
    env = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.39"))
    assert env is not None and env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1"])
def test_a_huge_page_choice_already_made_is_left_alone(tunables):
    assert huge_pages_env({"GLIBC_TUNABLES": tunables}, ("glibc", "2.36")) is None


@pytest.mark.parametrize("libc", [("glibc", "2.31"), ("", ""), ("musl", "1.2")])
def test_nothing_is_done_where_glibc_has_no_such_tunable(libc):
    assert huge_pages_env({}, libc) is None


@pytest.mark.skipif(sys.platform != "linux" or huge_pages_env({}, platform.libc_ver()) is None,
                    reason="needs Linux with glibc 2.35+")
def test_the_process_reruns_itself_once_with_the_tunable():
    code = ("import os; from exo_rknpu.cli.main import rerun_with_huge_pages; rerun_with_huge_pages(); "
            "print(os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines() == [HUGE_PAGES_TUNABLE]  # printed once: one re-run
