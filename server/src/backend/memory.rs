//! The embedded backend: locks kept in this process's memory, with the same semantics as Redis.
//!
//! Used when no Redis is configured. Locks are then local to this one lockd process, and
//! fencing counters restart from zero when it restarts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Backend, ExtendParams, FAIR_ENTRY_TTL, Page, mismatch};
use crate::error::Result;
use crate::events::Events;
use crate::lock::{
    AcquireOutcome, AcquireParams, Busy, EventKind, ExtendOutcome, Holders, Lease, LeaseStatus,
    LockEvent, LockInfo, ReleaseOutcome, ReleaseParams, Token, UnixMillis,
};
use crate::locks::waiters::Waiters;

/// Locks in maps behind one mutex. Expired leases are dropped on access and by [`sweep`](MemoryBackend::sweep).
#[derive(Debug)]
pub struct MemoryBackend {
    state: Mutex<State>,
    waiters: Arc<Waiters>,
    events: Arc<Events>,
}

#[derive(Debug, Default)]
struct State {
    /// Held resources, sorted so that listing can page by name.
    locks: BTreeMap<String, Entry>,
    /// Last fencing token per resource; kept forever, like the Redis `:fence` key.
    fences: HashMap<String, u64>,
    /// Fair waiters per resource in arrival order, with the instant their entry goes stale.
    queues: HashMap<String, VecDeque<(String, Instant)>>,
    /// When leases end, so the sweeper can report expirations on time.
    expiries: BinaryHeap<Reverse<(Instant, String)>>,
}

#[derive(Debug)]
struct Entry {
    /// 1 for a mutex.
    limit: u32,
    holders: Vec<Holder>,
}

#[derive(Debug)]
struct Holder {
    token: Token,
    owner: String,
    fencing_token: u64,
    acquired_at: UnixMillis,
    expires: Instant,
    labels: BTreeMap<String, String>,
    /// Released with a minimum hold: it only waits out its TTL.
    lingering: bool,
}

fn unix_now() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The instant/wall-clock pair every operation works from.
#[derive(Clone, Copy)]
struct Now {
    instant: Instant,
    unix: UnixMillis,
}

impl Now {
    fn get() -> Self {
        Self {
            instant: Instant::now(),
            unix: unix_now(),
        }
    }

    fn unix_at(self, at: Instant) -> UnixMillis {
        self.unix + millis(at.saturating_duration_since(self.instant))
    }
}

impl Holder {
    fn info(&self, resource: &str, now: Now) -> LockInfo {
        LockInfo {
            resource: resource.to_owned(),
            owner: self.owner.clone(),
            fencing_token: self.fencing_token,
            acquired_at: self.acquired_at,
            expires_at: now.unix_at(self.expires),
            remaining: self.expires.saturating_duration_since(now.instant),
            labels: self.labels.clone(),
        }
    }

    fn lease(&self, resource: &str, ttl: Duration, now: Now) -> Lease {
        Lease {
            resource: resource.to_owned(),
            token: self.token.clone(),
            fencing_token: self.fencing_token,
            expires_at: now.unix_at(self.expires),
            ttl,
        }
    }
}

impl State {
    /// Drops the expired holders of `resource`, reporting each expiry.
    fn prune(&mut self, resource: &str, now: Now, events: &Events) {
        let Some(entry) = self.locks.get_mut(resource) else {
            return;
        };
        entry.holders.retain(|h| {
            let live = h.expires > now.instant;
            if !live {
                events.publish(LockEvent {
                    kind: EventKind::Expired,
                    resource: resource.to_owned(),
                    owner: h.owner.clone(),
                    fencing_token: h.fencing_token,
                    time: now.unix_at(h.expires),
                    expires_at: None,
                });
            }
            live
        });
        if entry.holders.is_empty() {
            self.locks.remove(resource);
        }
    }

    /// The live head of the fair queue, dropping stale entries.
    fn queue_head(&mut self, resource: &str, now: Now) -> Option<&str> {
        let queue = self.queues.get_mut(resource)?;
        while queue.front().is_some_and(|(_, live)| *live <= now.instant) {
            queue.pop_front();
        }
        if queue.is_empty() {
            self.queues.remove(resource);
            return None;
        }
        self.queues
            .get(resource)?
            .front()
            .map(|(id, _)| id.as_str())
    }

    /// May `fair` (or a non-fair caller, `None`) take a free slot, given the fair queue?
    fn queue_allows(&mut self, resource: &str, fair: Option<&str>, now: Now) -> bool {
        match self.queue_head(resource, now) {
            None => true,
            Some(head) => Some(head) == fair,
        }
    }

    /// A fair waiter that is not granted joins the queue, or refreshes its place in it.
    fn enqueue(&mut self, resource: &str, fair: Option<&str>, now: Now) {
        if let Some(id) = fair {
            let queue = self.queues.entry(resource.to_owned()).or_default();
            let live = now.instant + FAIR_ENTRY_TTL;
            match queue.iter_mut().find(|(w, _)| w == id) {
                Some(entry) => entry.1 = live,
                None => queue.push_back((id.to_owned(), live)),
            }
        }
    }

