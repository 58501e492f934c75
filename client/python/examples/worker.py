#!/usr/bin/env python3
"""A demo scheduler worker: runs a job every tick, but only where it gets the job's lock.

Start several of them against one lockd and they share the work: at each tick all of them compete
for the job's lock; exactly one runs the job, and the others print
"skipping <job>: already running on <owner>", as the original design note's scheduler does.

Every outcome is appended to OUT (one ``os.write`` per line on an O_APPEND file, so lines from
several processes never mix), for tests/python.rs to check:

    run  <tick> <fencing_token> <worker> <start_ns> <end_ns> <lost 0|1>
    skip <tick> <worker> <holder_fencing_token> <holder_owner...>
    miss <tick> <worker> <lateness_ms>

Ticks are aligned to the wall clock (``--start-at-ms``, default: the next multiple of the
interval), so on one machine, or on machines with synchronized clocks, every worker competes at
the same moment. The winner keeps the lock for at least ``--min-hold-ms`` after it was granted
(ShedLock's lockAtLeastFor): a worker whose timer fires a little late then still finds it held,
instead of running the tick's job a second time after a fast job released it. A worker that wakes
more than ``--misfire-ms`` after the tick skips it ("miss"); with misfire + jitter well below the
minimum hold, and the minimum hold well below the interval, every tick runs exactly once.

Usage (after ``pip install client/python``, which provides the ``lockd`` package):
    worker.py 127.0.0.1:50051 nightly-scan worker-a 20 runs.log
"""

from __future__ import annotations

import argparse
import os
import random
import time

import grpc

from lockd import lockd_lock
from lockd.v1 import lock_pb2, lock_pb2_grpc


def parse_args() -> argparse.Namespace:
    """The command line; durations are in milliseconds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="lockd address, host:port")
    p.add_argument("job", help="the job's name, used as the lock's resource")
    p.add_argument("worker", help="this worker's id (no spaces)")
    p.add_argument("ticks", type=int, help="how many ticks to run")
    p.add_argument("out", help="file to append run/skip/miss lines to")
    p.add_argument("--interval-ms", type=int, default=400, help="time between ticks")
    p.add_argument("--job-ms", type=int, default=120, help="how long the job runs")
    p.add_argument("--min-hold-ms", type=int, default=200, help="keep the lock at least this long")
    p.add_argument("--misfire-ms", type=int, default=80, help="skip a tick woken later than this")
    p.add_argument("--jitter-ms", type=int, default=20, help="random delay before competing")
    p.add_argument("--ttl-ms", type=int, default=2000, help="lease TTL, renewed during the job")
    p.add_argument("--start-at-ms", type=int, default=None,
                   help="wall-clock time (ms since the epoch) of tick 0; default: the next "
                        "multiple of the interval")
    return p.parse_args()


class Recorder:
    """Appends outcome lines to a file shared by all workers."""

    def __init__(self, path: str) -> None:
        """Opens ``path`` for appending (created if missing)."""
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, *fields) -> None:
        """Writes one line, in one write, so concurrent workers' lines never interleave."""
        os.write(self.fd, (" ".join(str(f) for f in fields) + "\n").encode())


def main() -> None:
    """Runs the ticks, then exits."""
    args = parse_args()
    ms = 1e-3
    interval, job_time = args.interval_ms * ms, args.job_ms * ms
    start = (args.start_at_ms * ms if args.start_at_ms is not None
             else (time.time() // interval + 1) * interval)
    record = Recorder(args.out)
    job, worker = args.job, args.worker
    owner = f"{worker} (pid {os.getpid()})"

    channel = grpc.insecure_channel(args.target)
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = lock_pb2_grpc.LockServiceStub(channel)

    def nightly_scan(tick: int, fencing_token: int, lost) -> None:
        """The job: here, just time passing. A real job would pass fencing_token to its writes
        and stop early when ``lost`` is set."""
        lost.wait(job_time)

    # --- README example start ---
    for tick in range(args.ticks):
        scheduled = start + tick * interval
        time.sleep(max(0.0, scheduled - time.time()))
        lateness = time.time() - scheduled
        if lateness > args.misfire_ms * ms:
            print(f"missed {job} tick {tick}: woke {lateness * 1000:.0f} ms late", flush=True)
            record("miss", tick, worker, round(lateness * 1000))
            continue
        time.sleep(random.uniform(0, args.jitter_ms * ms))
        with lockd_lock(stub, job, ttl=args.ttl_ms * ms, owner=owner,
                        min_hold=args.min_hold_ms * ms) as acquired:
            if not acquired:
                holder = acquired.holder or lock_pb2.LockInfo(owner="?")  # None: freed meanwhile
                print(f"skipping {job}: already running on {holder.owner}", flush=True)
                record("skip", tick, worker, holder.fencing_token, holder.owner)
                continue
            started = time.time_ns()
            nightly_scan(tick, acquired.fencing_token, acquired.lost)
            ended = time.time_ns()
            lost = int(acquired.lost.is_set())
            print(f"ran {job} tick {tick} with fencing token {acquired.fencing_token}", flush=True)
            record("run", tick, acquired.fencing_token, worker, started, ended, lost)
    # --- README example end ---
    channel.close()


if __name__ == "__main__":
    main()
