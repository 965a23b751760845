"""ShardRunner moves the memory its sessions packed onto huge pages (runtime/shard.py back_with_huge_pages): only
private writable anonymous mappings whose pages are all resident, so nothing is added or read differently."""

from __future__ import annotations

import numpy as np

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
