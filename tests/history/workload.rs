//! The clients: N tasks that each pick random operations (seeded, so a run can be replayed in
//! what it asks, if not in what the scheduler does) and record every call in the shared history.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lockd_client::proto::session_request::Op as SessionOp;
use lockd_client::proto::session_response::Reply;
use lockd_client::proto::{
    AcquireRequest, ExtendRequest, KeepAliveRequest, KeepAliveResponse, LeaseRef, LeaseStatus,
    LockServiceClient, ReleaseRequest, SessionHeartbeat,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::model::*;
use super::session::{BoundLease, Session};

/// splitmix64: small, seedable, good enough to pick operations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// An independent generator for a sub-task.
    pub fn fork(&mut self) -> Self {
        Self(self.next_u64())
    }
}

/// The run's clock and the history, shared by every task.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    history: Arc<Mutex<History>>,
}

impl Recorder {
    pub fn new(limits: &[(String, u32)]) -> Self {
        let history = History {
            limits: limits.iter().cloned().collect(),
            ..Default::default()
        };
        Self {
            start: Instant::now(),
            history: Arc::new(Mutex::new(history)),
        }
    }

    pub fn now(&self) -> Micros {
        self.start.elapsed().as_micros() as Micros
    }

    /// A reply's `expires_at` (Redis `TIME`, the wall clock of this machine) on the run's clock.
    pub fn local(&self, at: &prost_types::Timestamp) -> Micros {
        let target = UNIX_EPOCH + Duration::new(at.seconds.max(0) as u64, at.nanos.max(0) as u32);
        let wall = SystemTime::now();
        let now = self.now();
        match target.duration_since(wall) {
            Ok(ahead) => now + ahead.as_micros() as Micros,
            Err(behind) => now.saturating_sub(behind.duration().as_micros() as Micros),
        }
    }

    pub fn record(
        &self,
        client: usize,
        resource: &str,
        op: Op,
        send: Micros,
        outcome: Outcome,
    ) -> Micros {
        let reply = self.now();
        self.history
            .lock()
            .unwrap()
            .push(client, resource, op, send, reply, outcome);
        reply
    }

    pub fn fault(&self, f: Fault) {
        self.history.lock().unwrap().faults.push(f);
    }

    pub fn take(&self) -> History {
        std::mem::take(&mut *self.history.lock().unwrap())
    }
}

/// Added to a call's wait for its gRPC deadline.
const DEADLINE_GRACE: Duration = Duration::from_secs(3);

fn dur(us: Micros) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (us / SEC) as i64,
        nanos: ((us % SEC) * 1000) as i32,
    }
}

fn micros(d: &prost_types::Duration) -> Micros {
    d.seconds.max(0) as Micros * SEC + d.nanos.max(0) as Micros / 1000
}

/// Runs `call` with a gRPC deadline of `wait` + [`DEADLINE_GRACE`], enforced here too (a
/// black-holed lockd never sees the deadline).
async fn timed<T>(
    wait: Micros,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    let budget = Duration::from_micros(wait) + DEADLINE_GRACE + Duration::from_millis(300);
    match tokio::time::timeout(budget, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("{:?}", status.code())),
        Err(_) => Err("local deadline".into()),
    }
}

fn request<T>(msg: T, wait: Micros) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_micros(wait) + DEADLINE_GRACE);
    r
}

