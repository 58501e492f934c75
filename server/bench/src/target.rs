//! The three targets behind one interface: a [`Client`] takes, frees and inspects locks.
//!
//! - redis-direct is the naive redis-rs lock that lockd competes with: `SET key token NX PX ttl`
//!   to take it, a compare-and-delete script (EVALSHA through `redis::Script`) to free it, `PTTL`
//!   and `GET` to inspect it, and for a blocking take a `SET NX` retry loop with a short sleep.
//! - lockd and lockd-memory are the generated gRPC client; lockd generates the tokens.
//! - lockd-session sends Acquire and Release on one `Session` stream per connection, shared by
//!   the connection's clients (as the Rust client shares one per `LockClient`); replies are
//!   routed back by request id. Inspection and KeepAlive stay unary, as for lockd.
//! - etcd is etcd's v3lock API, the nearest gRPC lock service: each client grants itself a
//!   lease (the TTL, in whole seconds) on first use, then `Lock(name, lease)` blocks until the
//!   lock is held (a try is a Lock with a 1 s deadline) and `Unlock(key)` frees it. Only the
//!   uncontended and contended scenarios run against it.
//!
//! Keeping a lease alive ([`Client::keep_alive`]): redis-direct renews with a compare-and-
//! `PEXPIRE` script (EVALSHA), as Redis lock libraries extend; lockd opens one KeepAlive stream
//! naming the lease, and every further (empty) message on it is a heartbeat that renews it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, AsyncConnectionConfig, Value};
use lockd_proto::v1 as pb;
use lockd_proto::v1::lock_service_client::LockServiceClient;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::cli::Target;
use crate::error::{Error, Result};

/// etcd's clients (lease grants, v3lock), generated from `server/bench/proto`.
mod etcd {
    #![allow(missing_docs, clippy::all)]
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
}

/// How long an etcd Lock without a wait may take: v3lock has no try, only a blocking Lock.
const ETCD_TRY: Duration = Duration::from_secs(1);

/// Prefix of redis-direct keys: `lockd-bench:{<resource>}`.
const DIRECT_PREFIX: &str = "lockd-bench";

/// Deletes KEYS[1] only if it holds the token ARGV[1]. Returns 1 when deleted, 0 otherwise.
const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Sets the expiry of KEYS[1] to ARGV[2] ms only if it holds the token ARGV[1]. Returns 1 when
/// renewed, 0 otherwise.
const COMPARE_AND_PEXPIRE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Messages queued on a KeepAlive stream's request side (one is in flight at a time).
const KEEPALIVE_BUFFER: usize = 4;

/// How long a lockd target may take to accept connections (it may still be starting).
const CONNECT_PATIENCE: Duration = Duration::from_secs(15);

/// The connections to one target, shared by all its clients.
pub struct Session {
    target: Target,
    conns: Vec<Conn>,
    release: Arc<redis::Script>,
    extend: Arc<redis::Script>,
    poll_interval: Duration,
}

#[derive(Clone)]
enum Conn {
    Redis(MultiplexedConnection),
    Grpc(LockServiceClient<Channel>),
    /// A Session stream for Acquire and Release, and the channel for everything else.
    Session(Arc<Mux>, LockServiceClient<Channel>),
    /// etcd's lease and v3lock services on one channel.
    Etcd(Channel),
}

/// Requests that may wait in a Session stream's send buffer.
const SESSION_BUFFER: usize = 1024;

/// Callers waiting for their reply on a Session stream, by request id.
type Pending = Mutex<HashMap<u64, oneshot::Sender<pb::session_response::Reply>>>;

/// One Session stream shared by many clients: each request gets an id, and a task routes each
/// reply to the caller waiting for that id.
pub struct Mux {
    tx: mpsc::Sender<pb::SessionRequest>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
}

