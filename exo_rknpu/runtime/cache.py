"""Host-side KV caches: `RequestCache` for one request on one shard, holding one cache per attention slice:
its own `KVCache` arrays, or a slot of the shard's `KVPool` (`SlotKV`) on backends that batch requests; and
`BatchState`/`BatchKV` for the requests of one batched decode step (`RowsState`/`RowsKV` on backends compiled
with batch buckets, where each request keeps its own arrays).

Caches are handed to backends as they are (no per-call copy). A KVCache grows in context-bucket steps (never
per token) and is always exactly one bucket long, so the NPU only sees compiled shapes. A KVPool (onnxruntime,
numpy: any shape) either reserves its every slot at the largest context up front, as address space the OS backs
only where it is written, and never grows (backends whose attention reads only the written positions:
Backend.reads_written_cache), or grows in small steps, copying what its requests hold (backends whose attention
cost grows with the capacity).

Why two ways of holding a batch's caches: the two kinds of batch graph take them differently, and each way hands
its graphs the caches as they are. onnxruntime's and numpy's graphs take one [B, kv, C, hd] float32 block per layer
for the whole batch: the pool keeps the requests in consecutive slots so that block is a view, where per-request
arrays would be gathered into a new block every step (every request's whole cache, per layer). The NPU's batch
graph (slices/npu_form.py::build_npu_batch_onnx) takes each row's cache as an input of its own, float16 in the NPU
form and exactly one context bucket long, and pads a batch to its compiled size by repeating a row: a request's
own KVCache is that input already (and the one its lone steps take), so there is nothing to pool, and a pool's slot
moves on release and shared growth would only add copies. Making them one would mean a pool with both layouts and
per-row views; not done, as the NPU path is checked in the simulator only.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import numpy as np

from exo_rknpu.errors import UsageError
from exo_rknpu.runtime.inputs import attention_mask


# positions axis of (keys, values) per layout; "npu" keeps float16 keys [n*kv, hd, C] and values [n*kv, C, hd] as
# the compiled NPU slice takes them (slices/npu_form.py), so they are handed over without a conversion
_AXES = {"seq": (2, 2), "npu": (2, 1)}


@dataclass
class KVCache:
    keys: np.ndarray  # [n_layers, kv_heads, capacity, head_dim] ("seq"),
    values: np.ndarray  # or the NPU form ("npu": float16 keys [n*kv, hd, capacity], values [n*kv, capacity, hd])
    layout: str = "seq"

    @classmethod
    def empty(cls, n_layers: int, kv_heads: int, capacity: int, head_dim: int, layout: str = "seq") -> "KVCache":
        if layout == "npu":
            rows = n_layers * kv_heads
            return cls(np.zeros((rows, head_dim, capacity), np.float16), np.zeros((rows, capacity, head_dim), np.float16), layout)
        shape = (n_layers, kv_heads, capacity, head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32), layout)

    # `keys`/`values` are the cache itself: what a runner writes into them stays (Runner.run's cache_in_place)
    in_place = True

    @property
    def axis(self) -> int:
        """The positions axis of the keys."""
        return _AXES[self.layout][0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[self.axis]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def grow(self, capacity: int) -> None:
        """Re-allocate to `capacity` positions, keeping what is stored."""
        if capacity <= self.capacity:
            return
        for name, axis in zip(("keys", "values"), _AXES[self.layout]):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[axis] = capacity
            new = np.zeros(shape, old.dtype)
            new[(slice(None),) * axis + (slice(0, old.shape[axis]),)] = old
            setattr(self, name, new)

    def write(self, pos: int, k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """Store the first `count` new positions (the rest of a padded chunk is discarded)."""
        for cache, new, axis in zip((self.keys, self.values), (k_new, v_new), _AXES[self.layout]):
            lead = (slice(None),) * axis
            cache[lead + (slice(pos, pos + count),)] = new[lead + (slice(0, count),)]


@dataclass
class RequestCache:
    """One request's state on one shard: its KV caches, its position, and what follows from the position.

    Like mlx-lm's cache owns its `offset`, this owns `pos` (tokens already in the cache; the next token goes there),
    the roll-back of a call that failed (`rollback`), and the attention mask over what it holds (`mask`). A call
    writes its rows past `pos` and moves `pos` only when it commits (`advance`): rows past `pos` are never read
    (the mask hides them) and the next write overwrites them, so rolling `pos` back undoes a call.
    """

    pos: int = 0
    # one per attention slice: own arrays allocated by the first call, or views of a KVPool slot
    caches: list["KVCache | SlotKV"] = field(default_factory=list)
    touched: float = 0.0  # monotonic time of the last step (RequestStore's clock)
    slot: int | None = None  # its slot of the shard's KVPool, if it holds one
    pool: "KVPool | None" = field(default=None, repr=False)
    _template: tuple[tuple[int, int], np.ndarray] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def release(self) -> None:
        """The request ended: free its pool slot (own arrays are freed with it)."""
        if self.pool is not None and self.slot is not None:
            self.pool.release(self)
        self.caches = []

    def advance(self, n: int) -> None:
        """A call of `n` tokens committed: they are part of the context from now on."""
        self.pos += n

    def rollback(self, pos: int) -> None:
        """Forget every position from `pos` on (a failed call's rows)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot roll back to position {pos}: the cache holds {self.pos}")
        self.pos = pos

    def mask(self, at: int, seq: int, ctx: int) -> np.ndarray:
        """Additive mask [1,1,seq,ctx+seq] of a `seq`-row chunk written at position `at`: row i sees the cached
        positions below `at` and the chunk's rows up to i. The causal part is kept from the last call of the same
        shape, so a decode step copies one row instead of rebuilding it. Read-only: every slice of the call reads
        the same array, and a backend may recognise it by identity (backends/ort.py MaskPositions)."""
        if self._template is None or self._template[0] != (seq, ctx):
            self._template = ((seq, ctx), attention_mask(seq, seq, ctx, 0))
        m = self._template[1].copy()
        m[..., :at] = 0.0
        m.flags.writeable = False
        return m


class KVPool:
    """The "seq" KV caches of every live request of one shard, in one buffer per attention slice: keys and values
    [n_layers, slots, kv_heads, capacity, head_dim]. A request holds one slot (RequestCache.slot) of every buffer
    and sees it through `SlotKV`; a batched step of requests in consecutive slots hands the backend
    `keys[i][:, a:b]` as it is (each layer a contiguous [B, kv, C, hd] block): nothing is gathered or scattered
    per step, and each request's new rows are written straight into its slot. Live requests keep consecutive
    slots: a released slot is filled with the positions the last one holds.

    Reserved (`slots` > 0; backends whose attention reads only each request's written positions,
    Backend.reads_written_cache): the buffers are mapped when the pool is made, `slots` slots of `max_positions`
    each (the shard's admission bound: RequestLimits admits no more requests than it could hold at the largest
    context), and kept: the pool never grows and never copies to grow, and a budget the machine cannot map is
    refused when the shard opens, not at some later request. That is address space: the mapping is anonymous, so
    the OS backs a page (zero-filled) only when a request first writes into it, and `nbytes` counts those. Huge
    pages are refused on it (MADV_NOHUGEPAGE: with THP "always" one written position would back 2 MiB of a row),
    and a released slot's pages go back to the OS (MADV_DONTNEED), so a long request that ends leaves nothing
    resident.

    Growing (`slots` 0; backends whose attention reads the whole capacity, where a reserved one would cost every
    step): capacity is shared by every slot and grows by a quarter of itself, at least `step` positions (at most
    `max_positions`), copying the positions some request holds (growing by a fixed step made a long batched decode
    copy the whole pool every `step` tokens: 8 requests of the 1B shape at 1024 positions, 135 ms every 32 steps).
    Slots double as requests arrive. Both re-allocate, so the pool is changed only between calls by the one thread
    that drives the shard (a driver that runs several calls at once from different threads gives requests their own
    KVCache instead: see ShardRunner.unpool). When the last request leaves, the buffers are freed.
    """

    def __init__(self, layers: list[int], kv_heads: int, head_dim: int, max_positions: int, step: int = 32,
                 slots: int = 0) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_positions, self.step = max_positions, step
        self.reserved = slots  # slots mapped up front (0: the growing pool)
        self.owners: list[RequestCache] = []  # owners[s] holds slot s
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._maps: list[mmap.mmap] = []  # reserved: the mapping under each of keys + values
        if slots:
            self._map()

    @property
    def slots(self) -> int:
        if self.reserved:
            return self.reserved
        return self.keys[0].shape[1] if self.keys else len(self.owners)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[3] if self.keys else self.max_positions

    @property
    def reserved_bytes(self) -> int:
        """Address space the pool holds (reserved: mapped, mostly not resident; growing: allocated)."""
        return sum(a.nbytes for a in (*self.keys, *self.values))

    def acquire(self, owner: "RequestCache") -> None:
        """Give `owner` the next free slot and its caches (one SlotKV per attention slice)."""
        assert owner.slot is None, "a request holds one slot"
        if len(self.owners) == self.slots:
            if self.reserved:  # admission (RequestLimits) admits no more requests than reserved
                raise RuntimeError(f"the KV pool reserved {self.reserved} request slots and every one is held")
            self._resize(max(1, 2 * self.slots), max(self.capacity, self.step) if self.keys else 0)
        owner.slot, owner.pool = len(self.owners), self
        self.owners.append(owner)
        owner.caches = [SlotKV(self, i, owner) for i in range(len(self.layers))]

    def release(self, owner: "RequestCache") -> None:
        """Free `owner`'s slot; the request in the last slot moves into it (the positions it holds are copied)."""
        slot, last = owner.slot, len(self.owners) - 1
        assert slot is not None and self.owners[slot] is owner, "release of a slot the request does not hold"
        if slot != last:
            moved = self.owners[last]
            held = min(moved.pos, self.capacity)  # rows past a request's position are never read
            self._discard(slot)  # then only the moved rows are resident in it
            for arr in (*self.keys, *self.values):
                arr[:, slot, :, :held] = arr[:, last, :, :held]
            self.owners[slot], moved.slot = moved, slot
        self._discard(last)
        self.owners.pop()
        owner.slot, owner.caches = None, []
        if not self.owners and not self.reserved:
            self._resize(0, 0)

    def reserve(self, positions: int) -> int:
        """Make every slot hold `positions` positions and return the capacity. Reserved: the capacity is
        `max_positions` already. Growing: by at least a quarter of the capacity, rounded up to `step`."""
        if not self.reserved and (positions > self.capacity or not self.keys):
            wanted = max(positions, self.capacity + self.capacity // 4) if self.keys else positions
            self._resize(self.slots, min(-(-wanted // self.step) * self.step, self.max_positions))
        return self.capacity

    def _resize(self, slots: int, capacity: int) -> None:
        """New buffers of `slots` x `capacity`, keeping the positions the requests hold (rows past a request's
        position are never read: the call that wrote them failed, or none did). The growing pool only."""
        if not slots:
            self.keys, self.values = [], []
            return
        capacity = max(capacity, self.capacity if self.keys else 0)
        old_slots, old_cap = (self.keys[0].shape[1], self.keys[0].shape[3]) if self.keys else (0, 0)
        held = min(max((o.pos for o in self.owners), default=0), old_cap)
        for arrays in (self.keys, self.values):
            for i, n in enumerate(self.layers):
                new = np.zeros((n, slots, self.kv_heads, capacity, self.head_dim), np.float32)
                if old_slots and held:
                    new[:, :old_slots, :, :held] = arrays[i][:, :, :, :held]
                if i < len(arrays):
                    arrays[i] = new
                else:
                    arrays.append(new)

    def _map(self) -> None:
        """The reserved buffers: private anonymous mappings (zero pages until written), no huge pages; UsageError if
        the OS refuses the address space (e.g. a KV budget beyond its memory, where it refuses obvious overcommits)."""
        for arrays in (self.keys, self.values):
            for n in self.layers:
                shape = (n, self.reserved, self.kv_heads, self.max_positions, self.head_dim)
                try:
                    m = mmap.mmap(-1, int(np.prod(shape)) * 4, flags=mmap.MAP_PRIVATE)
                except (OSError, OverflowError) as e:
                    total = 8 * sum(self.layers) * self.reserved * self.kv_heads * self.max_positions * self.head_dim
                    raise UsageError(
                        f"cannot reserve {total >> 20} MiB of address space for the KV caches of {self.reserved} "
                        f"requests at {self.max_positions} positions ({e}); lower --max-kv-mb, --max-requests or "
                        f"--max-context") from e
                if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
                    m.madvise(mmap.MADV_NOHUGEPAGE)
                self._maps.append(m)
                arrays.append(np.frombuffer(m, np.float32).reshape(shape))

    def _discard(self, slot: int) -> None:
        """Reserved: hand the pages of `slot` back to the OS (they read as zeros when next written). Only whole pages
        inside the slot's rows: a page it shares with the next slot's rows stays."""
        if not self._maps or not hasattr(mmap, "MADV_DONTNEED"):
            return
        block = self.kv_heads * self.max_positions * self.head_dim * 4  # one layer's rows of one slot, in bytes
        for m, n in zip(self._maps, self.layers * 2):
            for layer in range(n):
                start = (layer * self.reserved + slot) * block
                a, b = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + block) // mmap.PAGESIZE * mmap.PAGESIZE
                if b > a:
                    m.madvise(mmap.MADV_DONTNEED, a, b - a)

    def slot_nbytes(self, index: int, slot: int) -> int:
        """Memory slot `slot` of attention slice `index` takes. Growing: its share of the buffers. Reserved: the
        pages its held positions fill (what is resident; a failed call's rows past them may add a page a row until
        the slot is released)."""
        n, row = self.layers[index], self.head_dim * 4
        if not self.reserved:
            return 2 * n * self.kv_heads * self.capacity * row
        held = min(self.owners[slot].pos, self.capacity) * row
        return 2 * n * self.kv_heads * -(-held // mmap.PAGESIZE) * mmap.PAGESIZE

    @property
    def nbytes(self) -> int:
        """Memory the live requests' caches take (reserved: resident, not the reservation; see slot_nbytes)."""
        return sum(self.slot_nbytes(i, s) for i in range(len(self.layers)) for s in range(len(self.owners)))

    def batch(self, owners: list["RequestCache"], positions: int) -> list["BatchKV"]:
        """The caches of a batched step of `owners` (in slot order for the no-copy view), one per attention slice,
        holding `positions` positions (`reserve`d already). Slots that are not consecutive are gathered into a copy;
        in a reserved pool, of the positions the step reads only (rounded up to `step`; its attention reads no
        more): the whole capacity would copy every request's largest context (the 1B shape, 7 of 8 requests at 100
        positions: 155 ms a step against 5). A growing pool's copy keeps its capacity, the lone calls' C."""
        slots = [o.slot for o in owners]
        capacity = self.capacity
        if self.reserved and slots != list(range(slots[0], slots[0] + len(slots))):
            capacity = min(-(-positions // self.step) * self.step, capacity)
        return [BatchKV(self, i, slots, capacity) for i in range(len(self.layers))]


class SlotKV:
    """One request's cache of one attention slice in a KVPool: a "seq" KVCache's interface over its slot."""

    layout = "seq"
    in_place = True  # `keys`/`values` are views of the pool

    def __init__(self, pool: KVPool, index: int, owner: "RequestCache") -> None:
        self.pool, self.index, self.owner = pool, index, owner

    @property
    def keys(self) -> np.ndarray:  # [n_layers, kv, C, hd]; each layer a contiguous block
        return self.pool.keys[self.index][:, self.owner.slot]

    @property
    def values(self) -> np.ndarray:
        return self.pool.values[self.index][:, self.owner.slot]

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def nbytes(self) -> int:
        return self.pool.slot_nbytes(self.index, self.owner.slot)

    def grow(self, capacity: int) -> None:
        """The pool was grown when the call was admitted (ShardRunner.begin); a call sees one capacity throughout."""
        if capacity != self.pool.capacity:
            raise RuntimeError(f"the KV pool holds {self.pool.capacity} positions, the call was cut for {capacity}")

    def write(self, pos: int, k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """Store the first `count` new positions (k_new/v_new [n_layers, kv, S, hd])."""
        self.keys[:, :, pos : pos + count] = k_new[:, :, :count]
        self.values[:, :, pos : pos + count] = v_new[:, :, :count]


class BatchKV:
    """The caches of one attention slice for the requests of a batched decode step (row b = the request in
    slot slots[b]): keys/values [n_layers, B, kv, C, hd], what a batching backend takes. Consecutive slots are
    a view of the pool (no copy, C its capacity); others are gathered for the step, their first `capacity`
    positions (KVPool.batch). New rows go straight into the pool."""

    def __init__(self, pool: KVPool, index: int, slots: list[int], capacity: int) -> None:
        self.pool, self.index, self.slots, self.capacity = pool, index, slots, capacity
        a = slots[0]
        self._range = slice(a, a + len(slots)) if slots == list(range(a, a + len(slots))) else np.array(slots)
        assert isinstance(self._range, np.ndarray) or capacity == pool.capacity, "a view holds the pool's capacity"

    @property
    def in_place(self) -> bool:
        """Whether `keys`/`values` are views of the pool (consecutive slots), not gathered copies."""
        return isinstance(self._range, slice)

    @property
    def keys(self) -> np.ndarray:
        return self._view(self.pool.keys[self.index])

    @property
    def values(self) -> np.ndarray:
        return self._view(self.pool.values[self.index])

    def _view(self, pooled: np.ndarray) -> np.ndarray:
        # gathered rows in C order, so each layer is one contiguous block like the no-copy view's; slot by slot: np.take
        # first makes its whole input contiguous, which from a reserved pool's strided view copied every slot
        # (smollm2, 8 requests in slots apart: 24 steps 324 ms against 272 with the growing pool)
        if isinstance(self._range, slice):
            return pooled[:, self._range]
        out = np.empty((pooled.shape[0], len(self.slots), *pooled.shape[2:3], self.capacity, pooled.shape[4]),
                       pooled.dtype)
        for b, s in enumerate(self.slots):
            out[:, b] = pooled[:, s, :, : self.capacity]
        return out

    def grow(self, capacity: int) -> None:
        if capacity != self.capacity:
            raise RuntimeError(f"the KV pool holds {self.capacity} positions, the step was cut for {capacity}")

    def write(self, positions: list[int], k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """k_new/v_new [n_layers*B, kv, 1, hd] (layer-major, as a batched slice returns them) -> row b into slot
        slots[b] at positions[b], one scatter per tensor."""
        assert count == 1, "a batched step writes one position per request"
        slots, pos = np.array(self.slots), np.array(positions)
        for pooled, new in ((self.pool.keys[self.index], k_new), (self.pool.values[self.index], v_new)):
            n = pooled.shape[0]
            # advanced indices on axes 1 and 3 (split by a slice) put their dim first: [B, n, kv, hd]
            pooled[:, slots, :, pos] = new.reshape(n, len(slots), *new.shape[1:])[:, :, :, 0].swapaxes(0, 1)


class BatchState:
    """The requests of a batched decode step seen as one: `caches[i]` is their BatchKV of attention slice i
    (each RequestCache keeps its own position; the step's driver advances each one when the step commits)."""

    def __init__(self, pool: KVPool, requests: list[RequestCache], positions: int) -> None:
        """`positions`: what the step holds, the furthest request's position + 1 (`KVPool.reserve`d already)."""
        self.caches = pool.batch(requests, positions)
        self.capacity = self.caches[0].capacity if self.caches else pool.capacity  # what the step is cut for


class RowsKV:
    """The caches of one attention slice for the rows of a decode batch on a backend compiled with batch buckets
    (the NPU form, slices/npu_form.py::build_npu_batch_onnx): each request's own KVCache, handed to the backend as
    sequences of arrays (`keys`, `values`: row b's arrays), nothing gathered. Rows past `real` pad the batch to its
    bucket: they repeat a real request's cache, are read only, and their new rows are dropped."""

    in_place = False  # its rows repeat caches to pad the batch: the backend gets each row's own arrays, read only

    def __init__(self, caches: list[KVCache], real: int) -> None:
        self.caches, self.real = caches, real

    @property
    def keys(self) -> list[np.ndarray]:
        return [c.keys for c in self.caches]

    @property
    def values(self) -> list[np.ndarray]:
        return [c.values for c in self.caches]

    def grow(self, capacity: int) -> None:
        """Every row's cache to `capacity` positions (one context bucket for the whole batch)."""
        for c in self.caches[: self.real]:
            c.grow(capacity)

    def write(self, positions: list[int], k_new: np.ndarray, v_new: np.ndarray, count: int) -> None:
        """k_new [B*n*kv, hd, 1], v_new [B*n*kv, 1, hd] (request-major, as the batch graph returns them): row b's
        new position into its own cache at positions[b], for the real rows."""
        assert count == 1, "a batched step writes one position per request"
        rows = k_new.shape[0] // len(self.caches)
        for b in range(self.real):
            self.caches[b].write(positions[b], k_new[b * rows : (b + 1) * rows], v_new[b * rows : (b + 1) * rows], 1)


class RowsState:
    """The requests of a decode batch on a backend with batch buckets: `caches[i]` is their RowsKV of attention
    slice i (padding rows last; each RequestCache keeps its own position, advanced when the step commits)."""

    def __init__(self, requests: list[RequestCache], real: int) -> None:
        slices = len(requests[0].caches)
        self.caches = [RowsKV([r.caches[i] for r in requests], real) for i in range(slices)]  # type: ignore[misc]
