//! The Python client package (`client/python`, distribution `lockd-client`, import `lockd`)
//! against a real lockd and Redis: the proof that "any language with gRPC" can use lockd. Each
//! test run installs the package with `pip install client/python` into a fresh virtual
//! environment under target/, then real `python3` processes run `examples/worker.py`,
//! `lockd_lock`, the asyncio `lockd.lock`, and the package's pytest suite.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;

use crate::support::*;

/// `client/python`, from the repository root (the parent of this package's `server/`).
fn package_dir() -> PathBuf {
    repo_root().join("client").join("python")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Python of a fresh virtual environment (target/python-venv) with `client/python`
/// installed by pip, plus pytest and grpcio-tools (for the stubs' staleness check). Made once
/// per test process. Fails (never skips) when python3 cannot make a virtual environment.
fn venv_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let target = Path::new(env!("CARGO_BIN_EXE_lockd"))
            .parent()
            .and_then(Path::parent)
            .unwrap();
        let venv = target.join("python-venv");
        let _ = std::fs::remove_dir_all(&venv);
        let run = |cmd: &mut std::process::Command, what: &str| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                out.status.success(),
                "{what} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv),
            "python3 -m venv (install it with: sudo apt-get install -y python3-venv; \
             scripts/test does this for you)",
        );
        let python = venv.join("bin").join("python");
        run(
            std::process::Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .arg(format!("{}[test]", package_dir().display()))
                .arg("grpcio-tools"),
            "pip install client/python[test] grpcio-tools in a fresh virtual environment",
        );
        python
    })
}

