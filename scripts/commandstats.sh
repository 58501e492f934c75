#!/usr/bin/env bash
# Redis work per lock operation, from INFO commandstats: starts its own redis-server and lockd
# (release build, or LOCKD_BIN), runs lockd-bench's uncontended scenario (Acquire + Release of
# each client's own resource) against lockd and, for comparison, redis-direct (SET NX PX and a
# compare-and-delete script), and prints, per Acquire + Release pair, the calls and the
# microseconds Redis spent in each command (commands run inside scripts are counted too).
# Usage: scripts/commandstats.sh [OPS] (default 20000 operations per target, 16 clients).
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${1:-20000}
if [ -z "${LOCKD_BIN:-}" ]; then
  cargo build --release -p lockd -p lockd-bench
  LOCKD_BIN=$PWD/target/release/lockd
else
  cargo build --release -p lockd-bench
fi
TMP=$(mktemp -d -t lockd-cmdstats.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" </dev/null >/dev/null 2>&1 &
PIDS+=($!)
until [ "$(redis-cli -p "$RP" ping 2>/dev/null)" = PONG ]; do sleep 0.05; done
LP=$(free_port)
env REDIS_URL="redis://127.0.0.1:$RP" RUST_LOG=warn "$LOCKD_BIN" --listen "127.0.0.1:$LP" </dev/null >"$TMP/lockd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$LP") 2>/dev/null && break; sleep 0.05; done

for target in lockd redis-direct; do
  redis-cli -p "$RP" config resetstat >/dev/null
  target/release/lockd-bench --target "$target" --scenario uncontended --clients 16 --ops "$OPS" \
    --warmup 0s --redis-url "redis://127.0.0.1:$RP" --lockd-addr "http://127.0.0.1:$LP" >/dev/null 2>&1
  echo "== $target: per Acquire + Release ($OPS operations)"
  redis-cli -p "$RP" info commandstats | tr -d '\r' | awk -F'[:=,]' -v ops="$OPS" '
    /^cmdstat_/ && $3 > 0 {
      name = substr($1, 9)
      if (name == "info" || name == "config" || name == "ping" || name == "subscribe" || name == "psubscribe" || name == "client" || name == "hello" || name == "select") next
      printf "  %-10s %6.2f calls  %7.2f us\n", name, $3 / ops, $5 / ops
    }' | sort -k4 -rn
done
