#!/usr/bin/env bash
# Issue #13's benchmarks in one run: the Redis Cluster row store against the RAM and direct
# stores (prefill L=16384 on natural text, decode B=1 and B=64; caches of 1% and 10%, cold
# each run or kept warm), the store alone (`--gather-only`), and redis-benchmark GET
# throughput with the same pipelining on the same cluster (keys that exist, like the rows;
# and the old yardstick, random keys that mostly miss).
#
#   bash bench/redis_bench.sh W_BF16 TEXT URL FIRST_PORT OUT_DIR
#
# The table must already be in the cluster (engram table push --weights W_BF16 --store URL).
set -euo pipefail
W=$1; T=$2; URL=$3; P0=$4; OUT=$5
B=${ENGRAM:-target/release/engram}
mkdir -p "$OUT"; : > "$OUT/runs.jsonl"; : > "$OUT/redis_benchmark.txt"
tb=$(stat -c %s "$W")
masters() { for i in 0 1 2 3 4 5; do
  redis-cli -p $((P0 + i)) info replication | grep -q role:master && echo $((P0 + i)); done; }
stat_sum() { # keyspace_hits or keyspace_misses summed over the masters
  for p in $(masters); do redis-cli -p "$p" info stats | tr -d '\r' | grep "^$1:" | cut -d: -f2; done \
    | awk '{s += $1} END {printf "%.0f\n", s}'; }
missing() { # the old yardstick: random keys over 10M (most GETs miss, 5-byte replies)
  redis-benchmark --cluster -h 127.0.0.1 -p "$P0" -t set,get -n 2000000 -P 256 -d 128 -c 4 \
    -r 10000000 -q 2>/dev/null | tr '\r' '\n' | grep -E "^(SET|GET):.*requests per second" | tail -2 \
    | sed "s/^/$1 (keys over 10M, mostly missing) /" >> "$OUT/redis_benchmark.txt"
}
existing() { # like for like: GETs of 128-byte values that exist, with the servers' hit count
  local h0 m0 line hr; h0=$(stat_sum keyspace_hits); m0=$(stat_sum keyspace_misses)
  line=$(redis-benchmark --cluster -h 127.0.0.1 -p "$P0" -t get -n 3000000 -P 256 -d 128 -c 4 \
    -r 300000 -q 2>/dev/null | tr '\r' '\n' | grep -E "^GET:.*requests per second" | tail -1)
  hr=$(python3 -c "h=$(stat_sum keyspace_hits)-$h0; m=$(stat_sum keyspace_misses)-$m0; print(f'{h/max(h+m,1):.3f}')")
  echo "$1 (existing keys, hit rate $hr) $line" >> "$OUT/redis_benchmark.txt"
}
run() {
  local tag=$1; shift
  echo "== $tag" >&2
  $B bench --weights "$W" --dtype bf16 --text-file "$T" --json "$@" \
    | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d['tag']='$tag'; print(json.dumps(d))" >> "$OUT/runs.jsonl"
}
missing before
# The keys of the like-for-like yardstick: redis-benchmark tags keys per node, so -r 300000
# is 3 x 300k keys; 3M writes leave ~96% of them present.
redis-benchmark --cluster -h 127.0.0.1 -p "$P0" -t set -n 3000000 -P 256 -d 128 -c 4 \
  -r 300000 -q >/dev/null 2>&1
# The store alone, every row of the prefill run gathered with no compute, each time right
# after redis-benchmark's GETs of existing keys (three pairs: the machine is noisy).
for k in 1 2 3; do
  existing "pair $k"
  run "gather-only redis pair $k" --tokens 16384 --runs 5 --gather-only --table-store "$URL"
done
run "gather-only direct" --tokens 16384 --runs 5 --gather-only --table-io direct
for mode in "--tokens 16384 --runs 3" "--decode --batch 1 --tokens 256 --runs 3" "--decode --batch 64 --tokens 128 --runs 3"; do
  m=$(echo "$mode" | awk '{print ($1=="--decode") ? "decode-B" $3 : "prefill"}')
  run "$m ram" $mode --table-io ram
  run "$m direct+10%" $mode --table-io direct --table-cache $((tb / 10))
  run "$m redis" $mode --table-store "$URL"
  run "$m redis+1%" $mode --table-store "$URL" --table-cache $((tb / 100))
  run "$m redis+10%" $mode --table-store "$URL" --table-cache $((tb / 10))
  # The cache kept warm across runs (it holds the hot rows, as in serving).
  run "$m redis+1%warm" $mode --table-store "$URL" --table-cache $((tb / 100)) --warm
  run "$m redis+10%warm" $mode --table-store "$URL" --table-cache $((tb / 10)) --warm
done
missing after
existing after
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
out = sys.argv[1]
print(open(f"{out}/redis_benchmark.txt").read())
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
ram = {r["tag"].split(" ")[0]: r["tokens_per_s"] for r in runs if r["tag"].endswith(" ram")}
import re
limits = {}
for line in open(f"{out}/redis_benchmark.txt"):
    m = re.match(r"(pair \d) \(existing keys.*GET: ([\d.]+) requests per second", line)
    if m:
        limits[m.group(1)] = float(m.group(2))
for r in runs:
    if r["tag"].startswith("gather-only"):
        pair = r["tag"].split("gather-only redis ")[-1]
        if pair in limits:
            print(f"{r['tag']}: {100 * r['rows_per_s'] / limits[pair]:.0f}% of the GET rate before it")
        st = r.get("row_store") or {}
        print(f"{r['tag']}: {r['rows_per_s']:,.0f} rows/s (median of {r['runs']}), "
              f"{st.get('reads_per_s', 0):,.0f} round trips/s, peak RSS {r.get('peak_rss_bytes', 0) / 1e6:,.0f} MB")
print()
runs = [r for r in runs if not r["tag"].startswith("gather-only")]
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
