//! The results: a table for people, JSON for tools, the lockd / redis-direct ratios, and the
//! issue's targets with what was measured against them.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::{Scenario, Target, WaiterKind};
use crate::memory::MemoryResult;
use crate::scale::ScaleResult;
use crate::scenario::RunResult;
use crate::stats::Latency;
use crate::waiters::WaitersResult;

/// The scale target's tolerance: "does not grow" allows this much, for run-to-run noise.
const SCALE_TOLERANCE: f64 = 0.15;

/// lockd's RSS limit with 10,000 open calls.
const RSS_LIMIT: u64 = 100 * 1000 * 1000;

/// Everything one invocation measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The command line that reproduces this run, every option spelled out.
    pub command: String,
    /// Prefix of the resource names this run used.
    pub run_id: String,
    /// One entry per (scenario, concurrency, target).
    pub runs: Vec<RunResult>,
    /// The memory scenario, per target.
    pub memory: Vec<MemoryResult>,
    /// The scale scenario's setup (its runs are in `runs`, with `held_locks`).
    pub scale: Option<ScaleResult>,
    /// The waiters scenario, per target and kind.
    pub waiters: Vec<WaitersResult>,
    /// lockd (and lockd-memory) relative to redis-direct, per scenario and concurrency.
    pub ratios: Vec<Ratio>,
    /// The targets and what was measured.
    pub checks: Vec<Check>,
    /// Definitions and caveats.
    pub notes: Vec<String>,
}

/// One target relative to redis-direct, in one scenario at one concurrency.
#[derive(Debug, Serialize)]
pub struct Ratio {
    /// The scenario.
    pub scenario: Scenario,
    /// Concurrent clients.
    pub clients: usize,
    /// lockd or lockd-memory.
    pub target: Target,
    /// ops/s of the target divided by ops/s of redis-direct.
    pub ops: f64,
    /// Acquire p99 of the target divided by that of redis-direct.
    pub acquire_p99: Option<f64>,
    /// Contended: hand-offs to another client per second, divided likewise.
    pub handoffs: Option<f64>,
}

/// One of the targets.
#[derive(Debug, Serialize)]
pub struct Check {
    /// What is required.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Whether the target is met; `None` when the needed runs were not part of this invocation.
    pub met: Option<bool>,
}

impl Report {
    /// Assembles the report and derives the ratios and checks.
    pub fn new(
        command: String,
        run_id: String,
        runs: Vec<RunResult>,
        memory: Vec<MemoryResult>,
        scale: Option<ScaleResult>,
        waiters: Vec<WaitersResult>,
        notes: Vec<String>,
    ) -> Self {
        let mut report = Self {
            command,
            run_id,
            runs,
            memory,
            scale,
            waiters,
            ratios: Vec::new(),
            checks: Vec::new(),
            notes,
        };
        report.ratios = report.compute_ratios();
        report.checks = report.compute_checks();
        report
    }

    fn find(&self, scenario: Scenario, target: Target, clients: usize) -> Option<&RunResult> {
        self.runs
            .iter()
            .find(|r| r.scenario == scenario && r.target == target && r.clients == clients)
    }

    fn compute_ratios(&self) -> Vec<Ratio> {
        let mut out = Vec::new();
        for base in self
            .runs
            .iter()
            .filter(|r| r.target == Target::RedisDirect && r.scenario != Scenario::Scale)
        {
            for target in [
                Target::Lockd,
                Target::LockdSession,
                Target::LockdMemory,
                Target::Etcd,
            ] {
                let Some(run) = self.find(base.scenario, target, base.clients) else {
                    continue;
                };
                let p99 = |r: &RunResult| r.latency_of("acquire").map(|l| l.p99_us);
                let handoffs = |r: &RunResult| r.contention.as_ref().map(|c| c.handoffs_per_second);
                out.push(Ratio {
                    scenario: base.scenario,
                    clients: base.clients,
                    target,
                    ops: run.ops_per_second / base.ops_per_second.max(1e-9),
                    acquire_p99: p99(run).zip(p99(base)).map(|(a, b)| a / b.max(1e-9)),
                    handoffs: handoffs(run)
                        .zip(handoffs(base))
                        .map(|(a, b)| a / b.max(1e-9)),
                });
            }
        }
        out
    }

