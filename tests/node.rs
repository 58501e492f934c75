//! The Node.js example (`examples/node/lock.js`, @grpc/grpc-js loading proto/ at run time)
//! against a real lockd and Redis: a third language, beyond the two the team writes. Its npm
//! packages are installed (`npm ci`) when missing; a missing `node` fails with the install
//! command.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::support::*;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("examples")
        .join("node")
}

/// `npm ci` once per test process, if node_modules is missing.
fn npm_packages() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = example_dir();
        let node = Command::new("node").arg("--version").output();
        assert!(
            matches!(node, Ok(ref out) if out.status.success()),
            "node is not installed. Install it with: sudo apt-get install -y nodejs npm \
             (scripts/test does this for you)"
        );
        if dir
            .join("node_modules")
            .join("@grpc")
            .join("grpc-js")
            .exists()
        {
            return;
        }
        let out = Command::new("npm")
            .args(["ci", "--silent", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("run npm ci (install npm with: sudo apt-get install -y npm)");
        assert!(
            out.status.success(),
            "npm ci in examples/node failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

async fn lock_js(lockd: &Lockd, args: &[&str]) -> Output {
    npm_packages();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(example_dir().join("lock.js"))
        .arg(lockd.addr())
        .args(args)
        .env("LOCKD_API_KEY", "node-key")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd.output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_takes_renews_and_releases_a_lock_and_skips_a_held_one() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;

    // A 600 ms lease held for 1.5 s: it lives only through renewals.
    let out = lock_js(
        &lockd,
        &["node-job", "--ttl-ms", "600", "--hold-ms", "1500"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("acquired node-job with fencing token "),
        "{stdout}"
    );
    assert!(stdout.matches("renewed node-job").count() >= 3, "{stdout}");
    assert!(
        stdout.contains("released node-job: LEASE_STATUS_OK"),
        "{stdout}"
    );
    let mut c = lockd.client().await;
    assert!(!is_locked(&mut c, "node-job").await.locked, "not released");

    // Held by someone else: the example skips, naming the holder.
    let mut request = acquire_req("node-job", 30.0);
    request.owner = "scheduler-7".into();
    assert!(c.acquire(request).await.unwrap().into_inner().acquired);
    let out = lock_js(&lockd, &["node-job"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        stdout.trim(),
        "skipping node-job: already running on scheduler-7"
    );
}
