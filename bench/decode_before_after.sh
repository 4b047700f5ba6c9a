#!/usr/bin/env bash
# Decode steps of two builds, interleaved, in one run: for each ISA (AVX-512, AVX2 through
# ENGRAM_ISA), dtype (f32 and bf16, or DTYPES) and batch (B = 1, 8, 64, or BATCHES), ROUNDS pairs of bench processes (128 steps
# for B <= 8, 16 otherwise; median of 3 runs each), the two builds alternating so that
# both see the same moments of a shared machine. Each process measures its own floor
# (the packed weights at the read bandwidth measured in that process, or the step's FLOPs
# at its FMA peak). Writes one JSON line per process (tagged build=before|after) and
# prints the medians of the step latency and of step/floor.
#
#   [BATCHES="1 2 3 4 8"] [DTYPES=f32] bash bench/decode_before_after.sh BEFORE_BIN AFTER_BIN OUT.jsonl [ROUNDS]
set -euo pipefail
BEFORE=$1; AFTER=$2; OUT=$3; ROUNDS=${4:-4}
: > "$OUT"
isas="avx512 avx2"
# Only the ISAs this CPU has (ENGRAM_ISA=avx512 on an AVX2-only CPU runs AVX2 again).
grep -qw avx512f /proc/cpuinfo 2>/dev/null || isas="avx2"
for isa in $isas; do
  for dt in ${DTYPES:-f32 bf16}; do
    for b in ${BATCHES:-1 8 64}; do
      steps=128; [ "$b" -gt 8 ] && steps=16
      for r in $(seq "$ROUNDS"); do
        for v in before after; do
          bin=$BEFORE; [ "$v" = after ] && bin=$AFTER
          ENGRAM_ISA=$isa "$bin" bench --json --decode --dtype "$dt" --batch "$b" --tokens "$steps" --runs 3 \
            | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d.update(isa='$isa', build='$v'); print(json.dumps(d))" >> "$OUT"
        done
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
    g[(r["isa"], r["dtype"], r["batch"], r["build"])].append(r)
print("| ISA | dtype | B | build | step ms per process | median step (ms) | median step / floor | projection thread-ms per step |")
print("|---|---|---|---|---|---|---|---|")
for (isa, dt, b, v), rs in sorted(g.items(), key=lambda kv: (kv[0][0] != "avx512", kv[0][1], kv[0][2], kv[0][3] != "before")):
    steps = [x["step_latency_ms"] for x in rs]
    ratio = statistics.median(x["step_over_floor"] for x in rs)
    proj = statistics.median(x["stage_thread_s_per_run"]["projection"] * 1e3 / x["tokens"] for x in rs)
    print(f"| {isa} | {dt} | {b} | {v} | " + ", ".join(f"{s:.3f}" for s in steps)
          + f" | {statistics.median(steps):.3f} | {ratio:.2f} | {proj:.3f} |")
PY
