//! The embedded backend: locks kept in this process's memory, with the same semantics as Redis.
//!
//! Used when no Redis is configured. Locks are then local to this one lockd process. Fencing
//! tokens are `max(last token + 1, wall clock in µs)`, like Redis's: one high-water mark for the
//! whole process keeps them growing within it whatever the clock does, and the clock keeps them
//! growing across restarts, provided it never steps back by more than a restart takes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Backend, ExtendParams, FAIR_ENTRY_TTL, Page, millis, mismatch, since_epoch};
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
    /// The last fencing token given, for any resource.
    last_fence: u64,
    /// Fair waiters per resource in arrival order, with the instant their entry goes stale.
    queues: HashMap<String, VecDeque<(String, Instant)>>,
    /// When each held resource's first lease ends, so the sweeper can report expirations on
    /// time: one entry per held resource, moved (not added) when a lease is renewed.
    expiries: BTreeSet<(Instant, String)>,
    /// The instant each resource is filed under in `expiries`.
    due: HashMap<String, Instant>,
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
    /// The KeepAlive stream that renewed the lease last; `None` after a plain Extend or an
    /// idempotent re-acquire. See [`ReleaseParams::only_if_renewer`].
    renewer: Option<String>,
}

/// The instant/wall-clock pair every operation works from.
#[derive(Clone, Copy)]
struct Now {
    instant: Instant,
    unix: UnixMillis,
    /// The wall clock in microseconds since the epoch, for fencing tokens.
    unix_us: u64,
}

