#!/usr/bin/env python3
"""Python call overhead of the `engram` package: wall time of a call from Python against the
time the engine itself spent inside it (`last_engine_seconds`), for a decode step (B=1, one
token with carried state) and a prefill of L=4096 tokens on the full default layer.

    python bench/python_overhead.py [--tokens 4096] [--steps 2000] [--runs 5]
"""
import argparse
import json
import statistics
import time

import numpy as np

import engram


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    layer = engram.Engram.torch_default({}, 0)  # the full default layer (10.3M-row table)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128000, size=(1, a.tokens), dtype=np.int64)
    h = rng.standard_normal((1, a.tokens, 4, 1024), dtype=np.float32)
    layer.forward(ids, h)  # warm-up
    walls, engine = [], []
    for _ in range(a.runs):
        t = time.perf_counter()
        layer.forward(ids, h)
        walls.append(time.perf_counter() - t)
        engine.append(layer.last_engine_seconds)
    pre_wall, pre_eng = statistics.median(walls), statistics.median(engine)
    st = layer.new_state()
    one_id = ids[0, :1].copy()
    one_h = h[0, :1].copy()
    for _ in range(50):
        layer.forward_chunk(st, one_id, one_h)
    dw, de = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        layer.forward_chunk(st, one_id, one_h)
        dw.append(time.perf_counter() - t)
        de.append(layer.last_engine_seconds)
    dec_wall, dec_eng = statistics.median(dw), statistics.median(de)
    row = {
        "prefill_tokens": a.tokens,
        "prefill_wall_s": pre_wall,
        "prefill_engine_s": pre_eng,
        "prefill_overhead_share": (pre_wall - pre_eng) / pre_eng,
        "decode_wall_us": dec_wall * 1e6,
        "decode_engine_us": dec_eng * 1e6,
        "decode_overhead_us": (dec_wall - dec_eng) * 1e6,
    }
    print(json.dumps(row))
    print(
        f"prefill L={a.tokens}: {pre_wall*1e3:.1f} ms from Python, {pre_eng*1e3:.1f} ms in the engine "
        f"({100*row['prefill_overhead_share']:.2f}% overhead); decode B=1 step: {dec_wall*1e6:.1f} us from Python, "
        f"{dec_eng*1e6:.1f} us in the engine ({row['decode_overhead_us']:.1f} us overhead)"
    )


if __name__ == "__main__":
    main()
