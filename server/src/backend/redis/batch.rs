//! Batches of lock scripts. While two script calls per connection are already in flight, the
//! acquire, release and extend calls of further requests queue here and leave together, up to
//! `--redis-batch` of them, as one call of batch.lua, which runs each in turn and answers with
//! all their replies. Redis then reads, parses and starts one script call, and reads its clock
//! once, per batch instead of per operation; lockd sends and decodes one command. Under light
//! load nothing waits: a call that finds a free slot goes out alone at once, as before.
//!
//! Each operation in a batch runs as its own script call would, one after the other inside one
//! atomic script, so the outcome is that of some order of the same calls sent alone; each reply
//! goes back to its own caller. Only on one Redis or Sentinel's master: a Cluster refuses a
//! script whose keys lie in several hash slots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use deadpool_redis::redis::{
    Arg, Cmd, ErrorKind, RedisError, Script, ServerErrorKind, ToRedisArgs, Value,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::topology::Conn;
use super::{RedisBackend, is_connection_failure, timed};
use crate::error::{Error, Result};

/// The script calls in flight per shared connection before further calls wait for a batch:
/// one executing in Redis, one on its way.
pub(super) const SLOTS_PER_CONNECTION: usize = 2;

/// batch.lua's reply for an operation that raised an error.
const BATCH_ERROR: i64 = -100;

/// Which lock script a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Acquire,
    Release,
    Extend,
}

impl Kind {
    /// The script's name, for metrics.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Acquire => "acquire",
            Self::Release => "release",
            Self::Extend => "extend",
        }
    }

    /// The operation's letter in batch.lua.
    fn letter(self) -> &'static str {
        match self {
            Self::Acquire => "a",
            Self::Release => "r",
            Self::Extend => "e",
        }
    }
}

/// One call of a lock script, with its keys and arguments, to send alone or in a batch. The
/// arguments are written once into one buffer (a `Cmd` used as such), not one allocation each.
pub(super) struct Call {
    pub(super) kind: Kind,
    pub(super) keys: Vec<String>,
    args: Cmd,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The arguments hold the lock token: never shown.
        f.debug_struct("Call")
            .field("kind", &self.kind)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Call {
    /// A call of `kind`'s script on `key` (its KEYS[1]).
    pub(super) fn new(kind: Kind, key: String) -> Self {
        Self {
            kind,
            keys: vec![key],
            args: Cmd::with_capacity(16, 256),
        }
    }

    /// Appends a key.
    pub(super) fn key(&mut self, key: String) -> &mut Self {
        self.keys.push(key);
        self
    }

    /// Appends an argument (one value: a string or a number).
    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        self.args.arg(arg);
        self
    }

    /// The arguments, in order.
    fn args(&self) -> impl Iterator<Item = &[u8]> {
        // Only Simple: a cursor argument is for SCAN-style iteration, never written here.
        self.args.args_iter().filter_map(|a| match a {
            Arg::Simple(b) => Some(b),
            _ => None,
        })
    }

    /// The number of arguments.
    fn nargs(&self) -> usize {
        self.args().count()
    }

    /// The `EVALSHA` of `script` with this call's keys and arguments.
    pub(super) fn evalsha(&self, script: &Script) -> Cmd {
        let mut cmd = Cmd::with_capacity(3 + self.keys.len() + self.nargs(), 512);
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(self.keys.len());
        for key in &self.keys {
            cmd.arg(key.as_bytes());
        }
        for arg in self.args() {
            cmd.arg(arg);
        }
        cmd
    }
}

/// Runs `cmd`, an `EVALSHA` of `script`, on `conn`, loading the script first when Redis does
/// not have it (a restart, or `SCRIPT FLUSH`), as redis-rs's `Script` does.
pub(super) async fn evalsha(
    conn: &mut Conn,
    script: &Script,
    cmd: &Cmd,
) -> Result<Value, RedisError> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        r => r,
    }
}