impl Mux {
    async fn open(client: &mut LockServiceClient<Channel>) -> Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let mut replies = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let pending: Arc<Pending> = Arc::default();
        let routes = pending.clone();
        let releases = tx.downgrade();
        tokio::spawn(async move {
            // Loss reports (id 0) have no caller: the bench never heartbeats, and a lease it
            // holds longer than its TTL is a failed run anyway.
            while let Ok(Some(r)) = replies.message().await {
                let caller = routes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&r.request_id);
                match (caller, r.reply) {
                    (Some(caller), Some(reply)) => {
                        let _ = caller.send(reply);
                    }
                    // A wait cancelled at the end of a run may have been granted first: free
                    // it, or it would block the next run on the same resource for its TTL.
                    (None, Some(reply)) => {
                        if let Some(tx) = releases.upgrade() {
                            release_granted(&tx, reply);
                        }
                    }
                    _ => {}
                }
            }
            // The stream ended: every caller still waiting sees its reply channel closed.
            routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        });
        Ok(Arc::new(Self {
            tx,
            pending,
            next_id: AtomicU64::new(1),
        }))
    }

    /// Sends `op` and waits for its reply; a `SessionError` becomes an error. Dropped before
    /// the reply (a wait cancelled when a run ends), it cancels the operation at lockd.
    async fn call(&self, op: pb::session_request::Op) -> Result<pb::session_response::Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        let mut waiting = Waiting { mux: self, id, rx };
        let request = pb::SessionRequest {
            request_id: id,
            op: Some(op),
            ..Default::default()
        };
        let ended = || Error::Unexpected("the Session stream ended".into());
        self.tx.send(request).await.map_err(|_| ended())?;
        match (&mut waiting.rx).await.map_err(|_| ended())? {
            pb::session_response::Reply::Error(e) => Err(Error::Rpc(tonic::Status::new(
                tonic::Code::from(e.code),
                e.message,
            ))),
            reply => Ok(reply),
        }
    }
}

/// A call waiting for its reply; dropped first, it cancels the operation at lockd, and frees a
/// lease granted just before.
struct Waiting<'a> {
    mux: &'a Mux,
    id: u64,
    rx: oneshot::Receiver<pb::session_response::Reply>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let pending = self
            .mux
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        if pending.is_some() {
            let _ = self.mux.tx.try_send(pb::SessionRequest {
                request_id: self.id,
                op: Some(pb::session_request::Op::Cancel(pb::SessionCancel {})),
                ..Default::default()
            });
        } else if let Ok(reply) = self.rx.try_recv() {
            release_granted(&self.mux.tx, reply);
        }
    }
}

/// Releases the lease of a granted Acquire that nobody waits for (the reply is not read).
fn release_granted(tx: &mpsc::Sender<pb::SessionRequest>, reply: pb::session_response::Reply) {
    if let pb::session_response::Reply::Acquire(pb::AcquireResponse {
        acquired: true,
        lease: Some(lease),
        ..
    }) = reply
    {
        let _ = tx.try_send(pb::SessionRequest {
            request_id: 0,
            op: Some(pb::session_request::Op::Release(release_request(
                &lease.resource,
                &lease.token,
            ))),
            ..Default::default()
        });
    }
}

/// One simulated client: one request in flight at a time, on one of the session's connections.
pub struct Client {
    conn: Conn,
    release: Arc<redis::Script>,
    extend: Arc<redis::Script>,
    poll_interval: Duration,
    owner: String,
    /// redis-direct tokens are `<owner>-<n>`; lockd generates its own.
    next_token: u64,
    /// The etcd lease this client's locks are held by, once granted.
    etcd_lease: Option<i64>,
}

impl Session {
    /// Opens `connections` connections to `target`, at the address the options give for it.
    ///
    /// # Errors
    /// Fails when the address is missing or the target does not answer within 15s.
    pub async fn connect(
        target: Target,
        address: &str,
        connections: u32,
        poll_interval: Duration,
    ) -> Result<Self> {
        let mut conns = Vec::new();
        for _ in 0..connections {
            conns.push(match target {
                Target::RedisDirect => Conn::Redis(redis_connection(address).await?),
                Target::Lockd | Target::LockdMemory => Conn::Grpc(grpc_channel(address).await?),
                Target::LockdSession => {
                    let mut channel = grpc_channel(address).await?;
                    Conn::Session(Mux::open(&mut channel).await?, channel)
                }
                Target::Etcd => Conn::Etcd(endpoint(address)?.connect().await?),
            });
        }
        Ok(Self {
            target,
            conns,
            release: Arc::new(redis::Script::new(COMPARE_AND_DELETE)),
            extend: Arc::new(redis::Script::new(COMPARE_AND_PEXPIRE)),
            poll_interval,
        })
    }

    /// The target this session talks to.
    pub fn target(&self) -> Target {
        self.target
    }

    /// Client number `index`, on connection `index % connections`. Its owner string is 20
    /// bytes: `bench-client-NNNNNNN`.
    pub fn client(&self, index: usize) -> Client {
        Client {
            conn: self.conns[index % self.conns.len()].clone(),
            release: self.release.clone(),
            extend: self.extend.clone(),
            poll_interval: self.poll_interval,
            owner: format!("bench-client-{:07}", index % 10_000_000),
            next_token: 0,
            etcd_lease: None,
        }
    }
}

