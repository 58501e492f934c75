//! The offline checker: a pure function from a recorded [`History`] to a [`Report`].
//!
//! Two views of every lease, both conservative in the direction that cannot cause a false alarm:
//!
//! - **Belief** (for overlaps): when a client may act as the holder. It starts at the reply that
//!   granted or renewed the lease and ends at the earliest of: the send of a release (by
//!   `Release` or through a KeepAlive stream), a reply saying the lease is not held or lost, the
//!   client closing or killing the last KeepAlive stream that kept it (unless `expire_on_close`),
//!   and the believed expiry. The believed expiry is a lower bound of the real one: the send time
//!   of the latest successful grant/extend/renewal plus the TTL its reply gave, or the reply's
//!   `expires_at` (Redis clock, mapped onto the run's clock on receipt) minus [`CLOCK_SLACK`],
//!   whichever is later. Calls with unknown outcomes never start a belief: the client does not
//!   know it holds anything.
//! - **Possibly live** (for sleeping waiters): when lockd may still count the lease. It starts at
//!   the send of the call that granted it and ends at the earliest moment it is known to be gone:
//!   the reply of a successful release (or its `frees_at` plus [`CLOCK_SLACK`] after a minimum
//!   hold), a reply saying it is not held, or an upper bound of its expiry (the reply of the
//!   latest successful renewal plus its TTL, raised by every renewal whose outcome is unknown).
//!   An `Acquire` with an unknown outcome is possibly live from its send until its wait and TTL
//!   could have run out after its request could last have reached lockd (the later of its
//!   failure and the end of any fault it overlapped, plus [`RECOVERY`]).
//!
//! Checks:
//! 1. at no moment do more beliefs overlap than the resource's limit;
//! 2. fencing tokens grow in grant order: if lease A's grant was answered before lease B's grant
//!    was sent, fence(A) < fence(B) (a re-acquire by the same token keeps its fence and is the
//!    same lease); renewals report the lease's own fence;
//! 3. no waiter sleeps while the resource is definitely free: a waiting `Acquire` with a definite
//!    answer must not have seen, inside its wait and outside every fault (widened by
//!    [`RECOVERY`]), a stretch longer than [`WAKE_BOUND`] in which fewer than `limit` leases were
//!    possibly live and no other fair waiter was possibly queued (a fair waiter may be ahead of
//!    anyone; a fair waiter with an unknown outcome, or one whose wait overlapped a fault, may
//!    leave a queue entry behind for [`FAIR_STALE`]);
//! 4. every call is answered within its wait plus [`CALL_GRACE`] unless it overlapped a fault.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use super::model::*;

/// Allowed error when mapping a reply's `expires_at` (Redis `TIME`, the same machine's wall
/// clock) onto the run's monotonic clock.
pub const CLOCK_SLACK: Micros = 100 * MS;
/// How long a waiter may sleep while the resource is definitely free.
pub const WAKE_BOUND: Micros = 500 * MS;
/// How long after a fault ends lockd may still be recovering (reconnecting to Redis with its
/// 500 ms Redis timeout, resubscribing); windows inside a fault or this long after it are not
/// judged for liveness or lateness.
pub const RECOVERY: Micros = 1_500 * MS;
/// How long after its wait a call may take to be answered.
pub const CALL_GRACE: Micros = SEC;
/// How long a fair queue entry may outlive its waiter when lockd could not remove it (entries go
/// stale 6 s after their lockd stops refreshing them), plus a second.
pub const FAIR_STALE: Micros = 7 * SEC;

/// What the checker found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Overlap,
    Fencing,
    SleepingWaiter,
    LateCall,
}

/// One violation, described for a human.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: Kind,
    pub resource: String,
    pub text: String,
}

/// The checker's findings and figures.
#[derive(Debug, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// Belief intervals (leases as clients saw them).
    pub beliefs: usize,
    /// The longest time from the moment a resource became definitely free to the reply granting
    /// it to a waiter, outside faults, and the call.
    pub longest_wakeup: Option<(Micros, usize)>,
    /// Waiting acquires judged for wake-ups (definite answer).
    pub waits_judged: usize,
    /// Overlaps in which a client still believed in a lease after closing or killing one of its
    /// KeepAlive streams while a newer stream kept it.
    pub overlaps_after_handover: usize,
    /// Other overlaps in which a holder's KeepAlive stream failed (a fault broke its connection)
    /// while it still believed in its lease.
    pub overlaps_with_broken_stream: usize,
    /// The longest stretch, outside faults, during which a waiter that was not served then saw
    /// the resource definitely free (at most [`WAKE_BOUND`] unless flagged), and the call.
    pub longest_unserved_free: Option<(Micros, usize)>,
}

impl Report {
    pub fn count(&self, kind: Kind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }

    /// Every violation, one paragraph each.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for v in &self.violations {
            let _ = writeln!(out, "- {:?} on {}: {}", v.kind, v.resource, v.text);
        }
        out
    }
}

/// A stretch of time during which a client believed it held a lease.
#[derive(Debug, Clone)]
struct Belief {
    resource: String,
    client: usize,
    token: String,
    fence: u64,
    start: Micros,
    end: Micros,
    /// The call whose reply started it, and why it ended.
    from_call: usize,
    why_end: String,
    /// KeepAlive streams of this lease that the client closed or killed while a newer stream
    /// kept it: (when, what).
    handovers: Vec<(Micros, String)>,
}

