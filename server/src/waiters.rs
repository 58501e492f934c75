//! In-process wake-ups for blocking `Acquire`s: one queue of waiters per resource.
//!
//! Backends report releases here (the Redis backend from its one pub/sub subscription, the
//! memory backend directly). A release wakes only the waiter at the head of the resource's
//! queue, so twenty waiters cost one retry, not twenty. A waiter that leaves (granted, timed out,
//! cancelled) hands the head position on by waking the next one, so a wake-up is never lost to a
//! waiter that has gone.
//!
//! Hand-offs: a `Release` may grant the lock to the local head waiter in the same backend call
//! (see [`Waiters::offer`]), which then gets its lease without asking the backend itself. While a
//! hand-off is in flight the waiter makes no attempt of its own, and while the waiter makes an
//! attempt no hand-off starts: both would use the waiter's token, and a lease handed to a waiter
//! that has gone is released again (see [`Waiters::take_orphans`]), which must never free a
//! lease the waiter took itself.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lock::{AcquireParams, Lease};

/// The registry of waiting `Acquire`s, shared by the service and the backend.
#[derive(Debug, Default)]
pub struct Waiters {
    /// Waiters per resource, in arrival order. The head is the one woken by a release.
    /// A std mutex: it is held only for a few map operations, never across an `.await`.
    queues: Mutex<HashMap<String, VecDeque<Arc<Slot>>>>,
    /// Source of slot ids, to find a slot again when it leaves.
    next_id: AtomicU64,
    /// Leases handed to waiters that left before taking them: to be released.
    orphans: Mutex<Vec<Lease>>,
    /// Signalled when `orphans` gains a lease.
    orphaned: Notify,
}

/// One waiter's mailbox.
#[derive(Debug)]
struct Slot {
    id: u64,
    /// The waiter's id in the backend's fair queue, when it waits in fair order.
    fair_id: Option<String>,
    /// Stores one wake-up even when the waiter is not polling yet, so none is lost between a
    /// failed attempt and the wait.
    notify: Notify,
    /// Set when the previous head was granted the lock: when its lease ends at the latest, so the
    /// new head can arm its expiry timer without asking the backend. Cleared by a release.
    hint: Mutex<Option<Instant>>,
    /// Hand-off state; see the module documentation.
    hand_off: Mutex<HandOff>,
}

/// A waiter's side of hand-offs.
#[derive(Debug, Default)]
struct HandOff {
    /// The Acquire a release may grant to this waiter; `None` when it takes no hand-offs.
    params: Option<Arc<AcquireParams>>,
    /// The waiter is calling the backend itself: no hand-off may start.
    attempting: bool,
    /// A release is granting the lock to this waiter: the waiter must not call the backend.
    offered: bool,
    /// The waiter wanted to try while a hand-off was in flight: wake it if the hand-off fails.
    held_back: bool,
    /// The lease a release granted to this waiter, until the waiter takes it.
    lease: Option<Lease>,
    /// The waiter has left: a lease granted to it now belongs to nobody.
    gone: bool,
}

/// What a waiter should do before calling the backend; see [`Registration::begin_attempt`].
#[derive(Debug)]
pub enum Attempt {
    /// Call the backend, then [`Registration::end_attempt`].
    Go,
    /// A release granted this lease to the waiter.
    Granted(Lease),
    /// A hand-off to this waiter is in flight: wait to be woken.
    Wait,
}

/// A hand-off in flight: a release that tries to grant the lock to a local waiter. Settle it
/// with the backend's answer; dropping it unsettled counts as "not handed off".
#[derive(Debug)]
pub struct Offer {
    waiters: Arc<Waiters>,
    slot: Arc<Slot>,
    params: Arc<AcquireParams>,
    settled: bool,
}

/// Why a waiter was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Try again now: the lock may be free.
    Retry,
    /// The previous head got the lock; it is held until this instant at the latest.
    HeldUntil(Instant),
}