/// A multiplexed redis-rs connection with generous timeouts: at 1024 clients a reply may
/// queue behind many others, and a timeout would count as an error, not as latency.
///
/// # Errors
/// Fails when the URL is invalid or Redis does not answer.
pub async fn redis_connection(url: &str) -> Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let client = redis::Client::open(url)?;
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// One HTTP/2 connection to lockd (each `connect` opens its own), retried while lockd starts.
///
/// # Errors
/// Fails when the address is invalid or lockd does not accept connections within 15s.
pub async fn grpc_channel(address: &str) -> Result<LockServiceClient<Channel>> {
    let endpoint = endpoint(address)?;
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(LockServiceClient::new(channel)),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// An Acquire as every gRPC target sends it.
fn acquire_request(
    owner: &str,
    resource: &str,
    ttl: Duration,
    wait: Option<Duration>,
) -> pb::AcquireRequest {
    pb::AcquireRequest {
        resource: resource.to_owned(),
        ttl: Some(proto_duration(ttl)),
        wait_timeout: wait.map(proto_duration),
        owner: owner.to_owned(),
        token: String::new(),
        labels: Default::default(),
        // Newer fields (semaphore limit, fair waiting) keep their defaults: a plain mutex
        // with the default waiting order.
        ..Default::default()
    }
}

/// A lease of `ttl` (whole seconds, at least 1) for an etcd client's locks.
async fn etcd_lease(channel: &Channel, ttl: Duration) -> Result<i64> {
    let mut leases = etcd::etcdserverpb::lease_client::LeaseClient::new(channel.clone());
    let granted = leases
        .lease_grant(etcd::etcdserverpb::LeaseGrantRequest {
            ttl: i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX),
            id: 0,
        })
        .await?
        .into_inner();
    if granted.error.is_empty() {
        Ok(granted.id)
    } else {
        Err(Error::Unexpected(format!(
            "etcd LeaseGrant: {}",
            granted.error
        )))
    }
}

fn etcd_unsupported(what: &str) -> Error {
    Error::Usage(format!(
        "the etcd target has no {what}: run uncontended and contended only"
    ))
}

/// The token of a granted Acquire, `None` when not granted.
fn granted_token(reply: pb::AcquireResponse) -> Result<Option<String>> {
    if !reply.acquired {
        return Ok(None);
    }
    match reply.lease {
        Some(lease) => Ok(Some(lease.token)),
        None => Err(Error::Unexpected("acquired without a lease".into())),
    }
}

/// A Release of `token`'s lease on `resource`, with no minimum hold: free at once.
fn release_request(resource: &str, token: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        resource: resource.to_owned(),
        token: token.to_owned(),
        ..Default::default()
    }
}

/// An HTTP/2 endpoint with the bench's settings.
fn endpoint(address: &str) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(address.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2)))
}

fn direct_key(resource: &str) -> String {
    format!("{DIRECT_PREFIX}:{{{resource}}}")
}

/// `d` as a protobuf Duration.
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Client {
    /// This client's owner string (20 bytes).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Takes the lock on `resource` for `ttl`, waiting up to `wait` if it is held. Returns the
    /// token when granted, `None` when the lock stayed held.
    ///
    /// # Errors
    /// Fails when the target fails or answers something unexpected.
    pub async fn acquire(
        &mut self,
        resource: &str,
        ttl: Duration,
        wait: Option<Duration>,
    ) -> Result<Option<String>> {
        match &mut self.conn {
            Conn::Redis(conn) => {
                self.next_token += 1;
                let token = format!("{}-{}", self.owner, self.next_token);
                let key = direct_key(resource);
                let deadline = wait.map(|w| Instant::now() + w);
                loop {
                    let reply: Value = redis::cmd("SET")
                        .arg(&key)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(ttl))
                        .query_async(conn)
                        .await?;
                    match reply {
                        Value::Okay => return Ok(Some(token)),
                        Value::Nil => {}
                        other => return Err(Error::Unexpected(format!("SET NX: {other:?}"))),
                    }
                    match deadline {
                        Some(d) if Instant::now() + self.poll_interval < d => {
                            tokio::time::sleep(self.poll_interval).await;
                        }
                        _ => return Ok(None),
                    }
                }
            }
            Conn::Grpc(client) => {
                let request = acquire_request(&self.owner, resource, ttl, wait);
                granted_token(client.acquire(request).await?.into_inner())
            }
            Conn::Etcd(channel) => {
                let lease = match self.etcd_lease {
                    Some(lease) => lease,
                    None => {
                        let lease = etcd_lease(channel, ttl).await?;
                        self.etcd_lease = Some(lease);
                        lease
                    }
                };
                let mut request = tonic::Request::new(etcd::v3lockpb::LockRequest {
                    name: format!("{DIRECT_PREFIX}/{resource}").into_bytes(),
                    lease,
                });
                request.set_timeout(wait.unwrap_or(ETCD_TRY));
                let mut lock = etcd::v3lockpb::lock_client::LockClient::new(channel.clone());
                match lock.lock(request).await {
                    Ok(reply) => Ok(Some(
                        String::from_utf8_lossy(&reply.into_inner().key).into_owned(),
                    )),
                    // Still held when the wait ended.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                        ) =>
                    {
                        Ok(None)
                    }
                    Err(s) => Err(s.into()),
                }
            }
            Conn::Session(mux, _) => {
                let op = pb::session_request::Op::Acquire(acquire_request(
                    &self.owner,
                    resource,
                    ttl,
                    wait,
                ));
                match mux.call(op).await? {
                    pb::session_response::Reply::Acquire(r) => granted_token(r),
                    other => Err(Error::Unexpected(format!("{other:?}"))),
                }
            }
        }
    }
}