/// A stretch during which lockd may count a lease (or a fair waiter's queue entry).
#[derive(Debug, Clone)]
struct Live {
    start: Micros,
    end: Micros,
    call: usize,
    /// For a fair waiter: it answered definitely, outside every fault, so its queue entry lived
    /// only while it waited (else it may have outlived it by up to [`FAIR_STALE`]).
    clean: bool,
}

/// Runs every check.
pub fn check(h: &History) -> Report {
    let mut report = Report::default();
    let order = send_order(h);
    let beliefs = beliefs(h, &order, &mut report);
    report.beliefs = beliefs.len();
    overlaps(h, &beliefs, &mut report);
    fencing(h, &mut report);
    sleeping_waiters(h, &order, &mut report);
    late_calls(h, &mut report);
    report.violations.sort_by_key(|v| v.kind);
    report
}

fn send_order(h: &History) -> Vec<usize> {
    let mut order: Vec<usize> = (0..h.calls.len()).collect();
    order.sort_by_key(|&i| (h.calls[i].send, i));
    order
}

fn limit(h: &History, resource: &str) -> u32 {
    h.limits.get(resource).copied().unwrap_or(1).max(1)
}

fn token_of(op: &Op) -> &str {
    match op {
        Op::Acquire { token, .. }
        | Op::Release { token, .. }
        | Op::Extend { token, .. }
        | Op::KeepAlive { token, .. } => token,
    }
}

/// `…last8` of a token, to tell leases apart in messages without printing secrets in full.
fn short(token: &str) -> String {
    let n = token.chars().count();
    if n <= 10 {
        token.to_owned()
    } else {
        format!("…{}", token.chars().skip(n - 8).collect::<String>())
    }
}

/// The lower bound of a granted lease's expiry (see the module docs).
fn believed_expiry(send: Micros, g: &Grant) -> Micros {
    let by_ttl = send + g.ttl;
    let by_clock = g.expires.map_or(0, |e| e.saturating_sub(CLOCK_SLACK));
    by_ttl.max(by_clock)
}

/// Per (client, resource, token): the lease instance a client currently believes in.
struct Cur {
    fence: u64,
    /// Start of the current belief and the call that started it.
    believing: Option<(Micros, usize)>,
    expiry: Micros,
    /// KeepAlive streams that keep this lease now.
    streams: Vec<usize>,
    /// Hand-overs during the current belief (see [`Belief::handovers`]).
    handovers: Vec<(Micros, String)>,
}

