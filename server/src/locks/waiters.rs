//! Local wait queues for blocking `Acquire`s: one queue of waiters per resource, in arrival order.
//!
//! Backends report releases here (the Redis backend from its one pub/sub subscription, the
//! memory backend directly). A release wakes only the waiter at the head of the resource's
//! queue, so twenty waiters cost one retry, not twenty. A waiter that leaves (granted, timed out,
//! cancelled) hands the head position on by waking the next one, so a wake-up is never lost to a
//! waiter that has gone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

/// The registry of waiting `Acquire`s on this lockd, shared by the lock core and the backend.
#[derive(Debug, Default)]
pub struct Waiters {
    /// Waiters per resource, in arrival order. The head is the one woken by a release.
    /// A std mutex: it is held only for a few map operations, never across an `.await`.
    queues: Mutex<HashMap<String, VecDeque<Arc<Slot>>>>,
    /// Source of slot ids, to find a slot again when it leaves.
    next_id: AtomicU64,
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
    /// Why the waiter was woken: set by a leaving head, cleared by any release.
    wake: Mutex<Wake>,
}

/// Why a waiter was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something changed (a release, or the head left without the lock): try again.
    Retry,
    /// The previous head was granted the *mutex* until this instant at the latest: no need to
    /// try before then, unless a release comes first. Never used for semaphores, where other
    /// slots may free sooner.
    MutexHeldUntil(Instant),
}

/// A waiter's place in its resource's queue. Dropping it leaves the queue.
#[derive(Debug)]
pub struct Registration {
    waiters: Arc<Waiters>,
    resource: String,
    slot: Arc<Slot>,
    /// What to tell the next waiter when this one leaves.
    leaving: Wake,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data half-updated (single map or
    // value operations), so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Slot {
    fn wake(&self, why: Wake) {
        *lock(&self.wake) = why;
        self.notify.notify_one();
    }
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
            wake: Mutex::new(Wake::Retry),
        });
        lock(&self.queues)
            .entry(resource.to_owned())
            .or_default()
            .push_back(slot.clone());
        crate::metrics::waiters(1.0);
        Registration {
            waiters: self.clone(),
            resource: resource.to_owned(),
            slot,
            leaving: Wake::Retry,
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
            slot.wake(Wake::Retry);
            crate::metrics::handoff();
        }
    }

    /// Wakes the head of every queue: releases may have been missed (the Redis subscription
    /// was down).
    pub fn released_all(&self) {
        for queue in lock(&self.queues).values() {
            if let Some(head) = queue.front() {
                head.wake(Wake::Retry);
            }
        }
    }

    /// Number of resources that have at least one local waiter: none is left behind.
    #[cfg(test)]
    fn resources_waited_on(&self) -> usize {
        lock(&self.queues).len()
    }
}

impl Registration {
    /// Waits until this waiter is woken, and says why.
    pub async fn woken(&self) -> Wake {
        self.slot.notify.notified().await;
        std::mem::replace(&mut *lock(&self.slot.wake), Wake::Retry)
    }

    /// True when this waiter is at the head of its queue, and so must watch the holder's expiry.
    pub fn is_head(&self) -> bool {
        lock(&self.waiters.queues)
            .get(&self.resource)
            .and_then(|q| q.front())
            .is_some_and(|head| head.id == self.slot.id)
    }

    /// Leaves the queue after being granted a lease. For a mutex, `held_until` tells the next
    /// waiter when to look again without asking the backend; for a semaphore it must be `None`,
    /// since another slot may free at any time.
    pub fn granted(mut self, held_until: Option<Instant>) {
        if let Some(until) = held_until {
            self.leaving = Wake::MutexHeldUntil(until);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        crate::metrics::waiters(-1.0);
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
            // Hand the head position on. If a release woke this waiter and it leaves without
            // the lock (cancelled, timed out), the next waiter retries in its place.
            Some(next) if was_head => next.wake(self.leaving),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    async fn a_head_granted_a_mutex_tells_the_next_waiter_when_to_look_again() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("r", None);
        let second = waiters.register("r", None);
        let until = Instant::now() + Duration::from_secs(5);
        first.granted(Some(until));
        assert_eq!(second.woken().await, Wake::MutexHeldUntil(until));
    }

    #[tokio::test]
    async fn a_head_granted_a_semaphore_slot_makes_the_next_waiter_try_at_once() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("s", None);
        let second = waiters.register("s", None);
        first.granted(None);
        assert_eq!(second.woken().await, Wake::Retry);
    }

    #[tokio::test]
    async fn a_release_overrides_a_pending_hint() {
        let waiters = Arc::new(Waiters::default());
        let first = waiters.register("r", None);
        let second = waiters.register("r", None);
        first.granted(Some(Instant::now() + Duration::from_secs(5)));
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

    #[test]
    fn last_waiter_leaving_removes_the_resource() {
        let waiters = Arc::new(Waiters::default());
        let w = waiters.register("r", None);
        assert_eq!(waiters.resources_waited_on(), 1);
        drop(w);
        assert_eq!(waiters.resources_waited_on(), 0);
    }
}