    fn compute_checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let (u, c) = (Scenario::Uncontended, Scenario::Contended);
        let (rd, lockd) = (Target::RedisDirect, Target::Lockd);

        let measured = self.find(u, lockd, 128).zip(self.find(u, rd, 128));
        checks.push(Check {
            target: "uncontended, 128 clients: lockd ops/s >= 50% of redis-direct".into(),
            measured: measured.map_or_else(not_run, |(l, r)| {
                format!(
                    "{} vs {} ops/s = {:.0}%",
                    thousands(l.ops_per_second),
                    thousands(r.ops_per_second),
                    100.0 * l.ops_per_second / r.ops_per_second.max(1e-9)
                )
            }),
            met: measured.map(|(l, r)| l.ops_per_second >= 0.5 * r.ops_per_second),
        });

        // Issue 14: the session path, unary calls, and etcd, at 128 uncontended clients.
        let session = Target::LockdSession;
        for (target, base, goal) in [
            (session, rd, 0.5),
            (lockd, rd, 0.25),
            (lockd, Target::Etcd, 10.0),
            (session, Target::Etcd, 10.0),
        ] {
            let measured = self.find(u, target, 128).zip(self.find(u, base, 128));
            checks.push(Check {
                target: format!(
                    "uncontended, 128 clients: {} ops/s >= {goal}x {}'s",
                    target.name(),
                    base.name()
                ),
                measured: measured.map_or_else(not_run, |(t, b)| {
                    format!(
                        "{} vs {} ops/s = {:.2}x",
                        thousands(t.ops_per_second),
                        thousands(b.ops_per_second),
                        t.ops_per_second / b.ops_per_second.max(1e-9)
                    )
                }),
                met: measured.map(|(t, b)| t.ops_per_second >= goal * b.ops_per_second),
            });
        }
        let cpu = self
            .find(u, session, 128)
            .and_then(RunResult::server_us_per_op);
        checks.push(Check {
            target: "uncontended, 128 clients: lockd-session + Redis CPU <= 25us per op".into(),
            measured: cpu.map_or_else(not_run, |us| format!("{}/op", micros(us))),
            met: cpu.map(|us| us <= 25.0),
        });

        let p99 = |r: &RunResult| r.latency_of("acquire").map(|l| l.p99_us);
        let measured = self
            .find(u, lockd, 16)
            .and_then(p99)
            .zip(self.find(u, rd, 16).and_then(p99));
        checks.push(Check {
            target: "uncontended, 16 clients: lockd Acquire p99 <= 3x redis-direct's".into(),
            measured: measured.map_or_else(not_run, |(l, r)| {
                format!("{} vs {} = {:.1}x", micros(l), micros(r), l / r.max(1e-9))
            }),
            met: measured.map(|(l, r)| l <= 3.0 * r),
        });

