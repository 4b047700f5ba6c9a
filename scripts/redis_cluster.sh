#!/usr/bin/env bash
# A local Redis Cluster for tests and benchmarks: 3 masters + 3 replicas on loopback.
#   bash scripts/redis_cluster.sh start DIR [FIRST_PORT]   (default 7100: ports 7100-7105)
#   bash scripts/redis_cluster.sh stop DIR
# Needs redis-server and redis-cli (Debian: redis-server, redis-tools). Data lives in DIR;
# no persistence (no RDB, no AOF). cluster-node-timeout 1000 ms and replica validity factor 0,
# so a dead master's replica always takes over, within a few seconds.
set -euo pipefail
cmd=$1; dir=$2; p0=${3:-7100}
case "$cmd" in
start)
  mkdir -p "$dir"
  for i in 0 1 2 3 4 5; do
    if redis-cli -p $((p0 + i)) ping >/dev/null 2>&1; then
      echo "port $((p0 + i)) already answers (a cluster left running?); stop it or pick another first port" >&2
      exit 1
    fi
  done
  echo "$p0" > "$dir/first_port"
  nodes=()
  for i in 0 1 2 3 4 5; do
    p=$((p0 + i)); d="$dir/$p"; mkdir -p "$d"
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$d/nodes.conf" --cluster-node-timeout 1000 \
      --cluster-replica-validity-factor 0 \
      --dir "$d" --save "" --appendonly no --daemonize yes \
      --pidfile "$d/redis.pid" --logfile "$d/redis.log" --protected-mode yes
    nodes+=("127.0.0.1:$p")
  done
  for i in 0 1 2 3 4 5; do
    for _ in $(seq 50); do redis-cli -p $((p0 + i)) ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log"
  for _ in $(seq 200); do
    up=0
    for i in 0 1 2 3 4 5; do
      r=$(redis-cli -p $((p0 + i)) info replication)
      if echo "$r" | grep -q "role:master" || echo "$r" | grep -q "master_link_status:up"; then
        up=$((up + 1))
      fi
    done
    if [ $up -eq 6 ] && redis-cli -p "$p0" cluster info | grep -q "cluster_state:ok"; then
      echo "redis cluster up: redis://127.0.0.1:$p0 (ports $p0-$((p0 + 5)), data in $dir)"
      exit 0
    fi
    sleep 0.1
  done
  echo "redis cluster did not reach cluster_state:ok with every replica in sync; see $dir/create.log" >&2
  exit 1
  ;;
stop)
  # By port (a pid file may be stale after a node was killed); then wait for them to exit.
  [ -f "$dir/first_port" ] && p0=$(cat "$dir/first_port")
  for i in 0 1 2 3 4 5; do
    redis-cli -p $((p0 + i)) shutdown nosave >/dev/null 2>&1 || true
  done
  for i in 0 1 2 3 4 5; do
    for _ in $(seq 50); do redis-cli -p $((p0 + i)) ping >/dev/null 2>&1 || break; sleep 0.1; done
  done
  ;;
*) echo "usage: $0 start|stop DIR [FIRST_PORT]" >&2; exit 2 ;;
esac
