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

    /// Scenarios, comma separated; `all` runs uncontended, contended, mixed and memory.
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
}

impl Target {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::RedisDirect => "redis-direct",
            Self::Lockd => "lockd",
            Self::LockdMemory => "lockd-memory",
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
    /// Redis memory per held lock and per released resource.
    Memory,
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
            Self::Memory => "memory",
            Self::All => "all",
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
            Scenario::Memory,
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
        if let Some(url) = &self.redis_url {
            let _ = write!(s, " --redis-url {}", redact_url(url));
        }
        if let Some(a) = &self.lockd_addr {
            let _ = write!(s, " --lockd-addr {a}");
        }
        if let Some(a) = &self.lockd_memory_addr {
            let _ = write!(s, " --lockd-memory-addr {a}");
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
        assert!(cmd.contains("--scenario uncontended,contended,mixed,memory"));
        assert!(cmd.contains("--clients 1,16,128,1024 --connections 4 --duration 5s"));
        assert!(cmd.contains("redis://:***@h:1"));
    }
}