/// What a caller gets back: the script's reply and the connection it ran on (for `WAIT`).
type Reply = Result<(Value, Conn)>;

/// A call waiting for the next batch.
struct Queued {
    call: Call,
    reply: oneshot::Sender<Reply>,
}

/// The queue of calls waiting for a batch, and the slots for calls in flight.
#[derive(Debug)]
pub(super) struct Batcher {
    slots: Arc<Semaphore>,
    /// Operations sent in batches of two or more so far.
    batched: AtomicUsize,
    queue: mpsc::UnboundedSender<Queued>,
}

/// The receiving end of the queue, for [`run`].
pub(super) struct Queue(mpsc::UnboundedReceiver<Queued>);

impl Batcher {
    /// A batcher with `slots` calls in flight; [`run`] must drain the returned queue.
    pub(super) fn new(slots: usize) -> (Self, Queue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let batcher = Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            batched: AtomicUsize::new(0),
            queue: tx,
        };
        (batcher, Queue(rx))
    }

    /// A slot for a call to go out alone at once, if one is free and no batch waits for it
    /// (tokio's semaphore serves waiters first).
    pub(super) fn free_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.slots.try_acquire().ok()
    }

    /// Operations sent in batches of two or more so far.
    #[cfg(test)]
    pub(super) fn batched(&self) -> usize {
        self.batched.load(Ordering::Relaxed)
    }

    /// Queues `call` for the next batch and waits for its reply.
    pub(super) async fn queue(&self, call: Call) -> Reply {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Queued { call, reply: tx })
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }
}

/// Sends the queued calls in batches of at most `max`, each as soon as a slot frees, for as long
/// as the backend lives: not only until shutdown, since requests still finishing in the shutdown
/// grace period (a Session's releases as it closes) need their calls made.
pub(super) async fn run(backend: Weak<RedisBackend>, mut queue: Queue, max: usize) {
    let Some(slots) = backend
        .upgrade()
        .and_then(|b| b.batcher.as_ref().map(|b| b.slots.clone()))
    else {
        return;
    };
    // Ends when the backend, and with it the queue's sender, is gone.
    while let Some(first) = queue.0.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            // Never closed.
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match queue.0.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        // A caller that left (its request was cancelled) no longer needs its call made.
        batch.retain(|q| !q.reply.is_closed());
        let Some(backend) = backend.upgrade() else {
            return;
        };
        if !batch.is_empty() {
            tokio::spawn(send(backend, batch, slot));
        }
    }
}

