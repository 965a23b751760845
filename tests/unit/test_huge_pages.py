"""ShardRunner moves the memory its sessions packed onto huge pages (runtime/shard.py back_with_huge_pages): only
private writable anonymous mappings whose pages are all resident, so nothing is added or read differently."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from exo_rknpu.runtime import shard
from exo_rknpu.runtime.shard import _resident_anonymous, back_with_huge_pages

SMAPS = """\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
VmFlags: rd wr mr mw me ac
7f0000400000-7f0000800000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                1024 kB
VmFlags: rd wr mr mw me ac
7f0000800000-7f0000c00000 r--p 00000000 08:01 1234                       /tmp/prepared/ab/abcd/weights.bin
Size:               4096 kB
Rss:                4096 kB
7f0000c00000-7f0001000000 rw-s 00000000 00:01 99                         /dev/zero (deleted)
Size:               4096 kB
Rss:                4096 kB
55d000000000-55d000400000 rw-p 00000000 00:00 0                          [heap]
Size:               4096 kB
Rss:                4096 kB
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0                          [stack]
Size:               4096 kB
Rss:                4096 kB
"""


def test_only_fully_resident_private_anonymous_mappings_and_the_heap_are_listed():
    assert _resident_anonymous(SMAPS.splitlines()) == [(0x7F0000000000, 0x7F0000400000), (0x55D000000000, 0x55D000400000)]


def test_moving_memory_to_huge_pages_keeps_its_contents():
    a = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8)
    expected = a.copy()
    back_with_huge_pages()
    assert np.array_equal(a, expected)


def _mapping_of(address: int) -> dict[str, str]:
    """/proc/self/smaps' fields of the mapping holding `address`."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= address < hi
        elif inside:
            fields[head[0].rstrip(":")] = " ".join(head[1:])
    return fields


def test_where_the_collapse_succeeds_the_mapping_is_huge_and_marked_to_stay_so():
    a = np.ones(16 << 20, np.uint8)  # its own mapping, every page resident
    if back_with_huge_pages() == 0:
        pytest.skip("this kernel moves nothing onto huge pages (MADV_COLLAPSE needs Linux 6.1 and THP)")
    m = _mapping_of(a.ctypes.data + a.size // 2)  # its aligned middle (advice splits the unaligned ends off)
    assert int(m["AnonHugePages"].split()[0]) >= 8 << 10 and "hg" in m["VmFlags"].split()


class RefusingLibc:
    """The C library of a kernel that refuses MADV_COLLAPSE (older than 6.1, or no huge page free): records advice."""

    def __init__(self) -> None:
        self.advised: list[int] = []

        def madvise(address: int, length: int, advice: int) -> int:
            self.advised.append(advice)
            return -1 if advice == shard._MADV_COLLAPSE else 0

        self.madvise = madvise  # a function, as ctypes gives: argtypes can be set on it


def test_where_the_collapse_is_refused_no_mapping_is_left_marked_for_huge_pages(monkeypatch):
    libc = RefusingLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **kw: libc)
    keep = np.ones(16 << 20, np.uint8)  # at least one fully resident mapping to try
    assert back_with_huge_pages() == 0 and keep.all()
    assert libc.advised and set(libc.advised) == {shard._MADV_COLLAPSE}
