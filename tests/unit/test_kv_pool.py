"""A reserved KV pool (runtime/cache.py KVPool with slots: backends whose attention reads only the written positions)
maps every slot at the largest context once: it never grows or moves, requests keep what they wrote, and memory
follows what is written, not what is reserved: the OS backs only written pages (4 KiB, never 2 MiB huge pages), and a
released slot's pages go back to the OS. Memory is read from the kernel's own account of the buffers
(mincore(2), /proc/self/smaps), not from the pool."""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np
import pytest

from exo_rknpu.errors import UsageError
from exo_rknpu.runtime.cache import KVPool, RequestCache

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
PAGE = mmap.PAGESIZE


def buffers(pool: KVPool) -> list[tuple[int, int]]:
    """[start, end) of each of the pool's buffers."""
    return [(a.ctypes.data, a.ctypes.data + a.nbytes) for a in (*pool.keys, *pool.values)]


def vm_flags(pool: KVPool) -> list[set[str]]:
    """The VmFlags of every mapping (/proc/self/smaps) that holds part of the pool's buffers (the kernel merges
    adjacent mappings of the same kind into one)."""
    spans, out, inside = buffers(pool), [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = any(lo < b and a < hi for a, b in spans)
            elif inside and line.startswith("VmFlags:"):
                out.append(set(line.split()[1:]))
    assert out, "no mapping holds the pool's buffers"
    return out


def resident(pool: KVPool) -> int:
    """Bytes of the pool's buffers the kernel holds in memory: mincore(2) over each, page by page."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    total = 0
    for lo, hi in buffers(pool):
        assert lo % PAGE == 0
        vec = np.zeros(-(-(hi - lo) // PAGE), np.uint8)
        assert libc.mincore(lo, hi - lo, vec.ctypes.data) == 0, ctypes.get_errno()
        total += int((vec & 1).sum()) * PAGE
    return total


def row_pages(pool: KVPool, positions: int) -> int:
    """Bytes of `positions` written positions of one slot, rounded up to pages per (layer, kv head) row, for the
    keys and values of every attention slice."""
    row = -(-positions * pool.head_dim * 4 // PAGE) * PAGE
    return 2 * sum(pool.layers) * pool.kv_heads * row


def write(owner: RequestCache, positions: range, value: float) -> None:
    for c in owner.caches:
        shape = c.keys[:, :, : len(positions)].shape
        c.write(positions.start, np.full(shape, value, np.float32), np.full(shape, -value, np.float32), len(positions))
    owner.pos = max(owner.pos, positions.stop)


def test_a_reserved_pool_never_grows_or_moves_and_keeps_every_requests_rows():
    pool = KVPool([2, 1], kv_heads=2, head_dim=4, max_positions=300, step=32, slots=3)
    owners = [RequestCache() for _ in range(3)]
    for o in owners:
        pool.acquire(o)
    assert pool.reserve(1) == 300 and pool.slots == 3  # the largest context and every slot, from the first call
    buffers = [a.__array_interface__["data"][0] for a in (*pool.keys, *pool.values)]
    for i, o in enumerate(owners):
        write(o, range(0, 5 + 40 * i), float(i + 1))
    for needed in range(2, 301):
        assert pool.reserve(needed) == 300
    assert [a.__array_interface__["data"][0] for a in (*pool.keys, *pool.values)] == buffers  # nothing re-allocated
    for i, o in enumerate(owners):
        for c in o.caches:
            assert (c.keys[:, :, : o.pos] == i + 1).all() and (c.values[:, :, : o.pos] == -(i + 1)).all()
            assert not c.keys[:, :, o.pos :].any()
    with pytest.raises(RuntimeError, match="reserved 3 request slots"):  # admission never asks for a fourth
        pool.acquire(RequestCache())


def test_a_released_slot_is_filled_with_the_last_requests_rows_and_nothing_else():
    pool = KVPool([2], kv_heads=2, head_dim=4, max_positions=2048, slots=3)
    owners = [RequestCache() for _ in range(3)]
    for o in owners:
        pool.acquire(o)
    write(owners[0], range(0, 1500), 1.0)  # a long request in slot 0 ends; the short one in slot 2 moves there
    write(owners[1], range(0, 10), 2.0)
    write(owners[2], range(0, 7), 3.0)
    owners[0].release()
    assert owners[2].slot == 0 and pool.owners == [owners[2], owners[1]]
    (c,) = owners[2].caches
    assert (c.keys[:, :, :7] == 3.0).all() and (c.values[:, :, :7] == -3.0).all()
    assert not c.keys[:, :, 7:].any() and not c.values[:, :, 7:].any()  # the long request's rows are gone
    assert not pool.keys[0][:, 2].any()  # the slot left behind reads as zeros


@linux_only
def test_memory_follows_the_written_positions_not_the_reservation():
    """8 requests of the 1B shape (16 layers in slices of 2, 8 kv heads, head_dim 64) at up to 2048 positions
    reserve 2 GiB; writing 3 positions of every slot makes about 3 positions' pages of every row resident, where
    huge pages would back a whole 2 MiB (4 rows) per written row."""
    pool = KVPool([2] * 8, kv_heads=8, head_dim=64, max_positions=2048, slots=8)
    owners = [RequestCache() for _ in range(8)]
    for o in owners:
        pool.acquire(o)
    pool.reserve(3)
    assert pool.reserved_bytes == 8 * 2048 * 16 * 8 * 64 * 4 * 2
    assert all("nh" in flags for flags in vm_flags(pool))  # MADV_NOHUGEPAGE
    before = resident(pool)
    for o in owners:
        write(o, range(0, 3), 1.0)
    written = 8 * row_pages(pool, 3)  # 2 MiB: one page of each (layer, slot, kv head) row, keys and values
    assert written <= resident(pool) - before < 3 * written
    assert pool.nbytes == written  # what the pool reports is what is resident, not the reservation


@linux_only
def test_a_released_slot_gives_its_pages_back_to_the_os():
    pool = KVPool([2] * 4, kv_heads=8, head_dim=64, max_positions=2048, slots=3)
    owners = [RequestCache() for _ in range(3)]
    for o in owners:
        pool.acquire(o)
    pool.reserve(2048)
    write(owners[1], range(0, 1000), 1.0)  # a long request
    for o in (owners[0], owners[2]):
        write(o, range(0, 20), 2.0)
    short, long = row_pages(pool, 20), row_pages(pool, 1000)
    assert long <= resident(pool) - 2 * short < 1.5 * long
    owners[1].release()  # the long request ends: the last (short) request moves into its slot
    assert 2 * short <= resident(pool) < 3 * short
    assert pool.nbytes == 2 * short
    owners[0].release()  # the last slot is freed in place
    assert short <= resident(pool) < 2 * short


def test_a_reservation_the_os_refuses_is_refused_when_the_pool_is_made():
    """A KV budget the machine cannot map (here 2 PiB, past any 48-bit address space) is a clear error when the shard
    opens, not a failure at some later request."""
    with pytest.raises(UsageError, match="cannot reserve .* of address space .* lower --max-kv-mb"):
        KVPool([1], kv_heads=1, head_dim=1024, max_positions=1 << 20, slots=1 << 18)


def test_a_batch_of_slots_apart_gathers_only_the_positions_the_step_reads():
    """Consecutive slots are read in place (the reserved capacity, no copy); slots apart are gathered, and from a
    reserved pool only the step's positions rounded up to the step (its attention reads no more), so a gathered
    step does not copy every request's largest context."""
    pool = KVPool([2, 1], kv_heads=2, head_dim=4, max_positions=300, step=32, slots=4)
    owners = [RequestCache() for _ in range(4)]
    for i, o in enumerate(owners):
        pool.acquire(o)
        write(o, range(0, 10 + i), float(i + 1))
    together = pool.batch(owners[1:3], 13)
    assert all(np.shares_memory(b.keys, pool.keys[b.index]) and b.keys.shape[3] == 300 for b in together)
    apart = pool.batch([owners[0], owners[3]], 14)
    for b in apart:
        assert b.keys.shape == (pool.layers[b.index], 2, 2, 32, 4) and not np.shares_memory(b.keys, pool.keys[b.index])
        assert b.keys.flags.c_contiguous and b.values.flags.c_contiguous  # each layer one block, as a view's
        assert np.array_equal(b.keys, pool.keys[b.index][:, [0, 3], :, :32])
        assert np.array_equal(b.values, pool.values[b.index][:, [0, 3], :, :32])
        with pytest.raises(RuntimeError, match="holds 32 positions, the step was cut for 300"):
            b.grow(300)