fn beliefs(h: &History, order: &[usize], report: &mut Report) -> Vec<Belief> {
    let mut out = Vec::new();
    let mut cur: HashMap<(usize, String, String), Cur> = HashMap::new();
    let finish = |out: &mut Vec<Belief>,
                  key: &(usize, String, String),
                  c: &mut Cur,
                  at: Micros,
                  why: &str| {
        if let Some((start, from_call)) = c.believing.take() {
            let (end, why_end) = if c.expiry < at {
                (c.expiry, "believed expiry".to_owned())
            } else {
                (at, why.to_owned())
            };
            if end > start {
                out.push(Belief {
                    resource: key.1.clone(),
                    client: key.0,
                    token: key.2.clone(),
                    fence: c.fence,
                    start,
                    end,
                    from_call,
                    why_end,
                    handovers: std::mem::take(&mut c.handovers),
                });
            }
        }
        c.handovers.clear();
    };
    // A successful renewal: the belief continues, or starts again at the reply if it had run out.
    let renew = |out: &mut Vec<Belief>,
                 key: &(usize, String, String),
                 c: &mut Cur,
                 call: &Call,
                 g: &Grant| {
        if c.believing.is_some() && c.expiry < call.reply {
            finish(out, key, c, call.reply, "believed expiry");
        }
        if c.believing.is_none() {
            c.believing = Some((call.reply, call.id));
        }
        c.expiry = believed_expiry(call.send, g);
    };
    for &i in order {
        let call = &h.calls[i];
        let token = match (&call.op, &call.outcome) {
            (Op::Acquire { .. }, Outcome::Granted(g)) => g.token.clone(),
            (op, _) => token_of(op).to_owned(),
        };
        let key = (call.client, call.resource.clone(), token);
        match (&call.op, &call.outcome) {
            (Op::Acquire { .. }, Outcome::Granted(g)) => {
                let fence = g.fence.unwrap_or(0);
                match cur.get_mut(&key) {
                    Some(c) if c.fence == fence => renew(&mut out, &key, c, call, g),
                    existing => {
                        if let Some(c) = existing {
                            finish(
                                &mut out,
                                &key,
                                c,
                                call.reply,
                                "granted again with another fence",
                            );
                        }
                        cur.insert(
                            key.clone(),
                            Cur {
                                fence,
                                believing: Some((call.reply, call.id)),
                                expiry: believed_expiry(call.send, g),
                                streams: Vec::new(),
                                handovers: Vec::new(),
                            },
                        );
                    }
                }
            }
            // A re-acquire or a replacing extend that may or may not have run: if it ran, it set
            // the remaining time to its TTL, possibly shorter than before.
            (Op::Acquire { ttl, .. }, Outcome::Failed(_))
            | (
                Op::Extend {
                    ttl, replace: true, ..
                },
                Outcome::Failed(_),
            ) => {
                if let Some(c) = cur.get_mut(&key) {
                    c.expiry = c.expiry.min(call.send + ttl);
                }
            }
            (Op::Acquire { .. }, Outcome::NotGranted) => {
                if let Some(c) = cur.get_mut(&key) {
                    finish(&mut out, &key, c, call.reply, "re-acquire refused");
                }
            }
            (Op::Release { .. }, _) => {
                if let Some(c) = cur.get_mut(&key) {
                    finish(&mut out, &key, c, call.send, "release sent");
                    c.streams.clear();
                }
            }
            (Op::Extend { .. }, Outcome::Granted(g))
            | (Op::KeepAlive { .. }, Outcome::Granted(g)) => {
                if let Some(c) = cur.get_mut(&key) {
                    if let Some(f) = g.fence
                        && f != 0
                        && f != c.fence
                    {
                        report.violations.push(Violation {
                            kind: Kind::Fencing,
                            resource: call.resource.clone(),
                            text: format!(
                                "call #{} ({}) by client {} renewed token {} and reported fencing token {f}, \
                                 but that token's lease was granted fencing token {}",
                                call.id,
                                call.kind(),
                                call.client,
                                short(&key.2),
                                c.fence
                            ),
                        });
                    }
                    renew(&mut out, &key, c, call, g);
                    if let Op::KeepAlive { stream, .. } = &call.op
                        && !c.streams.contains(stream)
                    {
                        c.streams.push(*stream);
                    }
                }
            }
            (Op::Extend { .. }, Outcome::NotHeld) => {
                if let Some(c) = cur.get_mut(&key) {
                    finish(&mut out, &key, c, call.reply, "extend: not held");
                }
            }
            (
                Op::KeepAlive {
                    stream,
                    msg,
                    expire_on_close,
                    ..
                },
                outcome,
            ) => {
                let Some(c) = cur.get_mut(&key) else { continue };
                match (msg, outcome) {
                    (KaMsg::Keep | KaMsg::Heartbeat, Outcome::NotHeld) => {
                        c.streams.retain(|s| s != stream);
                        finish(&mut out, &key, c, call.reply, "keepalive: reported lost");
                    }
                    (KaMsg::Keep | KaMsg::Heartbeat, Outcome::Failed(_)) => {
                        // The client gives the stream up; it no longer trusts the lease.
                        c.streams.retain(|s| s != stream);
                        finish(&mut out, &key, c, call.reply, "keepalive: stream failed");
                    }
                    (KaMsg::Release, _) => {
                        c.streams.retain(|s| s != stream);
                        finish(&mut out, &key, c, call.send, "keepalive: release sent");
                    }
                    (KaMsg::Close | KaMsg::Kill, _) => {
                        c.streams.retain(|s| s != stream);
                        // Closing a stream drops the lease unless it asked to expire at its TTL,
                        // or another of the client's streams has taken the lease over since.
                        if !*expire_on_close && c.streams.is_empty() {
                            let why = if *msg == KaMsg::Close {
                                "keepalive: stream closed"
                            } else {
                                "keepalive: stream killed"
                            };
                            finish(&mut out, &key, c, call.send, why);
                        } else if !c.streams.is_empty() && c.believing.is_some() {
                            c.handovers.push((
                                call.send,
                                format!(
                                    "its KeepAlive stream {stream} was {} at {} (call #{}) while newer stream {:?} kept it",
                                    if *msg == KaMsg::Close { "closed" } else { "killed" },
                                    fmt_t(call.send),
                                    call.id,
                                    c.streams
                                ),
                            ));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    for (key, c) in cur.iter_mut() {
        finish(&mut out, key, c, Micros::MAX, "believed expiry");
    }
    out
}

fn describe_belief(h: &History, b: &Belief) -> String {
    let call = &h.calls[b.from_call];
    format!(
        "client {} token {} fence {}: believed from {} (reply of call #{} {}, sent {}) to {} ({})",
        b.client,
        short(&b.token),
        b.fence,
        fmt_t(b.start),
        call.id,
        call.kind(),
        fmt_t(call.send),
        fmt_t(b.end),
        b.why_end
    )
}

fn overlaps(h: &History, beliefs: &[Belief], report: &mut Report) {
    let mut by_resource: BTreeMap<&str, Vec<&Belief>> = BTreeMap::new();
    for b in beliefs {
        by_resource.entry(&b.resource).or_default().push(b);
    }
    for (resource, list) in by_resource {
        let limit = limit(h, resource) as usize;
        // Sweep: ends before starts at the same instant (half-open intervals).
        let mut points: Vec<(Micros, bool, usize)> = Vec::new();
        for (i, b) in list.iter().enumerate() {
            points.push((b.start, true, i));
            points.push((b.end, false, i));
        }
        points.sort_by_key(|&(t, is_start, i)| (t, is_start, i));
        let mut active: Vec<usize> = Vec::new();
        let mut reported: Vec<Vec<usize>> = Vec::new();
        for (t, is_start, i) in points {
            if !is_start {
                active.retain(|&a| a != i);
                continue;
            }
            active.push(i);
            if active.len() > limit {
                let mut set = active.clone();
                set.sort_unstable();
                if reported.contains(&set) {
                    continue;
                }
                let until = set.iter().map(|&a| list[a].end).min().unwrap_or(t);
                let mut text = format!(
                    "{} leases believed at once (limit {limit}) from {} to {} ({}):",
                    set.len(),
                    fmt_t(t),
                    fmt_t(until),
                    fmt_d(until.saturating_sub(t))
                );
                let mut after_handover = false;
                for &a in &set {
                    let _ = write!(text, "\n    {}", describe_belief(h, list[a]));
                    for (when, what) in &list[a].handovers {
                        if *when <= t {
                            after_handover = true;
                            let _ = write!(text, "\n      (client {}: {what})", list[a].client);
                        }
                    }
                }
                let broken = set
                    .iter()
                    .any(|&a| list[a].why_end == "keepalive: stream failed");
                if after_handover {
                    report.overlaps_after_handover += 1;
                } else if broken {
                    report.overlaps_with_broken_stream += 1;
                    let _ = write!(
                        text,
                        "\n    (a holder's KeepAlive stream broke, by a fault, while it still believed in its lease)"
                    );
                }
                report.violations.push(Violation {
                    kind: Kind::Overlap,
                    resource: resource.to_owned(),
                    text,
                });
                reported.push(set);
            }
        }
    }
}

fn fencing(h: &History, report: &mut Report) {
    // The first definite grant of each lease instance (resource, token, fence).
    let mut first: BTreeMap<(String, String, u64), &Call> = BTreeMap::new();
    for call in &h.calls {
        if let (Op::Acquire { .. }, Outcome::Granted(g)) = (&call.op, &call.outcome) {
            let key = (call.resource.clone(), g.token.clone(), g.fence.unwrap_or(0));
            let e = first.entry(key).or_insert(call);
            if call.send < e.send {
                *e = call;
            }
        }
    }
    let mut by_resource: BTreeMap<&str, Vec<(&str, u64, &Call)>> = BTreeMap::new();
    for ((resource, token, fence), call) in &first {
        by_resource
            .entry(resource)
            .or_default()
            .push((token, *fence, call));
    }
    for (resource, list) in by_resource {
        for (ta, fa, a) in &list {
            for (tb, fb, b) in &list {
                let later = a.reply < b.send;
                let bad = (later && fa >= fb) || (fa == fb && ta != tb && ta < tb);
                if bad {
                    report.violations.push(Violation {
                        kind: Kind::Fencing,
                        resource: resource.to_owned(),
                        text: format!(
                            "client {} got fencing token {fa} (token {}) by call #{} answered at {}; client {} \
                             got fencing token {fb} (token {}) by call #{} sent at {}{}",
                            a.client,
                            short(ta),
                            a.id,
                            fmt_t(a.reply),
                            b.client,
                            short(tb),
                            b.id,
                            fmt_t(b.send),
                            if later {
                                ", after the first grant: the fencing token went backwards"
                            } else {
                                ": two leases share one fencing token"
                            }
                        ),
                    });
                }
            }
        }
    }
}

fn overlaps_fault(h: &History, start: Micros, end: Micros) -> bool {
    h.faults
        .iter()
        .any(|f| start < f.end + RECOVERY && f.start < end)
}

/// The latest moment a request could have reached lockd: its failure, or the end of a fault it
/// overlapped (a black-holed proxy delivers held bytes when it heals), plus [`RECOVERY`].
fn latest_arrival(h: &History, call: &Call) -> Micros {
    let mut t = call.reply;
    for f in &h.faults {
        if f.start < call.reply && call.send < f.end + RECOVERY {
            t = t.max(f.end);
        }
    }
    t + RECOVERY
}

/// The earliest moment a granted lease may have started: its send, or later when the reply's
/// `expires_at` minus its TTL (the grant's Redis time) says so, less [`CLOCK_SLACK`]. Without
/// this, a waiter that was granted in the end would count as holding the lock all through its
/// wait, and hide every sleeping waiter beside it.
fn grant_floor(call: &Call, g: &Grant) -> Micros {
    let by_clock = g
        .expires
        .map_or(0, |e| e.saturating_sub(g.ttl + CLOCK_SLACK));
    call.send.max(by_clock.min(call.reply))
}

/// Per resource: possibly-live leases and possibly-queued fair waiters.
fn live_sets(h: &History, order: &[usize]) -> BTreeMap<String, (Vec<Live>, Vec<Live>)> {
    struct Ub {
        start: Micros,
        call: usize,
        fence: u64,
        expiry: Micros,
        gone: Option<Micros>,
    }
    let mut sets: BTreeMap<String, (Vec<Live>, Vec<Live>)> = BTreeMap::new();
    let mut cur: HashMap<(usize, String, String), Ub> = HashMap::new();
    let mut done: Vec<(String, Live)> = Vec::new();
    let close = |res: &str, u: &Ub, done: &mut Vec<(String, Live)>| {
        let end = u.gone.map_or(u.expiry, |g| g.min(u.expiry));
        done.push((
            res.to_owned(),
            Live {
                start: u.start,
                end,
                call: u.call,
                clean: false,
            },
        ));
    };
    for &i in order {
        let call = &h.calls[i];
        let token = match (&call.op, &call.outcome) {
            (Op::Acquire { .. }, Outcome::Granted(g)) => g.token.clone(),
            (op, _) => token_of(op).to_owned(),
        };
        let key = (call.client, call.resource.clone(), token);
        if let Op::Acquire {
            ttl, wait, fair, ..
        } = &call.op
        {
            if *fair && *wait > 0 {
                let definite = matches!(call.outcome, Outcome::Granted(_) | Outcome::NotGranted);
                let clean = definite && !overlaps_fault(h, call.send, call.reply);
                let end = if clean {
                    call.reply
                } else {
                    latest_arrival(h, call) + wait + FAIR_STALE
                };
                sets.entry(call.resource.clone()).or_default().1.push(Live {
                    start: call.send,
                    end,
                    call: call.id,
                    clean,
                });
            }
            if let Outcome::Failed(_) = call.outcome {
                done.push((
                    call.resource.clone(),
                    Live {
                        start: call.send,
                        end: latest_arrival(h, call) + wait + ttl + CLOCK_SLACK,
                        call: call.id,
                        clean: false,
                    },
                ));
            }
        }
        match (&call.op, &call.outcome) {
            (Op::Acquire { .. }, Outcome::Granted(g)) => {
                let fence = g.fence.unwrap_or(0);
                match cur.get_mut(&key) {
                    Some(u) if u.fence == fence => {
                        u.expiry = call.reply + g.ttl;
                        u.gone = None;
                    }
                    existing => {
                        if let Some(u) = existing {
                            close(&key.1, u, &mut done);
                        }
                        cur.insert(
                            key,
                            Ub {
                                start: grant_floor(call, g),
                                call: call.id,
                                fence,
                                expiry: call.reply + g.ttl,
                                gone: None,
                            },
                        );
                    }
                }
            }
            (Op::Acquire { .. }, Outcome::NotGranted) => {
                if let Some(u) = cur.get_mut(&key) {
                    u.gone.get_or_insert(call.reply);
                }
            }
            (Op::Extend { .. } | Op::KeepAlive { .. }, Outcome::Granted(g)) => {
                if let Some(u) = cur.get_mut(&key) {
                    u.expiry = call.reply + g.ttl;
                    u.gone = None;
                }
            }
            (Op::Extend { ttl, replace, .. }, Outcome::Failed(_)) => {
                if let Some(u) = cur.get_mut(&key) {
                    u.expiry = if *replace {
                        u.expiry.max(latest_arrival(h, call) + ttl)
                    } else {
                        u.expiry + ttl
                    };
                }
            }
            (
                Op::KeepAlive {
                    ttl,
                    msg: KaMsg::Keep | KaMsg::Heartbeat,
                    ..
                },
                Outcome::Failed(_),
            ) => {
                if let Some(u) = cur.get_mut(&key) {
                    u.expiry = u.expiry.max(latest_arrival(h, call) + ttl);
                }
            }
            (Op::Release { min_hold, .. }, Outcome::Failed(_)) => {
                if let (Some(u), Some(m)) = (cur.get_mut(&key), min_hold) {
                    u.expiry = u.expiry.max(latest_arrival(h, call) + m);
                }
            }
            (Op::Release { .. } | Op::KeepAlive { .. }, Outcome::Released { frees_at }) => {
                if let Some(u) = cur.get_mut(&key) {
                    let gone = frees_at.map_or(call.reply, |f| (f + CLOCK_SLACK).max(call.reply));
                    if frees_at.is_some() {
                        // A minimum hold keeps the lock until then, however short its TTL was.
                        u.expiry = u.expiry.max(gone);
                    }
                    u.gone.get_or_insert(gone);
                }
            }
            (_, Outcome::NotHeld) => {
                if let Some(u) = cur.get_mut(&key) {
                    u.gone.get_or_insert(call.reply);
                }
            }
            _ => {}
        }
    }
    for (key, u) in &cur {
        close(&key.1, u, &mut done);
    }
    for (res, live) in done {
        sets.entry(res).or_default().0.push(live);
    }
    sets
}

/// Stretches of `[from, to)` during which fewer than `limit` of `live` and none of `queued`
/// cover the time, minus the fault windows (widened by [`RECOVERY`]).
fn free_stretches(
    h: &History,
    live: &[&Live],
    queued: &[&Live],
    limit: usize,
    from: Micros,
    to: Micros,
) -> Vec<(Micros, Micros)> {
    // +1 for a lease, +limit+1 for a queued fair waiter: both block.
    let mut points: Vec<(Micros, i64)> = Vec::new();
    let block = limit as i64 + 1;
    for l in live {
        points.push((l.start, 1));
        points.push((l.end, -1));
    }
    for q in queued {
        points.push((q.start, block));
        points.push((q.end, -block));
    }
    for f in &h.faults {
        points.push((f.start, block));
        points.push((f.end + RECOVERY, -block));
    }
    points.sort_unstable();
    let mut level: i64 = 0;
    let mut free_from: Option<Micros> = None;
    let mut out = Vec::new();
    let mut idx = 0;
    // Level at `from`.
    while idx < points.len() && points[idx].0 <= from {
        level += points[idx].1;
        idx += 1;
    }
    if level < limit as i64 {
        free_from = Some(from);
    }
    while idx < points.len() && points[idx].0 < to {
        let t = points[idx].0;
        while idx < points.len() && points[idx].0 == t {
            level += points[idx].1;
            idx += 1;
        }
        let free = level < limit as i64;
        match (free, free_from) {
            (true, None) => free_from = Some(t),
            (false, Some(s)) => {
                if t > s {
                    out.push((s, t));
                }
                free_from = None;
            }
            _ => {}
        }
    }
    if let Some(s) = free_from
        && to > s
    {
        out.push((s, to));
    }
    out
}

fn sleeping_waiters(h: &History, order: &[usize], report: &mut Report) {
    let sets = live_sets(h, order);
    let empty = (Vec::new(), Vec::new());
    for call in &h.calls {
        let Op::Acquire { wait, .. } = &call.op else {
            continue;
        };
        if *wait == 0 {
            continue;
        }
        let granted = match call.outcome {
            Outcome::Granted(_) => true,
            Outcome::NotGranted => false,
            _ => continue,
        };
        report.waits_judged += 1;
        let (live, queued) = sets.get(&call.resource).unwrap_or(&empty);
        let live: Vec<&Live> = live
            .iter()
            .filter(|l| l.call != call.id && l.start < call.reply && l.end > call.send)
            .collect();
        // Fair waiters that may be ahead: any that may have left a stale entry; a fair waiter
        // still waiting is ahead of a plain waiter, and of a fair waiter that came after it.
        let fair = matches!(call.op, Op::Acquire { fair: true, .. });
        let queued: Vec<&Live> = queued
            .iter()
            .filter(|q| q.call != call.id && q.start < call.reply && q.end > call.send)
            .filter(|q| !q.clean || !fair || q.start < call.send)
            .collect();
        let limit = limit(h, &call.resource) as usize;
        let stretches = free_stretches(h, &live, &queued, limit, call.send, call.reply);
        if granted
            && let Some(&(s, e)) = stretches.last()
            && e == call.reply
            && report.longest_wakeup.is_none_or(|(d, _)| e - s > d)
        {
            report.longest_wakeup = Some((e - s, call.id));
        }
        // A granted waiter is judged up to the grant itself (its Redis time, from the reply's
        // `expires_at` minus its TTL, plus the clock slack), one that was not served up to the
        // end of its wait: a slow reply is not a sleep.
        let judged_until = match &call.outcome {
            Outcome::Granted(g) => (grant_floor(call, g) + 2 * CLOCK_SLACK).min(call.reply),
            _ => (call.send + wait).min(call.reply),
        };
        for (s, e) in stretches {
            let served_at_end = granted && e == call.reply;
            if !served_at_end && report.longest_unserved_free.is_none_or(|(d, _)| e - s > d) {
                report.longest_unserved_free = Some((e - s, call.id));
            }
            let e = e.min(judged_until);
            if e <= s {
                continue;
            }
            if e - s <= WAKE_BOUND {
                continue;
            }
            // What held it last before the stretch, for the reader.
            let before = live
                .iter()
                .filter(|l| l.end <= s)
                .max_by_key(|l| l.end)
                .map(|l| {
                    let c = &h.calls[l.call];
                    format!(
                        "; the last possibly live lease before it was from call #{} by client {} ({}, sent {}), gone by {}",
                        c.id,
                        c.client,
                        c.kind(),
                        fmt_t(c.send),
                        fmt_t(l.end)
                    )
                })
                .unwrap_or_default();
            report.violations.push(Violation {
                kind: Kind::SleepingWaiter,
                resource: call.resource.clone(),
                text: format!(
                    "call #{} by client {} ({}, wait {} ms) sent {} answered {} {}; the resource was \
                     definitely free (no lease possibly live beyond the limit, no fair waiter possibly \
                     queued, no fault) from {} to {} ({} ms){before}",
                    call.id,
                    call.client,
                    call.kind(),
                    wait / MS,
                    fmt_t(call.send),
                    fmt_t(call.reply),
                    if granted {
                        "granted only later"
                    } else {
                        "acquired: false"
                    },
                    fmt_t(s),
                    fmt_t(e),
                    (e - s) / MS
                ),
            });
        }
    }
}

fn late_calls(h: &History, report: &mut Report) {
    for call in &h.calls {
        if call.outcome == Outcome::Sent {
            continue;
        }
        let took = call.reply.saturating_sub(call.send);
        if took > call.wait() + CALL_GRACE && !overlaps_fault(h, call.send, call.reply) {
            report.violations.push(Violation {
                kind: Kind::LateCall,
                resource: call.resource.clone(),
                text: format!(
                    "call #{} by client {} ({}) sent {} took {} ms, more than its wait {} ms + {} ms, \
                     outside every fault; outcome {:?}",
                    call.id,
                    call.client,
                    call.kind(),
                    fmt_t(call.send),
                    took / MS,
                    call.wait() / MS,
                    CALL_GRACE / MS,
                    call.outcome
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    //! Small hand-made histories: each check must flag what it exists for, and a clean history
    //! must pass.

    use super::*;

    fn ms(n: u64) -> Micros {
        n * MS
    }

    fn history(limits: &[(&str, u32)]) -> History {
        History {
            limits: limits.iter().map(|(r, l)| (r.to_string(), *l)).collect(),
            ..Default::default()
        }
    }

    fn acquire(token: &str, ttl: u64, wait: u64, fair: bool) -> Op {
        Op::Acquire {
            token: token.into(),
            ttl: ms(ttl),
            wait: ms(wait),
            fair,
        }
    }

    fn granted(token: &str, fence: u64, ttl: u64) -> Outcome {
        Outcome::Granted(Grant {
            token: token.into(),
            fence: Some(fence),
            ttl: ms(ttl),
            expires: None,
        })
    }

    fn release(token: &str) -> Op {
        Op::Release {
            token: token.into(),
            min_hold: None,
        }
    }

    fn ka(stream: usize, token: &str, msg: KaMsg) -> Op {
        Op::KeepAlive {
            stream,
            token: token.into(),
            ttl: ms(500),
            msg,
            expire_on_close: false,
        }
    }

    /// A holds the mutex 0–100 ms and releases it; B waits and gets it 5 ms after the release.
    fn clean() -> History {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 1000, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 1000),
        );
        h.push(
            1,
            "m",
            acquire("", 1000, 2000, false),
            ms(10),
            ms(105),
            granted("b", 2, 1000),
        );
        h.push(
            0,
            "m",
            release("a"),
            ms(100),
            ms(101),
            Outcome::Released { frees_at: None },
        );
        h.push(
            1,
            "m",
            release("b"),
            ms(300),
            ms(301),
            Outcome::Released { frees_at: None },
        );
        h
    }

    #[test]
    fn a_clean_history_passes_and_reports_the_wakeup_delay() {
        let r = check(&clean());
        assert!(r.violations.is_empty(), "{}", r.describe());
        assert_eq!(r.beliefs, 2);
        assert_eq!(r.longest_wakeup, Some((ms(4), 1)));
    }

    #[test]
    fn two_clients_believing_they_hold_one_mutex_is_flagged() {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 1000, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 1000),
        );
        // B is granted while A's lease (TTL 1 s from 0 ms) is still believed.
        h.push(
            1,
            "m",
            acquire("b", 1000, 0, false),
            ms(200),
            ms(202),
            granted("b", 2, 1000),
        );
        let r = check(&h);
        assert_eq!(r.count(Kind::Overlap), 1, "{}", r.describe());
        assert!(
            r.violations[0].text.contains("from 0.202s to 1.000s"),
            "{}",
            r.describe()
        );
    }

    #[test]
    fn a_semaphore_may_have_limit_holders_but_not_more() {
        let mut h = history(&[("s", 2)]);
        h.push(
            0,
            "s",
            acquire("a", 1000, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 1000),
        );
        h.push(
            1,
            "s",
            acquire("b", 1000, 0, false),
            ms(10),
            ms(12),
            granted("b", 2, 1000),
        );
        assert!(check(&h).violations.is_empty());
        h.push(
            2,
            "s",
            acquire("c", 1000, 0, false),
            ms(20),
            ms(22),
            granted("c", 3, 1000),
        );
        assert_eq!(check(&h).count(Kind::Overlap), 1);
    }

    #[test]
    fn a_lease_taken_after_the_holders_release_was_sent_is_no_overlap() {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 1000, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 1000),
        );
        // A's release is sent at 100 ms but its reply is lost: A no longer believes after 100 ms.
        h.push(
            0,
            "m",
            release("a"),
            ms(100),
            ms(900),
            Outcome::Failed("Unavailable".into()),
        );
        h.push(
            1,
            "m",
            acquire("b", 1000, 0, false),
            ms(150),
            ms(152),
            granted("b", 2, 1000),
        );
        let r = check(&h);
        assert_eq!(r.count(Kind::Overlap), 0, "{}", r.describe());
    }

    #[test]
    fn a_lease_renewed_by_a_newer_keepalive_stream_outlives_the_older_streams_close() {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 500, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 500),
        );
        h.push(
            0,
            "m",
            ka(1, "a", KaMsg::Keep),
            ms(10),
            ms(12),
            granted("a", 1, 500),
        );
        h.push(
            0,
            "m",
            ka(2, "a", KaMsg::Keep),
            ms(100),
            ms(102),
            granted("a", 1, 500),
        );
        h.push(
            0,
            "m",
            ka(1, "a", KaMsg::Kill),
            ms(150),
            ms(150),
            Outcome::Sent,
        );
        // Stream 2 still keeps the lease: a grant to B at 300 ms is a double grant...
        h.push(
            1,
            "m",
            acquire("b", 500, 0, false),
            ms(290),
            ms(300),
            granted("b", 2, 500),
        );
        let r = check(&h);
        assert_eq!(r.count(Kind::Overlap), 1, "{}", r.describe());
        assert_eq!(r.overlaps_after_handover, 1);
        assert!(
            r.violations[0].text.contains("stream 1 was killed"),
            "{}",
            r.describe()
        );
        // ...but not once the last stream is killed too.
        let mut h2 = history(&[("m", 1)]);
        for c in h.calls.iter().take(4) {
            h2.push(
                c.client,
                &c.resource,
                c.op.clone(),
                c.send,
                c.reply,
                c.outcome.clone(),
            );
        }
        h2.push(
            0,
            "m",
            ka(2, "a", KaMsg::Kill),
            ms(200),
            ms(200),
            Outcome::Sent,
        );
        h2.push(
            1,
            "m",
            acquire("b", 500, 0, false),
            ms(290),
            ms(300),
            granted("b", 2, 500),
        );
        let r = check(&h2);
        assert!(r.violations.is_empty(), "{}", r.describe());
    }

    #[test]
    fn a_re_acquire_with_an_unknown_outcome_may_have_shortened_the_lease() {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 5000, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 5000),
        );
        // It may have run, setting the remaining time to 300 ms from about 100 ms.
        h.push(
            0,
            "m",
            acquire("a", 300, 0, false),
            ms(100),
            ms(600),
            Outcome::Failed("Unavailable".into()),
        );
        h.push(
            1,
            "m",
            acquire("b", 1000, 0, false),
            ms(700),
            ms(702),
            granted("b", 2, 1000),
        );
        let r = check(&h);
        assert!(r.violations.is_empty(), "{}", r.describe());
    }

    #[test]
    fn a_fencing_token_that_goes_backwards_is_flagged() {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 1000, 0, false),
            ms(0),
            ms(2),
            granted("a", 5, 1000),
        );
        h.push(
            0,
            "m",
            release("a"),
            ms(50),
            ms(52),
            Outcome::Released { frees_at: None },
        );
        h.push(
            1,
            "m",
            acquire("b", 1000, 0, false),
            ms(60),
            ms(62),
            granted("b", 3, 1000),
        );
        let r = check(&h);
        assert_eq!(r.count(Kind::Fencing), 1, "{}", r.describe());
        assert_eq!(r.count(Kind::Overlap), 0);
    }

    #[test]
    fn a_re_acquire_with_the_same_token_keeps_its_fence_without_a_violation() {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 1000, 0, false),
            ms(0),
            ms(2),
            granted("a", 5, 1000),
        );
        h.push(
            0,
            "m",
            acquire("a", 1000, 0, false),
            ms(500),
            ms(502),
            granted("a", 5, 1000),
        );
        h.push(
            0,
            "m",
            release("a"),
            ms(900),
            ms(902),
            Outcome::Released { frees_at: None },
        );
        let r = check(&h);
        assert!(r.violations.is_empty(), "{}", r.describe());
        assert_eq!(r.beliefs, 1);
    }

    /// A's lease (TTL 300 ms) ends by 302 ms at the latest; B waits from 20 ms to 2.02 s and
    /// gets `acquired: false`.
    fn sleeper() -> History {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 300, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 300),
        );
        h.push(
            1,
            "m",
            acquire("", 1000, 2000, false),
            ms(20),
            ms(2020),
            Outcome::NotGranted,
        );
        h
    }

    #[test]
    fn a_waiter_that_sleeps_while_the_lock_is_free_is_flagged() {
        let r = check(&sleeper());
        assert_eq!(r.count(Kind::SleepingWaiter), 1, "{}", r.describe());
        assert!(
            r.violations[0].text.contains("from 0.302s to 2.020s"),
            "{}",
            r.describe()
        );
    }

    #[test]
    fn a_waiter_is_not_blamed_for_a_fault_or_a_fair_waiter_ahead() {
        let mut h = sleeper();
        h.faults.push(Fault {
            kind: "redis-pause",
            target: "redis".into(),
            start: ms(100),
            end: ms(1000),
        });
        // Free from 302 ms, but the fault and its recovery cover up to 2.5 s.
        let r = check(&h);
        assert!(r.violations.is_empty(), "{}", r.describe());

        let mut h = sleeper();
        h.push(
            2,
            "m",
            acquire("", 1000, 3000, true),
            ms(10),
            ms(3010),
            Outcome::NotGranted,
        );
        let r = check(&h);
        // The fair waiter may have been ahead of client 1, but nobody was ahead of it.
        assert_eq!(r.count(Kind::SleepingWaiter), 1, "{}", r.describe());
        assert!(
            r.violations[0].text.contains("client 2"),
            "{}",
            r.describe()
        );
    }

    #[test]
    fn a_waiter_granted_late_does_not_hide_the_waiter_beside_it() {
        let mut h = sleeper();
        // Client 2 also waits from 30 ms and is granted at 1.9 s: its lease says (expires_at
        // minus TTL) that it was granted at 1.899 s, not at any time since 30 ms.
        let late = Outcome::Granted(Grant {
            token: "c".into(),
            fence: Some(2),
            ttl: ms(1000),
            expires: Some(ms(2899)),
        });
        h.push(
            2,
            "m",
            acquire("", 1000, 2500, false),
            ms(30),
            ms(1900),
            late,
        );
        let r = check(&h);
        assert_eq!(r.count(Kind::SleepingWaiter), 2, "{}", r.describe());
        assert!(r.describe().contains("client 1"), "{}", r.describe());
        assert!(
            r.describe().contains("granted only later"),
            "{}",
            r.describe()
        );
    }

    #[test]
    fn a_slow_reply_to_a_waiter_granted_in_time_is_no_sleep() {
        let mut h = history(&[("m", 1)]);
        h.push(
            0,
            "m",
            acquire("a", 300, 0, false),
            ms(0),
            ms(2),
            granted("a", 1, 300),
        );
        // Granted at 310 ms by Redis time (expires_at - TTL), answered only at 1 s.
        let slow = Outcome::Granted(Grant {
            token: "b".into(),
            fence: Some(2),
            ttl: ms(1000),
            expires: Some(ms(1310)),
        });
        h.push(
            1,
            "m",
            acquire("", 1000, 2000, false),
            ms(20),
            ms(1000),
            slow,
        );
        let r = check(&h);
        assert!(r.violations.is_empty(), "{}", r.describe());
        assert_eq!(r.longest_wakeup, Some((ms(698), 1)));
    }

    #[test]
    fn a_fair_waiter_with_an_unknown_outcome_may_leave_a_queue_entry_behind() {
        let mut h = sleeper();
        h.push(
            2,
            "m",
            acquire("", 1000, 500, true),
            ms(10),
            ms(40),
            Outcome::Failed("Unavailable".into()),
        );
        let r = check(&h);
        assert!(r.violations.is_empty(), "{}", r.describe());
    }

    #[test]
    fn an_acquire_with_an_unknown_outcome_may_hold_the_lock_until_its_ttl() {
        let mut h = sleeper();
        // Failed at 30 ms: it may have been granted, and live until 30 + 1500 + 5000 + 1000 ms.
        h.push(
            2,
            "m",
            acquire("", 5000, 1000, false),
            ms(25),
            ms(30),
            Outcome::Failed("Unavailable".into()),
        );
        let r = check(&h);
        assert!(r.violations.is_empty(), "{}", r.describe());
    }

    #[test]
    fn a_call_answered_long_after_its_wait_is_flagged_unless_a_fault_explains_it() {
        let mut h = clean();
        h.push(
            2,
            "x",
            acquire("", 1000, 1000, false),
            ms(0),
            ms(3500),
            Outcome::Failed("DeadlineExceeded".into()),
        );
        let r = check(&h);
        assert_eq!(r.count(Kind::LateCall), 1, "{}", r.describe());
        h.faults.push(Fault {
            kind: "black-hole",
            target: "client proxy 0".into(),
            start: ms(500),
            end: ms(2500),
        });
        assert_eq!(check(&h).count(Kind::LateCall), 0);
    }
}
