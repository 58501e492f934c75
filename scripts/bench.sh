#!/usr/bin/env bash
# Full lockd benchmark: builds in release, starts its own redis-server and two lockd servers
# (one on that Redis, one with its in-memory backend), runs lockd-bench against redis-direct,
# lockd and lockd-memory (all scenarios, 1/16/128/1024 clients), prints the table, and stops
# everything it started on exit. About 3 minutes after the build.
#
# Scenarios: cluster (lockd on a Redis Cluster of 1 and of 3 masters; part of `all`),
# uncontended, contended, mixed, keepalive (one held lease per client renewed
# back-to-back: KeepAlive stream heartbeats; redis-direct: compare-and-PEXPIRE), memory (Redis
# bytes per lock), scale (1,000 then 1,000,000 locks held in Redis) in one lockd-bench run;
# then waiters (lockd's RSS with 10,000 blocking Acquires, Watch streams, KeepAlive streams),
# each kind against fresh lockd processes.
# lockd-bench gets the servers' pids, to report their CPU time per operation and lockd's RSS.
#
# Placement (2+ cores, taskset available): redis-server and both lockd on CPU 1, the load
# generator on CPU 0, so the servers never compete with the client for a core. Override with
# SERVER_CPUS / BENCH_CPUS (taskset -c lists); with fewer than 2 cores nothing is pinned.
#
# Targets: redis-direct, lockd (unary RPCs), lockd-session (Acquire and Release on one Session
# stream per connection, to the same lockd), lockd-memory, and etcd (its v3lock API; uncontended
# and contended only). etcd comes from Debian's etcd-server package (apt-get install -y
# etcd-server); it is started like Redis, pinned with the servers, with its data directory on
# /dev/shm when that exists (Redis runs without persistence too; etcd 3.4 cannot turn fsync off).
# Without etcd installed the etcd target is left out, with a message.
# Knobs (environment): BENCH_TARGETS (a comma list of the targets above), BENCH_SCENARIOS (all, or a comma list), BENCH_WAITER_KINDS
# ("acquire watch keepalive"), BENCH_REPEAT (1: runs per load scenario, level and target; each
# row is then the median-ops/s run), BENCH_DURATION (2s), BENCH_WARMUP (300ms), BENCH_CLIENTS
# (1,16,128,1024), BENCH_CONNECTIONS (4), LOCKD_REDIS_POOL_SIZE (lockd's default: one per worker thread),
# BENCH_RUST_LOG (warn: lockd's RUST_LOG; lockd's own LOCKD_* variables pass through too), and
# LOCKD_BIN: a lockd binary to measure instead of building this tree's (e.g. one built from a
# committed revision while the working tree is mid-change); only lockd-bench is built then.
# Extra arguments go to every lockd-bench run, e.g. `scripts/bench.sh --waiters 1000`; options
# that take lists (--scenario, --clients, --target) add to this script's, so use the variables.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${BENCH_DURATION:-2s}
WARMUP=${BENCH_WARMUP:-300ms}
CLIENTS=${BENCH_CLIENTS:-1,16,128,1024}
SCENARIOS=${BENCH_SCENARIOS:-all}
CONNECTIONS=${BENCH_CONNECTIONS:-4}
REPEAT=${BENCH_REPEAT:-1}

TARGETS=${BENCH_TARGETS:-redis-direct,lockd,lockd-session,lockd-memory,etcd}
if [[ ",$TARGETS," == *,etcd,* ]] && ! command -v etcd >/dev/null; then
  echo "bench.sh: etcd is missing, so the etcd target is left out (apt-get install -y etcd-server)" >&2
  TARGETS=$(echo ",$TARGETS," | sed 's/,etcd,/,/; s/^,//; s/,$//')
fi

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
  if [ -n "${ETCD_DIR:-}" ] && [ "${ETCD_DIR#/dev/shm/}" != "$ETCD_DIR" ]; then
    rm -rf "$ETCD_DIR"
  fi
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
  PLACEMENT="redis-server + lockd + lockd-memory (+ etcd) on CPU $SERVER_CPUS; lockd-bench on CPU $BENCH_CPUS"
else
  PLACEMENT="not pinned ($(nproc) CPUs, taskset $(command -v taskset >/dev/null && echo present || echo missing))"