        let contended = self.find(c, lockd, 16);
        let contention = contended.and_then(|r| r.contention.as_ref());
        checks.push(Check {
            target: "contended, 16 clients: lockd >= 5,000 hand-offs/s to a different client"
                .into(),
            measured: contention.map_or_else(not_run, |c| {
                format!("{} hand-offs/s", thousands(c.handoffs_per_second))
            }),
            met: contention.map(|c| c.handoffs_per_second >= 5_000.0),
        });
        let gap = contention.and_then(|c| c.gap_from_release_reply.as_ref());
        checks.push(Check {
            target: "contended, 16 clients: lockd median Release reply -> next Acquire reply < 1ms"
                .into(),
            measured: gap.map_or_else(not_run, |g| {
                let send = contention
                    .and_then(|c| c.gap_from_release_send.as_ref())
                    .map_or_else(String::new, |s| {
                        format!(" (from Release sent: {})", micros(s.p50_us))
                    });
                format!("p50 {}, p99 {}{send}", micros(g.p50_us), micros(g.p99_us))
            }),
            met: gap.map(|g| g.p50_us < 1_000.0),
        });
        checks.push(Check {
            target: "contended, 16 clients: lockd serves every waiter".into(),
            measured: contended.zip(contention).map_or_else(not_run, |(r, c)| {
                format!(
                    "{}/{} clients served, grants per client {}..{}, {} wait timeouts, {} errors",
                    c.clients_served,
                    r.clients,
                    c.min_per_client,
                    c.max_per_client,
                    c.wait_timeouts,
                    r.errors.values().sum::<u64>()
                )
            }),
            met: contended
                .zip(contention)
                .map(|(r, c)| c.clients_served == r.clients && r.errors.is_empty()),
        });

        let mem = self.memory.iter().find(|m| m.target == lockd);
        checks.push(Check {
            target: "memory: lockd <= 256 bytes per held lock".into(),
            measured: mem.map_or_else(not_run, |m| format!("{:.0} bytes", m.bytes_per_held_lock)),
            met: mem.map(|m| m.bytes_per_held_lock <= 256.0),
        });
        checks.push(Check {
            target: "memory: lockd <= 96 bytes per released resource".into(),
            measured: mem.map_or_else(not_run, |m| {
                format!("{:.0} bytes", m.bytes_per_released_resource)
            }),
            met: mem.map(|m| m.bytes_per_released_resource <= 96.0),
        });

