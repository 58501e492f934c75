//! The recorded history: every call a client made, when it was sent and when it was answered,
//! what it asked and what it got, and every fault injected. The checker reads nothing else.

use std::collections::BTreeMap;

/// Microseconds since the run started, on the test's monotonic clock.
pub type Micros = u64;

/// One millisecond in [`Micros`].
pub const MS: Micros = 1_000;
/// One second in [`Micros`].
pub const SEC: Micros = 1_000_000;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `Acquire`; `token` is empty when lockd generates it, `wait` is 0 for a try.
    Acquire {
        token: String,
        ttl: Micros,
        wait: Micros,
        fair: bool,
    },
    /// `Release`, possibly with a minimum hold.
    Release {
        token: String,
        min_hold: Option<Micros>,
    },
    /// `Extend`: adds `ttl` to the remaining time, or sets it (`replace`).
    Extend {
        token: String,
        ttl: Micros,
        replace: bool,
    },
    /// One step of a KeepAlive stream that keeps one lease (`token`) renewed with `ttl`.
    KeepAlive {
        stream: usize,
        token: String,
        ttl: Micros,
        msg: KaMsg,
        expire_on_close: bool,
    },
}

/// A step of a KeepAlive stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KaMsg {
    /// The first message: `keep` names the lease.
    Keep,
    /// An empty message: renews the stream's leases.
    Heartbeat,
    /// A message whose `release` names the lease.
    Release,
    /// The client ends its request stream (half-close): lockd releases the lease unless the
    /// stream asked for `expire_on_close`.
    Close,
    /// The client drops the stream (and, sometimes, its whole connection) without a word.
    Kill,
}

/// A lease as a reply describes it: granted by `Acquire`, or renewed by `Extend` or KeepAlive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The lease's token (from the reply for an `Acquire`, else the one the call named).
    pub token: String,
    /// The fencing token, when the reply carries one.
    pub fence: Option<u64>,
    /// The time to live the reply grants, counted from some moment between send and reply.
    pub ttl: Micros,
    /// The reply's `expires_at` (Redis clock), mapped onto the run's clock when it was received.
    pub expires: Option<Micros>,
}

/// What a call got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acquired, extended or renewed.
    Granted(Grant),
    /// `Acquire` answered `acquired: false`.
    NotGranted,
    /// Released (by `Release` or through a KeepAlive stream); `frees_at` is the end of a minimum
    /// hold, mapped onto the run's clock.
    Released { frees_at: Option<Micros> },
    /// `NOT_HELD` or `HELD_BY_OTHER`: the token does not hold the lock (for KeepAlive: lost).
    NotHeld,
    /// An error or a deadline: unknown, anything may have happened.
    Failed(String),
    /// Nothing to wait for (a KeepAlive stream closed or killed by the client).
    Sent,
}

/// One call.
#[derive(Debug, Clone)]
pub struct Call {
    /// Index in [`History::calls`].
    pub id: usize,
    pub client: usize,
    pub resource: String,
    pub op: Op,
    pub send: Micros,
    pub reply: Micros,
    pub outcome: Outcome,
}

impl Call {
    /// How long lockd may take to answer before the call counts as late: the wait, plus the grace.
    pub fn wait(&self) -> Micros {
        match &self.op {
            Op::Acquire { wait, .. } => *wait,
            _ => 0,
        }
    }

    /// The operation's name, for figures.
    pub fn kind(&self) -> &'static str {
        match &self.op {
            Op::Acquire {
                token, wait, fair, ..
            } => match (*wait > 0, *fair, token.is_empty()) {
                (false, _, true) => "acquire (try, generated token)",
                (false, _, false) => "acquire (try, own token)",
                (true, true, _) => "acquire (fair wait)",
                (true, false, _) => "acquire (wait)",
            },
            Op::Release { min_hold: None, .. } => "release",
            Op::Release { .. } => "release with min_hold",
            Op::Extend { replace: false, .. } => "extend (add)",
            Op::Extend { .. } => "extend (replace)",
            Op::KeepAlive { msg, .. } => match msg {
                KaMsg::Keep => "keepalive: open + keep",
                KaMsg::Heartbeat => "keepalive: heartbeat",
                KaMsg::Release => "keepalive: release",
                KaMsg::Close => "keepalive: close",
                KaMsg::Kill => "keepalive: kill",
            },
        }
    }
}

/// A fault, from when it was injected to when it was healed.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: &'static str,
    pub target: String,
    pub start: Micros,
    pub end: Micros,
}

/// Everything the checker looks at.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub calls: Vec<Call>,
    pub faults: Vec<Fault>,
    /// Each resource's limit: 1 for a mutex.
    pub limits: BTreeMap<String, u32>,
}

impl History {
    /// Appends a call, numbering it.
    pub fn push(
        &mut self,
        client: usize,
        resource: &str,
        op: Op,
        send: Micros,
        reply: Micros,
        outcome: Outcome,
    ) -> usize {
        let id = self.calls.len();
        self.calls.push(Call {
            id,
            client,
            resource: resource.to_owned(),
            op,
            send,
            reply,
            outcome,
        });
        id
    }
}

/// `12.345s`, for messages.
pub fn fmt_t(t: Micros) -> String {
    format!("{}.{:03}s", t / SEC, (t % SEC) / MS)
}

/// `1234 ms`, or `87 µs` below a millisecond, for messages.
pub fn fmt_d(d: Micros) -> String {
    if d < MS {
        format!("{d} µs")
    } else {
        format!("{} ms", d / MS)
    }
}