fi

REDIS_PORT=$(free_port)
# The scale scenario waits for Redis's rehashing to end, seen through DEBUG HTSTATS (Redis 7+
# refuses DEBUG unless enabled).
REDIS_DEBUG=()
if [ "$(redis-server --version | sed -n 's/.*v=\([0-9]*\).*/\1/p')" -ge 7 ]; then
  REDIS_DEBUG=(--enable-debug-command local)
fi
"${SERVER_PIN[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize no --dir "$TMP" "${REDIS_DEBUG[@]}" </dev/null >/dev/null 2>&1 &
REDIS_PID=$!
PIDS+=($REDIS_PID)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
for _ in $(seq 200); do
  [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
  sleep 0.05
done
[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] || { echo "bench.sh: redis-server did not start" >&2; exit 1; }

# start_lockd NAME redis|memory: starts a lockd pinned like the others; sets PORT and PID.
start_lockd() {
  local name=$1 backend=$2
  PORT=$(free_port)
  if [ "$backend" = redis ]; then
    env REDIS_URL="$REDIS_URL" RUST_LOG="${BENCH_RUST_LOG:-warn}" "${SERVER_PIN[@]}" "$LOCKD_BIN" \
      --listen "127.0.0.1:$PORT" </dev/null >"$TMP/$name.log" 2>&1 &
  else
    env -u REDIS_URL -u REDIS_HOST RUST_LOG="${BENCH_RUST_LOG:-warn}" "${SERVER_PIN[@]}" "$LOCKD_BIN" \
      --listen "127.0.0.1:$PORT" </dev/null >"$TMP/$name.log" 2>&1 &
  fi
  PID=$!
  PIDS+=("$PID")
  wait_for_port "$PORT" "$name"
  # taskset and env exec the program: $! is lockd itself, whose CPU and RSS are read.
  [ "$(cat "/proc/$PID/comm" 2>/dev/null)" = lockd ] || { echo "bench.sh: pid $PID is not lockd" >&2; exit 1; }
}

# stop PID: ends one process this script started, and forgets it.
stop() {
  local pid=$1 p keep=()
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${PIDS[@]}"; do
    [ "$p" = "$pid" ] || keep+=("$p")
  done
  PIDS=("${keep[@]}")
}

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

# CPU accounting, to tell whether something else ran during the benchmark: busy jiffies of the
# whole machine, jiffies of one process, and jiffies of this script's reaped children.
machine_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
process_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# `times` must run in this shell (not in $(...)): it writes to a file, read by children_ticks.
children_ticks() {
  tail -1 "$1" | awk '{ n = 0; for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); n += t[1] * 60 + t[2] } print int(n * 100 + 0.5) }'
}
HZ=$(getconf CLK_TCK)
etcd_ticks() { if [ -n "$ETCD_PID" ]; then process_ticks "$ETCD_PID"; else echo 0; fi; }

ETCD_ARGS=()
ETCD_PID=
if [[ ",$TARGETS," == *,etcd,* ]]; then
  ETCD_PORT=$(free_port)
  ETCD_PEER=$(free_port)
  ETCD_DIR=$TMP/etcd
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    ETCD_DIR=$(mktemp -d -p /dev/shm lockd-bench-etcd.XXXXXX)
  fi
  "${SERVER_PIN[@]}" etcd --name bench --data-dir "$ETCD_DIR" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER" --log-level error </dev/null >"$TMP/etcd.log" 2>&1 &
  ETCD_PID=$!
  PIDS+=("$ETCD_PID")
  wait_for_port "$ETCD_PORT" etcd
  ETCD_ARGS=(--etcd-addr "http://127.0.0.1:$ETCD_PORT" --etcd-pid "$ETCD_PID")
fi

start_lockd lockd redis
LOCKD_PORT=$PORT LOCKD_PID=$PID
start_lockd lockd-memory memory
MEMORY_PORT=$PORT MEMORY_PID=$PID

# `all` runs every scenario; waiters runs after the others, each kind on fresh lockd processes
# (RSS is never given back to the system, so earlier load would inflate it).
MAIN_SCENARIOS=$SCENARIOS
RUN_WAITERS=no
RUN_CLUSTER=no
case ",$SCENARIOS," in
  *,all,*) MAIN_SCENARIOS=uncontended,contended,mixed,keepalive,memory,scale RUN_WAITERS=yes RUN_CLUSTER=yes ;;
  *)
    case ",$SCENARIOS," in *,waiters,*) RUN_WAITERS=yes ;; esac
    case ",$SCENARIOS," in *,cluster,*) RUN_CLUSTER=yes ;; esac
    MAIN_SCENARIOS=$(echo ",$SCENARIOS," | sed 's/,waiters,/,/g; s/,cluster,/,/g; s/^,//; s/,$//') ;;