pub fn channel(endpoint: &str) -> Channel {
    Endpoint::from_shared(endpoint.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// A resource the clients use.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    /// 1: a mutex.
    pub limit: u32,
}

#[derive(Debug, Clone)]
struct Held {
    resource: Resource,
    token: String,
    ttl: Micros,
}

/// One client task.
pub struct Client {
    pub id: usize,
    pub endpoint: String,
    pub rng: Rng,
    pub rec: Recorder,
    pub resources: Vec<Resource>,
    pub until: Instant,
    pub streams: Arc<AtomicUsize>,
    /// Whether KeepAlive sessions sometimes hand their lease over to a second stream.
    pub handover: bool,
    /// Whether Acquire, Release and Extend go on a Session stream (see `session.rs`).
    pub sessions: bool,
    /// Counts the calls made on Session streams, for the run's figures.
    pub session_calls: Arc<AtomicUsize>,
    session: Option<Session>,
    raw: LockServiceClient<Channel>,
    next_token: u64,
}

impl Client {
    pub fn new(
        id: usize,
        endpoint: String,
        rng: Rng,
        rec: Recorder,
        resources: Vec<Resource>,
        until: Instant,
        streams: Arc<AtomicUsize>,
    ) -> Self {
        let raw = LockServiceClient::new(channel(&endpoint));
        Self {
            id,
            endpoint,
            rng,
            rec,
            resources,
            until,
            streams,
            handover: true,
            sessions: false,
            session_calls: Arc::default(),
            session: None,
            raw,
            next_token: 0,
        }
    }

    pub async fn run(mut self) {
        let mut held: Option<Held> = None;
        while Instant::now() < self.until {
            held = match held.take() {
                None => self.idle_step().await,
                Some(h) => self.held_step(h).await,
            };
        }
        if let Some(h) = held {
            self.release(&h, None).await;
        }
        self.end_session(true).await;
    }

    /// Mostly short, so that leases expire within a run. One in twenty is at least the fencing
    /// grace (10 s): from that length, Redis keeps a mutex's fencing token only in its lock hash
    /// (docs/design.md, fencing tokens), and that path is checked too.
    fn ttl(&mut self) -> Micros {
        if self.rng.chance(5) {
            self.rng.range(10_000, 11_000) * MS
        } else {
            self.rng.range(300, 3000) * MS
        }
    }

    async fn pause(&mut self, lo_ms: u64, hi_ms: u64) {
        sleep(Duration::from_millis(self.rng.range(lo_ms, hi_ms))).await;
    }

    async fn idle_step(&mut self) -> Option<Held> {
        let resource = self.resources[self.rng.below(self.resources.len() as u64) as usize].clone();
        let token = if self.rng.chance(50) {
            self.next_token += 1;
            format!("c{}-t{}", self.id, self.next_token)
        } else {
            String::new()
        };
        let ttl = self.ttl();
        match self.rng.below(100) {
            0..35 => self.acquire(&resource, token, ttl, 0, false).await,
            35..85 => {
                let wait = self.rng.range(200, 3000) * MS;
                let fair = self.rng.chance(35);
                self.acquire(&resource, token, ttl, wait, fair).await
            }
            _ => {
                self.pause(20, 300).await;
                None
            }
        }
    }

    async fn held_step(&mut self, h: Held) -> Option<Held> {
        match self.rng.below(100) {
            // Work for a while, maybe past a short TTL (a long one ends by walking away).
            0..20 => {
                let ms = (h.ttl / MS * self.rng.range(20, 130) / 100).min(3_000);
                sleep(Duration::from_millis(ms)).await;
                Some(h)
            }
            20..30 => {
                let ttl = self.ttl();
                let token = h.token.clone();
                self.acquire(&h.resource, token, ttl, 0, false).await
            }
            30..50 => {
                let ttl = self.rng.range(300, 2000) * MS;
                let replace = self.rng.chance(40);
                self.extend(h, ttl, replace).await
            }
            50..64 if self.sessions => self.session_heartbeats(h).await,
            50..64 => self.keepalive_session(h).await,
            64..94 => {
                let min_hold = self.rng.chance(33).then(|| self.rng.range(100, 1500) * MS);
                self.release(&h, min_hold).await;
                None
            }
            // Walk away: the lease is left to its TTL. A session would renew it with its next
            // heartbeat, so it goes too (lockd may then release the lease at once).
            _ => {
                let close = self.rng.chance(50);
                self.end_session(close).await;
                None
            }
        }
    }

    async fn acquire(
        &mut self,
        resource: &Resource,
        token: String,
        ttl: Micros,
        wait: Micros,
        fair: bool,
    ) -> Option<Held> {
        let req = AcquireRequest {
            resource: resource.name.clone(),
            ttl: Some(dur(ttl)),
            wait_timeout: (wait > 0).then(|| dur(wait)),
            owner: format!("client-{}", self.id),
            token: token.clone(),
            limit: resource.limit,
            fair,
            ..Default::default()
        };
        let op = Op::Acquire {
            token,
            ttl,
            wait,
            fair,
        };
        let send = self.rec.now();
        let reply = if self.sessions {
            match self.session_call(SessionOp::Acquire(req), wait).await {
                Ok(Reply::Acquire(r)) => Ok(r),
                other => self.unexpected(other).await,
            }
        } else {
            timed(wait, self.raw.acquire(request(req, wait))).await
        };
        let (outcome, held) = match reply {
            Ok(r) if r.acquired => match r.lease {
                Some(lease) => {
                    let grant = Grant {
                        token: lease.token.clone(),
                        fence: Some(lease.fencing_token),
                        ttl: lease.ttl.as_ref().map_or(ttl, micros),
                        expires: lease.expires_at.as_ref().map(|t| self.rec.local(t)),
                    };
                    self.bind(&resource.name, &lease.token, grant.ttl);
                    let held = Held {
                        resource: resource.clone(),
                        token: lease.token,
                        ttl: grant.ttl,
                    };
                    (Outcome::Granted(grant), Some(held))
                }
                None => (Outcome::Failed("acquired without a lease".into()), None),
            },
            Ok(_) => (Outcome::NotGranted, None),
            Err(e) => (Outcome::Failed(e), None),
        };
        self.rec.record(self.id, &resource.name, op, send, outcome);
        held
    }

    async fn release(&mut self, h: &Held, min_hold: Option<Micros>) {
        let req = ReleaseRequest {
            resource: h.resource.name.clone(),
            token: h.token.clone(),
            min_hold: min_hold.map(dur),
            ..Default::default()
        };
        let send = self.rec.now();
        let reply = if self.sessions {
            // lockd stops keeping it as soon as it reads the request.
            if let Some(s) = self.session.as_mut() {
                s.unbind(&h.resource.name, &h.token);
            }
            match self.session_call(SessionOp::Release(req), 0).await {
                Ok(Reply::Release(r)) => Ok(r),
                other => self.unexpected(other).await,
            }
        } else {
            timed(0, self.raw.release(request(req, 0))).await
        };
        let outcome = match reply {
            Ok(r) if r.released => Outcome::Released {
                frees_at: if min_hold.is_some() {
                    r.frees_at.as_ref().map(|t| self.rec.local(t))
                } else {
                    None
                },
            },
            Ok(r) => match r.status() {
                LeaseStatus::NotHeld | LeaseStatus::HeldByOther => Outcome::NotHeld,
                other => Outcome::Failed(format!("release status {other:?}")),
            },
            Err(e) => Outcome::Failed(e),
        };
        let op = Op::Release {
            token: h.token.clone(),
            min_hold,
        };
        self.rec
            .record(self.id, &h.resource.name, op, send, outcome);
    }

    async fn extend(&mut self, h: Held, ttl: Micros, replace: bool) -> Option<Held> {
        let req = ExtendRequest {
            resource: h.resource.name.clone(),
            token: h.token.clone(),
            ttl: Some(dur(ttl)),
            replace_ttl: replace,
        };
        let send = self.rec.now();
        let reply = if self.sessions {
            match self.session_call(SessionOp::Extend(req), 0).await {
                Ok(Reply::Extend(r)) => Ok(r),
                other => self.unexpected(other).await,
            }
        } else {
            timed(0, self.raw.extend(request(req, 0))).await
        };
        let (outcome, keep) = match reply {
            Ok(r) if r.extended => {
                // Bound to the session from now on, renewed to `ttl` by its heartbeats.
                self.bind(&h.resource.name, &h.token, ttl);
                let lease = r.lease.unwrap_or_default();
                let grant = Grant {
                    token: h.token.clone(),
                    fence: Some(lease.fencing_token),
                    ttl: lease.ttl.as_ref().map_or(ttl, micros),
                    expires: lease.expires_at.as_ref().map(|t| self.rec.local(t)),
                };
                (Outcome::Granted(grant), true)
            }
            Ok(r) => match r.status() {
                LeaseStatus::NotHeld | LeaseStatus::HeldByOther => (Outcome::NotHeld, false),
                other => (Outcome::Failed(format!("extend status {other:?}")), true),
            },
            Err(e) => (Outcome::Failed(e), true),
        };
        let op = Op::Extend {
            token: h.token.clone(),
            ttl,
            replace,
        };
        self.rec
            .record(self.id, &h.resource.name, op, send, outcome);
        keep.then_some(h)
    }

    /// The client's Session stream, opened first if needed (on its own connection half the
    /// time, so killing it drops a connection).
    async fn session(&mut self) -> Result<&mut Session, String> {
        if self.session.is_none() {
            let id = self.streams.fetch_add(1, Ordering::Relaxed);
            let raw = if self.rng.chance(50) {
                LockServiceClient::new(channel(&self.endpoint))
            } else {
                self.raw.clone()
            };
            let expire_on_close = self.rng.chance(25);
            self.session = Some(Session::open(raw, id, expire_on_close, DEADLINE_GRACE).await?);
        }
        self.session.as_mut().ok_or_else(|| "no session".to_owned())
    }

    /// One call on the session, with the budget of a unary call waiting `wait`. A failed call
    /// ends the session: whatever it did is unknown, and a lease it may have bound must not be
    /// kept alive by later heartbeats.
    async fn session_call(&mut self, op: SessionOp, wait: Micros) -> Result<Reply, String> {
        let budget = Duration::from_micros(wait) + DEADLINE_GRACE + Duration::from_millis(300);
        self.session_calls.fetch_add(1, Ordering::Relaxed);
        let result = match self.session().await {
            Ok(s) => s.call(op, budget).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.end_session(false).await;
        }
        result
    }

    /// A session reply of the wrong kind (or a failure): the session ends, the outcome is
    /// unknown.
    async fn unexpected<T>(&mut self, reply: Result<Reply, String>) -> Result<T, String> {
        match reply {
            Ok(other) => {
                self.end_session(false).await;
                Err(format!("unexpected session reply {other:?}"))
            }
            Err(e) => Err(e),
        }
    }

    /// Records that the last session request bound `resource`/`token` (renewed to `ttl`).
    fn bind(&mut self, resource: &str, token: &str, ttl: Micros) {
        if let Some(s) = self.session.as_mut() {
            let bound_by = s.last_request();
            s.bind(BoundLease {
                resource: resource.to_owned(),
                token: token.to_owned(),
                ttl,
                bound_by,
            });
        }
    }

    /// Ends the session, closing it (half-close) or killing it (dropping it, sometimes with its
    /// connection), recorded as a KeepAlive close or kill of every lease it bound.
    async fn end_session(&mut self, close: bool) {
        let Some(s) = self.session.take() else { return };
        let send = self.rec.now();
        for b in &s.bound {
            let op = Op::KeepAlive {
                stream: s.id,
                token: b.token.clone(),
                ttl: b.ttl,
                msg: if close { KaMsg::Close } else { KaMsg::Kill },
                expire_on_close: s.expire_on_close,
            };
            self.rec
                .record(self.id, &b.resource, op, send, Outcome::Sent);
        }
        if close {
            s.close().await;
        }
    }

    /// A few session heartbeats for `h`, each well within the TTL it is bound with, recorded as
    /// KeepAlive heartbeats of the session's stream. A lease not bound to the current session
    /// (it was granted on one that ended) is bound to it with an Extend first.
    async fn session_heartbeats(&mut self, h: Held) -> Option<Held> {
        let bound = self
            .session
            .as_ref()
            .and_then(|s| s.binding(&h.resource.name, &h.token));
        let Some(bound) = bound else {
            let ttl = self.rng.range(300, 2000) * MS;
            return self.extend(h, ttl, true).await;
        };
        for _ in 0..self.rng.range(1, 6) {
            let ms = bound.ttl / MS * self.rng.range(25, 55) / 100;
            sleep(Duration::from_millis(ms)).await;
            let send = self.rec.now();
            let reply = self
                .session_call(SessionOp::Heartbeat(SessionHeartbeat {}), 0)
                .await;
            let stream = self.session.as_ref().map_or(usize::MAX, |s| s.id);
            let (expire_on_close, still_bound) = match self.session.as_mut() {
                Some(s) => (
                    s.expire_on_close,
                    s.binding(&h.resource.name, &h.token).is_some(),
                ),
                None => (false, false),
            };
            let outcome = match reply {
                Ok(Reply::Heartbeat(hb)) => {
                    if let Some(s) = self.session.as_mut() {
                        s.bound
                            .retain(|b| !hb.lost.iter().any(|l| l.bound_by == b.bound_by));
                    }
                    let lost = hb.lost.iter().any(|l| l.bound_by == bound.bound_by);
                    if still_bound && !lost {
                        Outcome::Granted(Grant {
                            token: h.token.clone(),
                            fence: None,
                            ttl: bound.ttl,
                            expires: None,
                        })
                    } else {
                        Outcome::NotHeld
                    }
                }
                other => Outcome::Failed(match self.unexpected::<()>(other).await {
                    Err(e) => e,
                    Ok(()) => "no reply".into(),
                }),
            };
            let op = Op::KeepAlive {
                stream,
                token: h.token.clone(),
                ttl: bound.ttl,
                msg: KaMsg::Heartbeat,
                expire_on_close,
            };
            let ok = matches!(outcome, Outcome::Granted(_));
            self.rec
                .record(self.id, &h.resource.name, op, send, outcome);
            if !ok {
                return None;
            }
        }
        Some(h)
    }

    /// Keeps `h` alive over a KeepAlive stream for a few heartbeats, sometimes hands it over to
    /// a second stream, then releases it through the stream, closes the stream, or kills it.
    async fn keepalive_session(&mut self, h: Held) -> Option<Held> {
        let ttl = self.rng.range(300, 1500) * MS;
        let expire_on_close = self.rng.chance(25);
        let mut stream = self.open_stream(&h, ttl, expire_on_close).await?;
        if !self.heartbeats(&h, &mut stream).await {
            return None;
        }
        if self.rng.chance(30) && self.handover {
            // A second stream takes the lease over; the first one goes away.
            let mut newer = self.open_stream(&h, ttl, expire_on_close).await?;
            let how = if self.rng.chance(50) {
                KaMsg::Close
            } else {
                KaMsg::Kill
            };
            self.end_stream(&h, stream, how).await;
            if !self.heartbeats(&h, &mut newer).await {
                return None;
            }
            stream = newer;
        }
        let how = match self.rng.below(3) {
            0 => KaMsg::Release,
            1 => KaMsg::Close,
            _ => KaMsg::Kill,
        };
        let kept = self.end_stream(&h, stream, how).await;
        // After a close with expire_on_close the lease lives on to its TTL: keep using it.
        (kept && expire_on_close).then_some(Held { ttl, ..h })
    }

    fn ka_op(h: &Held, s: &Stream, msg: KaMsg) -> Op {
        Op::KeepAlive {
            stream: s.id,
            token: h.token.clone(),
            ttl: s.ttl,
            msg,
            expire_on_close: s.expire_on_close,
        }
    }

    fn lease_ref(h: &Held, ttl: Micros) -> LeaseRef {
        LeaseRef {
            resource: h.resource.name.clone(),
            token: h.token.clone(),
            ttl: Some(dur(ttl)),
        }
    }

    async fn open_stream(
        &mut self,
        h: &Held,
        ttl: Micros,
        expire_on_close: bool,
    ) -> Option<Stream> {
        let id = self.streams.fetch_add(1, Ordering::Relaxed);
        // Half the streams get a connection of their own, so killing them drops a connection.
        let mut raw = if self.rng.chance(50) {
            LockServiceClient::new(channel(&self.endpoint))
        } else {
            self.raw.clone()
        };
        let (tx, rx) = mpsc::channel(4);
        let first = KeepAliveRequest {
            keep: vec![Self::lease_ref(h, ttl)],
            expire_on_close,
            ..Default::default()
        };
        let mut stream = Stream {
            id,
            ttl,
            expire_on_close,
            tx,
            replies: None,
            _raw: raw.clone(),
        };
        let op = Self::ka_op(h, &stream, KaMsg::Keep);
        let send = self.rec.now();
        let _ = stream.tx.send(first).await;
        let opened = timed(0, raw.keep_alive(ReceiverStream::new(rx))).await;
        let outcome = match opened {
            Ok(replies) => {
                stream.replies = Some(replies);
                self.next_reply(h, &mut stream).await
            }
            Err(e) => Outcome::Failed(e),
        };
        let ok = matches!(outcome, Outcome::Granted(_));
        self.rec
            .record(self.id, &h.resource.name, op, send, outcome);
        ok.then_some(stream)
    }

    /// The next message on the stream, about our one lease.
    async fn next_reply(&mut self, h: &Held, s: &mut Stream) -> Outcome {
        let Some(replies) = s.replies.as_mut() else {
            return Outcome::Failed("no stream".into());
        };
        let budget = Duration::from_secs(1) + DEADLINE_GRACE;
        let msg: Result<Option<KeepAliveResponse>, String> =
            match tokio::time::timeout(budget, replies.message()).await {
                Ok(Ok(m)) => Ok(m),
                Ok(Err(status)) => Err(format!("{:?}", status.code())),
                Err(_) => Err("local deadline".into()),
            };
        let state = match msg {
            Ok(Some(m)) => m.leases.into_iter().find(|l| l.resource == h.resource.name),
            Ok(None) => return Outcome::Failed("stream ended".into()),
            Err(e) => return Outcome::Failed(e),
        };
        let Some(state) = state else {
            return Outcome::Failed("reply without the lease".into());
        };
        match state.status() {
            LeaseStatus::Ok if state.released => Outcome::Released { frees_at: None },
            LeaseStatus::Ok => Outcome::Granted(Grant {
                token: h.token.clone(),
                fence: (state.fencing_token != 0).then_some(state.fencing_token),
                ttl: s.ttl,
                expires: state.expires_at.as_ref().map(|t| self.rec.local(t)),
            }),
            LeaseStatus::NotHeld | LeaseStatus::HeldByOther => Outcome::NotHeld,
            other => Outcome::Failed(format!("lease status {other:?}")),
        }
    }

    /// A few heartbeats, each well within the stream's TTL. False once the lease is lost.
    async fn heartbeats(&mut self, h: &Held, s: &mut Stream) -> bool {
        for _ in 0..self.rng.below(6) {
            let ms = s.ttl / MS * self.rng.range(25, 55) / 100;
            sleep(Duration::from_millis(ms)).await;
            let op = Self::ka_op(h, s, KaMsg::Heartbeat);
            let send = self.rec.now();
            let outcome = if s.tx.send(KeepAliveRequest::default()).await.is_ok() {
                self.next_reply(h, s).await
            } else {
                Outcome::Failed("request stream closed".into())
            };
            let ok = matches!(outcome, Outcome::Granted(_));
            self.rec
                .record(self.id, &h.resource.name, op, send, outcome);
            if !ok {
                return false;
            }
        }
        true
    }

    /// Ends a stream; true unless it was released through the stream.
    async fn end_stream(&mut self, h: &Held, mut s: Stream, how: KaMsg) -> bool {
        let op = Self::ka_op(h, &s, how);
        let send = self.rec.now();
        match how {
            KaMsg::Release => {
                let msg = KeepAliveRequest {
                    release: vec![Self::lease_ref(h, s.ttl)],
                    ..Default::default()
                };
                let outcome = if s.tx.send(msg).await.is_ok() {
                    self.next_reply(h, &mut s).await
                } else {
                    Outcome::Failed("request stream closed".into())
                };
                self.rec
                    .record(self.id, &h.resource.name, op, send, outcome);
                false
            }
            KaMsg::Close => {
                self.rec
                    .record(self.id, &h.resource.name, op, send, Outcome::Sent);
                let Stream { tx, replies, .. } = s;
                drop(tx);
                // Read to the end, so lockd sees an orderly close.
                if let Some(mut replies) = replies {
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Ok(Some(_)) = replies.message().await {}
                    })
                    .await;
                }
                true
            }
            _ => {
                self.rec
                    .record(self.id, &h.resource.name, op, send, Outcome::Sent);
                drop(s);
                true
            }
        }
    }
}

/// An open KeepAlive stream keeping one lease.
struct Stream {
    id: usize,
    ttl: Micros,
    expire_on_close: bool,
    tx: mpsc::Sender<KeepAliveRequest>,
    replies: Option<tonic::Streaming<KeepAliveResponse>>,
    /// The client (and connection) the stream runs on, dropped with it.
    _raw: LockServiceClient<Channel>,
}
