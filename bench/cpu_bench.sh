#!/usr/bin/env bash
# Issue #14's CPU measurements in one run, limits measured in the same run:
#   - `engram bench --fma-peak` and `--mem-bw` before and after;
#   - per ISA (AVX-512, AVX2 through ENGRAM_ISA; whatever this CPU runs) and dtype (f32,
#     bf16): prefill L = 4096, B = 1, ROUNDS separate processes of 5 runs each (the
#     median of their `fma_peak_share` is the figure), then decode B = 1/8/64/256 (5 runs
#     of 512 steps for B <= 8, 64 for B = 64, 16 for B = 256), step latency against its
#     floor.
#
#   bash bench/cpu_bench.sh OUT_DIR [ROUNDS]
#
# Writes OUT_DIR/limits.txt, OUT_DIR/runs.jsonl (one JSON line per bench process, tagged)
# and prints the summary (bench/cpu_summary.py).
set -euo pipefail
OUT=$1; ROUNDS=${2:-5}
B=${ENGRAM:-target/release/engram}
mkdir -p "$OUT"
: > "$OUT/runs.jsonl"
{ echo "== before"; $B bench --fma-peak; $B bench --mem-bw; } > "$OUT/limits.txt"
run() { # isa tag args...
  local isa=$1 tag=$2; shift 2
  echo "== $isa $tag" >&2
  ENGRAM_ISA=$isa $B bench --json "$@" \
    | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d['tag']='$tag'; d['isa']='$isa'; print(json.dumps(d))" >> "$OUT/runs.jsonl"
}
isas="avx512 avx2"
# Only the ISAs this CPU has (ENGRAM_ISA=avx512 on an AVX2-only CPU runs AVX2 again).
grep -qw avx512f /proc/cpuinfo 2>/dev/null || isas="avx2"
case "$(uname -m)" in aarch64) isas="neon";; esac
for isa in $isas; do
  for dt in f32 bf16; do
    for r in $(seq "$ROUNDS"); do
      run "$isa" "prefill $dt" --dtype "$dt" --tokens 4096 --runs 5
    done
    for b in 1 8 64 256; do
      # Runs of 0.04-0.3 s (512 steps for B <= 8, 64 for B = 64, 16 for B = 256), five of
      # them: with three runs of 128 steps (10 ms at B = 1) one burst of the other tenant
      # moved a whole run, and the median with it.
      case $b in 1|8) steps=512;; 64) steps=64;; *) steps=16;; esac
      run "$isa" "decode $dt B=$b" --dtype "$dt" --decode --batch "$b" --tokens "$steps" --runs 5
    done
  done
done
{ echo "== after"; $B bench --fma-peak; $B bench --mem-bw; } >> "$OUT/limits.txt"
python3 "$(dirname "$0")/cpu_summary.py" "$OUT/runs.jsonl" | tee "$OUT/summary.md"
