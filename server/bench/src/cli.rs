//! Command-line options, and the one command line that reproduces a run.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// lockd-bench: measures lockd against redis-rs locking on the same Redis.
///
/// Each scenario runs at every concurrency level against every target, targets interleaved, so
/// that all targets see the same machine conditions. Results go to stdout as a table, or as
/// JSON with --json (the table then goes to stderr).
#[derive(Debug, Clone, Parser)]
#[command(name = "lockd-bench", version, about, long_about = None)]
pub struct Args {
    /// Targets, comma separated: redis-direct (redis-rs on multiplexed connections), lockd
    /// (gRPC, Redis backend), lockd-memory (gRPC, in-memory backend).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "redis-direct,lockd"
    )]
    pub target: Vec<Target>,

    /// Scenarios, comma separated; `all` runs uncontended, contended, mixed, keepalive, memory,
    /// scale and waiters.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub scenario: Vec<Scenario>,

    /// Concurrency levels: number of concurrent clients, each with one request in flight.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128,1024")]
    pub clients: Vec<usize>,

    /// Connections per target: HTTP/2 channels for lockd, multiplexed Redis connections for
    /// redis-direct. Clients are spread over them round-robin.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,

    /// Measured time per run (after the warm-up), e.g. 5s or 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration, conflicts_with = "ops")]
    pub duration: Duration,

    /// Measured operations per run instead of a duration (all clients together).
    #[arg(long)]
    pub ops: Option<u64>,

    /// Unmeasured time at the start of each run.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Runs of each load scenario per concurrency level and target, targets interleaved; each
    /// reported row is the run with the median ops/s, so that one noisy run does not decide a
    /// figure.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub repeat: u32,

    /// TTL of every lock taken.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,

    /// wait_timeout of the blocking Acquire in the contended scenario.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub wait_timeout: Duration,

    /// redis-direct in the contended scenario: sleep between two failed `SET NX` attempts.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Locks taken by the memory scenario.
    #[arg(long, default_value_t = 100_000)]
    pub memory_locks: u64,

    /// Held locks pre-loaded into Redis by the scale scenario, comma separated: the uncontended
    /// load runs once at each level.
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    pub scale_locks: Vec<u64>,

    /// Concurrent clients of the scale scenario's uncontended load.
    #[arg(long, default_value_t = 16)]
    pub scale_clients: usize,

    /// Key prefix of the lockd target (its LOCKD_KEY_PREFIX): where the scale scenario writes
    /// its pre-loaded locks.
    #[arg(long, default_value = "lockd")]
    pub key_prefix: String,

    /// Calls the waiters scenario keeps open at once, per kind.
    #[arg(long, default_value_t = 10_000)]
    pub waiters: usize,

    /// HTTP/2 connections the waiters scenario spreads its calls over (its own, opened for it).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub waiter_connections: u32,

    /// What the waiters scenario keeps open, comma separated: blocking Acquire calls on one held
    /// lock, Watch streams, KeepAlive streams (each keeping one lease).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "acquire,watch,keepalive"
    )]
    pub waiter_kinds: Vec<WaiterKind>,

    /// wait_timeout of the waiters scenario's blocking Acquires (they are cancelled sooner).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub waiter_wait: Duration,

    /// Process id of the lockd target: its CPU time per operation is reported, and the waiters
    /// scenario reads its RSS.
    #[arg(long)]
    pub lockd_pid: Option<u32>,

    /// Process id of the lockd-memory target (CPU per operation, RSS in the waiters scenario).
    #[arg(long)]
    pub lockd_memory_pid: Option<u32>,

    /// Process id of redis-server: its CPU time per operation is reported (redis-direct and
    /// lockd).
    #[arg(long)]
    pub redis_pid: Option<u32>,

    /// Process id of etcd (the etcd target's CPU time per operation).
    #[arg(long)]
    pub etcd_pid: Option<u32>,

    /// Address of the etcd target's client port, e.g. http://127.0.0.1:2379.
    #[arg(long)]
    pub etcd_addr: Option<String>,

    /// Redis URL: the Redis of redis-direct, and where the memory scenario reads INFO memory
    /// (it must be the Redis the lockd target uses).
    #[arg(long)]
    pub redis_url: Option<String>,

    /// Address of the lockd target (with a Redis backend), e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub lockd_addr: Option<String>,

    /// Address of the lockd-memory target (a lockd started without Redis).
    #[arg(long)]
    pub lockd_memory_addr: Option<String>,

    /// Print the results as JSON on stdout; the table goes to stderr.
    #[arg(long)]
    pub json: bool,
}