        checks.push(self.scale_check());
        for kind in [
            WaiterKind::Acquire,
            WaiterKind::Watch,
            WaiterKind::Keepalive,
        ] {
            let w = self
                .waiters
                .iter()
                .find(|w| w.target == lockd && w.kind == kind);
            checks.push(Check {
                target: format!(
                    "waiters: lockd RSS < 100 MB with {} open {}s",
                    w.map_or_else(|| "10,000".to_owned(), |w| thousands(w.calls as f64)),
                    kind.describe()
                ),
                measured: w.map_or_else(not_run, |w| {
                    format!(
                        "{} with {} open (before: {}; {:.1} KB per call)",
                        megabytes(w.rss_open),
                        thousands(w.open as f64),
                        megabytes(w.rss_before),
                        w.bytes_per_call / 1000.0
                    )
                }),
                met: w.map(|w| w.rss_open < RSS_LIMIT && w.open == w.calls),
            });
        }
        checks
    }

    /// The scale runs of `target`, in the order they ran.
    fn scale_runs(&self, target: Target) -> Vec<&RunResult> {
        self.runs
            .iter()
            .filter(|r| r.scenario == Scenario::Scale && r.target == target)
            .collect()
    }

    /// The scale comparison of `target`: the runs at the fewest held locks (before and after
    /// the others), and the run at the most.
    fn scale_ends(&self, target: Target) -> Option<ScaleEnds<'_>> {
        let runs = self.scale_runs(target);
        let least = runs.iter().filter_map(|r| r.held_locks).min()?;
        let most = runs.iter().filter_map(|r| r.held_locks).max()?;
        if least == most {
            return None;
        }
        Some(ScaleEnds {
            base: runs
                .iter()
                .copied()
                .filter(|r| r.held_locks == Some(least))
                .collect(),
            top: runs.iter().copied().find(|r| r.held_locks == Some(most))?,
        })
    }

    fn scale_check(&self) -> Check {
        let ends = self.scale_ends(Target::Lockd);
        let target = ends.as_ref().map_or_else(
            || "scale: lockd work per op does not grow with the held locks".to_owned(),
            |e| {
                format!(
                    "scale: lockd work per op (lockd + redis CPU, else 1 / ops/s) does not \
                     grow between {} and {} held locks (within {:.0}%)",
                    thousands(e.base[0].held_locks.unwrap_or(0) as f64),
                    thousands(e.top.held_locks.unwrap_or(0) as f64),
                    SCALE_TOLERANCE * 100.0
                )
            },
        );
        let Some(e) = ends else {
            return Check {
                target,
                measured: not_run(),
                met: None,
            };
        };
        let list = |f: &dyn Fn(&RunResult) -> String| {
            e.base.iter().map(|r| f(r)).collect::<Vec<_>>().join(" / ")
        };
        let p50 = |r: &RunResult| micros(r.latency_of("op").map_or(0.0, |l| l.p50_us));
        let p99 = |r: &RunResult| micros(r.latency_of("op").map_or(0.0, |l| l.p99_us));
        let mut measured = format!(
            "ops/s {} -> {} ({:.2}x), op p50 {} -> {}, p99 {} -> {}",
            list(&|r| thousands(r.ops_per_second)),
            thousands(e.top.ops_per_second),
            e.ops_ratio(),
            list(&p50),
            p50(e.top),
            list(&p99),
            p99(e.top),
        );
        let cpu = e.cpu_ratio();
        if let Some(ratio) = cpu {
            let _ = write!(
                measured,
                ", lockd+redis CPU per op {} -> {} ({ratio:.2}x)",
                list(&|r| r.server_us_per_op().map_or_else(String::new, micros)),
                e.top.server_us_per_op().map_or_else(String::new, micros),
            );
        }
        // Server work per request is the CPU the servers spend per op when it is measured (it
        // does not move with the load generator's share of the machine); otherwise the
        // clients' time per op, 1 / ops/s.
        let met = match cpu {
            Some(ratio) => ratio <= 1.0 + SCALE_TOLERANCE,
            None => 1.0 / e.ops_ratio().max(1e-9) <= 1.0 + SCALE_TOLERANCE,
        };
        Check {
            target,
            measured,
            met: Some(met),
        }
    }

    /// The results as text tables.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let scenarios = [
            (
                Scenario::Uncontended,
                "1 op = Acquire + Release of the client's own resource",
            ),
            (
                Scenario::Contended,
                "1 op = blocking Acquire of the one shared resource + Release",
            ),
            (
                Scenario::Mixed,
                "1 op = IsLocked 40% | GetOwner 40% | Acquire + Release 20%",
            ),
            (
                Scenario::Keepalive,
                "1 op = one renewal of the client's held lease (KeepAlive heartbeat; \
                 redis-direct: compare-and-PEXPIRE)",
            ),
        ];
        for (scenario, what) in scenarios {
            let runs: Vec<&RunResult> = self
                .runs
                .iter()
                .filter(|r| r.scenario == scenario)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n== {}: {what} ==", scenario.name());
            let _ = writeln!(
                out,
                "{:<13}{:>8}{:>11}  {:<10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>8}",
                "target",
                "clients",
                "ops/s",
                "latency",
                "calls/s",
                "p50",
                "p90",
                "p99",
                "p99.9",
                "max",
                "errors"
            );
            for run in runs {
                let errors: u64 = run.errors.values().sum::<u64>() + run.unexpected;
                for (i, l) in ordered(&run.latency).into_iter().enumerate() {
                    let (name, clients, ops, errs) = if i == 0 {
                        (
                            run.target.name().to_owned(),
                            run.clients.to_string(),
                            thousands(run.ops_per_second),
                            errors.to_string(),
                        )
                    } else {
                        Default::default()
                    };
                    let _ = writeln!(
                        out,
                        "{name:<13}{clients:>8}{ops:>11}  {:<10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{errs:>8}",
                        l.name,
                        thousands(l.per_second),
                        micros(l.p50_us),
                        micros(l.p90_us),
                        micros(l.p99_us),
                        micros(l.p999_us),
                        micros(l.max_us),
                    );
                }
                if run.latency.is_empty() {
                    let _ = writeln!(
                        out,
                        "{:<13}{:>8}{:>11}  (nothing completed){errors:>44}",
                        run.target.name(),
                        run.clients,
                        thousands(run.ops_per_second),
                    );
                }
                if let Some(c) = &run.contention {
                    let gap = |l: &Option<Latency>| {
                        l.as_ref().map_or_else(
                            || "-".to_owned(),
                            |l| format!("p50 {} p99 {}", micros(l.p50_us), micros(l.p99_us)),
                        )
                    };
                    let _ = writeln!(
                        out,
                        "{:>21}hand-offs to another client {}/s; gap from Release reply {}, \
                         from Release sent {}; served {}/{} (grants per client {}..{}); \
                         wait timeouts {}",
                        "",
                        thousands(c.handoffs_per_second),
                        gap(&c.gap_from_release_reply),
                        gap(&c.gap_from_release_send),
                        c.clients_served,
                        run.clients,
                        c.min_per_client,
                        c.max_per_client,
                        c.wait_timeouts,
                    );
                }
                if let Some(line) = cpu_line(run) {
                    let _ = writeln!(out, "{:>21}{line}", "");
                }
                if let Some(e) = &run.first_error {
                    let _ = writeln!(out, "{:>21}first error: {e}", "");
                }
            }
        }
        self.scale_table(&mut out);
        self.waiters_table(&mut out);

        if !self.memory.is_empty() {
            let _ = writeln!(
                out,
                "\n== memory: Redis used_memory, locks with a 20-byte owner and no labels =="
            );
            for m in &self.memory {
                let _ = writeln!(
                    out,
                    "{:<13} {} locks ({}-byte resources, {:.0}-byte tokens, {} granted): \
                     {:.0} bytes per held lock ({} keys), {:.0} bytes per released resource \
                     ({} keys left); {} acquires/s, {} errors",
                    m.target.name(),
                    m.locks,
                    m.resource_bytes,
                    m.token_bytes,
                    m.granted,
                    m.bytes_per_held_lock,
                    m.keys_held,
                    m.bytes_per_released_resource,
                    m.keys_released,
                    thousands(m.acquire_per_second),
                    m.errors,
                );
                if let Some(e) = &m.first_error {
                    let _ = writeln!(out, "{:>14}first error: {e}", "");
                }
            }
        }

        if !self.ratios.is_empty() {
            let _ = writeln!(out, "\n== ratios to redis-direct (same invocation) ==");
            let _ = writeln!(
                out,
                "{:<13}{:<13}{:>8}{:>9}{:>14}{:>11}",
                "scenario", "target", "clients", "ops/s", "acquire p99", "hand-offs"
            );
            for r in &self.ratios {
                let x = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"));
                let _ = writeln!(
                    out,
                    "{:<13}{:<13}{:>8}{:>9}{:>14}{:>11}",
                    r.scenario.name(),
                    r.target.name(),
                    r.clients,
                    format!("{:.2}x", r.ops),
                    x(r.acquire_p99),
                    x(r.handoffs),
                );
            }
        }

        let _ = writeln!(out, "\n== issue targets ==");
        let mut not_run = 0;
        for c in &self.checks {
            let verdict = match c.met {
                Some(true) => "MET    ",
                Some(false) => "MISSED ",
                None => {
                    not_run += 1;
                    continue;
                }
            };
            let _ = writeln!(out, "{verdict} {}: {}", c.target, c.measured);
        }
        if not_run > 0 {
            let _ = writeln!(
                out,
                "({not_run} more need scenarios or targets that were not part of this run)"
            );
        }
        let _ = writeln!(out, "\nnotes:");
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        let _ = writeln!(out, "\nreproduce: {}", self.command);
        out
    }
}

