#!/usr/bin/env bash
# Issue #13's benchmarks in one run: the Redis Cluster row store against the RAM and direct
# stores (prefill L=16384 on natural text, decode B=1 and B=64; caches of 1% and 10%), and
# redis-benchmark GET throughput with the same pipelining on the same cluster.
#
#   bash bench/redis_bench.sh W_BF16 TEXT URL FIRST_PORT OUT_DIR
#
# The table must already be in the cluster (engram table push --weights W_BF16 --store URL).
set -euo pipefail
W=$1; T=$2; URL=$3; P0=$4; OUT=$5
B=${ENGRAM:-target/release/engram}
mkdir -p "$OUT"; : > "$OUT/runs.jsonl"; : > "$OUT/redis_benchmark.txt"
tb=$(stat -c %s "$W")
rb() { # redis-benchmark GETs of 128-byte values, pipelines of 256, 4 connections per node
  redis-benchmark --cluster -h 127.0.0.1 -p "$P0" -t set,get -n 2000000 -P 256 -d 128 -c 4 \
    -r 10000000 -q 2>/dev/null | tr '\r' '\n' | grep -E "^(SET|GET):.*requests per second" | tail -2 \
    | sed "s/^/$1 /" >> "$OUT/redis_benchmark.txt"
}
rb before
run() {
  local tag=$1; shift
  echo "== $tag" >&2
  $B bench --weights "$W" --dtype bf16 --text-file "$T" --json "$@" \
    | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d['tag']='$tag'; print(json.dumps(d))" >> "$OUT/runs.jsonl"
}
for mode in "--tokens 16384 --runs 3" "--decode --batch 1 --tokens 256 --runs 3" "--decode --batch 64 --tokens 128 --runs 3"; do
  m=$(echo "$mode" | awk '{print ($1=="--decode") ? "decode-B" $3 : "prefill"}')
  run "$m ram" $mode --table-io ram
  run "$m direct+10%" $mode --table-io direct --table-cache $((tb / 10))
  run "$m redis" $mode --table-store "$URL"
  run "$m redis+1%" $mode --table-store "$URL" --table-cache $((tb / 100))
  run "$m redis+10%" $mode --table-store "$URL" --table-cache $((tb / 10))
done
rb after
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
out = sys.argv[1]
print(open(f"{out}/redis_benchmark.txt").read())
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
ram = {r["tag"].split(" ")[0]: r["tokens_per_s"] for r in runs if r["tag"].endswith(" ram")}
print("| run | tokens/s | of RAM | step ms | hit rate | rows fetched/s | round trips/s | rows per trip | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|")
for r in runs:
    st = r.get("row_store") or {}
    m = r["tag"].split(" ")[0]
    rows = st.get("rows_read_per_s"); trips = st.get("reads_per_s")
    def f(x, s):
        return "" if x is None else s.format(x)
    print("| " + " | ".join([
        r["tag"], f(r["tokens_per_s"], "{:,.0f}"), f(100 * r["tokens_per_s"] / ram[m], "{:.0f}%"),
        f(r.get("step_latency_ms"), "{:.3f}"),
        f(100 * st["hit_rate"] if st.get("table_cache_bytes") else None, "{:.1f}%"),
        f(rows if st else None, "{:,.0f}"), f(trips if st else None, "{:,.0f}"),
        f(rows / trips if st and trips else None, "{:.0f}"),
        f(r.get("peak_rss_bytes", 0) / 1e6, "{:,.0f}"),
    ]) + " |")
PY
