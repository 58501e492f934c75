#!/usr/bin/env bash
# A/B benchmark of two lockd binaries on one Redis, runs interleaved so that this noisy
# machine's load hits both alike. lockd-bench's second target slot ("lockd-memory") is pointed
# at the B binary, which also uses Redis: in the output, read "lockd" as A and "lockd-memory"
# as B. Usage: scripts/bench-ab.sh A_BIN B_BIN LOCKD_BENCH_BIN [lockd-bench options...]
# Placement as in bench.sh: Redis and both lockd on CPU 1, the load generator on CPU 0.
set -euo pipefail
A=$1 B=$2 BENCH=$3
shift 3
TMP=$(mktemp -d -t lockd-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
RP=$(port) AP=$(port) BP=$(port)
taskset -c 1 redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" \
  </dev/null >/dev/null 2>&1 &
PIDS+=($!); RPID=$!
until [ "$(redis-cli -p "$RP" ping 2>/dev/null)" = PONG ]; do sleep 0.05; done
start() { # bin port
  REDIS_URL=redis://127.0.0.1:$RP LOCKD_LISTEN=127.0.0.1:$2 RUST_LOG=warn taskset -c 1 "$1" \
    </dev/null >"$TMP/lockd-$2.log" 2>&1 &
  PIDS+=($!)
}
start "$A" "$AP"; APID=$!
start "$B" "$BP"; BPID=$!
sleep 1
taskset -c 0 "$BENCH" --target lockd,lockd-memory --redis-url "redis://127.0.0.1:$RP" \
  --lockd-addr "http://127.0.0.1:$AP" --lockd-memory-addr "http://127.0.0.1:$BP" \
  --lockd-pid "$APID" --lockd-memory-pid "$BPID" --redis-pid "$RPID" "$@"
