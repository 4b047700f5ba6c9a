#!/usr/bin/env python3
"""Writes a DeepSeek-V4.1-geometry Engram checkpoint with random fp8 weights, for the row-store
benchmarks: the real width (dim 5120, hc_mult 4, 24 columns x 256) and a table of the size
asked for (the config's engram_vocab_size is lowered so that the 24 primes per layer sum to
about that many rows; engram_num_embeddings are computed as the reference does). Only
layer 1's tensors are written. The table is streamed to disk in chunks (never held in RAM).

    python3 bench/make_v41_checkpoint.py OUT_DIR --table-gb 10

writes OUT_DIR/config.json and OUT_DIR/model.safetensors (atomically: a temporary name, then
renamed).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

BLOCK = 32


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def layer_rows(vocab: int, layers, orders: int, heads: int):
    """Sum of each layer's primes: per layer, per order, the search restarts at vocab - 1 and
    takes for each head the next prime not taken before (one `seen` set for all layers)."""
    seen, sums = set(), []
    for _ in layers:
        total = 0
        for _ in range(orders):
            cur = vocab - 1
            for _ in range(heads):
                cur += 1
                while not is_prime(cur) or cur in seen:
                    cur += 1
                seen.add(cur)
                total += cur
        sums.append(total)
    return sums


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--table-gb", type=float, default=10.0, help="table size (codes + scales), GB")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dim, hc, heads, hd, n = 5120, 4, 8, 256, 4
    cols = (n - 1) * heads
    row_bytes = hd + hd // BLOCK
    vocab = max(1000, int(a.table_gb * 1e9 / row_bytes / cols))
    layers = [1, 14]
    sums = layer_rows(vocab, layers, n - 1, heads)
    rows = sums[0]
    cfg = {
        "dim": dim, "hc_mult": hc, "norm_eps": 1e-20, "vocab_size": 129280,
        "engram_layer_ids": layers, "engram_vocab_size": vocab, "engram_num_embeddings": sums,
        "engram_max_ngram_size": n, "engram_pad_id": 2,
        # The bundled DeepSeek-V3 tokenizer's compressed vocabulary (the V4.1 one gives 99,092).
        "engram_compressed_vocab_size": 98627, "engram_n_heads": heads, "engram_head_dim": hd,
    }
    kvw, mw = (hc + 1) * dim, cols * hd
    p = "layers.1.engram"
    tensors = [
        (f"{p}.embed.weight", "F8_E4M3", [rows, hd]),
        (f"{p}.embed.scale", "F8_E8M0", [rows, hd // BLOCK]),
        (f"{p}.wkv.weight", "F8_E4M3", [kvw, mw]),
        (f"{p}.wkv.scale", "F8_E8M0", [kvw // BLOCK, mw // BLOCK]),
        (f"{p}.q_weight", "BF16", [hc, dim]),
        (f"{p}.k_weight", "BF16", [hc, dim]),
    ]
    size = {"F8_E4M3": 1, "F8_E8M0": 1, "BF16": 2}
    header, at = {}, 0
    for name, dt, shape in tensors:
        nbytes = int(np.prod(shape)) * size[dt]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "model.safetensors")
    tmp = path + ".partial"
    rng = np.random.default_rng(a.seed)
    chunk = 64 << 20

    def codes(nbytes: int, f):
        """e4m3 codes of |value| up to 2^3, random signs (never the NaN codes)."""
        left = nbytes
        while left:
            k = min(chunk, left)
            c = rng.integers(0, 0x58, size=k, dtype=np.uint8)
            c |= (rng.integers(0, 2, size=k, dtype=np.uint8) << 7)
            f.write(c.tobytes())
            left -= k
            done = nbytes - left
            if nbytes > (1 << 30) and done % (1 << 30) < chunk:
                print(f"  {done / 1e9:.1f} / {nbytes / 1e9:.1f} GB", file=sys.stderr, flush=True)

    def scales(nbytes: int, f, lo: int):
        left = nbytes
        while left:
            k = min(chunk, left)
            f.write(rng.integers(lo, lo + 5, size=k, dtype=np.uint8).tobytes())
            left -= k

    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        codes(rows * hd, f)
        scales(rows * hd // BLOCK, f, 118)
        codes(kvw * mw, f)
        scales(kvw // BLOCK * mw // BLOCK, f, 116)
        qk = (1.0 + ((np.arange(hc * dim) * 37 % 101) - 50) / 500.0).astype(np.float32)
        bf = (qk.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # truncated to bf16
        f.write(bf)
        f.write(bf)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"wrote {path}: table {rows} rows x {hd} ({rows * row_bytes / 1e9:.2f} GB), layer 1; config {a.out}/config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
