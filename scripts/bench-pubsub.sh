#!/usr/bin/env bash
# What a wake-up or Watch event costs a Redis Cluster: classic PUBLISH (the cluster forwards it
# to every node over its bus) against sharded SPUBLISH (it stays on the channel's shard), with
# one subscriber per node as lockd replicas would have. Starts a 3-master cluster, runs
# redis-benchmark with each command, and reports requests/s and the CPU time all nodes spent per
# message (utime + stime from /proc). Usage: scripts/bench-pubsub.sh [REQUESTS] (default 200000).
set -euo pipefail

REQUESTS=${1:-200000}
for tool in redis-server redis-cli redis-benchmark python3; do
  command -v "$tool" >/dev/null || { echo "bench-pubsub.sh: $tool is missing (apt-get install -y redis-server redis-tools)" >&2; exit 1; }
done

TMP=$(mktemp -d -t lockd-pubsub.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p < 55535: print(p); break'
}

PORTS=()
NODE_PIDS=()
for _ in 1 2 3; do
  port=$(free_port)
  mkdir -p "$TMP/$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --dir "$TMP/$port" --cluster-enabled yes --cluster-config-file "$TMP/$port/nodes.conf" \
    </dev/null >/dev/null 2>&1 &
  PIDS+=($!)
  NODE_PIDS+=($!)
  PORTS+=("$port")
done
for port in "${PORTS[@]}"; do
  until [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; do sleep 0.05; done
done
redis-cli --cluster create "${PORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
for port in "${PORTS[@]}"; do
  until redis-cli -p "$port" cluster info | grep -q cluster_state:ok; do sleep 0.05; done
done

ticks() {
  local total=0 pid
  for pid in "${NODE_PIDS[@]}"; do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

# One subscriber per node, as three lockd replicas subscribed through different nodes.
CHANNEL='lockd:{bench}:released'
# SPUBLISH must go to the node that serves the channel's slot; the others answer MOVED.
SLOT_PORT=
for port in "${PORTS[@]}"; do
  case "$(redis-cli -p "$port" spublish "$CHANNEL" probe 2>&1)" in
    *MOVED*) ;;
    *) SLOT_PORT=$port; break ;;
  esac
done
[ -n "$SLOT_PORT" ] || { echo "bench-pubsub.sh: no node serves $CHANNEL" >&2; exit 1; }
for port in "${PORTS[@]}"; do
  redis-cli -p "$port" subscribe "$CHANNEL" >/dev/null &
  PIDS+=($!)
done
redis-cli -p "$SLOT_PORT" ssubscribe "$CHANNEL" >/dev/null &
PIDS+=($!)
sleep 0.5

echo "== 3-master cluster on $(nproc) CPUs, $(redis-server --version | cut -d' ' -f3), $REQUESTS messages of 40 bytes, 50 connections"
for cmd in PUBLISH SPUBLISH; do
  before=$(ticks)
  start=$(date +%s.%N)
  rps=$(redis-benchmark -p "$SLOT_PORT" -n "$REQUESTS" -c 50 -q \
    "$cmd" "$CHANNEL" "job-1234567890-abcdefghijklmnopqrstuvw" | tr '\r' '\n' | awk '/requests per second/ { for (i = 2; i <= NF; i++) if ($i == "requests") v = $(i - 1) } END { print v }')
  after=$(ticks)
  awk -v cmd="$cmd" -v rps="$rps" -v t="$((after - before))" -v hz="$HZ" -v n="$REQUESTS" 'BEGIN {
    printf "%-8s %10s requests/s   all nodes: %6.1f us CPU per message\n", cmd, rps, t / hz / n * 1e6 }'
done
