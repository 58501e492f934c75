//! The embedded backend: locks kept in this process's memory, with the same semantics as Redis.
//!
//! Used when no Redis is configured. Locks are then local to this one lockd process, and
//! fencing counters restart from zero when it restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::{Backend, ExtendParams};
use crate::error::Result;
use crate::lock::{
    AcquireOutcome, AcquireParams, ExtendOutcome, Lease, LeaseStatus, LockInfo, Token, UnixMillis,
};
use crate::waiters::Waiters;

/// Locks in a map behind a mutex. Expired entries are ignored on access and swept periodically.
#[derive(Debug)]
pub struct MemoryBackend {
    state: Mutex<State>,
    waiters: Arc<Waiters>,
}

#[derive(Debug, Default)]
struct State {
    locks: HashMap<String, Held>,
    /// Last fencing token per resource; kept forever, like the Redis `:fence` key.
    fences: HashMap<String, u64>,
    /// Operations since the last sweep of expired locks.
    ops_since_sweep: usize,
}

#[derive(Debug)]
struct Held {
    token: Token,
    owner: String,
    fencing_token: u64,
    acquired_at: UnixMillis,
    expires: Instant,
    labels: std::collections::BTreeMap<String, String>,
}

/// Sweep expired locks after this many operations, so abandoned locks do not pile up.
const SWEEP_EVERY: usize = 4096;

fn unix_now() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl MemoryBackend {
    /// An empty store that reports releases to `waiters`.
    pub fn new(waiters: Arc<Waiters>) -> Self {
        Self {
            state: Mutex::default(),
            waiters,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent, so a poisoned lock is safe to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The unexpired lock on `resource`, dropping it if it has expired.
    fn live(&mut self, resource: &str, now: Instant) -> Option<&mut Held> {
        if self.locks.get(resource).is_some_and(|h| h.expires <= now) {
            self.locks.remove(resource);
        }
        self.locks.get_mut(resource)
    }

    fn maybe_sweep(&mut self, now: Instant) {
        self.ops_since_sweep += 1;
        if self.ops_since_sweep >= SWEEP_EVERY {
            self.ops_since_sweep = 0;
            self.locks.retain(|_, h| h.expires > now);
        }
    }
}

impl Held {
    fn info(&self, resource: &str, now: Instant, unix: UnixMillis) -> LockInfo {
        let remaining = self.expires.saturating_duration_since(now);
        LockInfo {
            resource: resource.to_owned(),
            owner: self.owner.clone(),
            fencing_token: self.fencing_token,
            acquired_at: self.acquired_at,
            expires_at: unix + millis(remaining),
            remaining,
            labels: self.labels.clone(),
        }
    }
}

impl Backend for MemoryBackend {
    async fn acquire(&self, p: &AcquireParams) -> Result<AcquireOutcome> {
        let (now, unix) = (Instant::now(), unix_now());
        let mut state = self.state();
        state.maybe_sweep(now);
        if let Some(held) = state.live(&p.resource, now) {
            if held.token != p.token {
                return Ok(AcquireOutcome::Held(held.info(&p.resource, now, unix)));
            }
            held.expires = now + p.ttl;
            return Ok(AcquireOutcome::Acquired(Lease {
                resource: p.resource.clone(),
                token: p.token.clone(),
                fencing_token: held.fencing_token,
                expires_at: unix + millis(p.ttl),
                ttl: p.ttl,
            }));
        }
        let fence = state.fences.entry(p.resource.clone()).or_default();
        *fence += 1;
        let fencing_token = *fence;
        state.locks.insert(
            p.resource.clone(),
            Held {
                token: p.token.clone(),
                owner: p.owner.clone(),
                fencing_token,
                acquired_at: unix,
                expires: now + p.ttl,
                labels: p.labels.clone(),
            },
        );
        Ok(AcquireOutcome::Acquired(Lease {
            resource: p.resource.clone(),
            token: p.token.clone(),
            fencing_token,
            expires_at: unix + millis(p.ttl),
            ttl: p.ttl,
        }))
    }

    async fn release(&self, resource: &str, token: &Token) -> Result<LeaseStatus> {
        let status = {
            let mut state = self.state();
            match state.live(resource, Instant::now()) {
                None => LeaseStatus::NotHeld,
                Some(held) if held.token != *token => LeaseStatus::HeldByOther,
                Some(_) => {
                    state.locks.remove(resource);
                    LeaseStatus::Ok
                }
            }
        };
        if status == LeaseStatus::Ok {
            self.waiters.released(resource);
        }
        Ok(status)
    }

    async fn extend(&self, p: &ExtendParams) -> Result<ExtendOutcome> {
        let (now, unix) = (Instant::now(), unix_now());
        let mut state = self.state();
        let Some(held) = state.live(&p.resource, now) else {
            return Ok(ExtendOutcome {
                status: LeaseStatus::NotHeld,
                lease: None,
            });
        };
        if held.token != p.token {
            return Ok(ExtendOutcome {
                status: LeaseStatus::HeldByOther,
                lease: None,
            });
        }
        let base = if p.replace_ttl {
            Duration::ZERO
        } else {
            held.expires.saturating_duration_since(now)
        };
        // Whole milliseconds, as Redis keeps them.
        let ttl = Duration::from_millis(
            u64::try_from((base + p.ttl).min(p.max_ttl).as_millis()).unwrap_or(u64::MAX),
        );
        held.expires = now + ttl;
        Ok(ExtendOutcome {
            status: LeaseStatus::Ok,
            lease: Some(Lease {
                resource: p.resource.clone(),
                token: p.token.clone(),
                fencing_token: held.fencing_token,
                expires_at: unix + millis(ttl),
                ttl,
            }),
        })
    }

    async fn inspect(&self, resource: &str) -> Result<Option<LockInfo>> {
        let (now, unix) = (Instant::now(), unix_now());
        let mut state = self.state();
        Ok(state
            .live(resource, now)
            .map(|h| h.info(resource, now, unix)))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
