#!/usr/bin/env bash
# A/B benchmark of two lockd binaries: each on its own redis-server, measured alternately
# (A, B, A, B, ...) so that this noisy machine's load hits both alike; lockd-bench's `lockd`
# target runs against one of them at a time (and cleans that Redis between runs).
# Usage: scripts/bench-ab.sh A_BIN B_BIN LOCKD_BENCH_BIN ROUNDS [lockd-bench options...]
# e.g. scripts/bench-ab.sh old/lockd new/lockd target/release/lockd-bench 3 --scenario contended --clients 16
# Placement as in bench.sh: Redis and lockd on CPU 1, the load generator on CPU 0.
set -euo pipefail
A=$1 B=$2 BENCH=$3 ROUNDS=$4
shift 4
TMP=$(mktemp -d -t lockd-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
declare -A RPORT RPID LPORT LPID
for side in A B; do
  RPORT[$side]=$(port); LPORT[$side]=$(port)
  mkdir -p "$TMP/$side"
  taskset -c 1 redis-server --port "${RPORT[$side]}" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$TMP/$side" </dev/null >/dev/null 2>&1 &
  PIDS+=($!); RPID[$side]=$!
  until [ "$(redis-cli -p "${RPORT[$side]}" ping 2>/dev/null)" = PONG ]; do sleep 0.05; done
  bin=$A; [ "$side" = B ] && bin=$B
  REDIS_URL=redis://127.0.0.1:${RPORT[$side]} LOCKD_LISTEN=127.0.0.1:${LPORT[$side]} RUST_LOG=warn \
    taskset -c 1 "$bin" </dev/null >"$TMP/lockd-$side.log" 2>&1 &
  PIDS+=($!); LPID[$side]=$!
done
sleep 1
for round in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    echo "=== round $round: $side"
    taskset -c 0 "$BENCH" --target lockd --redis-url "redis://127.0.0.1:${RPORT[$side]}" \
      --lockd-addr "http://127.0.0.1:${LPORT[$side]}" --lockd-pid "${LPID[$side]}" \
      --redis-pid "${RPID[$side]}" "$@"
  done
done
