//! Overload protection: the caps on concurrent work, and the permits that hold them.
//!
//! Every cap answers at once when it is full (`RESOURCE_EXHAUSTED`, naming the limit and its
//! setting), so nothing queues without bound, and every permit is a value whose drop frees it,
//! so it is released on every path (answered, client gone, stream dropped, shutdown).
//!
//! - [`InFlightLayer`]: requests being handled, counted until their response headers. A
//!   stream's headers go out when it opens, so long-lived streams count only while they open;
//!   a blocking `Acquire` counts for its whole wait, which is why the in-flight cap must exceed
//!   the waiter cap. Health checks are never refused, so an orchestrator does not restart a
//!   lockd for being busy.
//! - [`Gate`]: blocking waiters (unary and on Session streams), and open `Watch`, `KeepAlive`
//!   and `Session` streams in total and per connection.
//! - [`Connections`]: open connections, and the time a new one gets to start HTTP/2.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::{Stream, StreamExt as _};
use tonic::codegen::http;
use tonic::transport::server::Connected;

use crate::error::{Error, Result};

/// The caps, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Requests handled at once (`LOCKD_MAX_IN_FLIGHT`).
    pub in_flight: usize,
    /// Blocking acquires waiting at once (`LOCKD_MAX_WAITERS`).
    pub waiters: usize,
    /// Open Watch, KeepAlive and Session streams (`LOCKD_MAX_STREAMS`).
    pub streams: usize,
    /// Open streams on one connection (`LOCKD_MAX_STREAMS_PER_CONNECTION`).
    pub streams_per_connection: usize,
    /// Open connections (`LOCKD_MAX_CONNECTIONS`).
    pub connections: usize,
}

/// The long-lived streams, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `Watch`.
    Watch,
    /// `KeepAlive`.
    KeepAlive,
    /// `Session`.
    Session,
}

impl StreamKind {
    fn name(self) -> &'static str {
        match self {
            Self::Watch => "Watch",
            Self::KeepAlive => "KeepAlive",
            Self::Session => "Session",
        }
    }
}

/// Open streams per peer connection (remote address); an entry goes when its count is 0.
type PerConnection = Arc<Mutex<HashMap<SocketAddr, usize>>>;

/// The waiter and stream caps of one server.
#[derive(Debug)]
pub struct Gate {
    caps: Caps,
    waiters: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    per_connection: PerConnection,
}

/// A blocking acquire's place under `LOCKD_MAX_WAITERS`, held while it waits.
#[derive(Debug)]
pub struct WaiterPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// An open stream's place under the stream caps, held by the stream's task.
#[derive(Debug)]
pub struct StreamPermit {
    _total: OwnedSemaphorePermit,
    connection: Option<(SocketAddr, PerConnection)>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some((peer, counts)) = self.connection.take() {
            let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = counts.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&peer);
                }
            }
        }
    }
}

impl Gate {
    /// A gate with these caps.
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            waiters: Arc::new(Semaphore::new(caps.waiters)),
            streams: Arc::new(Semaphore::new(caps.streams)),
            per_connection: Arc::default(),
        }
    }

    /// A place for one more blocking acquire.
    ///
    /// # Errors
    /// [`Error::ResourceExhausted`] when `LOCKD_MAX_WAITERS` acquires wait already.
    pub fn waiter(&self) -> Result<WaiterPermit> {
        self.waiters
            .clone()
            .try_acquire_owned()
            .map(WaiterPermit)
            .map_err(|_| {
                Error::ResourceExhausted(format!(
                    "too many blocking acquires wait on this lockd (LOCKD_MAX_WAITERS={}); \
                     retry later, or try without wait_timeout",
                    self.caps.waiters
                ))
            })
    }

    /// A place for one more stream of `kind`, opened by `peer`.
    ///
    /// # Errors
    /// [`Error::ResourceExhausted`] when `LOCKD_MAX_STREAMS` streams are open, or
    /// `LOCKD_MAX_STREAMS_PER_CONNECTION` on `peer`'s connection.
    pub fn stream(&self, kind: StreamKind, peer: Option<SocketAddr>) -> Result<StreamPermit> {
        let total = self.streams.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "too many streams are open on this lockd (LOCKD_MAX_STREAMS={}, Watch, KeepAlive \
                 and Session together); cannot open another {}",
                self.caps.streams,
                kind.name()
            ))
        })?;
        let Some(peer) = peer else {
            return Ok(StreamPermit {
                _total: total,
                connection: None,
            });
        };
        let mut counts = self
            .per_connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(peer).or_default();
        if *n >= self.caps.streams_per_connection {
            return Err(Error::ResourceExhausted(format!(
                "too many streams are open on this connection \
                 (LOCKD_MAX_STREAMS_PER_CONNECTION={}, Watch, KeepAlive and Session together); \
                 cannot open another {}",
                self.caps.streams_per_connection,
                kind.name()
            )));
        }
        *n += 1;
        drop(counts);
        Ok(StreamPermit {
            _total: total,
            connection: Some((peer, self.per_connection.clone())),
        })
    }
}

/// The in-flight cap as a tower layer over lockd's routes (see the module doc).
#[derive(Debug, Clone)]
pub struct InFlightLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl InFlightLayer {
    /// At most `limit` requests at once.
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            permits: self.permits.clone(),
            limit: self.limit,
        }
    }
}

