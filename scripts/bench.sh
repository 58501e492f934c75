#!/usr/bin/env bash
# Full lockd benchmark: builds in release, starts its own redis-server and two lockd servers
# (one on that Redis, one with its in-memory backend), runs lockd-bench against redis-direct,
# lockd and lockd-memory (all scenarios, 1/16/128/1024 clients), prints the table, and stops
# everything it started on exit. About 2.5 minutes after the build.
#
# Placement (2+ cores, taskset available): redis-server and both lockd on CPU 1, the load
# generator on CPU 0, so the servers never compete with the client for a core. Override with
# SERVER_CPUS / BENCH_CPUS (taskset -c lists); with fewer than 2 cores nothing is pinned.
#
# Knobs (environment): BENCH_DURATION (3s), BENCH_WARMUP (500ms), BENCH_CLIENTS
# (1,16,128,1024), BENCH_CONNECTIONS (4), LOCKD_REDIS_POOL_SIZE (lockd's default: 4), and
# LOCKD_BIN: a lockd binary to measure instead of building this tree's (e.g. one built from a
# committed revision while the working tree is mid-change); only lockd-bench is built then.
# Extra arguments go to lockd-bench, e.g. `scripts/bench.sh --scenario contended`.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-3s}
WARMUP=${BENCH_WARMUP:-500ms}
CLIENTS=${BENCH_CLIENTS:-1,16,128,1024}
CONNECTIONS=${BENCH_CONNECTIONS:-4}

for tool in redis-server redis-cli python3; do
  if ! command -v "$tool" >/dev/null; then
    echo "bench.sh: $tool is missing (apt-get install -y redis-server redis-tools python3)" >&2
    exit 1
  fi
done

echo "== build"
if [ -n "${LOCKD_BIN:-}" ]; then
  cargo build --release -p lockd-bench
else
  cargo build --release -p lockd -p lockd-bench
  LOCKD_BIN=$ROOT/target/release/lockd
fi

TMP=$(mktemp -d -t lockd-bench.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Pinning: servers on one core, load generator on the other.
SERVER_PIN=()
BENCH_PIN=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  SERVER_CPUS=${SERVER_CPUS:-1}
  BENCH_CPUS=${BENCH_CPUS:-0}
  SERVER_PIN=(taskset -c "$SERVER_CPUS")
  BENCH_PIN=(taskset -c "$BENCH_CPUS")
  PLACEMENT="redis-server + lockd + lockd-memory on CPU $SERVER_CPUS; lockd-bench on CPU $BENCH_CPUS"
else
  PLACEMENT="not pinned ($(nproc) CPUs, taskset $(command -v taskset >/dev/null && echo present || echo missing))"
fi

REDIS_PORT=$(free_port)
"${SERVER_PIN[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no --dir "$TMP" </dev/null >/dev/null 2>&1 &
PIDS+=($!)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
for _ in $(seq 200); do
  [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
  sleep 0.05
done
[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] || { echo "bench.sh: redis-server did not start" >&2; exit 1; }

LOCKD_PORT=$(free_port)
env REDIS_URL="$REDIS_URL" RUST_LOG=warn "${SERVER_PIN[@]}" "$LOCKD_BIN" \
  --listen "127.0.0.1:$LOCKD_PORT" </dev/null >"$TMP/lockd.log" 2>&1 &
PIDS+=($!)
MEMORY_PORT=$(free_port)
env -u REDIS_URL -u REDIS_HOST RUST_LOG=warn "${SERVER_PIN[@]}" "$LOCKD_BIN" \
  --listen "127.0.0.1:$MEMORY_PORT" </dev/null >"$TMP/lockd-memory.log" 2>&1 &
PIDS+=($!)

wait_for_port() {
  local port=$1 name=$2
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "bench.sh: $name did not listen on $port; its log:" >&2
  cat "$TMP/$name.log" >&2
  exit 1
}
wait_for_port "$LOCKD_PORT" lockd
wait_for_port "$MEMORY_PORT" lockd-memory

echo "== machine: $(nproc) CPUs, $(redis-server --version | cut -d' ' -f3), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== placement: $PLACEMENT"
echo "== lockd binary: $LOCKD_BIN"
echo "== redis $REDIS_URL, lockd :$LOCKD_PORT (pool size ${LOCKD_REDIS_POOL_SIZE:-4}), lockd-memory :$MEMORY_PORT"

mkdir -p "$ROOT/target/bench"
JSON="$ROOT/target/bench/lockd-bench-$(date +%Y%m%d-%H%M%S).json"
START=$SECONDS
"${BENCH_PIN[@]}" "$ROOT/target/release/lockd-bench" \
  --target redis-direct,lockd,lockd-memory \
  --scenario all \
  --clients "$CLIENTS" \
  --connections "$CONNECTIONS" \
  --duration "$DURATION" \
  --warmup "$WARMUP" \
  --redis-url "$REDIS_URL" \
  --lockd-addr "http://127.0.0.1:$LOCKD_PORT" \
  --lockd-memory-addr "http://127.0.0.1:$MEMORY_PORT" \
  --json "$@" >"$JSON"
echo
echo "== benchmark took $((SECONDS - START))s; placement: $PLACEMENT; JSON: $JSON"
if grep -qiE "error|panic" "$TMP/lockd.log" "$TMP/lockd-memory.log"; then
  echo "== lockd logged errors:"
  grep -hiE "error|panic" "$TMP/lockd.log" "$TMP/lockd-memory.log" | head -20
fi
