#!/usr/bin/env bash
# A/B cost of a lockd setting in one lockd-bench run: two lockd processes on one redis-server,
# A measured as target "lockd" and B as target "lockd-memory" (only a label here: both use
# Redis), the targets interleaved, BENCH_REPEAT runs each (the median-ops/s run is reported).
# Prints, per scenario and concurrency, ops/s and lockd's own CPU per op for A and B, and B/A.
#
#   scripts/bench-pair.sh "A_ENV" A_BIN "B_ENV" B_BIN
#   e.g. scripts/bench-pair.sh "RUST_LOG=warn" target/release/lockd \
#          "RUST_LOG=warn LOCKD_METRICS_LISTEN=127.0.0.1:0" target/release/lockd
#
# Knobs: BENCH_SCENARIOS (uncontended,contended), BENCH_CLIENTS (16,128), BENCH_REPEAT (5),
# BENCH_DURATION (2s). BENCH_SESSION=1 measures both on the Session path instead (target
# lockd-session, run against A then B, BENCH_REPEAT times, one lockd-bench run each). Placement as in bench.sh: servers on CPU 1, lockd-bench on CPU 0 (when
# taskset and 2 CPUs are there). Build first: cargo build --release -p lockd -p lockd-bench.
set -euo pipefail
[ "$#" -eq 4 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
A_ENV=$1 A_BIN=$2 B_ENV=$3 B_BIN=$4
cd "$(dirname "$0")/.."
TMP=$(mktemp -d -t lockd-pair.XXXXXX)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
SERVER_PIN=() BENCH_PIN=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  SERVER_PIN=(taskset -c 1) BENCH_PIN=(taskset -c 0)
fi
REDIS_PORT=$(free_port) A_PORT=$(free_port) B_PORT=$(free_port)
"${SERVER_PIN[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no --dir "$TMP" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
until [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; do sleep 0.05; done
# env and taskset exec the program: $! is lockd itself.
# shellcheck disable=SC2086
env $A_ENV REDIS_URL="redis://127.0.0.1:$REDIS_PORT" "${SERVER_PIN[@]}" "$A_BIN" \
  --listen "127.0.0.1:$A_PORT" </dev/null >"$TMP/a.log" 2>&1 &
A_PID=$!
PIDS+=("$A_PID")
# shellcheck disable=SC2086
env $B_ENV REDIS_URL="redis://127.0.0.1:$REDIS_PORT" "${SERVER_PIN[@]}" "$B_BIN" \
  --listen "127.0.0.1:$B_PORT" </dev/null >"$TMP/b.log" 2>&1 &
B_PID=$!
PIDS+=("$B_PID")
for port in "$A_PORT" "$B_PORT"; do
  until python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; do
    sleep 0.05
  done
done
echo "== A: $A_ENV $A_BIN (pid $A_PID); B: $B_ENV $B_BIN (pid $B_PID); load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "${BENCH_SESSION:-0}" = 1 ]; then
  for i in $(seq "${BENCH_REPEAT:-5}"); do
    for side in A B; do
      if [ "$side" = A ]; then port=$A_PORT pid=$A_PID; else port=$B_PORT pid=$B_PID; fi
      "${BENCH_PIN[@]}" target/release/lockd-bench --target lockd-session \
        --scenario "${BENCH_SCENARIOS:-uncontended,contended}" --clients "${BENCH_CLIENTS:-16,128}" \
        --connections 4 --repeat 1 --duration "${BENCH_DURATION:-2s}" --warmup 300ms \
        --redis-url "redis://127.0.0.1:$REDIS_PORT" --lockd-addr "http://127.0.0.1:$port" \
        --redis-pid "$REDIS_PID" --lockd-pid "$pid" --json >"$TMP/$side.$i.json" 2>"$TMP/bench.log" \
        || { cat "$TMP/bench.log" >&2; exit 1; }
    done
  done
  echo "== load average after $(cut -d' ' -f1-3 /proc/loadavg)"
  python3 - "$TMP" "${BENCH_REPEAT:-5}" <<'PY'
import json, statistics, sys
tmp, repeat = sys.argv[1], int(sys.argv[2])
rows = {}
for side in "AB":
    for i in range(1, repeat + 1):
        for r in json.load(open(f"{tmp}/{side}.{i}.json"))["runs"]:
            cpu = {p["process"]["name"].split("-")[0]: p["us_per_op"] for p in r["server_cpu"]}
            rows.setdefault((r["scenario"], r["clients"], side), []).append(
                (r["ops_per_second"], cpu.get("lockd", 0), cpu.get("redis", 0)))
print("| scenario | clients | A ops/s (runs) | B ops/s (runs) | B/A (medians) | A CPU/op lockd + Redis | B CPU/op lockd + Redis |")
print("|---|---|---|---|---|---|---|")
for s, c in sorted({(k[0], k[1]) for k in rows}):
    a, b = rows[(s, c, "A")], rows[(s, c, "B")]
    med = lambda runs: sorted(runs)[len(runs) // 2]
    ma, mb = med(a), med(b)
    fmt = lambda runs: " · ".join(f"{r[0]:,.0f}" for r in runs)
    print(f"| {s} | {c} | {ma[0]:,.0f} ({fmt(a)}) | {mb[0]:,.0f} ({fmt(b)}) | {mb[0]/ma[0]:.2f} "
          f"| {ma[1]:.0f} + {ma[2]:.0f} µs | {mb[1]:.0f} + {mb[2]:.0f} µs |")
PY
  exit 0
fi
"${BENCH_PIN[@]}" target/release/lockd-bench --target lockd,lockd-memory \
  --scenario "${BENCH_SCENARIOS:-uncontended,contended}" --clients "${BENCH_CLIENTS:-16,128}" \
  --connections 4 --repeat "${BENCH_REPEAT:-5}" --duration "${BENCH_DURATION:-2s}" --warmup 300ms \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" --lockd-addr "http://127.0.0.1:$A_PORT" \
  --lockd-memory-addr "http://127.0.0.1:$B_PORT" --redis-pid "$REDIS_PID" --lockd-pid "$A_PID" \
  --lockd-memory-pid "$B_PID" --json >"$TMP/run.json" 2>"$TMP/bench.log" \
  || { cat "$TMP/bench.log" >&2; exit 1; }
echo "== load average after $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$TMP/run.json" <<'PY'
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
rows = {}
for r in runs:
    # lockd's own CPU (Redis's is left out, since only A's run reports it).
    cpu = sum(p["us_per_op"] for p in r["server_cpu"] if p["process"]["name"].startswith("lockd"))
    rows[(r["scenario"], r["clients"], r["target"])] = (r["ops_per_second"], cpu)
print("| scenario | clients | A ops/s | B ops/s | B/A | A lockd CPU/op | B lockd CPU/op | B/A |")
print("|---|---|---|---|---|---|---|---|")
for s, c in sorted({(k[0], k[1]) for k in rows}):
    a, b = rows.get((s, c, "lockd")), rows.get((s, c, "lockd-memory"))
    if a and b:
        print(f"| {s} | {c} | {a[0]:,.0f} | {b[0]:,.0f} | {b[0]/a[0]:.2f} | {a[1]:.0f} µs | {b[1]:.0f} µs | {b[1]/a[1]:.2f} |")
PY
