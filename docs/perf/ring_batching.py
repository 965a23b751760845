"""Issue 19's ring figure: a two-node ring (both nodes on the onnx backend, smollm2-135m, default weights) answering
8 chat requests sent one after another, then the same 8 sent at once (their decode steps batch on each node). Prints
completion tokens per wall second of each and checks every answer equals the one the request gets alone. Not a
test (timings are not asserted); needs legacy exo.

    python docs/perf/ring_batching.py      (from the repository root, in the venv with exo)
    python docs/perf/ring_batching.py --backends numpy,onnx     (node-a on the numpy reference: far slower)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "tests" / "exo_integration")]

from ring_figures import two_node_ring  # noqa: E402
from test_ring_load_and_faults import post  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a large animal.", "What is 2 plus 2?", "Say hello.",
             "What colour is the sky?", "Name a fruit.", "What is water made of?", "Name a planet."]
MAX_TOKENS = 24


def ask(q: str) -> dict:
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": q}], "max_tokens": MAX_TOKENS}


def burst(url: str, together: bool, check: bool = True) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
            results = list(pool.map(lambda q: post(url, ask(q)), QUESTIONS))
    else:
        results = [post(url, ask(q)) for q in QUESTIONS]
    wall = time.perf_counter() - t
    assert not check or all(s == 200 for s, _ in results), results
    return wall, [b for _, b in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="onnx,onnx", help="node-a,node-b (default: onnx,onnx)")
    a, b = ap.parse_args().backends.split(",")
    with two_node_ring((a, b)) as url:
        # warm-up: sessions open; a ring still settling its partition may fail a request or two here
        burst(url, together=False, check=False)
        for together in (False, True, False, True):
            wall, bodies = burst(url, together)
            tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
            answers = [b["choices"][0]["message"]["content"] for b in bodies]
            if not together:
                alone = answers
            print(f"{'8 at once     ' if together else 'one at a time '}: {tokens} tokens in {wall:.1f} s = "
                  f"{tokens / wall:.1f} tok/s; answers as alone: {answers == alone}", flush=True)


if __name__ == "__main__":
    main()
