//! `lockctl` end to end: the real binary (built here if needed) against a real lockd and Redis.
//! Its exit codes are a contract for scripts, so every test checks them.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::{Instant, sleep, timeout};

use crate::support::*;

/// lockctl's documented exit codes (client/lockctl/src/error.rs).
const NO: i32 = 1;
const USAGE: i32 = 2;
const UNAVAILABLE: i32 = 69;
const BUSY: i32 = 75;
const LOST: i32 = 76;
const NOT_FOUND: i32 = 127;

/// `lockctl` talking to `lockd`, with an API key set (lockd ignores it until it checks keys).
fn lockctl(lockd: &Lockd) -> Command {
    let mut cmd = Command::new(workspace_binary("lockctl", "lockctl"));
    cmd.env("LOCKD_ENDPOINT", lockd.endpoint())
        .env("LOCKD_API_KEY", "test-key")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `lockctl <args>` to the end: exit code, stdout, stderr.
async fn run(lockd: &Lockd, args: &[&str]) -> (i32, String, String) {
    let out = lockctl(lockd).args(args).output().await.unwrap();
    text(out)
}

fn text(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_acquire_prints_a_token_that_release_takes_and_busy_exits_75() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;

    let (code, token, err) = run(
        &lockd,
        &[
            "acquire",
            "report",
            "--ttl",
            "30s",
            "--owner",
            "ops-1",
            "--label",
            "team=data",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_owned();
    assert!(
        !token.is_empty() && !token.contains(' '),
        "token: {token:?}"
    );
    assert!(err.contains("acquired report (fencing token"), "{err}");

    let (code, out, err) = run(&lockd, &["acquire", "report", "--owner", "ops-2"]).await;
    assert_eq!((code, out.as_str()), (BUSY, ""), "{err}");
    assert!(err.contains("held by \"ops-1\""), "{err}");
    let (code, out, _) = run(&lockd, &["--json", "acquire", "report"]).await;
    assert_eq!(code, BUSY);
    assert_eq!(json(&out)["holder"]["owner"], "ops-1");

    // The table and the JSON name the holder, never the token.
    let (code, table, _) = run(&lockd, &["list", "rep"]).await;
    assert_eq!(code, 0);
    assert!(table.starts_with("RESOURCE"), "{table}");
    assert!(
        table.contains("report") && table.contains("ops-1") && table.contains("team=data"),
        "{table}"
    );
    let (_, listed, _) = run(&lockd, &["--json", "list"]).await;
    assert_eq!(json(&listed)[0]["labels"]["team"], "data");
    let (code, got, _) = run(&lockd, &["--json", "get", "report"]).await;
    assert_eq!(code, 0);
    assert_eq!(json(&got)["holders"][0]["owner"], "ops-1");
    for output in [&table, &listed, &got] {
        assert!(!output.contains(&token), "a token was printed:\n{output}");
    }

    let (code, _, err) = run(&lockd, &["release", "report", "not-the-token"]).await;
    assert_eq!(code, NO, "{err}");
    let (code, out, err) = run(&lockd, &["release", "report", &token]).await;
    assert_eq!((code, out.trim()), (0, "released report"), "{err}");
    let (code, out, _) = run(&lockd, &["get", "report"]).await;
    assert_eq!((code, out.trim()), (0, "report is free"));
    let (code, out, _) = run(&lockd, &["--json", "release", "report", &token]).await;
    assert_eq!(code, NO);
    assert_eq!(json(&out)["released"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_acquire_with_wait_gets_the_lock_when_its_holder_releases() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let (_, token, _) = run(&lockd, &["acquire", "nightly", "--ttl", "30s"]).await;
    let waiter = lockctl(&lockd)
        .args(["--json", "acquire", "nightly", "--wait", "20s"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        run(&lockd, &["release", "nightly", token.trim()]).await.0,
        0
    );
    let (code, out, err) = text(waiter.wait_with_output().await.unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["acquired"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_rejects_invalid_requests_and_unreachable_servers_with_their_own_codes() {
    let lockd = Lockd::start(None).await;
    let (code, _, err) = run(&lockd, &["acquire", "x", "--ttl", "0s"]).await;
    assert_eq!(code, USAGE, "{err}");
    assert!(err.contains("ttl"), "the message names the field: {err}");
    let (code, _, _) = run(&lockd, &["acquire", "x", "--ttl", "soon"]).await;
    assert_eq!(code, USAGE);
    let (code, _, err) = run(&lockd, &["--endpoint", "http://127.0.0.1:1", "health"]).await;
    assert_eq!(code, UNAVAILABLE, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_health_exits_0_while_serving_and_1_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let (code, out, err) = run(&lockd, &["health"]).await;
    assert_eq!((code, out.trim()), (0, "SERVING"), "stderr: {err}");
    redis.kill();
    health_becomes(
        &lockd,
        tonic_health::pb::health_check_response::ServingStatus::NotServing,
    )
    .await;
    let (code, out, err) = run(&lockd, &["health"]).await;
    assert_eq!(
        (code, out.trim()),
        (NO, "NOT_SERVING"),
        "stderr: {err}\nlockd log:\n{}",
        lockd.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_watch_prints_each_change_under_its_prefix() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut watch = lockctl(&lockd)
        .args(["--json", "watch", "etl-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(watch.stderr.take().unwrap()).lines();
    let started = timeout(Duration::from_secs(10), err.next_line()).await;
    assert!(
        matches!(&started, Ok(Ok(Some(line))) if line.starts_with("watching")),
        "{started:?}"
    );
    let (_, token, _) = run(&lockd, &["acquire", "etl-daily", "--owner", "etl"]).await;
    run(&lockd, &["acquire", "other"]).await;
    run(&lockd, &["release", "etl-daily", token.trim()]).await;
    let mut out = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut events = Vec::new();
    while events.len() < 2 {
        let line = timeout(Duration::from_secs(10), out.next_line())
            .await
            .expect("no event within 10 s")
            .unwrap()
            .unwrap();
        events.push(json(&line));
    }
    assert_eq!(events[0]["type"], "ACQUIRED");
    assert_eq!(events[0]["resource"], "etl-daily");
    assert_eq!(events[0]["owner"], "etl");
    assert_eq!(events[1]["type"], "RELEASED");
    assert!(!events.iter().any(|e| e.to_string().contains(token.trim())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_run_passes_the_fencing_token_and_the_exit_code_and_releases() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let (code, out, err) = run(
        &lockd,
        &[
            "run",
            "job",
            "--",
            "sh",
            "-c",
            "echo $LOCKD_RESOURCE $LOCKD_FENCING_TOKEN; exit 3",
        ],
    )
    .await;
    assert_eq!(code, 3, "{err}");
    let (resource, fencing_token) = out.trim().split_once(' ').unwrap();
    assert_eq!(resource, "job");
    assert!(fencing_token.parse::<u64>().unwrap() > 0, "{out}");
    assert_eq!(run(&lockd, &["get", "job"]).await.1.trim(), "job is free");

    // Killed by a signal: 128 + its number, as shells report it.
    let (code, _, _) = run(&lockd, &["run", "job", "--", "sh", "-c", "kill -9 $$"]).await;
    assert_eq!(code, 128 + 9);
    let (code, _, _) = run(&lockd, &["run", "job", "--", "/no/such/command"]).await;
    assert_eq!(code, NOT_FOUND);
    assert_eq!(run(&lockd, &["get", "job"]).await.1.trim(), "job is free");

    // --min-hold keeps the lock after a quick command.
    let (code, _, _) = run(&lockd, &["run", "job", "--min-hold", "30s", "--", "true"]).await;
    assert_eq!(code, 0);
    let (code, _, _) = run(&lockd, &["run", "job", "--", "true"]).await;
    assert_eq!(code, BUSY);
}

/// Two `lockctl run` for one lock, started together: the command runs once, and the loser
/// exits 75 without running it. With `--wait`, the second runs after the first, never during.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lockctl_runs_for_one_lock_never_run_their_commands_at_the_same_time() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let dir = scratch_dir("lockctl-compete");
    let log = dir.join("runs.log");
    // Each run appends "start <fence>" and "end <fence>" lines around a 1 s job.
    let job = format!(
        "echo start $LOCKD_FENCING_TOKEN >> {0}; sleep 1; echo end $LOCKD_FENCING_TOKEN >> {0}",
        log.display()
    );
    let start = |extra: &[&str]| {
        lockctl(&lockd)
            .args(["run", "nightly", "--ttl", "2s"])
            .args(extra)
            .args(["--", "sh", "-c", &job])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let (a, b) = (start(&[]), start(&[]));
    let (a, b) = (
        a.wait_with_output().await.unwrap(),
        b.wait_with_output().await.unwrap(),
    );
    let mut codes = [a.status.code(), b.status.code()];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(BUSY)], "{a:?}\n{b:?}");
    let lines = read(&log);
    assert_eq!(
        lines.lines().count(),
        2,
        "the command ran more than once:\n{lines}"
    );

    std::fs::remove_file(&log).unwrap();
    let (a, b) = (start(&["--wait", "20s"]), start(&["--wait", "20s"]));
    let (a, b) = (
        a.wait_with_output().await.unwrap(),
        b.wait_with_output().await.unwrap(),
    );
    assert_eq!(
        (a.status.code(), b.status.code()),
        (Some(0), Some(0)),
        "{a:?}\n{b:?}"
    );
    let lines: Vec<(String, u64)> = read(&log)
        .lines()
        .map(|l| {
            let (what, fence) = l.split_once(' ').unwrap();
            (what.to_owned(), fence.parse().unwrap())
        })
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["start", "end", "start", "end"],
        "the runs overlapped: {lines:?}"
    );
    assert!(
        lines[2].1 > lines[0].1,
        "fencing tokens did not grow: {lines:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis loses every lock while the command runs (restarted without persistence): lockctl
/// learns it from the next renewal, stops the command's whole process group (SIGTERM, then
/// SIGKILL for a command that ignores it) and exits 76.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_run_stops_the_command_when_the_lock_is_lost() {
    let mut redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let dir = scratch_dir("lockctl-lost");
    // A shell that reports SIGTERM, with a child of its own (a sleep) that must die too.
    let polite = format!(
        "trap 'echo term >> {0}/polite; exit 0' TERM; sleep 600 & echo $! > {0}/sleep.pid; \
         echo started >> {0}/polite; wait",
        dir.display()
    );
    // A shell that ignores SIGTERM: only SIGKILL, after --grace, stops it.
    let stubborn = format!(
        "trap '' TERM; echo started >> {0}/stubborn; while :; do sleep 0.1; done",
        dir.display()
    );
    let spawn = |resource: &str, command: &str| {
        lockctl(&lockd)
            .args([
                "run", resource, "--ttl", "1s", "--grace", "1s", "--", "sh", "-c", command,
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let polite_run = spawn("lost-polite", &polite);
    let stubborn_run = spawn("lost-stubborn", &stubborn);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(read(&dir.join("polite")).contains("started")
        && read(&dir.join("stubborn")).contains("started")
        && !read(&dir.join("sleep.pid")).is_empty())
    {
        assert!(Instant::now() < deadline, "the commands did not start");
        sleep(Duration::from_millis(20)).await;
    }

    redis.restart().await;

    let polite_out = timeout(Duration::from_secs(10), polite_run.wait_with_output())
        .await
        .expect("lockctl did not stop after the loss")
        .unwrap();
    let stubborn_out = timeout(Duration::from_secs(10), stubborn_run.wait_with_output())
        .await
        .expect("lockctl did not kill the command that ignores SIGTERM")
        .unwrap();
    for out in [&polite_out, &stubborn_out] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(LOST), "{err}");
        assert!(err.contains("lost"), "{err}");
    }
    assert!(
        read(&dir.join("polite")).contains("term"),
        "no SIGTERM reached the command"
    );
    assert!(
        String::from_utf8_lossy(&stubborn_out.stderr).contains("killing it"),
        "the stubborn command was not SIGKILLed"
    );
    let sleep_pid = read(&dir.join("sleep.pid")).trim().to_owned();
    // Dead, or a zombie (killed, waiting for init to reap it, since its shell has exited):
    // `kill -0` would still find a zombie. SIGTERM takes a moment to land.
    let running = || {
        std::fs::read_to_string(format!("/proc/{sleep_pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut alive = running();
    while alive && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
        alive = running();
    }
    assert!(!alive, "the command's child {sleep_pid} outlived the lock");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM to lockctl reaches the command; lockctl releases the lock once the command exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_run_passes_sigterm_on_and_releases_after_the_command_exits() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let run_ = lockctl(&lockd)
        .args([
            "run",
            "deploy",
            "--ttl",
            "30s",
            "--",
            "sh",
            "-c",
            "trap 'exit 7' TERM; while :; do sleep 0.1; done",
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while run(&lockd, &["get", "deploy"]).await.1.contains("free") {
        assert!(Instant::now() < deadline, "lockctl run never took the lock");
        sleep(Duration::from_millis(50)).await;
    }
    sleep(Duration::from_millis(200)).await;
    signal(run_.id().unwrap(), "TERM");
    let out = timeout(Duration::from_secs(10), run_.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        run(&lockd, &["get", "deploy"]).await.1.trim(),
        "deploy is free"
    );
}

/// With an auth file, every lockctl command sends its key (`run` too, which renews on a
/// Session): the lock lands in the key's namespace, and a wrong key fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_sends_its_api_key_on_every_command_including_run() {
    let redis = RedisServer::start().await;
    let file = scratch_dir("lockctl-auth").join("auth.toml");
    crate::auth::write_auth_file(&file, &[("ops", "ops-team", "write", "test-key")]);
    let lockd =
        Lockd::start_with(Some(&redis), &[("LOCKD_AUTH_FILE", file.to_str().unwrap())]).await;
    let (code, out, err) = run(
        &lockd,
        &["run", "job", "--", "sh", "-c", "echo $LOCKD_FENCING_TOKEN"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().parse::<u64>().unwrap() > 0, "{out}");
    let (code, _, err) = run(&lockd, &["acquire", "held", "--ttl", "30s"]).await;
    assert_eq!(code, 0, "{err}");
    let keys = redis.keys().await;
    assert!(keys.iter().any(|k| k.contains("ops-team:held")), "{keys:?}");
    let out = lockctl(&lockd)
        .env("LOCKD_API_KEY", "wrong-key")
        .args(["get", "held"])
        .output()
        .await
        .unwrap();
    let (code, _, err) = text(out);
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("unknown api key"), "{err}");
}
