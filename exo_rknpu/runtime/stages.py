"""Per-device pipelining of a shard: consecutive slices on one device form a stage, one worker thread per device.

With several requests in flight, request 2 runs in core 0's layers while request 1 is in core 1's; a long prompt's
prefill chunks flow through the devices the same way (chunk 2 enters core 0 as chunk 1 moves on to core 1).
Order is safe because every device serves its queue first-in first-out: a request's chunk reaches each slice after
the chunk before it, so each slice's KV cache is extended in position order, exactly as in an unpipelined run.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from exo_rknpu.runtime.shard import Chunk, ShardCall, ShardRunner
from exo_rknpu.slices.spec import SliceSpec


@dataclass
class Stage:
    device: str
    specs: list[SliceSpec]  # consecutive slices of one device; [head] for the head stage
    head: bool = False


@dataclass
class _Flight:
    """One call in flight through the stages: what comes back from its chunks."""

    call: ShardCall
    outputs: dict[int, np.ndarray] = field(default_factory=dict)
    error: BaseException | None = None
    remaining: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish_chunk(self, index: int, out: np.ndarray | None = None, error: BaseException | None = None) -> None:
        with self.lock:
            if out is not None:
                self.outputs[index] = out
            if error is not None and self.error is None:
                self.error = error
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()


@dataclass
class _Item:
    flight: _Flight
    index: int
    stage: int = 0

    @property
    def chunk(self) -> Chunk:
        return self.flight.call.chunks[self.index]


def device_stages(runner: ShardRunner) -> list[Stage]:
    """Consecutive slices on the same device (runner.devices; one device without a plan), then the head."""
    devices = runner.devices
    stages: list[Stage] = []
    for spec in runner.body_specs:
        device = devices[spec.name]
        if stages and stages[-1].device == device:
            stages[-1].specs.append(spec)
        else:
            stages.append(Stage(device, [spec]))
    head = [s for s in runner.specs if s.kind == "head"]
    if head:
        stages.append(Stage(devices[head[0].name], head, head=True))
    return stages


class StagedShard:
    """A ShardRunner driven by one worker thread per device; `forward` may be called from many threads at once
    (one request each). Same contract as ShardRunner.forward; a request may have one call in flight at a time."""

    def __init__(self, runner: ShardRunner) -> None:
        runner.unpool()  # calls of several requests run at once here: each keeps its own cache arrays
        self.runner = runner
        self.stages = device_stages(runner)
        self.lock = threading.Lock()  # the request store and positions
        self.in_flight: set[str] = set()
        self.queues: dict[str, queue.Queue] = {s.device: queue.Queue() for s in self.stages}
        self.workers = [threading.Thread(target=self._serve, args=(d,), name=f"stage-{d}", daemon=True) for d in self.queues]
        for w in self.workers:
            w.start()

    @property
    def layer_range(self):
        return self.runner.layer_range

    @property
    def devices(self) -> list[str]:
        return list(self.queues)

    def forward(self, request_id: str, x: np.ndarray, logits: Literal["all", "last"] = "all",
                start: bool | None = None) -> np.ndarray:
        """ShardRunner.forward's contract (admission for a new request, RequestStateError for an unknown live one,
        roll-back on error), its chunks flowing through the device stages."""
        with self.lock:
            if request_id in self.in_flight:
                raise ValueError(f"request {request_id} already has a call in flight; wait for it")
            call = self.runner.begin(request_id, x, logits, start)  # refusals happen before anything is queued
            self.in_flight.add(request_id)
        flight = _Flight(call, remaining=len(call.chunks))
        for i in range(len(call.chunks)):
            self.queues[self.stages[0].device].put(_Item(flight, i))
        flight.done.wait()
        with self.lock:
            self.in_flight.discard(request_id)
            if flight.error is not None:
                call.rollback()
                raise flight.error
            call.commit()
        outs = [flight.outputs[i] for i in sorted(flight.outputs)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)

    def _serve(self, device: str) -> None:
        q = self.queues[device]
        while True:
            item = q.get()
            if item is None:
                return
            flight = item.flight
            if flight.error is not None:  # an earlier chunk failed: the call is rolled back, skip the rest
                flight.finish_chunk(item.index)
                continue
            try:
                self._step(item)
            except BaseException as e:  # handed to the caller, who raises it
                flight.finish_chunk(item.index, error=e)

    def _step(self, item: _Item) -> None:
        """Run one chunk through its current stage; pass it on, or hand its output back after the last stage."""
        call, stage = item.flight.call, self.stages[item.stage]
        out = None
        if stage.head:
            if call.logits == "all" or item.index == len(call.chunks) - 1:
                h = item.chunk.output()
                out = call.head(h if call.logits == "all" else h[:, -1:])
        else:
            call.run(item.chunk, stage.specs)
        item.stage += 1
        if item.stage < len(self.stages):
            self.queues[self.stages[item.stage].device].put(item)
            return
        if not stage.head:
            out = item.chunk.output()
        item.flight.finish_chunk(item.index, out)  # with logits="last" only the final chunk has an output

    def drop(self, request_id: str) -> None:
        with self.lock:
            self.runner.drop(request_id)

    def close(self) -> None:
        for q in self.queues.values():
            q.put(None)
        for w in self.workers:
            w.join(timeout=30)
        self.runner.close()
