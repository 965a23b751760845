"""Copy a GGUF with its block-quantized matrices re-encoded as another GGUF type (gguf-py's own quantizer):
metadata, tokenizer and every other tensor as they are. scripts/arm64-emulation.sh makes smollm2-135m's Q4_1 file
into a Q8_0 one with it, so that `--weights auto` runs split8 (8-bit blocks as 4-bit blocks over K doubled) in
every layer, not only in the tied head.

    python docs/perf/requant_gguf.py IN.gguf OUT.gguf [Q8_0]
"""
from __future__ import annotations

import sys

import gguf
import numpy as np


def requantize(src: str, dst: str, qtype: str = "Q8_0") -> None:
    """Write `dst`: `src` with each Q4_0/Q4_1 tensor dequantized and quantized again as `qtype`."""
    target = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]))
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        if t.tensor_type in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            writer.add_tensor(t.name, gguf.quants.quantize(w, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    requantize(*sys.argv[1:])
