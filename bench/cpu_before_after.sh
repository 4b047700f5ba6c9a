#!/usr/bin/env bash
# Prefill of two builds, interleaved, in one run: for each ISA (AVX-512, AVX2 through
# ENGRAM_ISA) and dtype, ROUNDS pairs of bench processes (5 runs each), the two builds
# alternating so that both see the same moments of a shared machine. Writes one JSON line
# per process (tagged build=before|after) and prints the medians. The share printed is
# recomputed the same way for both builds, at the higher of each process's two peak
# measurements (builds before 2026-11-29 reported the share at their mean).
#
#   bash bench/cpu_before_after.sh BEFORE_BIN AFTER_BIN OUT.jsonl [ROUNDS]
set -euo pipefail
BEFORE=$1; AFTER=$2; OUT=$3; ROUNDS=${4:-5}
: > "$OUT"
isas="avx512 avx2"
# Only the ISAs this CPU has (ENGRAM_ISA=avx512 on an AVX2-only CPU runs AVX2 again).
grep -qw avx512f /proc/cpuinfo 2>/dev/null || isas="avx2"
for isa in $isas; do
  for dt in f32 bf16; do
    for r in $(seq "$ROUNDS"); do
      for v in before after; do
        bin=$BEFORE; [ "$v" = after ] && bin=$AFTER
        ENGRAM_ISA=$isa "$bin" bench --json --dtype "$dt" --tokens 4096 --runs 5 \
          | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d.update(isa='$isa', build='$v'); print(json.dumps(d))" >> "$OUT"
      done
    done
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
g = defaultdict(list)
for r in runs:
    g[(r["isa"], r["dtype"], r["build"])].append(r)
print("| ISA | dtype | build | tok/s (median) | share per process (higher peak) | median | conv | gate | hash+gather | projection (thread-s) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (isa, dt, b), rs in sorted(g.items(), key=lambda kv: (kv[0][0] != "avx512", kv[0][1], kv[0][2] != "before")):
    # The default layer's projection: 2·Dm·(1+HC)·D = 2·1024·5120 FLOPs per token, over the
    # higher of the process's two peak measurements (a busy moment only lowers a peak).
    share = [x["tokens_per_s"] * 2 * 1024 * 5120 / 1e9
             / max(x["fma_peak_gflops_before"], x["fma_peak_gflops_after"]) for x in rs]
    st = {s: statistics.median(x["stage_thread_s_per_run"][s] for x in rs) for s in ("conv", "gate", "hash+gather", "projection")}
    print(f"| {isa} | {dt} | {b} | {statistics.median(x['tokens_per_s'] for x in rs):,.0f} | "
          + ", ".join(f"{s:.2f}" for s in share)
          + f" | {statistics.median(share):.3f} | " + " | ".join(f"{st[s]:.4f}" for s in st) + " |")
PY