esac

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== machine: $(nproc) CPUs, $(redis-server --version | cut -d' ' -f3), load average $LOAD_BEFORE"
echo "== placement: $PLACEMENT"
echo "== lockd binary: $LOCKD_BIN"
echo "== redis $REDIS_URL (pid $REDIS_PID), lockd :$LOCKD_PORT (pid $LOCKD_PID, pool size ${LOCKD_REDIS_POOL_SIZE:-default}), lockd-memory :$MEMORY_PORT (pid $MEMORY_PID)${ETCD_PID:+, etcd $(etcd --version | head -1 | cut -d' ' -f3) :$ETCD_PORT (pid $ETCD_PID, data in $ETCD_DIR)}"

mkdir -p "$ROOT/target/bench"
STAMP=$(date +%Y%m%d-%H%M%S)
JSON="$ROOT/target/bench/lockd-bench-$STAMP.json"
START=$SECONDS
BUSY0=$(machine_busy)
times >"$TMP/times0"
SERVERS0=$(( $(process_ticks "$REDIS_PID") + $(process_ticks "$LOCKD_PID") + $(process_ticks "$MEMORY_PID") + $(etcd_ticks) ))
if [ -n "$MAIN_SCENARIOS" ]; then
  "${BENCH_PIN[@]}" "$ROOT/target/release/lockd-bench" \
    --target "$TARGETS" \
    --scenario "$MAIN_SCENARIOS" \
    --clients "$CLIENTS" \
    --connections "$CONNECTIONS" \
    --repeat "$REPEAT" \
    --duration "$DURATION" \
    --warmup "$WARMUP" \
    --redis-url "$REDIS_URL" \
    --lockd-addr "http://127.0.0.1:$LOCKD_PORT" \
    --lockd-memory-addr "http://127.0.0.1:$MEMORY_PORT" \
    --redis-pid "$REDIS_PID" \
    --lockd-pid "$LOCKD_PID" \
    --lockd-memory-pid "$MEMORY_PID" \
    "${ETCD_ARGS[@]}" \
    --json "$@" >"$JSON"
fi
SERVERS1=$(( $(process_ticks "$REDIS_PID") + $(process_ticks "$LOCKD_PID") + $(process_ticks "$MEMORY_PID") + $(etcd_ticks) ))

if [ "$RUN_WAITERS" = yes ]; then
  for kind in ${BENCH_WAITER_KINDS:-acquire watch keepalive}; do
    start_lockd "lockd-waiters-$kind" redis
    W_PORT=$PORT W_PID=$PID
    start_lockd "lockd-memory-waiters-$kind" memory
    M_PORT=$PORT M_PID=$PID
    echo
    echo "== waiters ($kind): fresh lockd (pid $W_PID) and lockd-memory (pid $M_PID)"
    "${BENCH_PIN[@]}" "$ROOT/target/release/lockd-bench" \
      --target lockd,lockd-memory \
      --scenario waiters \
      --waiter-kinds "$kind" \
      --lockd-addr "http://127.0.0.1:$W_PORT" \
      --lockd-memory-addr "http://127.0.0.1:$M_PORT" \
      --lockd-pid "$W_PID" \
      --lockd-memory-pid "$M_PID" \
      --json "$@" >"${JSON%.json}-waiters-$kind.json"
    stop "$W_PID"
    stop "$M_PID"
  done
fi