impl Report {
    fn scale_table(&self, out: &mut String) {
        let Some(scale) = &self.scale else {
            return;
        };
        let _ = writeln!(
            out,
            "\n== scale: uncontended, {} clients, with N locks already held in Redis ==",
            scale.clients
        );
        for l in &scale.levels {
            let rehash = l.rehash_wait_s.map_or_else(
                || "rehash not checked: DEBUG HTSTATS refused".to_owned(),
                |s| format!("rehash done {s:.1}s later"),
            );
            let _ = writeln!(
                out,
                "N = {:>10}: {} keys in Redis, used_memory {} (pre-loaded in {:.1}s, {rehash})",
                format!(
                    "{}{}",
                    thousands(l.held_locks as f64),
                    if l.repeat { "*" } else { "" }
                ),
                thousands(l.keys as f64),
                megabytes(u64::try_from(l.used_memory).unwrap_or(0)),
                l.preload_s
            );
        }
        let _ = writeln!(
            out,
            "{:<13}{:>10}{:>10}{:>10}{:>10}{:>12}{:>10}  server CPU per op",
            "target", "held", "ops/s", "op p50", "op p99", "acquire p99", "errors"
        );
        let targets = [Target::RedisDirect, Target::Lockd];
        for target in targets {
            for r in self.scale_runs(target) {
                let lat = |name: &str, f: fn(&Latency) -> f64| {
                    r.latency_of(name)
                        .map_or_else(|| "-".to_owned(), |l| micros(f(l)))
                };
                let held = format!(
                    "{}{}",
                    thousands(r.held_locks.unwrap_or(0) as f64),
                    if r.scale_repeat { "*" } else { "" }
                );
                let _ = writeln!(
                    out,
                    "{:<13}{:>10}{:>10}{:>10}{:>10}{:>12}{:>10}  {}",
                    target.name(),
                    held,
                    thousands(r.ops_per_second),
                    lat("op", |l| l.p50_us),
                    lat("op", |l| l.p99_us),
                    lat("acquire", |l| l.p99_us),
                    r.errors.values().sum::<u64>() + r.unexpected,
                    cpu_line(r).unwrap_or_else(|| "-".to_owned()),
                );
            }
        }
        for target in targets {
            let Some(e) = self.scale_ends(target) else {
                continue;
            };
            let mean = |f: fn(&Latency) -> f64| {
                e.base
                    .iter()
                    .map(|r| r.latency_of("op").map_or(0.0, f))
                    .sum::<f64>()
                    / e.base.len() as f64
            };
            let top = |f: fn(&Latency) -> f64| e.top.latency_of("op").map_or(0.0, f);
            let cpu = e
                .cpu_ratio()
                .map_or_else(String::new, |r| format!(", server CPU per op {r:.2}x"));
            let _ = writeln!(
                out,
                "{:<13}{} held vs {} (mean of {} runs): ops/s {:.2}x, op p50 {:.2}x, op p99 \
                 {:.2}x{cpu}",
                target.name(),
                thousands(e.top.held_locks.unwrap_or(0) as f64),
                thousands(e.base[0].held_locks.unwrap_or(0) as f64),
                e.base.len(),
                e.ops_ratio(),
                top(|l| l.p50_us) / mean(|l| l.p50_us).max(1e-9),
                top(|l| l.p99_us) / mean(|l| l.p99_us).max(1e-9),
            );
        }
        let _ = writeln!(
            out,
            "* = measured again after the largest level was deleted; pre-loaded keys deleted: {} \
             in {:.1}s",
            thousands(scale.keys_deleted as f64),
            scale.cleanup_s
        );
    }

