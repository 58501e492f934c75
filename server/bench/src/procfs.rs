//! What the server processes cost, read from Linux's `/proc`: CPU time (utime + stime of
//! `/proc/<pid>/stat`, all threads, in clock ticks of 10 ms) and resident memory (`VmRSS` of
//! `/proc/<pid>/status`).

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::cli::{Args, Target};
use crate::error::{Error, Result};

/// How often [`wait_quiet`] samples the CPU time.
const QUIET_SAMPLE: Duration = Duration::from_millis(250);

/// A process is quiet when it used at most this much CPU in one sample (two clock ticks).
const QUIET_CPU_S: f64 = 0.02;

/// Consecutive quiet samples [`wait_quiet`] needs.
const QUIET_SAMPLES: usize = 3;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on every Linux architecture
/// lockd runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// A server process the benchmark watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Process {
    /// `redis`, `lockd` or `lockd-memory`.
    pub name: &'static str,
    /// Its process id.
    pub pid: u32,
}

/// The server processes given on the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pids {
    redis: Option<u32>,
    lockd: Option<u32>,
    lockd_memory: Option<u32>,
    etcd: Option<u32>,
}

impl Pids {
    /// The pids of the options.
    pub fn from_args(args: &Args) -> Self {
        Self {
            redis: args.redis_pid,
            lockd: args.lockd_pid,
            lockd_memory: args.lockd_memory_pid,
            etcd: args.etcd_pid,
        }
    }

    /// True when no pid was given.
    pub fn is_empty(&self) -> bool {
        self.redis.is_none()
            && self.lockd.is_none()
            && self.lockd_memory.is_none()
            && self.etcd.is_none()
    }

    /// The redis-server process, if its pid was given.
    pub fn redis(&self) -> Option<u32> {
        self.redis
    }

    /// The processes that serve `target`'s requests: Redis for redis-direct, lockd and Redis
    /// for lockd, lockd-memory alone for lockd-memory. Only those with a known pid.
    pub fn serving(&self, target: Target) -> Vec<Process> {
        let redis = self.redis.map(|pid| Process { name: "redis", pid });
        let lockd = self.lockd.map(|pid| Process { name: "lockd", pid });
        let memory = self.lockd_memory.map(|pid| Process {
            name: "lockd-memory",
            pid,
        });
        match target {
            Target::RedisDirect => redis.into_iter().collect(),
            Target::Lockd | Target::LockdSession => lockd.into_iter().chain(redis).collect(),
            Target::LockdMemory => memory.into_iter().collect(),
            Target::Etcd => self
                .etcd
                .map(|pid| Process { name: "etcd", pid })
                .into_iter()
                .collect(),
        }
    }

    /// The lockd process behind `target`, whose RSS the waiters scenario reads.
    pub fn server(&self, target: Target) -> Option<Process> {
        match target {
            Target::RedisDirect | Target::Etcd => None,
            Target::Lockd | Target::LockdSession => {
                self.lockd.map(|pid| Process { name: "lockd", pid })
            }
            Target::LockdMemory => self.lockd_memory.map(|pid| Process {
                name: "lockd-memory",
                pid,
            }),
        }
    }
}

/// CPU time a process used in a measured window.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    /// The process.
    pub process: Process,
    /// User + system CPU seconds inside the window (10 ms resolution).
    pub cpu_seconds: f64,
    /// Those seconds per measured operation, in microseconds.
    pub us_per_op: f64,
}

/// User + system CPU seconds `pid` has used so far, all its threads together.
///
/// # Errors
/// Fails when the process does not exist or `/proc` is not Linux's.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .map_err(|e| Error::Unexpected(format!("{path}: {e} (is --*-pid right?)")))?;
    // The command name (field 2) may contain spaces: count fields after its closing ')'.
    // There, field 3 (state) is index 0, so utime (field 14) is 11 and stime (15) is 12.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| Error::Unexpected(format!("{path}: no ')'")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| Error::Unexpected(format!("{path}: field {} is not a number", i + 3)))
    };
    Ok((tick(11)? + tick(12)?) as f64 / TICKS_PER_SECOND)
}

/// Resident memory of `pid` (`VmRSS`), in bytes.
///
/// # Errors
/// Fails when the process does not exist or has no `VmRSS` line.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|e| Error::Unexpected(format!("{path}: {e} (is --*-pid right?)")))?;
    parse_vm_rss(&status).ok_or_else(|| Error::Unexpected(format!("{path}: no VmRSS")))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU seconds of each process now, in the order given; a process that cannot be read is left
/// out.
pub fn cpu_snapshot(processes: &[Process]) -> Vec<(Process, f64)> {
    processes
        .iter()
        .filter_map(|p| cpu_seconds(p.pid).ok().map(|s| (*p, s)))
        .collect()
}

/// The CPU each process used between two snapshots, per operation of `ops`.
pub fn cpu_between(before: &[(Process, f64)], after: &[(Process, f64)], ops: u64) -> Vec<CpuUse> {
    before
        .iter()
        .filter_map(|(p, s0)| {
            let (_, s1) = after.iter().find(|(q, _)| q == p)?;
            let cpu_seconds = (s1 - s0).max(0.0);
            Some(CpuUse {
                process: *p,
                cpu_seconds,
                us_per_op: cpu_seconds * 1e6 / ops.max(1) as f64,
            })
        })
        .collect()
}

/// Waits until `pid` has used at most 20 ms of CPU in each of three 250 ms samples in a row
/// (nothing left over from earlier work), or until `limit` has passed. Returns whether it was
/// quiet.
///
/// # Errors
/// Fails when the process cannot be read.
pub async fn wait_quiet(pid: u32, limit: Duration) -> Result<bool> {
    let deadline = Instant::now() + limit;
    let mut cpu = cpu_seconds(pid)?;
    let mut quiet_samples = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(QUIET_SAMPLE).await;
        let cpu1 = cpu_seconds(pid)?;
        quiet_samples = if cpu1 - cpu <= QUIET_CPU_S {
            quiet_samples + 1
        } else {
            0
        };
        cpu = cpu1;
        if quiet_samples >= QUIET_SAMPLES {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(rss_bytes(pid).unwrap() > 1024 * 1024);
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
    }

    #[test]
    fn cpu_per_op() {
        let p = Process {
            name: "lockd",
            pid: 1,
        };
        let used = cpu_between(&[(p, 1.0)], &[(p, 1.5)], 10_000);
        assert_eq!(used.len(), 1);
        assert!((used[0].us_per_op - 50.0).abs() < 1e-9);
    }
}