/// What the load is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// redis-rs on multiplexed connections: `SET NX PX` and a compare-and-delete script.
    RedisDirect,
    /// lockd over gRPC, with its Redis backend.
    Lockd,
    /// lockd over gRPC, with its in-memory backend: the cost of gRPC and lockd alone.
    LockdMemory,
    /// lockd (the `--lockd-addr` server) with every Acquire and Release multiplexed on one
    /// Session stream per connection; inspection stays unary.
    LockdSession,
    /// etcd's v3lock API (Lock and Unlock, each client with a lease of its own): uncontended
    /// and contended only.
    Etcd,
}

impl Target {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::RedisDirect => "redis-direct",
            Self::Lockd => "lockd",
            Self::LockdMemory => "lockd-memory",
            Self::LockdSession => "lockd-session",
            Self::Etcd => "etcd",
        }
    }
}

/// What load is generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every client locks and unlocks its own resource.
    Uncontended,
    /// All clients compete for one resource with blocking waits.
    Contended,
    /// 80% IsLocked/GetOwner, 20% Acquire+Release.
    Mixed,
    /// Every client holds one lease and renews it back-to-back: heartbeats on its own KeepAlive
    /// stream (redis-direct: a compare-and-PEXPIRE script).
    Keepalive,
    /// Redis memory per held lock and per released resource.
    Memory,
    /// Uncontended load with few, then very many locks already held in Redis.
    Scale,
    /// lockd's RSS with many blocking Acquires or open streams.
    Waiters,
    /// Every scenario above.
    All,
}

impl Scenario {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uncontended => "uncontended",
            Self::Contended => "contended",
            Self::Mixed => "mixed",
            Self::Keepalive => "keepalive",
            Self::Memory => "memory",
            Self::Scale => "scale",
            Self::Waiters => "waiters",
            Self::All => "all",
        }
    }
}

/// What the waiters scenario keeps open on lockd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaiterKind {
    /// Blocking Acquire calls, all waiting for one held lock.
    Acquire,
    /// Watch streams, each on its own resource.
    Watch,
    /// KeepAlive streams, each keeping one held lease.
    Keepalive,
}

impl WaiterKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Acquire => "acquire",
            Self::Watch => "watch",
            Self::Keepalive => "keepalive",
        }
    }

    /// What one open call is, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Acquire => "blocking Acquire",
            Self::Watch => "Watch stream",
            Self::Keepalive => "KeepAlive stream",
        }
    }
}

impl Args {
    /// The scenarios to run, in a fixed order, with `all` expanded.
    pub fn scenarios(&self) -> Vec<Scenario> {
        let all = [
            Scenario::Uncontended,
            Scenario::Contended,
            Scenario::Mixed,
            Scenario::Keepalive,
            Scenario::Memory,
            Scenario::Scale,
            Scenario::Waiters,
        ];
        let mut out: Vec<Scenario> = all
            .into_iter()
            .filter(|s| self.scenario.contains(s) || self.scenario.contains(&Scenario::All))
            .collect();
        out.dedup();
        out
    }

    /// The targets to run, in a fixed order (redis-direct first), without duplicates.
    pub fn targets(&self) -> Vec<Target> {
        let mut t = self.target.clone();
        t.sort();
        t.dedup();
        t
    }