    fn leave_queue(&mut self, resource: &str, fair: Option<&str>) {
        if let (Some(id), Some(queue)) = (fair, self.queues.get_mut(resource)) {
            queue.retain(|(w, _)| w != id);
            if queue.is_empty() {
                self.queues.remove(resource);
            }
        }
    }
}

/// Gives `h` a new TTL from now, reporting the extension; returns the renewed lease.
fn renew(
    h: &mut Holder,
    resource: &str,
    ttl: Duration,
    now: Now,
    events: &Events,
    expiries: &mut BinaryHeap<Reverse<(Instant, String)>>,
) -> Lease {
    h.expires = now.instant + ttl;
    let lease = h.lease(resource, ttl, now);
    events.publish(LockEvent {
        kind: EventKind::Extended,
        resource: resource.to_owned(),
        owner: h.owner.clone(),
        fencing_token: h.fencing_token,
        time: now.unix,
        expires_at: Some(lease.expires_at),
    });
    expiries.push(Reverse((h.expires, resource.to_owned())));
    lease
}

impl MemoryBackend {
    /// An empty store that reports releases to `waiters` and changes to `events`.
    pub fn new(waiters: Arc<Waiters>, events: Arc<Events>) -> Self {
        Self {
            state: Mutex::default(),
            waiters,
            events,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent, so a poisoned lock is safe to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops expired leases as they expire (reporting them to watchers) until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Now::get();
            let mut state = self.state();
            while let Some(Reverse((at, _))) = state.expiries.peek() {
                if *at > now.instant {
                    break;
                }
                if let Some(Reverse((_, resource))) = state.expiries.pop() {
                    state.prune(&resource, now, &self.events);
                }
            }
        }
    }
}

impl Backend for MemoryBackend {
    async fn acquire(&self, p: &AcquireParams) -> Result<AcquireOutcome> {
        let now = Now::get();
        let mut state = self.state();
        let state = &mut *state;
        state.prune(&p.resource, now, &self.events);
        let mut free = true;
        if let Some(entry) = state.locks.get_mut(&p.resource) {
            if entry.limit != p.limit {
                return Err(mismatch(&p.resource, entry.limit, p.limit));
            }
            if let Some(h) = entry
                .holders
                .iter_mut()
                .find(|h| h.token == p.token && !h.lingering)
            {
                let lease = renew(
                    h,
                    &p.resource,
                    p.ttl,
                    now,
                    &self.events,
                    &mut state.expiries,
                );
                state.leave_queue(&p.resource, p.fair.as_deref());
                return Ok(AcquireOutcome::Acquired(lease));
            }
            free = entry.holders.len() < p.limit as usize;
        }
        let allowed = state.queue_allows(&p.resource, p.fair.as_deref(), now);
        if free && allowed {
            state.leave_queue(&p.resource, p.fair.as_deref());
            let fence = state.fences.entry(p.resource.clone()).or_default();
            *fence += 1;
            let holder = Holder {
                token: p.token.clone(),
                owner: p.owner.clone(),
                fencing_token: *fence,
                acquired_at: now.unix,
                expires: now.instant + p.ttl,
                labels: p.labels.clone(),
                lingering: false,
            };
            let lease = holder.lease(&p.resource, p.ttl, now);
            self.events.publish(LockEvent {
                kind: EventKind::Acquired,
                resource: p.resource.clone(),
                owner: p.owner.clone(),
                fencing_token: holder.fencing_token,
                time: now.unix,
                expires_at: Some(lease.expires_at),
            });
            state
                .expiries
                .push(Reverse((holder.expires, p.resource.clone())));
            state
                .locks
                .entry(p.resource.clone())
                .or_insert_with(|| Entry {
                    limit: p.limit,
                    holders: Vec::new(),
                })
                .holders
                .push(holder);
            return Ok(AcquireOutcome::Acquired(lease));
        }
        state.enqueue(&p.resource, p.fair.as_deref(), now);
        let entry = state.locks.get(&p.resource);
        let first = entry.and_then(|e| e.holders.iter().min_by_key(|h| h.fencing_token));
        Ok(AcquireOutcome::Busy(Busy {
            holder: first.map(|h| h.info(&p.resource, now)),
            holders: entry.map_or(0, |e| e.holders.len() as u32),
            retry_in: entry
                .and_then(|e| e.holders.iter().map(|h| h.expires).min())
                .map(|at| at.saturating_duration_since(now.instant)),
        }))
    }