# cluster: lockd on a Redis Cluster of 1 master (all 16384 slots) and of 3 masters, each node
# pinned with the other servers; uncontended and contended, lockd target only. On a 2-core
# machine this shows what Cluster mode costs, not how it scales: the 3 masters share one core.
# start_cluster N: starts N cluster nodes and joins them; sets CLUSTER_SEEDS and CLUSTER_PIDS.
start_cluster() {
  local n=$1 i port ports=()
  CLUSTER_PIDS=()
  for i in $(seq "$n"); do
    port=$(free_port)
    while [ "$port" -ge 55535 ]; do port=$(free_port); done  # the bus port (+10000) must fit
    mkdir -p "$TMP/cluster-$n-$port"
    "${SERVER_PIN[@]}" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize no --dir "$TMP/cluster-$n-$port" --cluster-enabled yes \
      --cluster-config-file "$TMP/cluster-$n-$port/nodes.conf" </dev/null >/dev/null 2>&1 &
    PIDS+=($!)
    CLUSTER_PIDS+=($!)
    ports+=("$port")
  done
  for port in "${ports[@]}"; do wait_for_port "$port" "cluster node $port"; done
  local nodes=()
  for port in "${ports[@]}"; do nodes+=("127.0.0.1:$port"); done
  if [ "$n" -eq 1 ]; then
    # redis-cli --cluster create wants 3 masters at least: one node takes every slot itself.
    redis-cli -p "${ports[0]}" cluster addslotsrange 0 16383 >/dev/null
  else
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  fi
  for port in "${ports[@]}"; do
    until redis-cli -p "$port" cluster info | grep -q cluster_state:ok; do sleep 0.05; done
  done
  CLUSTER_SEEDS=$(IFS=,; echo "${nodes[*]}")
}

if [ "$RUN_CLUSTER" = yes ]; then
  for masters in 1 3; do
    start_cluster "$masters"
    PORT=$(free_port)
    env -u REDIS_URL REDIS_CLUSTER_NODES="$CLUSTER_SEEDS" RUST_LOG="${BENCH_RUST_LOG:-warn}" "${SERVER_PIN[@]}" \
      "$LOCKD_BIN" --listen "127.0.0.1:$PORT" </dev/null >"$TMP/lockd-cluster-$masters.log" 2>&1 &
    C_PID=$!
    PIDS+=("$C_PID")
    wait_for_port "$PORT" "lockd-cluster-$masters"
    echo
    echo "== cluster: lockd (pid $C_PID) on a Redis Cluster of $masters master(s) ($CLUSTER_SEEDS)"
    "${BENCH_PIN[@]}" "$ROOT/target/release/lockd-bench" \
      --target lockd \
      --scenario "${BENCH_CLUSTER_SCENARIOS:-uncontended,contended}" \
      --clients "${BENCH_CLUSTER_CLIENTS:-16,128}" \
      --connections "$CONNECTIONS" \
      --repeat "$REPEAT" \
      --duration "$DURATION" \
      --warmup "$WARMUP" \
      --lockd-addr "http://127.0.0.1:$PORT" \
      --lockd-pid "$C_PID" \
      --json "$@" >"${JSON%.json}-cluster-$masters.json"
    stop "$C_PID"
    for pid in "${CLUSTER_PIDS[@]}"; do stop "$pid"; done
  done
fi

ELAPSED=$((SECONDS - START))
BUSY=$(( $(machine_busy) - BUSY0 ))
times >"$TMP/times1"
OURS=$(( $(children_ticks "$TMP/times1") - $(children_ticks "$TMP/times0") + SERVERS1 - SERVERS0 ))
echo
echo "== benchmark took ${ELAPSED}s; placement: $PLACEMENT; JSON: ${JSON%.json}*.json"
echo "== load average before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg) (the benchmark itself keeps both CPUs busy)"
awk -v busy="$BUSY" -v ours="$OURS" -v hz="$HZ" -v secs="$ELAPSED" -v cpus="$(nproc)" 'BEGIN {
  printf "== CPU: %.1f CPU-s used by the machine, %.1f by the benchmark and its servers, %.1f by other processes (of %d available)\n",
    busy / hz, ours / hz, (busy - ours) / hz, secs * cpus }'
if grep -qiE "error|panic" "$TMP"/*.log; then
  echo "== lockd logged errors:"
  grep -hiE "error|panic" "$TMP"/*.log | head -20
fi
