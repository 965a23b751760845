"""Time a KVPool spends growing while its requests decode (runtime/cache.py KVPool.reserve): N requests of the
Llama-3.2-1B shape (16 layers in 8 slices of 2, 8 kv heads, head_dim 64, up to 4096 positions) step from 16 to
16 + STEPS positions, each step writing its row into every slot as the gqa form does. "grow": the pool of backends
whose attention reads the whole capacity (numpy, the onnx split form); "reserve": the pool of the gqa form, its N
slots mapped at 4096 positions up front. Prints the time spent growing and the memory the pool reports (nbytes:
what is resident) against what it holds as address space.

    python docs/perf/pool_growth.py [N] [STEPS] [grow|reserve]    # default 8 requests, 1024 steps, reserve
"""

import sys
import time

from exo_rknpu.runtime.cache import KVPool, RequestCache

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
mode = sys.argv[3] if len(sys.argv) > 3 else "reserve"
pool = KVPool([2] * 8, 8, 64, 4096, 32, slots=n if mode == "reserve" else 0)
owners = [RequestCache() for _ in range(n)]
for o in owners:
    pool.acquire(o)
spent, growths = 0.0, 0
for pos in range(16, 16 + steps):
    before = pool.capacity if pool.keys else 0
    t = time.perf_counter()
    pool.reserve(pos + 1)
    spent += time.perf_counter() - t
    growths += pool.capacity != before
    for o in owners:
        o.pos = pos + 1
    for a in pool.keys + pool.values:
        a[:, :n, :, pos] = 1.0
print(f"{mode}: {n} requests, {steps} steps: {growths} growths, {spent * 1e3:.0f} ms growing "
      f"({spent / steps * 1e3:.3f} ms a step); capacity {pool.capacity}; nbytes {pool.nbytes >> 20} MiB, "
      f"address space {pool.reserved_bytes >> 20} MiB")
