//! The scheduler use case end to end: instances of `examples/scheduler` (the
//! `lockd-scheduler-example` binary, built here if needed) share jobs through one lockd and one
//! Redis. Their jobs append to a file, the real side effect that the checks read.
//!
//! - `quick`: every second, takes 50 ms, on three instances whose timers are skewed by 0, 150
//!   and 300 ms, with a minimum hold of 80% of the interval: each tick runs exactly once.
//! - `unguarded`: the same job on the same instances with no minimum hold: the clock-skew
//!   problem. A late instance finds the lock already released and runs the tick again.
//! - `long`: every second, takes 4 s, on two other instances; the one running it is killed
//!   mid-job, and the other takes the job over within the lock's TTL, because lockd releases
//!   a lease as soon as its holder's `KeepAlive` stream breaks.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, sleep};

use crate::support::*;

/// The scheduler binary, built once per test run (a plain `cargo test` builds only its
/// unit-test harness).
fn scheduler_binary() -> PathBuf {
    workspace_binary("lockd-scheduler-example", "lockd-scheduler-example")
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One scheduler process, in a process group of its own so that killing the group also kills
/// the job it is running (as a crashed machine or container would). Killed when dropped.
struct Instance {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Instance {
    fn start(dir: &Path, name: &str, endpoint: &str, skew_ms: u64, jobs: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(scheduler_binary());
        cmd.args(["--endpoint", endpoint, "--instance", name])
            .args(["--skew-ms", &skew_ms.to_string()]);
        for job in jobs {
            cmd.args(["--job", job]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("start the scheduler");
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL to the scheduler and the job it runs.
    fn kill(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until every instance has logged that it started.
async fn wait_started(instances: &[&Instance]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for instance in instances {
        while !instance.log_text().contains("scheduler started") {
            assert!(
                Instant::now() < deadline,
                "{} did not start:\n{}",
                instance.name,
                instance.log_text()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A run recorded by a job: `run <job> <tick ms> <instance> <fencing token> <start ns> <end ns>`.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    tick: u64,
    instance: String,
    fence: u64,
    start: u128,
    end: u128,
}

fn runs(file: &Path, job: &str) -> Vec<Run> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut runs: Vec<Run> = text
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() == 7 && f[0] == "run" && f[1] == job)
        .map(|f| Run {
            tick: f[2].parse().unwrap(),
            instance: f[3].to_owned(),
            fence: f[4].parse().unwrap(),
            start: f[5].parse().unwrap(),
            end: f[6].parse().unwrap(),
        })
        .collect();
    runs.sort_by_key(|r| r.start);
    runs
}

/// Runs of one job that overlap in time (a later run started before an earlier one ended).
fn overlaps(runs: &[Run]) -> Vec<(Run, Run)> {
    runs.windows(2)
        .filter(|w| w[1].start < w[0].end)
        .map(|w| (w[0].clone(), w[1].clone()))
        .collect()
}

/// `start|end <job> <tick ms> <instance> <fencing token> <ns>` lines of a long job.
fn events(file: &Path, job: &str) -> Vec<(String, String, u128)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() == 6 && f[1] == job && (f[0] == "start" || f[0] == "end"))
        .map(|f| (f[0].to_owned(), f[3].to_owned(), f[5].parse().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_skewed_schedulers_run_each_tick_once_and_take_over_a_killed_instances_job() {
    let began = Instant::now();
    let setup = Setup::new(Store::Redis).await;
    let endpoint = setup.lockd.endpoint();
    let dir = std::env::temp_dir().join(format!("lockd-test-{}-scheduler", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("runs.txt");
    let _ = std::fs::remove_file(&out);
    let out = out.display().to_string();

    // A 50 ms job that records its run in one line (one append, so lines never mix).
    let record = format!(
        "s=$(date +%s%N); sleep 0.05; \
         echo \"run $LOCKD_JOB $LOCKD_TICK_MS $LOCKD_INSTANCE $LOCKD_FENCING_TOKEN $s $(date +%s%N)\" >> {out}"
    );
    let quick = format!("name=quick;cron=* * * * * *;min_hold=auto;cmd={record}");
    let unguarded = format!("name=unguarded;cron=* * * * * *;min_hold=0;cmd={record}");
    let jobs = [quick, unguarded];
    let skewed = [
        Instance::start(&dir, "sched-a", &endpoint, 0, &jobs),
        Instance::start(&dir, "sched-b", &endpoint, 150, &jobs),
        Instance::start(&dir, "sched-c", &endpoint, 300, &jobs),
    ];

    // A 4 s job, every second, with a 5 s TTL, on two more instances.
    let ttl = Duration::from_secs(5);
    let line = |event: &str| {
        format!(
            "echo \"{event} $LOCKD_JOB $LOCKD_TICK_MS $LOCKD_INSTANCE $LOCKD_FENCING_TOKEN $(date +%s%N)\" >> {out}"
        )
    };
    let long = format!(
        "name=long;every=1s;ttl={}s;min_hold=0;cmd={}; sleep 4; {}",
        ttl.as_secs(),
        line("start"),
        line("end")
    );
    let mut pair = [
        Instance::start(&dir, "sched-d", &endpoint, 0, std::slice::from_ref(&long)),
        Instance::start(&dir, "sched-e", &endpoint, 150, std::slice::from_ref(&long)),
    ];
    let all: Vec<&Instance> = skewed.iter().chain(pair.iter()).collect();
    wait_started(&all).await;
    // Ticks from here on find every instance's schedule running.
    let first_tick = (now_ns() / 1_000_000_000 + 2) as u64 * 1000;
    let ticks = 13u64;
    let last_tick = first_tick + (ticks - 1) * 1000;

    // ---- the long job: kill its runner mid-job ----
    let started = |events: &[(String, String, u128)]| {
        events
            .iter()
            .find(|(event, _, _)| event == "start")
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (_, runner, _) = loop {
        if let Some(start) = started(&events(Path::new(&out), "long")) {
            break start;
        }
        assert!(Instant::now() < deadline, "the long job never started");
        sleep(Duration::from_millis(20)).await;
    };
    sleep(Duration::from_secs(1)).await; // mid-job: it runs for 4 s
    if pair[0].name != runner {
        pair.swap(0, 1);
    }
    let [victim, survivor] = &mut pair;
    let killed_at = now_ns();
    victim.kill();
    let deadline = Instant::now() + ttl + Duration::from_secs(2);
    let takeover = loop {
        let taken = events(Path::new(&out), "long")
            .into_iter()
            .find(|(event, who, at)| event == "start" && *who == survivor.name && *at > killed_at);
        if let Some((_, _, at)) = taken {
            break Duration::from_nanos((at - killed_at) as u64);
        }
        assert!(
            Instant::now() < deadline,
            "{} never took the long job over:\n{}",
            survivor.name,
            survivor.log_text()
        );
        sleep(Duration::from_millis(20)).await;
    };
    let long_events = events(Path::new(&out), "long");
    // Nobody else ran the long job while the victim held it, and the victim's run died with it.
    let mut starts = long_events.iter().filter(|(event, _, _)| event == "start");
    assert_eq!(starts.next().unwrap().1, runner);
    assert!(starts.all(|(_, _, at)| *at > killed_at), "{long_events:?}");
    assert!(
        !long_events
            .iter()
            .any(|(event, who, _)| event == "end" && *who == runner),
        "the killed instance's job kept running: {long_events:?}"
    );
    assert!(takeover < ttl, "took {takeover:?}, the TTL is {ttl:?}");
    assert!(
        survivor
            .log_text()
            .contains(&format!("skipping long: already running on {runner}")),
        "{}",
        survivor.log_text()
    );

    // ---- the quick job: every tick exactly once, despite the skew ----
    let wait_for = Duration::from_millis(last_tick + 1500)
        .saturating_sub(Duration::from_nanos(now_ns() as u64));
    sleep(wait_for).await;
    let skip_lines: usize = skewed
        .iter()
        .map(|i| {
            let log = i.log_text();
            let skips = log
                .matches("skipping quick: already running on sched-")
                .count();
            // Each instance counts its own skips, numbering them in its log.
            if skips > 0 {
                assert!(log.contains(&format!("({skips} skipped)")), "{log}");
            }
            skips
        })
        .sum();
    drop(skewed);
    drop(pair);

    let quick = runs(Path::new(&out), "quick");
    let mut per_tick: BTreeMap<u64, Vec<&Run>> = (0..ticks)
        .map(|i| (first_tick + i * 1000, Vec::new()))
        .collect();
    for run in &quick {
        if let Some(runs) = per_tick.get_mut(&run.tick) {
            runs.push(run);
        }
    }
    let duplicates: usize = per_tick.values().map(|r| r.len().saturating_sub(1)).sum();
    let missed: Vec<u64> = per_tick
        .iter()
        .filter(|(_, r)| r.is_empty())
        .map(|(t, _)| *t)
        .collect();
    let mut by_instance: BTreeMap<&str, usize> = BTreeMap::new();
    for runs in per_tick.values() {
        for run in runs {
            *by_instance.entry(run.instance.as_str()).or_default() += 1;
        }
    }
    let unguarded = runs(Path::new(&out), "unguarded");
    let unguarded_duplicates: usize = {
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for run in unguarded.iter().filter(|r| per_tick.contains_key(&r.tick)) {
            *counts.entry(run.tick).or_default() += 1;
        }
        counts.values().map(|c| c.saturating_sub(1)).sum()
    };
    eprintln!(
        "scheduler test: ran {:.1} s; quick job: {ticks} ticks checked, {duplicates} duplicates, \
         {} missed, runs per instance {by_instance:?}, {skip_lines} skip lines; unguarded job \
         (no minimum hold, same ticks): {unguarded_duplicates} duplicates; long job taken over \
         {takeover:?} after its runner was killed (TTL {ttl:?})",
        began.elapsed().as_secs_f64(),
        missed.len(),
    );

    assert_eq!(duplicates, 0, "ticks run more than once: {per_tick:#?}");
    assert!(missed.is_empty(), "ticks never run: {missed:?}");
    assert_eq!(overlaps(&quick), Vec::new(), "overlapping runs of quick");
    assert!(
        quick.windows(2).all(|w| w[1].fence > w[0].fence),
        "fencing tokens must grow run after run: {quick:#?}"
    );
    assert!(skip_lines >= ticks as usize, "only {skip_lines} skip lines");
    // The clock-skew problem is real: without the minimum hold, late instances run ticks again
    // (but never at the same time: the lock still excludes).
    assert!(
        unguarded_duplicates > 0,
        "the unguarded job never ran a tick twice"
    );
    assert_eq!(
        overlaps(&unguarded),
        Vec::new(),
        "overlapping runs of unguarded"
    );
}

/// Lines with their common indentation removed (blank lines made empty).
fn dedent(lines: &[&str]) -> Vec<String> {
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| {
            if l.trim().is_empty() {
                ""
            } else {
                &l[indent..]
            }
            .to_owned()
        })
        .collect()
}

/// The README's "Using lockd from your scheduler" section quotes code that CI runs: its Rust
/// example is this test's scheduler, its Python example is the worker `tests/python.rs` runs.
#[test]
fn readme_scheduler_examples_are_copied_from_code_that_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "## Using lockd from your scheduler")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect();
    assert!(!section.is_empty(), "README.md lost its scheduler section");
    for (lang, source) in [
        ("rust", "examples/scheduler/src/scheduler.rs"),
        ("python", "client/python/examples/worker.py"),
    ] {
        let fence = format!("```{lang}");
        let snippet: Vec<&str> = section
            .iter()
            .skip_while(|l| **l != fence)
            .skip(1)
            .take_while(|l| **l != "```")
            .copied()
            .collect();
        assert!(
            !snippet.is_empty(),
            "no {lang} example in the README section"
        );
        let snippet = dedent(&snippet);
        let text = std::fs::read_to_string(root.join(source)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines
                .windows(snippet.len())
                .any(|window| dedent(window) == snippet),
            "README.md's {lang} example is not a verbatim copy of lines of {source}:\n{}",
            snippet.join("\n")
        );
    }
}