    async fn release(&self, p: &ReleaseParams) -> Result<ReleaseOutcome> {
        let now = Now::get();
        let not = |status| ReleaseOutcome {
            status,
            frees_at: None,
        };
        let (outcome, next) = {
            let mut state = self.state();
            let state = &mut *state;
            state.prune(&p.resource, now, &self.events);
            let Some(entry) = state.locks.get_mut(&p.resource) else {
                return Ok(not(LeaseStatus::NotHeld));
            };
            let Some(i) = entry.holders.iter().position(|h| h.token == p.token) else {
                return Ok(not(if entry.limit == 1 {
                    LeaseStatus::HeldByOther
                } else {
                    LeaseStatus::NotHeld
                }));
            };
            if entry.holders[i].lingering {
                return Ok(not(LeaseStatus::NotHeld));
            }
            let h = &mut entry.holders[i];
            let hold_until = p
                .keep_until
                .unwrap_or(0)
                .max(h.acquired_at.saturating_add(millis(p.min_hold)))
                .min(now.unix.saturating_add(millis(p.max_ttl)));
            let frees_at = if hold_until > now.unix {
                h.lingering = true;
                h.expires =
                    now.instant + Duration::from_millis((hold_until - now.unix).unsigned_abs());
                state
                    .expiries
                    .push(Reverse((h.expires, p.resource.clone())));
                hold_until
            } else {
                now.unix
            };
            let (owner, fencing_token) = (h.owner.clone(), h.fencing_token);
            if frees_at == now.unix {
                entry.holders.remove(i);
                if entry.holders.is_empty() {
                    state.locks.remove(&p.resource);
                }
            }
            self.events.publish(LockEvent {
                kind: EventKind::Released,
                resource: p.resource.clone(),
                owner,
                fencing_token,
                time: now.unix,
                expires_at: Some(frees_at),
            });
            let next = state.queue_head(&p.resource, now).map(str::to_owned);
            (
                // The release below wakes the next waiter in-process.
                ReleaseOutcome {
                    status: LeaseStatus::Ok,
                    frees_at: Some(frees_at),
                },
                next,
            )
        };
        self.waiters.released(&p.resource, next.as_deref());
        Ok(outcome)
    }

    async fn extend(&self, p: &ExtendParams) -> Result<ExtendOutcome> {
        let now = Now::get();
        let not = |status| ExtendOutcome {
            status,
            lease: None,
        };
        let mut state = self.state();
        let state = &mut *state;
        state.prune(&p.resource, now, &self.events);
        let Some(entry) = state.locks.get_mut(&p.resource) else {
            return Ok(not(LeaseStatus::NotHeld));
        };
        let limit = entry.limit;
        let Some(h) = entry.holders.iter_mut().find(|h| h.token == p.token) else {
            return Ok(not(if limit == 1 {
                LeaseStatus::HeldByOther
            } else {
                LeaseStatus::NotHeld
            }));
        };
        if h.lingering {
            return Ok(not(LeaseStatus::NotHeld));
        }
        let base = if p.replace_ttl {
            Duration::ZERO
        } else {
            h.expires.saturating_duration_since(now.instant)
        };
        // Whole milliseconds, as Redis keeps them.
        let ttl = Duration::from_millis(
            u64::try_from((base + p.ttl).min(p.max_ttl).as_millis()).unwrap_or(u64::MAX),
        );
        let lease = renew(h, &p.resource, ttl, now, &self.events, &mut state.expiries);
        Ok(ExtendOutcome {
            status: LeaseStatus::Ok,
            lease: Some(lease),
        })
    }

    async fn inspect(&self, resource: &str) -> Result<Option<Holders>> {
        let now = Now::get();
        let mut state = self.state();
        state.prune(resource, now, &self.events);
        Ok(state.locks.get(resource).map(|e| {
            let mut holders: Vec<_> = e.holders.iter().map(|h| h.info(resource, now)).collect();
            holders.sort_by_key(|h| h.fencing_token);
            Holders {
                limit: e.limit,
                holders,
            }
        }))
    }

    async fn list(&self, prefix: &str, page_size: usize, cursor: &str) -> Result<Page> {
        let now = Now::get();
        let state = self.state();
        let start = if cursor.is_empty() {
            Bound::Included(prefix.to_owned())
        } else {
            Bound::Excluded(cursor.to_owned())
        };
        let mut locks = Vec::new();
        let mut last = None;
        let mut more = false;
        for (resource, entry) in state.locks.range((start, Bound::Unbounded)) {
            if !resource.starts_with(prefix) {
                break;
            }
            if last.is_some() && locks.len() >= page_size {
                more = true;
                break;
            }
            let live = entry.holders.iter().filter(|h| h.expires > now.instant);
            locks.extend(live.map(|h| h.info(resource, now)));
            last = Some(resource.clone());
        }
        Ok(Page {
            locks,
            next: if more {
                last.unwrap_or_default()
            } else {
                String::new()
            },
        })
    }

    async fn leave_queue(&self, resource: &str, waiter: &str) -> Result<()> {
        let now = Now::get();
        let next = {
            let mut state = self.state();
            let was_head = state.queue_head(resource, now) == Some(waiter);
            state.leave_queue(resource, Some(waiter));
            if !was_head {
                return Ok(());
            }
            state.queue_head(resource, now).map(str::to_owned)
        };
        self.waiters.released(resource, next.as_deref());
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