    /// A command line with every option spelled out, so that changed defaults do not change
    /// what it runs. A password in the Redis URL is replaced by `***`.
    pub fn reproduce(&self, program: &str) -> String {
        let join = |v: Vec<String>| v.join(",");
        let mut s = String::from(program);
        let _ = write!(
            s,
            " --target {} --scenario {} --clients {} --connections {}",
            join(self.targets().iter().map(|t| t.name().to_owned()).collect()),
            join(
                self.scenarios()
                    .iter()
                    .map(|t| t.name().to_owned())
                    .collect()
            ),
            join(self.clients.iter().map(ToString::to_string).collect()),
            self.connections,
        );
        if self.repeat > 1 {
            let _ = write!(s, " --repeat {}", self.repeat);
        }
        match self.ops {
            Some(n) => {
                let _ = write!(s, " --ops {n}");
            }
            None => {
                let _ = write!(s, " --duration {}", format_duration(self.duration));
            }
        }
        let _ = write!(
            s,
            " --warmup {} --ttl {} --wait-timeout {} --poll-interval {} --memory-locks {}",
            format_duration(self.warmup),
            format_duration(self.ttl),
            format_duration(self.wait_timeout),
            format_duration(self.poll_interval),
            self.memory_locks,
        );
        let scenarios = self.scenarios();
        if scenarios.contains(&Scenario::Scale) {
            let _ = write!(
                s,
                " --scale-locks {} --scale-clients {} --key-prefix {}",
                join(self.scale_locks.iter().map(ToString::to_string).collect()),
                self.scale_clients,
                self.key_prefix,
            );
        }
        if scenarios.contains(&Scenario::Waiters) {
            let mut kinds = self.waiter_kinds.clone();
            kinds.sort();
            kinds.dedup();
            let _ = write!(
                s,
                " --waiters {} --waiter-connections {} --waiter-kinds {} --waiter-wait {}",
                self.waiters,
                self.waiter_connections,
                join(kinds.iter().map(|k| k.name().to_owned()).collect()),
                format_duration(self.waiter_wait),
            );
        }
        for (flag, pid) in [
            ("--redis-pid", self.redis_pid),
            ("--lockd-pid", self.lockd_pid),
            ("--lockd-memory-pid", self.lockd_memory_pid),
            ("--etcd-pid", self.etcd_pid),
        ] {
            if let Some(pid) = pid {
                let _ = write!(s, " {flag} {pid}");
            }
        }
        if let Some(url) = &self.redis_url {
            let _ = write!(s, " --redis-url {}", redact_url(url));
        }
        if let Some(a) = &self.lockd_addr {
            let _ = write!(s, " --lockd-addr {a}");
        }
        if let Some(a) = &self.lockd_memory_addr {
            let _ = write!(s, " --lockd-memory-addr {a}");
        }
        if let Some(a) = &self.etcd_addr {
            let _ = write!(s, " --etcd-addr {a}");
        }
        if self.json {
            s.push_str(" --json");
        }
        s
    }
}

/// Parses durations such as `250us`, `500ms`, `5s`, `2m` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 5s or 2m"))?;
    match unit {
        "us" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use us, ms, s or m)")),
    }
}

/// The shortest exact spelling of `d` that [`parse_duration`] reads back.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1_000) {
        format!("{}ms", us / 1_000)
    } else {
        format!("{us}us")
    }
}

/// Replaces the password in `scheme://user:password@host` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let user = rest[..at].split(':').next().unwrap_or_default();
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for s in ["250us", "500ms", "5s", "120s"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn reproduce_spells_out_every_option_and_hides_passwords() {
        let args = Args::parse_from([
            "lockd-bench",
            "--target",
            "lockd,redis-direct",
            "--scenario",
            "all",
            "--redis-url",
            "redis://:pw@h:1",
        ]);
        let cmd = args.reproduce("lockd-bench");
        assert!(cmd.contains("--target redis-direct,lockd"), "{cmd}");
        assert!(!cmd.contains("--repeat"), "one run is the default: {cmd}");
        let repeated = Args::parse_from(["lockd-bench", "--repeat", "3"]);
        assert!(repeated.reproduce("lockd-bench").contains("--repeat 3"));
        assert!(
            cmd.contains("--scenario uncontended,contended,mixed,keepalive,memory,scale,waiters")
        );
        assert!(cmd.contains("--scale-locks 1000,1000000 --scale-clients 16 --key-prefix lockd"));
        assert!(cmd.contains("--waiters 10000 --waiter-connections 100"));
        assert!(cmd.contains("--waiter-kinds acquire,watch,keepalive --waiter-wait 60s"));
        assert!(cmd.contains("--clients 1,16,128,1024 --connections 4 --duration 5s"));
        assert!(cmd.contains("redis://:***@h:1"));
    }
}