impl Client {
    /// Frees the lock on `resource` if `token` holds it. Returns whether it did.
    ///
    /// # Errors
    /// Fails when the target fails.
    pub async fn release(&mut self, resource: &str, token: &str) -> Result<bool> {
        match &mut self.conn {
            Conn::Redis(conn) => {
                let deleted: i64 = self
                    .release
                    .key(direct_key(resource))
                    .arg(token)
                    .invoke_async(conn)
                    .await?;
                Ok(deleted == 1)
            }
            Conn::Grpc(client) => {
                let reply = client.release(release_request(resource, token)).await?;
                Ok(reply.into_inner().released)
            }
            Conn::Etcd(channel) => {
                let mut lock = etcd::v3lockpb::lock_client::LockClient::new(channel.clone());
                lock.unlock(etcd::v3lockpb::UnlockRequest {
                    key: token.as_bytes().to_vec(),
                })
                .await?;
                Ok(true)
            }
            Conn::Session(mux, _) => {
                let op = pb::session_request::Op::Release(release_request(resource, token));
                match mux.call(op).await? {
                    pb::session_response::Reply::Release(r) => Ok(r.released),
                    other => Err(Error::Unexpected(format!("{other:?}"))),
                }
            }
        }
    }

    /// Whether `resource` is held (redis-direct: `PTTL`).
    ///
    /// # Errors
    /// Fails when the target fails.
    pub async fn is_locked(&mut self, resource: &str) -> Result<bool> {
        match &mut self.conn {
            Conn::Redis(conn) => {
                let pttl: i64 = redis::cmd("PTTL")
                    .arg(direct_key(resource))
                    .query_async(conn)
                    .await?;
                Ok(pttl != -2)
            }
            Conn::Etcd(_) => Err(etcd_unsupported("IsLocked")),
            Conn::Grpc(client) | Conn::Session(_, client) => {
                let reply = client
                    .is_locked(pb::IsLockedRequest {
                        resource: resource.to_owned(),
                    })
                    .await?;
                Ok(reply.into_inner().locked)
            }
        }
    }

    /// Whether `resource` has a holder, asking for its description (redis-direct: `GET`).
    ///
    /// # Errors
    /// Fails when the target fails.
    pub async fn get_owner(&mut self, resource: &str) -> Result<bool> {
        match &mut self.conn {
            Conn::Redis(conn) => {
                let holder: Option<String> = redis::cmd("GET")
                    .arg(direct_key(resource))
                    .query_async(conn)
                    .await?;
                Ok(holder.is_some())
            }
            Conn::Etcd(_) => Err(etcd_unsupported("GetOwner")),
            Conn::Grpc(client) | Conn::Session(_, client) => {
                let reply = client
                    .get_owner(pb::GetOwnerRequest {
                        resource: resource.to_owned(),
                    })
                    .await?;
                Ok(reply.into_inner().holder.is_some())
            }
        }
    }

