"""Figures for docs/exo.md: a two-node ring (numpy + onnx, smollm2-135m, default --max-requests 8) under 8, 16 and
32 concurrent chat requests: how many were served (each checked against the answer the prompt gets alone) and how
many refused, and the wall time of each burst. Not a test (timings are not asserted); needs legacy exo.
docs/perf/ring_batching.py measures in the same kind of ring (`two_node_ring`, both nodes on onnx there).

    python tests/exo_integration/ring_figures.py      (from the repository root, in the venv with exo)
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from exo_helpers import Ring  # noqa: E402
from test_ring_load_and_faults import ANSWER, MEMORY, ask, post, wait_healthy  # noqa: E402


@contextlib.contextmanager
def two_node_ring(backends: tuple[str, str] = ("numpy", "onnx")) -> Iterator[str]:
    """A healthy two-node ring on this host (smollm2-135m, default weights), node-a and node-b on `backends`, in a
    temporary folder; yields node-a's chat-completions URL and stops the ring afterwards."""
    from exo_rknpu.model.zoo import resolve_model

    resolve_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        ring = Ring(Path(tmp), {nid: {"backend": b, "memory": MEMORY[nid]} for nid, b in zip(("node-a", "node-b"), backends)})
        try:
            ring.start()
            wait_healthy(ring, MEMORY)
            yield ring.url("node-a", "/v1/chat/completions")
        finally:
            ring.stop()


def main() -> None:
    with two_node_ring() as url:
        status, body = post(url, ask())
        assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER, body
        for n in (8, 16, 32):
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda _: post(url, ask()), range(n)))
            wall = time.perf_counter() - t
            counts = collections.Counter(s for s, _ in results)
            wrong = sum(1 for s, b in results if s == 200 and b["choices"][0]["message"]["content"] != ANSWER)
            print(f"{n:3d} concurrent: {counts.get(200, 0)} served ({wrong} wrong), {counts.get(429, 0)} refused "
                  f"(429), other {dict((k, v) for k, v in counts.items() if k not in (200, 429))}, "
                  f"{wall:.1f} s", flush=True)


if __name__ == "__main__":
    main()
