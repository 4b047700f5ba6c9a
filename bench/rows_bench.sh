#!/usr/bin/env bash
# Issue #10's row-store benchmarks in one run: the disk's own limit (fio, before and after),
# the demo layer's bf16 table in RAM / mmap / direct with caches of 1%, 10%, 50% (prefill and
# decode on natural text), the cache policies' hit rates, and a V4.1-geometry table.
#
#   bash bench/rows_bench.sh W_BF16 TEXT [V41_DIR] OUT_DIR
#
# W_BF16: demo-layer weights with a bf16 table (engram init --dtype bf16); TEXT: a plain-text
# file; V41_DIR: config.json + model.safetensors from bench/make_v41_checkpoint.py (optional).
set -euo pipefail
W=$1; T=$2
if [ $# -ge 4 ]; then V=$3; OUT=$4; else V=""; OUT=$3; fi
B=${ENGRAM:-target/release/engram}
mkdir -p "$OUT"
tb=$(stat -c %s "$W")
fio_run() { # file tag
  for eng in "io_uring --iodepth=64" "psync --numjobs=64 --group_reporting"; do
    fio --name=r --filename="$1" --rw=randread --bs=4k --direct=1 --ioengine=$eng \
      --runtime=10 --time_based --readonly --output-format=json \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'tag': '$2', 'engine': '${eng%% *}', 'iops': sum(j['read']['iops'] for j in d['jobs'])}))"
  done >> "$OUT/fio.jsonl"
}
: > "$OUT/fio.jsonl"; : > "$OUT/runs.jsonl"
fio_run "$W" demo-before
run() { # tag args...
  local tag=$1; shift
  echo "== $tag" >&2
  $B bench --weights "$W" --dtype bf16 --text-file "$T" --json "$@" \
    | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d['tag']='$tag'; print(json.dumps(d))" >> "$OUT/runs.jsonl"
}
pct() { echo $(( tb * $1 / 100 )); }
for mode in "--tokens 16384 --runs 3" "--decode --batch 1 --tokens 256 --runs 3" "--decode --batch 64 --tokens 128 --runs 3"; do
  m=$(echo "$mode" | awk '{print ($1=="--decode") ? "decode-B" $3 : "prefill"}')
  run "$m ram" $mode --table-io ram
  run "$m mmap" $mode
  run "$m direct" $mode --table-io direct
  for p in 1 10 50; do
    run "$m direct+$p%" $mode --table-io direct --table-cache $(pct $p)
  done
done
fio_run "$W" demo-after
$B table cache-sim --text-file "$T" --budgets 0.1%,1%,5%,10%,50% > "$OUT/cache_sim.txt"
if [ -n "$V" ]; then
  fio_run "$V/model.safetensors" v41
  vb=$(python3 -c "import json; print(json.load(open('$V/config.json'))['engram_num_embeddings'][0]*264)")
  for args in "--table-io direct" "--table-io direct --table-cache $((vb / 100))" "--table-io direct --table-cache $((vb / 10))" "--table-io mmap"; do
    echo "== v41 $args" >&2
    $B bench --config "$V/config.json" --layer 1 --weights "$V/model.safetensors" --tokens 2048 \
      --runs 3 --text-file "$T" --json $args \
      | python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d['tag']='v41 $args'; print(json.dumps(d))" >> "$OUT/runs.jsonl"
  done
fi
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
out = sys.argv[1]
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
fio = [json.loads(l) for l in open(f"{out}/fio.jsonl")]
print("fio 4 KiB random reads, O_DIRECT:")
for f in fio:
    print(f"- {f['tag']}: {f['engine']} {f['iops']:,.0f} IOPS")
print()
print("| run | tokens/s | vs ram | step ms | hit rate | rows read/s | reads in flight | io_wait s/run | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|")
ram = {}
for r in runs:
    t = r["tag"]
    mode = t.split(" ")[0]
    if t.endswith(" ram"):
        ram[mode] = r["tokens_per_s"]
def fmt(x, f):
    return "" if x is None else f.format(x)
for r in runs:
    t = r["tag"]
    st = r.get("row_store") or {}
    mode = t.split(" ")[0]
    rel = r["tokens_per_s"] / ram[mode] if mode in ram else None
    io = (r.get("stage_thread_s_per_run") or {}).get("io_wait")
    direct = st.get("table_io") == "direct"
    cached = bool(st.get("table_cache_bytes"))
    cells = [
        t,
        fmt(r["tokens_per_s"], "{:,.0f}"),
        fmt(None if rel is None else 100 * rel, "{:.0f}%"),
        fmt(r.get("step_latency_ms"), "{:.3f}"),
        fmt(100 * st["hit_rate"] if cached else None, "{:.1f}%"),
        fmt(st.get("rows_read_per_s") if direct else None, "{:,.0f}"),
        fmt(st.get("io_depth_mean") if direct else None, "{:.1f}"),
        fmt(io, "{:.3f}"),
        fmt(r.get("peak_rss_bytes", 0) / 1e6, "{:,.0f}"),
    ]
    print("| " + " | ".join(cells) + " |")
PY