    /// Starts keeping the lease `token` on `resource` alive with renewals of `ttl`. lockd: opens
    /// a KeepAlive stream whose first message names the lease, and waits for its reply (which
    /// must say OK); redis-direct: nothing to open.
    ///
    /// # Errors
    /// Fails when the stream cannot be opened, or its first reply does not renew the lease.
    pub async fn keep_alive(
        &mut self,
        resource: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<Renewal> {
        match &mut self.conn {
            Conn::Redis(conn) => Ok(Renewal::Redis {
                conn: conn.clone(),
                script: self.extend.clone(),
                key: direct_key(resource),
                token: token.to_owned(),
                ttl_ms: millis(ttl),
            }),
            Conn::Etcd(_) => Err(etcd_unsupported("KeepAlive")),
            Conn::Grpc(client) | Conn::Session(_, client) => {
                let lease = pb::LeaseRef {
                    resource: resource.to_owned(),
                    token: token.to_owned(),
                    ttl: Some(proto_duration(ttl)),
                };
                let (tx, rx) = mpsc::channel(KEEPALIVE_BUFFER);
                let first = pb::KeepAliveRequest {
                    keep: vec![lease.clone()],
                    ..Default::default()
                };
                tx.try_send(first)
                    .map_err(|_| Error::Unexpected("KeepAlive buffer full".into()))?;
                let replies = client
                    .keep_alive(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                let mut renewal = Renewal::Grpc { tx, replies, lease };
                if !renewal.reply().await? {
                    return Err(Error::Unexpected(format!(
                        "KeepAlive did not renew {resource} on its first message"
                    )));
                }
                Ok(renewal)
            }
        }
    }
}

/// One lease kept alive: a KeepAlive stream (lockd), or what the renewal script needs
/// (redis-direct).
pub enum Renewal {
    /// redis-direct: compare-and-`PEXPIRE` on the lock's key.
    Redis {
        /// The connection the renewals go to.
        conn: MultiplexedConnection,
        /// The compare-and-`PEXPIRE` script (EVALSHA).
        script: Arc<redis::Script>,
        /// The lock's key.
        key: String,
        /// The lease's token.
        token: String,
        /// The TTL each renewal sets, in ms.
        ttl_ms: u64,
    },
    /// lockd: a KeepAlive stream that keeps the lease.
    Grpc {
        /// The stream's request side.
        tx: mpsc::Sender<pb::KeepAliveRequest>,
        /// The stream's replies.
        replies: tonic::Streaming<pb::KeepAliveResponse>,
        /// The lease, to release it at the end.
        lease: pb::LeaseRef,
    },
}

impl Renewal {
    /// Renews the lease once and waits for the outcome: lockd, one empty heartbeat on the
    /// stream and its reply; redis-direct, one script call. Returns whether the lease was
    /// renewed (false: it is lost).
    ///
    /// # Errors
    /// Fails when the target fails or the stream ended.
    pub async fn renew(&mut self) -> Result<bool> {
        match self {
            Self::Redis {
                conn,
                script,
                key,
                token,
                ttl_ms,
            } => {
                let renewed: i64 = script
                    .key(key.as_str())
                    .arg(token.as_str())
                    .arg(*ttl_ms)
                    .invoke_async(conn)
                    .await?;
                Ok(renewed == 1)
            }
            Self::Grpc { tx, .. } => {
                tx.send(pb::KeepAliveRequest::default())
                    .await
                    .map_err(|_| Error::Unexpected("KeepAlive stream closed".into()))?;
                self.reply().await
            }
        }
    }

    /// lockd: the next reply on the stream; true when it reports the lease renewed (OK, not
    /// released).
    async fn reply(&mut self) -> Result<bool> {
        let Self::Grpc { replies, lease, .. } = self else {
            return Ok(true);
        };
        let Some(reply) = replies.message().await? else {
            return Err(Error::Unexpected("KeepAlive stream ended".into()));
        };
        Ok(reply.leases.iter().any(|s| {
            s.resource == lease.resource && s.status == pb::LeaseStatus::Ok as i32 && !s.released
        }))
    }

    /// Whether this is a KeepAlive stream (lockd), which [`Renewal::release`] releases.
    pub fn is_stream(&self) -> bool {
        matches!(self, Self::Grpc { .. })
    }

    /// Ends the lease: lockd, releases it through the stream (`release`), waits for the reply
    /// and closes the stream; redis-direct, nothing (the caller releases the key). Returns
    /// whether the release freed the lease.
    ///
    /// # Errors
    /// Fails when the target fails or the stream ended.
    pub async fn release(self) -> Result<bool> {
        let Self::Grpc {
            tx,
            mut replies,
            lease,
        } = self
        else {
            return Ok(true);
        };
        let resource = lease.resource.clone();
        tx.send(pb::KeepAliveRequest {
            release: vec![lease],
            ..Default::default()
        })
        .await
        .map_err(|_| Error::Unexpected("KeepAlive stream closed".into()))?;
        drop(tx);
        let Some(reply) = replies.message().await? else {
            return Err(Error::Unexpected("KeepAlive stream ended".into()));
        };
        Ok(reply
            .leases
            .iter()
            .any(|s| s.resource == resource && s.released))
    }
}