/// Sends one batch and hands each caller its reply; `slot` is held until Redis answered.
async fn send(backend: Arc<RedisBackend>, mut batch: Vec<Queued>, slot: OwnedSemaphorePermit) {
    if batch.len() == 1 {
        let q = batch.remove(0);
        let r = backend.run_alone(&q.call).await;
        drop(slot);
        let _ = q.reply.send(r);
        return;
    }
    crate::metrics::redis_batched(batch.len());
    if let Some(b) = &backend.batcher {
        b.batched.fetch_add(batch.len(), Ordering::Relaxed);
    }
    let script = &backend.scripts.batch;
    let nkeys: usize = batch.iter().map(|q| q.call.keys.len()).sum();
    let nargs: usize = batch.iter().map(|q| 3 + q.call.nargs()).sum();
    let mut cmd = Cmd::with_capacity(4 + nkeys + nargs, 512 * batch.len());
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(nkeys);
    for q in &batch {
        for key in &q.call.keys {
            cmd.arg(key.as_bytes());
        }
    }
    cmd.arg(batch.len());
    for q in &batch {
        cmd.arg(q.call.kind.letter())
            .arg(q.call.keys.len())
            .arg(q.call.nargs());
        for arg in q.call.args() {
            cmd.arg(arg);
        }
    }
    let sent = async {
        let (mut conn, epoch) = backend.conn().await?;
        let r = backend.forget_on_failure(timed("batch", evalsha(&mut conn, script, &cmd)).await);
        Ok::<_, Error>((r, conn, epoch))
    };
    let (r, conn, epoch) = match sent.await {
        Ok(sent) => sent,
        Err(e) => {
            drop(slot);
            return fail(batch, &e);
        }
    };
    drop(slot);
    match r {
        Ok(Value::Array(replies)) if replies.len() == batch.len() => {
            for (q, v) in batch.into_iter().zip(replies) {
                let r = backend
                    .unless_master_switched(epoch, ())
                    .and_then(|()| own_reply(v))
                    .map(|v| (v, conn.clone()));
                let _ = q.reply.send(r);
            }
        }
        Ok(other) => fail(
            batch,
            &Error::Internal(format!("batch.lua answered {other:?}")),
        ),
        // Redis did not get it (or its connection died): an acquire may safely run again, as
        // it does alone (RedisBackend::run_idempotent); the others fail, since they may have
        // run.
        Err(e) if is_connection_failure(&e) && !e.is_timeout() => {
            let e = Error::from(e);
            for q in batch {
                if q.call.kind == Kind::Acquire {
                    let b = backend.clone();
                    tokio::spawn(async move {
                        let r = b.run_alone(&q.call).await;
                        let _ = q.reply.send(r);
                    });
                } else {
                    let _ = q.reply.send(Err(e.clone()));
                }
            }
        }
        Err(e) => fail(batch, &Error::from(e)),
    }
}

/// Sends `calls` as one batch, at once, and returns their replies in order.
#[cfg(test)]
pub(super) async fn send_together(backend: &Arc<RedisBackend>, calls: Vec<Call>) -> Vec<Reply> {
    let (mut batch, mut replies) = (Vec::new(), Vec::new());
    for call in calls {
        let (tx, rx) = oneshot::channel();
        batch.push(Queued { call, reply: tx });
        replies.push(rx);
    }
    let slot = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
    send(backend.clone(), batch, slot).await;
    let mut out = Vec::new();
    for rx in replies {
        out.push(rx.await.unwrap());
    }
    out
}

/// Answers every call of `batch` with `e`.
fn fail(batch: Vec<Queued>, e: &Error) {
    for q in batch {
        let _ = q.reply.send(Err(e.clone()));
    }
}

/// One operation's reply in batch.lua's answer: its script's reply, or the error it raised,
/// classed as the same error from a script alone would be.
fn own_reply(v: Value) -> Result<Value> {
    if let Value::Array(items) = &v
        && let [Value::Int(BATCH_ERROR), message] = &items[..]
    {
        let message = match message {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        };
        // Redis's own transient refusals, as crate::error classes them for a script alone.
        let transient = [
            "OOM",
            "BUSY",
            "LOADING",
            "TRYAGAIN",
            "MASTERDOWN",
            "READONLY",
        ]
        .iter()
        .any(|p| message.starts_with(p));
        return Err(if transient {
            Error::Unavailable(message)
        } else {
            Error::Internal(format!("script error: {message}"))
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_error_in_a_batch_is_its_own_and_classed_like_a_script_error() {
        let err = |m: &str| {
            Value::Array(vec![
                Value::Int(BATCH_ERROR),
                Value::BulkString(m.as_bytes().to_vec()),
            ])
        };
        assert!(matches!(
            own_reply(err(
                "OOM command not allowed when used memory > 'maxmemory'"
            )),
            Err(Error::Unavailable(_))
        ));
        assert!(matches!(
            own_reply(err("WRONGTYPE Operation against a key holding the wrong kind of value")),
            Err(Error::Internal(m)) if m.contains("WRONGTYPE")
        ));
        let granted = Value::Array(vec![Value::Int(1), Value::Int(7)]);
        assert_eq!(own_reply(granted.clone()).unwrap(), granted);
    }
}