/// The service of [`InFlightLayer`].
#[derive(Debug, Clone)]
pub struct InFlight<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S, B> tower::Service<http::Request<B>> for InFlight<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, std::result::Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with("/grpc.health.") {
            return Box::pin(self.inner.call(req));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let response = self.inner.call(req);
                Box::pin(async move {
                    let response = response.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                let status = tonic::Status::resource_exhausted(format!(
                    "lockd is handling too many requests (LOCKD_MAX_IN_FLIGHT={}); retry later",
                    self.limit
                ));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Time a new connection gets to send the first bytes of HTTP/2 (or TLS): the 24-byte
/// HTTP/2 connection preface. A connection that sends nothing, or a byte at a time, is closed
/// then, so idle sockets cannot hold connection places. Once started, HTTP/2 keepalive pings
/// find peers that stopped answering.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes that complete the start of a connection (the HTTP/2 client preface).
const PREFACE_BYTES: usize = 24;

/// The connection cap over a listener's accepted sockets.
#[derive(Debug, Clone)]
pub struct Connections {
    permits: Arc<Semaphore>,
    limit: usize,
    refused: Arc<AtomicU64>,
}

impl Connections {
    /// At most `limit` connections at once.
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            refused: Arc::default(),
        }
    }

    /// The connections of `incoming` under the cap (see [`Connections::admit`]).
    pub fn cap<IO, E>(
        self,
        incoming: impl Stream<Item = std::result::Result<IO, E>> + Send + 'static,
    ) -> impl Stream<Item = std::result::Result<Conn<IO>, E>> + Send + 'static
    where
        IO: Send + 'static,
        E: Send + 'static,
    {
        incoming.filter_map(move |accepted| match accepted {
            Ok(io) => self.admit(io).map(Ok),
            Err(e) => Some(Err(e)),
        })
    }

    /// Admits `io` under the cap, or closes it (`None`) when the cap is full: there is no
    /// HTTP/2 connection yet to answer on, so the client sees the connection closed (and its
    /// gRPC library reports `UNAVAILABLE`). Logged for the first refusal and every 1000th.
    pub fn admit<IO>(&self, io: IO) -> Option<Conn<IO>> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let n = self.refused.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(1000) {
                tracing::warn!(
                    limit = self.limit,
                    refused = n + 1,
                    "connection refused: LOCKD_MAX_CONNECTIONS reached"
                );
            }
            return None;
        };
        Some(Conn {
            io,
            _permit: permit,
            handshake: Some(Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT))),
            read: 0,
        })
    }
}

/// An admitted connection (TCP, or TLS over TCP): holds its place under the cap until it
/// closes.
#[derive(Debug)]
pub struct Conn<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
    /// Until the preface has arrived: when it ends, the connection is closed.
    handshake: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far, counted until the preface has arrived.
    read: usize,
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> IO::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.handshake.as_mut() else {
            return result;
        };
        match result {
            Poll::Ready(Ok(())) => {
                this.read += buf.filled().len() - before;
                if this.read >= PREFACE_BYTES {
                    this.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not start HTTP/2 in time",
                )))
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            in_flight: 10,
            waiters: 2,
            streams: 3,
            streams_per_connection: 2,
            connections: 10,
        }
    }

    #[test]
    fn a_full_waiter_cap_names_its_setting_and_frees_up_when_a_permit_drops() {
        let gate = Gate::new(caps());
        let a = gate.waiter().unwrap();
        let _b = gate.waiter().unwrap();
        let err = gate.waiter().unwrap_err().to_string();
        assert!(err.contains("LOCKD_MAX_WAITERS=2"), "{err}");
        drop(a);
        assert!(gate.waiter().is_ok());
    }

    #[test]
    fn streams_are_capped_per_connection_and_in_total() {
        let gate = Gate::new(caps());
        let one: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let two: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let a = gate.stream(StreamKind::Watch, Some(one)).unwrap();
        let _b = gate.stream(StreamKind::KeepAlive, Some(one)).unwrap();
        let err = gate
            .stream(StreamKind::Session, Some(one))
            .unwrap_err()
            .to_string();
        assert!(err.contains("LOCKD_MAX_STREAMS_PER_CONNECTION=2"), "{err}");
        assert!(err.contains("Session"), "{err}");
        let _c = gate.stream(StreamKind::Watch, Some(two)).unwrap();
        let err = gate
            .stream(StreamKind::Watch, Some(two))
            .unwrap_err()
            .to_string();
        assert!(err.contains("LOCKD_MAX_STREAMS=3"), "{err}");
        drop(a);
        assert!(gate.stream(StreamKind::Watch, Some(one)).is_ok());
        assert_eq!(gate.per_connection.lock().unwrap().get(&one), Some(&1));
    }

    #[test]
    fn a_refused_stream_leaves_no_count_behind() {
        let gate = Gate::new(caps());
        let one: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let held: Vec<_> = (0..2)
            .map(|_| gate.stream(StreamKind::Watch, Some(one)).unwrap())
            .collect();
        assert!(gate.stream(StreamKind::Watch, Some(one)).is_err());
        drop(held);
        assert!(gate.per_connection.lock().unwrap().is_empty());
        assert_eq!(gate.streams.available_permits(), 3);
    }
}
