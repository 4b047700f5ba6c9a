#!/usr/bin/env bash
# The push of issue #13's table, timed, and Redis's memory per row: `used_memory` summed over
# the cluster's nodes before and after (run it on a cluster that does not hold the table yet;
# `bash scripts/redis_cluster.sh start DIR PORT` makes an empty one).
#
#   bash bench/redis_push.sh W_BF16 URL FIRST_PORT OUT_DIR
set -euo pipefail
W=$1; URL=$2; P0=$3; OUT=$4
B=${ENGRAM:-target/release/engram}
mkdir -p "$OUT"
mem() { for i in 0 1 2 3 4 5; do redis-cli -p $((P0 + i)) info memory | tr -d '\r' \
  | grep '^used_memory:' | cut -d: -f2; done | awk '{s += $1} END {printf "%.0f\n", s}'; }
m0=$(mem)
{ time "$B" table push --weights "$W" --store "$URL"; } > "$OUT/push.txt" 2>&1
sleep 3
m1=$(mem)
echo "used_memory summed over the 6 nodes: before $m0, after $m1 bytes" >> "$OUT/push.txt"
for i in 0 1 2 3 4 5; do
  p=$((P0 + i))
  echo "port $p: dbsize $(redis-cli -p $p dbsize), $(redis-cli -p $p info replication | tr -d '\r' | grep ^role)"
done >> "$OUT/push.txt"
cat "$OUT/push.txt"