/// A waiter's place in its resource's queue. Dropping it leaves the queue.
#[derive(Debug)]
pub struct Registration {
    waiters: Arc<Waiters>,
    resource: String,
    slot: Arc<Slot>,
    /// Set by [`Registration::granted`]: the lease the leaving waiter got ends by then.
    granted_until: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data half-updated (single map or
    // Option operations), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Waiters {
    /// Joins the queue of `resource`. Register *before* the first attempt, so that a release
    /// landing between a failed attempt and the wait is not missed.
    /// `fair_id` is the waiter's id in the backend's fair queue, if it waits in fair order.
    pub fn register(self: &Arc<Self>, resource: &str, fair_id: Option<&str>) -> Registration {
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            fair_id: fair_id.map(str::to_owned),
            notify: Notify::new(),
            hint: Mutex::new(None),
            hand_off: Mutex::default(),
        });
        lock(&self.queues)
            .entry(resource.to_owned())
            .or_default()
            .push_back(slot.clone());
        Registration {
            waiters: self.clone(),
            resource: resource.to_owned(),
            slot,
            granted_until: None,
        }
    }

    /// A release of `resource` happened: wake one waiter. That is the local waiter whose fair
    /// id is `next` (the head of the backend's fair queue) when there is one, else the head of
    /// the local queue.
    pub fn released(&self, resource: &str, next: Option<&str>) {
        let queues = lock(&self.queues);
        let Some(queue) = queues.get(resource) else {
            return;
        };
        let fair_next = next.and_then(|id| queue.iter().find(|s| s.fair_id.as_deref() == Some(id)));
        if let Some(slot) = fair_next.or_else(|| queue.front()) {
            *lock(&slot.hint) = None;
            slot.notify.notify_one();
        }
    }

    /// Wake the head of every queue: releases may have been missed (the Redis subscription
    /// reconnected).
    pub fn released_all(&self) {
        for queue in lock(&self.queues).values() {
            if let Some(head) = queue.front() {
                *lock(&head.hint) = None;
                head.notify.notify_one();
            }
        }
    }

    /// Starts a hand-off of `resource` to its local head waiter, if that waiter takes hand-offs
    /// and is not calling the backend itself. The release passes [`Offer::params`] to the
    /// backend, then settles the offer with the lease the backend granted, if any.
    pub fn offer(self: &Arc<Self>, resource: &str) -> Option<Offer> {
        let queues = lock(&self.queues);
        let slot = queues.get(resource)?.front()?;
        let mut h = lock(&slot.hand_off);
        if h.attempting || h.offered || h.gone {
            return None;
        }
        let params = h.params.clone()?;
        h.offered = true;
        Some(Offer {
            waiters: self.clone(),
            slot: slot.clone(),
            params,
            settled: false,
        })
    }

    /// Takes the leases handed to waiters that left before taking them. Whoever runs the backend
    /// releases them, so they do not block the lock until their TTL.
    pub fn take_orphans(&self) -> Vec<Lease> {
        std::mem::take(&mut *lock(&self.orphans))
    }

    /// Resolves when [`Waiters::take_orphans`] may have something to take.
    pub async fn orphaned(&self) {
        self.orphaned.notified().await;
    }

    fn orphan(&self, lease: Lease) {
        lock(&self.orphans).push(lease);
        self.orphaned.notify_one();
    }

    /// Number of resources that have at least one local waiter.
    pub fn resources_waited_on(&self) -> usize {
        lock(&self.queues).len()
    }
}

impl Offer {
    /// The Acquire to grant: the waiter's own request.
    pub fn params(&self) -> &Arc<AcquireParams> {
        &self.params
    }

    /// Ends the hand-off: `lease` is what the backend granted to the waiter, or `None` when it
    /// did not hand the lock over (or the release failed).
    pub fn settle(mut self, lease: Option<Lease>) {
        self.finish(lease);
    }

    fn finish(&mut self, lease: Option<Lease>) {
        self.settled = true;
        let mut h = lock(&self.slot.hand_off);
        h.offered = false;
        match lease {
            Some(lease) if h.gone => {
                drop(h);
                self.waiters.orphan(lease);
            }
            Some(lease) => {
                h.lease = Some(lease);
                drop(h);
                self.slot.notify.notify_one();
            }
            None => {
                if std::mem::take(&mut h.held_back) {
                    drop(h);
                    self.slot.notify.notify_one();
                }
            }
        }
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if !self.settled {
            // The release was cancelled mid-call: whether the backend handed the lock over is
            // unknown. The waiter tries again itself; if it got the lock, its own token still
            // holds it, and the attempt is granted with the same lease.
            lock(&self.slot.hand_off).held_back = true;
            self.finish(None);
        }
    }
}

impl Registration {
    /// Lets a release grant the lock to this waiter directly, with these Acquire parameters.
    pub fn accept_hand_offs(&self, params: Arc<AcquireParams>) {
        lock(&self.slot.hand_off).params = Some(params);
    }

