//! The command line: one clap struct (flags and environment), which `--help` documents.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// lockctl: look at and take lockd's locks from a shell, and run a command under a lock.
///
/// Exit codes: 0 ok; 1 a definite no (release: token does not hold the lock; health: not
/// serving); 2 usage or invalid request; 69 lockd unreachable or unavailable; 70 other lockd
/// error; 75 lock busy; 76 (run) lock lost, command stopped; 126/127 (run) command not
/// executable / not found; otherwise (run) the command's own exit code, 128+N if killed by
/// signal N.
#[derive(Debug, Parser)]
#[command(version, max_term_width = 100)]
pub struct Cli {
    /// lockd's address: http://host:port, or https://host:port for TLS.
    #[arg(
        long,
        global = true,
        env = "LOCKD_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// Print JSON (one document; for `watch`, one per line) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Time limit of each call (a waiting acquire gets its wait on top).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// API key, sent as `authorization: Bearer <key>` (for when lockd checks keys; prefer the
    /// variable to the flag, which other users can see in the process list).
    #[arg(long, global = true, env = "LOCKD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// TLS settings, used with an https:// endpoint.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// PEM file of the CA that signed lockd's certificate (default: the system's roots).
    #[arg(long, global = true, env = "LOCKD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (with --key).
    #[arg(long, global = true, env = "LOCKD_CLIENT_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, env = "LOCKD_CLIENT_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name to check lockd's certificate against (default: the endpoint's host).
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The locks held now (never their tokens), by resource.
    List {
        /// Only resources starting with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Who holds one resource: its holder (or, for a semaphore, holders), or "free".
    Get {
        /// The resource.
        resource: String,
    },
    /// Print lock events (acquired, extended, released, expired) as they happen, until
    /// interrupted.
    Watch {
        /// Only resources starting with this (default: all).
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Take a lock and print its token once (on stdout; details on stderr). The lock is not
    /// renewed: it ends at its TTL unless released with `lockctl release`.
    Acquire {
        /// The resource.
        resource: String,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Release a lock taken by `lockctl acquire`.
    Release {
        /// The resource.
        resource: String,
        /// The token `lockctl acquire` printed.
        token: String,
        /// Keep the lock until this long after it was taken, if that is later than now.
        #[arg(long, value_parser = parse_duration)]
        min_hold: Option<Duration>,
    },
    /// Check lockd's health (grpc.health.v1 for lockd.v1.LockService): exit 0 when serving.
    Health,
    /// Run a command while holding a lock, as flock(1) and `consul lock` do. The lock is
    /// renewed while the command runs and released when it ends. The command gets
    /// LOCKD_RESOURCE and LOCKD_FENCING_TOKEN in its environment, runs in a process group of its
    /// own, and gets SIGTERM (SIGKILL after --grace) if the lock is lost. lockctl exits with
    /// the command's exit code, 75 when the lock is busy, 76 when it was lost.
    Run {
        /// The resource.
        resource: String,
        #[command(flatten)]
        lock: LockArgs,
        /// Keep the lock at least this long after it was taken, even if the command ends
        /// sooner (ShedLock's lockAtLeastFor): a scheduler whose timer fires a little late
        /// then finds it held instead of running the job again.
        #[arg(long, value_parser = parse_duration)]
        min_hold: Option<Duration>,
        /// Time between SIGTERM and SIGKILL when the lock is lost.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        grace: Duration,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true, num_args = 1..)]
        command: Vec<String>,
    },
}

/// Options for taking a lock.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lease's time to live.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Wait up to this long while the lock is held (default: try once).
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Free text naming the holder, shown to others (default: lockctl on <host>, pid <pid>).
    #[arg(long)]
    pub owner: Option<String>,
    /// A label stored with the lease, key=value (repeat for more).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
}

impl LockArgs {
    /// The owner to send: `--owner`, or one naming this host and process.
    pub fn owner(&self) -> String {
        self.owner.clone().unwrap_or_else(|| {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "?".into());
            format!("lockctl on {host}, pid {}", std::process::id())
        })
    }
}

/// A duration such as `500ms`, `30s`, `5m`, `1h30m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (write 500ms, 30s, 5m, 1h)"))
}

/// A `key=value` label.
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}`: a label is key=value"))
}
