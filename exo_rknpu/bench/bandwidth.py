"""The machine's memory read bandwidth, measured: the ceiling a decode step that streams its weights can reach."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BUFFER_MIB = 256  # far larger than any last-level cache, so every pass comes from DRAM
PASSES = 5


@dataclass(frozen=True)
class Bandwidth:
    gb_s: float  # 1 GB = 1e9 bytes
    method: str


def measure_bandwidth(threads: int, buffer_mib: int = BUFFER_MIB, passes: int = PASSES) -> Bandwidth:
    """Best of `passes` passes of `threads` threads each reducing (np.max) its own contiguous part of one
    float32 buffer: a pure streaming read, as decode reads its weights. numpy releases the GIL inside the
    reduction, so the threads really run in parallel. The best pass is the least disturbed by other load."""
    buf = np.ones(buffer_mib * (1 << 20) // 4, np.float32)  # np.ones writes every page, so none is lazily zero
    parts = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t))
    method = (f"numpy streaming read: {threads} thread(s) each np.max over its share of a {buffer_mib} MiB float32 "
              f"buffer, best of {passes} passes")
    return Bandwidth(best / 1e9, method)