    /// Before calling the backend: go ahead, or take the lease a release granted, or wait for a
    /// hand-off in flight to settle.
    pub fn begin_attempt(&self) -> Attempt {
        let mut h = lock(&self.slot.hand_off);
        if let Some(lease) = h.lease.take() {
            return Attempt::Granted(lease);
        }
        if h.offered {
            h.held_back = true;
            return Attempt::Wait;
        }
        h.attempting = true;
        Attempt::Go
    }

    /// After the backend call that [`Attempt::Go`] allowed.
    pub fn end_attempt(&self) {
        lock(&self.slot.hand_off).attempting = false;
    }

    /// The lease a release granted to this waiter, if any.
    pub fn take_lease(&self) -> Option<Lease> {
        lock(&self.slot.hand_off).lease.take()
    }

    /// Whether a release granted this waiter a lease it has not taken yet.
    pub fn has_lease(&self) -> bool {
        lock(&self.slot.hand_off).lease.is_some()
    }

    /// Waits until this waiter is woken, and says why.
    pub async fn woken(&self) -> Wake {
        self.slot.notify.notified().await;
        match lock(&self.slot.hint).take() {
            Some(until) => Wake::HeldUntil(until),
            None => Wake::Retry,
        }
    }

    /// True when this waiter is at the head of its queue, and so must watch the holder's expiry.
    pub fn is_head(&self) -> bool {
        lock(&self.waiters.queues)
            .get(&self.resource)
            .and_then(|q| q.front())
            .is_some_and(|head| head.id == self.slot.id)
    }

    /// Records that this waiter was granted a lease ending at `until`, then leaves the queue.
    /// The next waiter learns when to look again without asking the backend.
    pub fn granted(mut self, until: Instant) {
        self.granted_until = Some(until);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let orphan = {
            let mut h = lock(&self.slot.hand_off);
            h.gone = true;
            h.lease.take()
        };
        if let Some(lease) = orphan {
            self.waiters.orphan(lease);
        }
        let mut queues = lock(&self.waiters.queues);
        let Some(queue) = queues.get_mut(&self.resource) else {
            return;
        };
        let was_head = queue.front().is_some_and(|s| s.id == self.slot.id);
        queue.retain(|s| s.id != self.slot.id);
        match queue.front() {
            None => {
                queues.remove(&self.resource);
            }
            Some(next) if was_head => {
                // Hand the head position on. If a release woke us and we are leaving without
                // the lock (cancelled, timed out), the next waiter retries in our place.
                *lock(&next.hint) = self.granted_until;
                next.notify.notify_one();
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::Token;
    use std::time::Duration;

    #[tokio::test]
    async fn release_wakes_only_the_head_waiter() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("r", None);
        let second = waiters.register("r", None);
        waiters.released("r", None);
        assert_eq!(first.woken().await, Wake::Retry);
        let second_woken = tokio::time::timeout(Duration::from_millis(20), second.woken()).await;
        assert!(second_woken.is_err(), "the second waiter must not be woken");
    }

    #[tokio::test]
    async fn wake_before_wait_is_not_lost() {
        let waiters = Arc::new(Waiters::default());
        let w = waiters.register("r", None);
        waiters.released("r", None);
        // The release happened before we started waiting: the stored permit still wakes us.
        assert_eq!(w.woken().await, Wake::Retry);
    }

    #[tokio::test]
    async fn leaving_head_hands_the_wake_to_the_next_waiter() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("r", None);
        let second = waiters.register("r", None);
        assert!(first.is_head());
        drop(first);
        assert!(second.is_head());
        assert_eq!(second.woken().await, Wake::Retry);
    }

    #[tokio::test]
    async fn granted_head_tells_the_next_waiter_when_to_look_again() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("r", None);
        let second = waiters.register("r", None);
        let until = Instant::now() + Duration::from_secs(5);
        first.granted(until);
        assert_eq!(second.woken().await, Wake::HeldUntil(until));
    }

