"""The native quantized matmul: block-quantized weights (Q4_0, Q4_1, Q8_0, Q6_K) times int16-quantized activations, with
the same result bits on every CPU (notes in qmatmul.c). Depends on numpy only; the library is built on first use.

- pack.py: the packed weight layout (`pack`, `packed_bytes`), the same bytes on every machine.
- reference.py: the arithmetic in numpy, the tests' reference.
- build.py: compiles qmatmul.c into the cache (`library`).
- kernel.py: ctypes calls for tests and benchmarks (`qmatmul`).
"""

from exo_rknpu.native.pack import FORMATS, Q4_0, Q4_1, Q6_K, Q8_0, ROW_GROUP, pack, packed_bytes

__all__ = ["FORMATS", "Q4_0", "Q4_1", "Q6_K", "Q8_0", "ROW_GROUP", "pack", "packed_bytes"]