    fn waiters_table(&self, out: &mut String) {
        let Some(first) = self.waiters.first() else {
            return;
        };
        let _ = writeln!(
            out,
            "\n== waiters: lockd's RSS (VmRSS) with {} calls held open over {} HTTP/2 \
             connections ==",
            thousands(first.calls as f64),
            first.connections
        );
        let _ = writeln!(
            out,
            "{:<13}{:<18}{:>8}{:>12}{:>12}{:>12}{:>12}{:>8}{:>8}",
            "target",
            "open calls",
            "open",
            "RSS before",
            "RSS open",
            "RSS after",
            "per call",
            "ended",
            "errors"
        );
        for w in &self.waiters {
            let _ = writeln!(
                out,
                "{:<13}{:<18}{:>8}{:>12}{:>12}{:>12}{:>12}{:>8}{:>8}{}",
                w.target.name(),
                w.kind.describe(),
                w.open,
                megabytes(w.rss_before),
                megabytes(w.rss_open),
                megabytes(w.rss_after),
                format!("{:.1} KB", w.bytes_per_call / 1000.0),
                w.ended_early,
                w.errors,
                if w.settled {
                    ""
                } else {
                    "  (lockd was still busy when read)"
                },
            );
            if let Some(e) = &w.first_error {
                let _ = writeln!(out, "{:>14}first error: {e}", "");
            }
        }
    }
}