/// A fresh directory for one test's files.
fn scratch(what: &str) -> PathBuf {
    scratch_dir(&format!("python-{what}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The virtual environment's `python <args>`, run from the repository root, killed if the test
/// ends first.
fn python(args: &[&str]) -> Command {
    let mut cmd = Command::new(venv_python());
    cmd.args(args)
        .current_dir(repo_root())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

// ---- the scheduler scenario: three workers, one job, many ticks ----

const WORKERS: [&str; 3] = ["worker-a", "worker-b", "worker-c"];
const TICKS: usize = 12;
/// worker.py's defaults, written out so the timing the test relies on is visible here: ticks
/// 400 ms apart; the job runs 120 ms; the winner keeps the lock at least 200 ms after the grant
/// (min hold); a worker that wakes more than 80 ms late skips the tick; 0-20 ms random delay
/// before competing. So a duplicate run needs a competitor stalled for about 100 ms between
/// deciding to compete and lockd receiving its Acquire, and the lock is free well before the
/// next tick.
const TIMING: [&str; 10] = [
    "--interval-ms",
    "400",
    "--job-ms",
    "120",
    "--min-hold-ms",
    "200",
    "--misfire-ms",
    "80",
    "--jitter-ms",
    "20",
];
const INTERVAL: Duration = Duration::from_millis(400);
/// Tick 0 is this far in the future when the workers start: time for Python and grpcio to load
/// and connect, so that all three compete from the first tick.
const START_DELAY: Duration = Duration::from_millis(2000);

/// One line of the workers' shared log (see worker.py).
#[derive(Debug)]
enum Record {
    Run {
        tick: usize,
        fencing_token: u64,
        worker: String,
        start_ns: u128,
        end_ns: u128,
        lost: bool,
    },
    Skip {
        tick: usize,
        worker: String,
        holder_fencing_token: u64,
        holder_owner: String,
    },
    Miss {
        tick: usize,
        worker: String,
    },
}

impl Record {
    fn tick(&self) -> usize {
        match self {
            Record::Run { tick, .. } | Record::Skip { tick, .. } | Record::Miss { tick, .. } => {
                *tick
            }
        }
    }

    fn worker(&self) -> &str {
        match self {
            Record::Run { worker, .. }
            | Record::Skip { worker, .. }
            | Record::Miss { worker, .. } => worker,
        }
    }
}

fn parse_record(line: &str) -> Result<Record, String> {
    let bad = || format!("unparsable line {line:?}");
    let f: Vec<&str> = line.split(' ').collect();
    let num = |i: usize| {
        f.get(i)
            .and_then(|s| s.parse::<u128>().ok())
            .ok_or_else(bad)
    };
    Ok(match f.first().copied() {
        Some("run") if f.len() == 7 => Record::Run {
            tick: num(1)? as usize,
            fencing_token: num(2)? as u64,
            worker: f[3].to_string(),
            start_ns: num(4)?,
            end_ns: num(5)?,
            lost: num(6)? != 0,
        },
        Some("skip") if f.len() >= 5 => Record::Skip {
            tick: num(1)? as usize,
            worker: f[2].to_string(),
            holder_fencing_token: num(3)? as u64,
            holder_owner: f[4..].join(" "),
        },
        Some("miss") if f.len() == 4 => Record::Miss {
            tick: num(1)? as usize,
            worker: f[2].to_string(),
        },
        _ => return Err(bad()),
    })
}

/// What the history showed, for the test's output.
#[derive(Debug)]
struct Summary {
    runs: usize,
    skips: usize,
    misses: usize,
    /// Ticks at which every worker woke too late to compete (a misfire, not a lock failure).
    missed_by_all: usize,
    /// Ticks at which the previous tick's run still held the lock, so all the workers on time
    /// skipped ("already running"): an overrun, not a lock failure.
    overrun: usize,
    /// Ticks at which at least one worker lost to the run.
    contested: usize,
    winners: BTreeMap<String, usize>,
}

/// Checks the scheduler's promises on the recorded history:
/// - every worker decided every tick once: ran it, skipped it, or missed it (woke too late);
/// - every tick at which any worker was on time ran exactly once, and its run never lost its
///   lock; except, rarely (at most a quarter of the ticks, on an overloaded machine), ticks that
///   every worker missed, or at which the previous run still held the lock;
/// - every skip names that tick's run and its fencing token: the competitors met the very lease
///   that ran, at the same time; most ticks were contested;
/// - fencing tokens strictly increase from run to run, and no two runs overlap in time;
/// - at least two different workers won ticks.
fn check_history(records: &[Record]) -> Result<Summary, String> {
    let mut per_tick: BTreeMap<usize, Vec<&Record>> = BTreeMap::new();
    for r in records {
        if r.tick() >= TICKS {
            return Err(format!("a record for tick {} of {TICKS}: {r:?}", r.tick()));
        }
        per_tick.entry(r.tick()).or_default().push(r);
    }
    let mut runs: Vec<&Record> = Vec::new();
    let mut summary = Summary {
        runs: 0,
        skips: 0,
        misses: 0,
        missed_by_all: 0,
        overrun: 0,
        contested: 0,
        winners: BTreeMap::new(),
    };
    for tick in 0..TICKS {
        let recs = per_tick.remove(&tick).unwrap_or_default();
        let deciders: BTreeSet<&str> = recs.iter().map(|r| r.worker()).collect();
        if recs.len() != WORKERS.len() || deciders.len() != WORKERS.len() {
            return Err(format!(
                "tick {tick}: expected one record per worker, got {recs:?}"
            ));
        }
        let misses = recs
            .iter()
            .filter(|r| matches!(r, Record::Miss { .. }))
            .count();
        summary.misses += misses;
        if misses == WORKERS.len() {
            summary.missed_by_all += 1;
            continue;
        }
        let tick_runs: Vec<&Record> = recs
            .iter()
            .copied()
            .filter(|r| matches!(r, Record::Run { .. }))
            .collect();
        let previous_lease = match runs.last() {
            Some(Record::Run { fencing_token, .. }) => Some(*fencing_token),
            _ => None,
        };
        let overran = |r: &&Record| match r {
            Record::Skip {
                holder_fencing_token,
                ..
            } => Some(*holder_fencing_token) == previous_lease,
            _ => matches!(r, Record::Miss { .. }),
        };
        if tick_runs.is_empty() && recs.iter().all(overran) {
            summary.overrun += 1;
            continue;
        }
        let [run] = tick_runs.as_slice() else {
            return Err(format!(
                "tick {tick}: expected exactly one run, got {}: {recs:?}",
                tick_runs.len()
            ));
        };
        let Record::Run {
            fencing_token,
            worker,
            lost,
            ..
        } = run
        else {
            unreachable!()
        };
        if *lost {
            return Err(format!("tick {tick}: the run lost its lock: {run:?}"));
        }
        let mut skips = 0;
        for r in &recs {
            if let Record::Skip {
                holder_fencing_token,
                holder_owner,
                ..
            } = r
            {
                skips += 1;
                if holder_fencing_token != fencing_token
                    || !holder_owner.starts_with(&format!("{worker} "))
                {
                    return Err(format!(
                        "tick {tick}: a skip names another lease than the run's \
                         ({worker}, fencing token {fencing_token}): {r:?}"
                    ));
                }
            }
        }
        summary.skips += skips;
        if skips > 0 {
            summary.contested += 1;
        }
        *summary.winners.entry(worker.clone()).or_default() += 1;
        runs.push(*run);
    }
    for pair in runs.windows(2) {
        let (
            Record::Run {
                tick: t1,
                fencing_token: f1,
                end_ns: end1,
                ..
            },
            Record::Run {
                tick: t2,
                fencing_token: f2,
                start_ns: start2,
                ..
            },
        ) = (pair[0], pair[1])
        else {
            unreachable!()
        };
        if f2 <= f1 {
            return Err(format!(
                "fencing tokens do not increase: tick {t1} had {f1}, tick {t2} had {f2}"
            ));
        }
        if start2 <= end1 {
            return Err(format!("the runs of ticks {t1} and {t2} overlap"));
        }
    }
    summary.runs = runs.len();
    // Liveness, not safety: on a machine so loaded that timers fire more than 80 ms late or a
    // run overruns its tick, ticks are skipped; they must stay rare for the run to show much.
    if summary.missed_by_all + summary.overrun > TICKS / 4 || summary.contested < TICKS / 2 {
        return Err(format!(
            "too few ticks were contested (is the machine overloaded?): {summary:?}"
        ));
    }
    if summary.winners.len() < 2 {
        return Err(format!(
            "one worker won every tick: {:?}; the workers did not really compete",
            summary.winners
        ));
    }
    Ok(summary)
}

/// Three `worker.py` processes compete for the job `nightly-scan` at every tick, as three
/// scheduler instances would. All of them use the same resource, so its fencing token grows
/// with every run, and the winner keeps the lock for a minimum hold (ShedLock's
/// lockAtLeastFor) so that a competitor whose timer fires a little late cannot run the same
/// tick again after a fast job ended. (The alternative, one resource per tick such as
/// `nightly-scan:<tick>`, can never block the next tick, but gives every tick fencing token 1,
/// so it could not show fencing tokens increasing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_python_processes_run_each_job_exactly_once_with_increasing_fencing_tokens() {
    venv_python();
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let dir = scratch("workers");
    let log = dir.join("runs.log");
    let start_at = (now_ms() + START_DELAY.as_millis() as u64).to_string();
    let ticks = TICKS.to_string();
    let started = std::time::Instant::now();

    let mut workers: Vec<(&str, Child)> = Vec::new();
    for worker in WORKERS {
        let out = std::fs::File::create(dir.join(format!("{worker}.out"))).unwrap();
        let err = std::fs::File::create(dir.join(format!("{worker}.err"))).unwrap();
        let addr = lockd.addr();
        let mut args = vec![
            "client/python/examples/worker.py",
            &addr,
            "nightly-scan",
            worker,
            &ticks,
            log.to_str().unwrap(),
            "--start-at-ms",
            &start_at,
        ];
        args.extend(TIMING);
        let child = python(&args)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start python3");
        workers.push((worker, child));
    }
    let output = |worker: &str| {
        let read = |ext: &str| {
            std::fs::read_to_string(dir.join(format!("{worker}.{ext}"))).unwrap_or_default()
        };
        format!("stdout:\n{}\nstderr:\n{}", read("out"), read("err"))
    };
    let limit = START_DELAY + INTERVAL * TICKS as u32 + Duration::from_secs(30);
    for (worker, child) in &mut workers {
        let status = timeout(limit, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{worker} did not finish in {limit:?}"))
            .unwrap();
        assert!(
            status.success(),
            "{worker} failed: {status}\n{}",
            output(worker)
        );
    }
    let elapsed = started.elapsed();

    let history = std::fs::read_to_string(&log).unwrap();
    let records: Vec<Record> = history
        .lines()
        .map(parse_record)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{history}"));
    let summary = check_history(&records).unwrap_or_else(|e| panic!("{e}\nlog:\n{history}"));
    let out_a = output("worker-a") + &output("worker-b") + &output("worker-c");
    assert!(
        out_a.contains("skipping nightly-scan: already running on worker-"),
        "the losers did not say who runs the job:\n{out_a}"
    );
    eprintln!(
        "python workers: {TICKS} ticks in {elapsed:?}: {} runs, no duplicates; {} skips; {} late \
         wake-ups, {} ticks missed by all, {} overrun; wins per worker: {:?}",
        summary.runs,
        summary.skips,
        summary.misses,
        summary.missed_by_all,
        summary.overrun,
        summary.winners
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- lockd_lock on its own: renewal, release on exceptions, a lost lock ----

/// Runs inside one Python process; the test kills Redis when it prints "holding".
const LOCK_CHECKS: &str = r#"
import asyncio, sys, time
import grpc
import lockd
from lockd import lockd_lock
from lockd.v1 import lock_pb2, lock_pb2_grpc

target = sys.argv[1]
stub = lock_pb2_grpc.LockServiceStub(grpc.insecure_channel(target))

def locked(resource):
    return stub.IsLocked(lock_pb2.IsLockedRequest(resource=resource)).locked

# Renewal: a 600 ms lease held for 2 s (over three TTLs) stays held; competitors see its owner.
with lockd_lock(target, "py-renewed", ttl=0.6, owner="renewal-check") as lock:
    assert lock and lock.fencing_token > 0 and lock.holder is None, lock
    for _ in range(20):
        time.sleep(0.1)
        assert locked("py-renewed") and not lock.lost.is_set(), lock
        with lockd_lock(stub, "py-renewed", ttl=1) as other:
            assert not other and other.holder.owner == "renewal-check", other
            assert other.fencing_token is None and not other.lost.is_set(), other
assert not locked("py-renewed"), "not released on exit"
print("renewed ok", flush=True)

# The body raises: the lock is released all the same, long before its 30 s TTL.
try:
    with lockd_lock(stub, "py-raising", ttl=30) as lock:
        assert lock
        raise RuntimeError("the job failed")
except RuntimeError:
    pass
assert not locked("py-raising"), "not released when the body raised"
print("released on raise ok", flush=True)

# min_hold: a job that ends at once keeps the lock for the rest of the minimum hold.
with lockd_lock(stub, "py-min-hold", ttl=5, min_hold=0.5) as lock:
    granted = time.monotonic()
    assert lock
    first_token = lock.fencing_token
assert locked("py-min-hold"), "released before the minimum hold"
with lockd_lock(stub, "py-min-hold", ttl=5, wait=3) as lock:
    waited = time.monotonic() - granted
    assert lock and lock.fencing_token > first_token and 0.4 < waited < 2.5, (lock, waited)
print(f"min hold ok (waited {waited:.2f} s)", flush=True)

# Lost: the test kills Redis while we hold two 600 ms leases, one from lockd_lock and one from
# the asyncio lockd.lock; renewal fails and both set `lost`.
async def hold_both_until_lost():
    async with lockd.lock(target, "py-lost-aio", ttl=0.6, rpc_timeout=1) as alock:
        assert alock
        with lockd_lock(stub, "py-lost", ttl=0.6, rpc_timeout=1) as lock:
            assert lock
            print("holding", flush=True)
            start = time.monotonic()
            await asyncio.wait_for(alock.lost.wait(), 5)
            assert await asyncio.to_thread(lock.lost.wait, 5), "lost was not set"
            print(f"lost after {time.monotonic() - start:.2f} s", flush=True)
asyncio.run(hold_both_until_lost())
print("exited", flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lock_renews_releases_on_exceptions_keeps_min_hold_and_reports_loss() {
    venv_python();
    let mut redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut child = python(&["-c", LOCK_CHECKS, &lockd.addr()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let read_until_holding = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let holding = line == "holding";
            seen.push(line);
            if holding {
                return true;
            }
        }
        false
    };
    let holding = timeout(Duration::from_secs(30), read_until_holding).await;
    if holding != Ok(true) {
        let _ = child.start_kill();
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "the checks failed before \"holding\":\nstdout:\n{}\nstderr:\n{}",
            seen.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    redis.kill();
    let rest = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line);
        }
    };
    timeout(Duration::from_secs(30), rest)
        .await
        .expect("python did not finish after Redis was killed");
    let out = child.wait_with_output().await.unwrap();
    let stdout = seen.join("\n");
    assert!(
        out.status.success() && stdout.contains("lost after") && stdout.ends_with("exited"),
        "{}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- the README quotes code that runs ----

/// client/python/README.md's worker example is worker.py's loop, verbatim (dedented): the
/// code the scheduler test above runs.
#[test]
fn python_readme_example_is_the_tested_worker_loop() {
    let dir = package_dir();
    let worker = std::fs::read_to_string(dir.join("examples").join("worker.py")).unwrap();
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let lines: Vec<&str> = worker
        .lines()
        .skip_while(|l| !l.contains("--- README example start ---"))
        .skip(1)
        .take_while(|l| !l.contains("--- README example end ---"))
        .collect();
    assert!(
        !lines.is_empty(),
        "worker.py lost its README example markers"
    );
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap();
    let code: Vec<&str> = lines
        .iter()
        .map(|l| if l.len() >= indent { &l[indent..] } else { "" })
        .collect();
    let quoted: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.contains("<!-- worker.py: README example -->"))
        .skip(2)
        .take_while(|l| *l != "```")
        .collect();
    assert_eq!(
        quoted.join("\n"),
        code.join("\n"),
        "client/python/README.md must quote worker.py's loop between its README markers"
    );
}

// ---- the package: its pytest suite, and stubs that match proto/ ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_package_tests_pass_against_a_real_lockd() {
    venv_python();
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let out = python(&[
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "client/python/tests",
    ])
    .env("LOCKD_TARGET", lockd.addr())
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "pytest failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stubs are committed (so pip needs no code generator); this fails when proto/ changed
/// without `client/python/generate.sh` being run.
#[test]
fn python_stubs_are_generated_from_the_current_proto() {
    let out = std::process::Command::new(package_dir().join("generate.sh"))
        .arg("--check")
        .env("PYTHON", venv_python())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python client with an API key: locks land in the key's namespace; a wrong key is
/// refused with UNAUTHENTICATED.
const API_KEY_CHECKS: &str = r#"
import sys, grpc, lockd
target, key = sys.argv[1], sys.argv[2]
with lockd.lockd_lock(target, "py-job", ttl=10, api_key=key) as lock:
    assert lock, "not acquired"
    print("acquired", lock.fencing_token)
try:
    with lockd.lockd_lock(target, "py-job", ttl=10, api_key="lockd_wrong_key", retries=0):
        pass
    print("wrong key let in")
except grpc.RpcError as e:
    print("refused", e.code().name)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lock_sends_its_api_key_and_lands_in_the_keys_namespace() {
    venv_python();
    let redis = RedisServer::start().await;
    let file = scratch_dir("py-auth").join("auth.toml");
    let key = "lockd_python_test_key";
    crate::auth::write_auth_file(&file, &[("py", "python-team", "write", key)]);
    let lockd =
        Lockd::start_with(Some(&redis), &[("LOCKD_AUTH_FILE", file.to_str().unwrap())]).await;
    let out = python(&["-c", API_KEY_CHECKS, &lockd.addr(), key])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("acquired")
            && stdout.contains("refused UNAUTHENTICATED"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = redis.keys().await;
    assert!(
        keys.iter().any(|k| k.contains("python-team:py-job")),
        "{keys:?}"
    );
}