    #[tokio::test]
    async fn a_release_overrides_a_pending_hint() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("r", None);
        let second = waiters.register("r", None);
        first.granted(Instant::now() + Duration::from_secs(5));
        waiters.released("r", None);
        assert_eq!(second.woken().await, Wake::Retry);
    }

    #[tokio::test]
    async fn release_wakes_the_fair_queue_head_even_when_it_is_not_first_locally() {
        let waiters = Arc::new(Waiters::default());
        let local_first = waiters.register("r", None);
        let fair = waiters.register("r", Some("w-1"));
        waiters.released("r", Some("w-1"));
        assert_eq!(fair.woken().await, Wake::Retry);
        let first_woken =
            tokio::time::timeout(Duration::from_millis(20), local_first.woken()).await;
        assert!(first_woken.is_err());
    }

    fn params() -> Arc<AcquireParams> {
        Arc::new(AcquireParams {
            resource: "r".into(),
            token: Token::generate("test"),
            owner: "o".into(),
            ttl: Duration::from_secs(30),
            labels: Default::default(),
            limit: 1,
            fair: None,
            waiting: true,
            new_token: true,
        })
    }

    fn lease(p: &AcquireParams) -> Lease {
        Lease {
            resource: p.resource.clone(),
            token: p.token.clone(),
            fencing_token: 7,
            expires_at: 0,
            ttl: p.ttl,
        }
    }

    /// A waiter that takes hand-offs, registered on "r".
    fn hand_off_waiter(waiters: &Arc<Waiters>) -> Registration {
        let w = waiters.register("r", None);
        w.accept_hand_offs(params());
        w
    }

    #[tokio::test]
    async fn a_handed_lease_reaches_the_head_waiter() {
        let waiters = Arc::new(Waiters::default());
        let w = hand_off_waiter(&waiters);
        let offer = waiters.offer("r").unwrap();
        let granted = lease(offer.params());
        offer.settle(Some(granted));
        assert_eq!(w.woken().await, Wake::Retry);
        match w.begin_attempt() {
            Attempt::Granted(l) => assert_eq!(l.fencing_token, 7),
            other => panic!("expected the handed lease, got {other:?}"),
        }
        drop(w);
        assert!(waiters.take_orphans().is_empty());
    }

    #[tokio::test]
    async fn a_waiter_makes_no_attempt_while_a_hand_off_is_in_flight() {
        let waiters = Arc::new(Waiters::default());
        let w = hand_off_waiter(&waiters);
        let offer = waiters.offer("r").unwrap();
        assert!(matches!(w.begin_attempt(), Attempt::Wait));
        // Not handed over: the held-back waiter is woken to try itself.
        offer.settle(None);
        assert_eq!(w.woken().await, Wake::Retry);
        assert!(matches!(w.begin_attempt(), Attempt::Go));
    }

    #[test]
    fn no_hand_off_starts_while_the_waiter_attempts() {
        let waiters = Arc::new(Waiters::default());
        let w = hand_off_waiter(&waiters);
        assert!(matches!(w.begin_attempt(), Attempt::Go));
        assert!(waiters.offer("r").is_none());
        w.end_attempt();
        assert!(waiters.offer("r").is_some());
    }

    #[test]
    fn a_waiter_without_hand_offs_gets_no_offer() {
        let waiters = Arc::new(Waiters::default());
        let _w = waiters.register("r", None);
        assert!(waiters.offer("r").is_none());
    }

    #[test]
    fn a_lease_handed_to_a_waiter_that_left_is_orphaned_for_release() {
        let waiters = Arc::new(Waiters::default());
        let w = hand_off_waiter(&waiters);
        let offer = waiters.offer("r").unwrap();
        let granted = lease(offer.params());
        drop(w);
        offer.settle(Some(granted));
        let orphans = waiters.take_orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].fencing_token, 7);
    }

    #[test]
    fn a_lease_the_waiter_never_took_is_orphaned_when_it_leaves() {
        let waiters = Arc::new(Waiters::default());
        let w = hand_off_waiter(&waiters);
        let offer = waiters.offer("r").unwrap();
        let granted = lease(offer.params());
        offer.settle(Some(granted));
        drop(w);
        assert_eq!(waiters.take_orphans().len(), 1);
    }

    #[tokio::test]
    async fn a_cancelled_release_wakes_the_waiter_to_try_itself() {
        let waiters = Arc::new(Waiters::default());
        let w = hand_off_waiter(&waiters);
        drop(waiters.offer("r").unwrap());
        assert_eq!(w.woken().await, Wake::Retry);
        assert!(matches!(w.begin_attempt(), Attempt::Go));
    }

    #[test]
    fn last_waiter_leaving_removes_the_resource() {
        let waiters = Arc::new(Waiters::default());
        let w = waiters.register("r", None);
        assert_eq!(waiters.resources_waited_on(), 1);
        drop(w);
        assert_eq!(waiters.resources_waited_on(), 0);
    }
}