/// The scale runs of one target that its check compares.
struct ScaleEnds<'a> {
    /// The runs at the fewest held locks (first and repeated).
    base: Vec<&'a RunResult>,
    /// The run at the most held locks.
    top: &'a RunResult,
}

impl ScaleEnds<'_> {
    /// ops/s at the most held locks, over the mean at the fewest.
    fn ops_ratio(&self) -> f64 {
        let base = self.base.iter().map(|r| r.ops_per_second).sum::<f64>() / self.base.len() as f64;
        self.top.ops_per_second / base.max(1e-9)
    }

    /// Server CPU per op at the most held locks, over the mean at the fewest, if measured.
    fn cpu_ratio(&self) -> Option<f64> {
        let base: Option<Vec<f64>> = self.base.iter().map(|r| r.server_us_per_op()).collect();
        let base = base?;
        let mean = base.iter().sum::<f64>() / base.len() as f64;
        Some(self.top.server_us_per_op()? / mean.max(1e-9))
    }
}

/// "server CPU: lockd 44us + redis 29us per op (1.20 + 0.80 CPU-s)", when measured.
fn cpu_line(run: &RunResult) -> Option<String> {
    let total = run.server_us_per_op()?;
    let parts: Vec<String> = run
        .server_cpu
        .iter()
        .map(|c| format!("{} {}", c.process.name, micros(c.us_per_op)))
        .collect();
    let secs: Vec<String> = run
        .server_cpu
        .iter()
        .map(|c| format!("{:.2}", c.cpu_seconds))
        .collect();
    Some(format!(
        "server CPU per op: {} = {} ({} CPU-s in {:.1}s)",
        parts.join(" + "),
        micros(total),
        secs.join(" + "),
        run.elapsed_s
    ))
}

/// `op` first, then the RPCs in a fixed order.
fn ordered(latency: &[Latency]) -> Vec<&Latency> {
    let rank = |n: &str| match n {
        "op" => 0,
        "renew" => 1,
        "acquire" => 1,
        "release" => 2,
        "is_locked" => 3,
        "get_owner" => 4,
        _ => 5,
    };
    let mut v: Vec<&Latency> = latency.iter().collect();
    v.sort_by_key(|l| rank(&l.name));
    v
}

fn not_run() -> String {
    "not part of this run".to_owned()
}

/// 12345.6 -> "12,346".
pub fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as MB (10^6 bytes) with one decimal: `31.4 MB`.
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Microseconds in the most readable unit: `87us`, `1.25ms`, `2.10s`.
pub fn micros(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.1}us")
    } else if us < 1_000.0 {
        format!("{us:.0}us")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1_000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_readable() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(micros(5.3), "5.3us");
        assert_eq!(micros(87.0), "87us");
        assert_eq!(micros(1250.0), "1.25ms");
        assert_eq!(micros(2_100_000.0), "2.10s");
    }
}