impl Now {
    fn get() -> Self {
        let epoch = since_epoch();
        Self {
            instant: Instant::now(),
            unix: millis(epoch),
            unix_us: u64::try_from(epoch.as_micros()).unwrap_or(u64::MAX),
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
            since: now.instant,
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
        self.reschedule(resource);
    }

    /// Files `resource` in `expiries` under its first lease's end, replacing its old entry, or
    /// removes it when the resource is free. Called after every change to its holders.
    fn reschedule(&mut self, resource: &str) {
        let due = self
            .locks
            .get(resource)
            .and_then(|e| e.holders.iter().map(|h| h.expires).min());
        let old = match due {
            Some(at) => self.due.insert(resource.to_owned(), at),
            None => self.due.remove(resource),
        };
        if old == due {
            return;
        }
        if let Some(at) = old {
            self.expiries.remove(&(at, resource.to_owned()));
        }
        if let Some(at) = due {
            self.expiries.insert((at, resource.to_owned()));
        }
    }

    /// The next fencing token: above every token given before, and at least the wall clock in µs.
    fn next_fence(&mut self, now: Now) -> u64 {
        self.last_fence = self.last_fence.saturating_add(1).max(now.unix_us);
        self.last_fence
    }

    /// The live head of the fair queue and when it goes stale, dropping stale entries.
    fn queue_head(&mut self, resource: &str, now: Now) -> Option<(&str, Instant)> {
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
            .map(|(id, live)| (id.as_str(), *live))
    }

    /// May `fair` (or a non-fair caller, `None`) take a free slot, given the fair queue? If
    /// not, `Err` carries when the head that blocks it goes stale.
    fn queue_allows(
        &mut self,
        resource: &str,
        fair: Option<&str>,
        now: Now,
    ) -> std::result::Result<(), Instant> {
        match self.queue_head(resource, now) {
            Some((head, stale)) if Some(head) != fair => Err(stale),
            _ => Ok(()),
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

    /// One acquire attempt, with expired holders already pruned.
    /// `shortened` is set when the caller's own lease was refreshed to end sooner.
    fn acquire(
        &mut self,
        p: &AcquireParams,
        now: Now,
        events: &Events,
        shortened: &mut bool,
    ) -> Result<AcquireOutcome> {
        let mut free = true;
        if let Some(entry) = self.locks.get_mut(&p.resource) {
            if entry.limit != p.limit {
                return Err(mismatch(&p.resource, entry.limit, p.limit));
            }
            match entry.holders.iter_mut().find(|h| h.token == p.token) {
                Some(h) if !h.lingering => {
                    h.renewer.clone_from(&p.renewer);
                    let lease;
                    (lease, *shortened) = renew(h, &p.resource, p.ttl, now, events);
                    self.leave_queue(&p.resource, p.fair.as_deref());
                    return Ok(AcquireOutcome::Acquired(lease));
                }
                // Released with a minimum hold: not granted again to its own token, as for a
                // mutex (and never a second slot for one token).
                Some(_) => free = false,
                None => free = entry.holders.len() < p.limit as usize,
            }
        }
        let allowed = self.queue_allows(&p.resource, p.fair.as_deref(), now);
        if free && allowed.is_ok() {
            self.leave_queue(&p.resource, p.fair.as_deref());
            let holder = Holder {
                token: p.token.clone(),
                owner: p.owner.clone(),
                fencing_token: self.next_fence(now),
                acquired_at: now.unix,
                expires: now.instant + p.ttl,
                labels: p.labels.clone(),
                lingering: false,
                renewer: p.renewer.clone(),
            };
            let lease = holder.lease(&p.resource, p.ttl, now);
            events.publish(LockEvent {
                kind: EventKind::Acquired,
                resource: p.resource.clone(),
                owner: p.owner.clone(),
                fencing_token: holder.fencing_token,
                time: now.unix,
                expires_at: Some(lease.expires_at),
            });
            self.locks
                .entry(p.resource.clone())
                .or_insert_with(|| Entry {
                    limit: p.limit,
                    holders: Vec::new(),
                })
                .holders
                .push(holder);
            return Ok(AcquireOutcome::Acquired(lease));
        }
        self.enqueue(&p.resource, p.fair.as_deref(), now);
        let entry = self.locks.get(&p.resource);
        let first = entry.and_then(|e| e.holders.iter().min_by_key(|h| h.fencing_token));
        // A slot is free and only the fair queue's head stands in the way: retry when it goes
        // stale. Otherwise, when the first lease ends.
        let retry_at = match allowed {
            Err(stale) if free => Some(stale),
            _ => entry.and_then(|e| e.holders.iter().map(|h| h.expires).min()),
        };
        Ok(AcquireOutcome::Busy(Busy {
            holder: first.map(|h| h.info(&p.resource, now)),
            retry_in: retry_at.map(|at| at.saturating_duration_since(now.instant)),
        }))
    }
}

/// Gives `h` a new TTL from now, reporting the extension; returns the renewed lease, and
/// whether it now ends sooner than before (waiters must then look again: their timers are set
/// for the old expiry). The caller reschedules the resource's expiry.
fn renew(
    h: &mut Holder,
    resource: &str,
    ttl: Duration,
    now: Now,
    events: &Events,
) -> (Lease, bool) {
    let shortened = now.instant + ttl < h.expires;
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
    (lease, shortened)
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
            while state
                .expiries
                .first()
                .is_some_and(|(at, _)| *at <= now.instant)
            {
                if let Some((_, resource)) = state.expiries.pop_first() {
                    // Filed again by prune while the resource still has holders.
                    state.due.remove(&resource);
                    state.prune(&resource, now, &self.events);
                }
            }
        }
    }
}

impl Backend for MemoryBackend {
    async fn acquire(&self, p: &AcquireParams) -> Result<AcquireOutcome> {
        let now = Now::get();
        let mut shortened = false;
        let (outcome, wake) = {
            let mut state = self.state();
            state.prune(&p.resource, now, &self.events);
            let outcome = state.acquire(p, now, &self.events, &mut shortened);
            state.reschedule(&p.resource);
            // Only a shortened lease wakes anyone: the fair queue is read for that case alone.
            let wake = shortened.then(|| {
                state
                    .queue_head(&p.resource, now)
                    .map(|(id, _)| id.to_owned())
            });
            (outcome, wake)
        };
        if let Some(next) = wake {
            self.waiters.released(&p.resource, next.as_deref());
        }
        outcome
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
            if let Some(stream) = &p.only_if_renewer
                && entry.holders[i].renewer.as_ref() != Some(stream)
            {
                // Renewed through another KeepAlive stream (or a plain Extend) since.
                return Ok(not(LeaseStatus::HeldByOther));
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
            state.reschedule(&p.resource);
            self.events.publish(LockEvent {
                kind: EventKind::Released,
                resource: p.resource.clone(),
                owner,
                fencing_token,
                time: now.unix,
                expires_at: Some(frees_at),
            });
            let next = state
                .queue_head(&p.resource, now)
                .map(|(id, _)| id.to_owned());
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
        let mut guard = self.state();
        let state = &mut *guard;
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
        h.renewer.clone_from(&p.renewer);
        let (lease, shortened) = renew(h, &p.resource, ttl, now, &self.events);
        state.reschedule(&p.resource);
        if shortened {
            let next = state
                .queue_head(&p.resource, now)
                .map(|(id, _)| id.to_owned());
            drop(guard);
            self.waiters.released(&p.resource, next.as_deref());
        }
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
            let was_head = state.queue_head(resource, now).map(|(id, _)| id) == Some(waiter);
            state.leave_queue(resource, Some(waiter));
            if !was_head {
                return Ok(());
            }
            state.queue_head(resource, now).map(|(id, _)| id.to_owned())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::checks::{self, acquire_params, extend_params, release_params};

    fn backend() -> MemoryBackend {
        MemoryBackend::new(Arc::default(), Arc::default())
    }

    #[tokio::test]
    async fn release_on_close_spares_a_renewal_made_elsewhere() {
        let b = backend();
        checks::release_on_close_spares_a_renewal_made_elsewhere(&b, 1).await;
        checks::release_on_close_spares_a_renewal_made_elsewhere(&b, 3).await;
        checks::an_acquire_through_a_session_binds_the_lease_to_it(&b, 1).await;
        checks::an_acquire_through_a_session_binds_the_lease_to_it(&b, 3).await;
    }

    #[tokio::test]
    async fn a_fair_queue_head_in_the_way_reports_when_it_goes_stale() {
        let b = backend();
        checks::a_fair_queue_head_in_the_way_reports_when_it_goes_stale(&b, 1).await;
        checks::a_fair_queue_head_in_the_way_reports_when_it_goes_stale(&b, 2).await;
    }

    #[tokio::test]
    async fn renewals_keep_one_expiry_entry_per_lock() {
        let b = backend();
        b.acquire(&acquire_params("r", "T", 1)).await.unwrap();
        b.acquire(&acquire_params("s", "A", 2)).await.unwrap();
        b.acquire(&acquire_params("s", "B", 2)).await.unwrap();
        for i in 0..100_000 {
            let (resource, token) = if i % 2 == 0 { ("r", "T") } else { ("s", "A") };
            let extended = b
                .extend(&extend_params(resource, token, None))
                .await
                .unwrap();
            assert_eq!(extended.status, LeaseStatus::Ok);
        }
        assert_eq!(b.state().expiries.len(), 2);
        b.release(&release_params("r", "T", None)).await.unwrap();
        b.release(&release_params("s", "A", None)).await.unwrap();
        b.release(&release_params("s", "B", None)).await.unwrap();
        let state = b.state();
        assert!(state.expiries.is_empty() && state.due.is_empty());
    }

    #[tokio::test]
    async fn fencing_tokens_follow_the_clock_and_keep_no_state_per_free_resource() {
        let b = backend();
        let before = u64::try_from(since_epoch().as_micros()).unwrap();
        let mut last = 0;
        for _ in 0..3 {
            let AcquireOutcome::Acquired(lease) =
                b.acquire(&acquire_params("r", "T", 1)).await.unwrap()
            else {
                panic!("busy");
            };
            assert!(lease.fencing_token > last && lease.fencing_token >= before);
            last = lease.fencing_token;
            b.release(&release_params("r", "T", None)).await.unwrap();
        }
        // Nothing is left of a free resource.
        let state = b.state();
        assert!(state.locks.is_empty() && state.queues.is_empty() && state.due.is_empty());
    }

    #[tokio::test]
    async fn a_semaphore_slot_released_with_a_minimum_hold_is_not_granted_again() {
        let b = backend();
        b.acquire(&acquire_params("s", "T", 2)).await.unwrap();
        let mut hold = release_params("s", "T", None);
        hold.min_hold = Duration::from_secs(3600);
        b.release(&hold).await.unwrap();
        let again = b.acquire(&acquire_params("s", "T", 2)).await.unwrap();
        assert!(matches!(again, AcquireOutcome::Busy(_)), "{again:?}");
        assert_eq!(b.inspect("s").await.unwrap().unwrap().holders.len(), 1);
    }
}
