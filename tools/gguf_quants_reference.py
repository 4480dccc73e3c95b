#!/usr/bin/env python3
"""Writes tests/fixtures/gguf-quants.gguf and gguf-quants.json: one (2, 256) tensor of
every GGUF type Tandem dequantizes, and the float32 values llama.cpp's own Python
package (gguf-py, `gguf.quants.dequantize`) decodes from the same bytes, for
model/tests/gguf.rs. Candle decodes the blocks on Tandem's side, so the two are
independent implementations of llama.cpp's block formats.

    pip install gguf numpy
    python tools/gguf_quants_reference.py

The quantized blocks are random bytes (every bit pattern is a valid block) with their
f16 scale fields set to small finite values, so every code path of a decoder is hit
(all quant values, both halves of the K-quants' 6-bit scales). Seeded: the files are
reproducible.
"""
import argparse
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Byte offsets of the f16 fields (d, and dmin or m) inside one block.
SCALE_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
ROWS, COLS = 2, 256


def raw_tensor(qtype, rng):
    """(bytes as uint8 (ROWS, bytes per row), the values gguf-py decodes)."""
    if qtype == T.F32:
        values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
        raw = values.view(np.uint8)
    elif qtype == T.F16:
        raw = rng.standard_normal((ROWS, COLS)).astype(np.float16).view(np.uint8)
    elif qtype == T.BF16:
        bits = (rng.standard_normal((ROWS, COLS)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = bits.view(np.uint8)
    else:
        block, size = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
        for at in SCALE_FIELDS[qtype]:
            scale = rng.uniform(0.001, 0.05, size=blocks.shape[0]).astype(np.float16)
            blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
        raw = blocks.reshape(ROWS, -1)
    return raw, dequantize(raw, qtype).reshape(ROWS, COLS).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    rng = np.random.default_rng(11)
    path = os.path.join(args.out, "gguf-quants.gguf")
    writer = GGUFWriter(path, "llama")
    expected = {}
    for qtype in [T.F32, T.F16, T.BF16, *SCALE_FIELDS]:
        raw, values = raw_tensor(qtype, rng)
        writer.add_tensor(qtype.name, raw, raw_dtype=qtype)
        expected[qtype.name] = {"shape": [ROWS, COLS], "values": [float(x) for x in values.flatten()]}
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(os.path.join(args.out, "gguf-quants.json"), "w") as f:
        json.dump({"tensors": expected}, f)
    print(f"wrote {path} and gguf-quants.json")


if __name__ == "__main__":
    main()
