//! The leases this lockd granted, while metrics are on: from grant to release or expiry, for
//! the hold-time histogram and the count of leases that expired instead of being released.
//!
//! Keyed by resource and a hash of the token (the token itself is not kept). A lease granted
//! here and released or renewed through another lockd is not seen here: before counting a lease
//! as expired, the sweep asks the backend whether it is still held (renewed elsewhere), and
//! keeps it if so. One released through another lockd is counted as expired here; docs say so.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::lock::Token;
use crate::metrics::{self, Prefixes};

/// How often expired leases are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Most backend checks per sweep, so a mass expiry cannot turn one sweep into unbounded work;
/// the rest wait for the next sweep.
const CHECKS_PER_SWEEP: usize = 256;

/// A lease's entry.
#[derive(Debug, Clone, Copy)]
struct Held {
    fencing_token: u64,
    granted: Instant,
    /// When the lease ends unless renewed, by this process's clock.
    until: Instant,
}

/// The leases this lockd granted that are still held, as far as it knows.
#[derive(Debug)]
pub struct HeldLeases {
    /// `None` while metrics are off: nothing is tracked.
    leases: Option<Mutex<HashMap<(String, u64), Held>>>,
    hasher: RandomState,
    prefixes: Prefixes,
}

impl HeldLeases {
    /// Tracks leases when `enabled`, labelled by `prefixes`.
    pub fn new(enabled: bool, prefixes: Prefixes) -> Self {
        Self {
            leases: enabled.then(Mutex::default),
            hasher: RandomState::new(),
            prefixes,
        }
    }

    /// The label prefixes.
    pub fn prefixes(&self) -> &Prefixes {
        &self.prefixes
    }

    fn map(&self) -> Option<MutexGuard<'_, HashMap<(String, u64), Held>>> {
        // Single map operations under the lock: a poisoned one is still consistent.
        let m = self.leases.as_ref()?;
        Some(m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn key(&self, resource: &str, token: &Token) -> (String, u64) {
        (resource.to_owned(), self.hasher.hash_one(token.expose()))
    }

    /// A lease was granted (or re-acquired by its token) at `granted`, for `ttl`.
    pub fn granted(
        &self,
        resource: &str,
        token: &Token,
        fencing_token: u64,
        granted: Instant,
        ttl: Duration,
    ) {
        let key = self.key(resource, token);
        if let Some(mut m) = self.map() {
            let held = m.entry(key).or_insert(Held {
                fencing_token,
                granted,
                until: granted,
            });
            held.until = granted + ttl;
        }
    }

    /// A lease was renewed at `at` for `ttl`.
    pub fn renewed(&self, resource: &str, token: &Token, at: Instant, ttl: Duration) {
        let key = self.key(resource, token);
        if let Some(mut m) = self.map()
            && let Some(held) = m.get_mut(&key)
        {
            held.until = at + ttl;
        }
    }

    /// A release answered: `Some(true)` it released the lease, `Some(false)` the token held
    /// nothing (the lease was gone: it expired), `None` (a check of another stream's lease that
    /// changed nothing) leaves it.
    pub fn ended(&self, resource: &str, token: &Token, released: Option<bool>) {
        let Some(released) = released else { return };
        let key = self.key(resource, token);
        let Some(held) = self.map().and_then(|mut m| m.remove(&key)) else {
            return;
        };
        let prefix = self.prefixes.of(resource);
        if released {
            metrics::held(prefix, held.granted.elapsed(), false);
        } else {
            metrics::held(
                prefix,
                held.until.saturating_duration_since(held.granted),
                true,
            );
        }
    }

    /// Every second until `shutdown`, counts the leases past their end as expired, unless the
    /// backend says they are still held (renewed through another lockd).
    pub async fn sweep<B: Backend>(self: Arc<Self>, backend: Arc<B>, shutdown: CancellationToken) {
        if self.leases.is_none() {
            return;
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            let now = Instant::now();
            let due: Vec<_> = self
                .map()
                .map(|m| {
                    m.iter()
                        .filter(|(_, h)| h.until <= now)
                        .take(CHECKS_PER_SWEEP)
                        .map(|(k, h)| (k.clone(), *h))
                        .collect()
                })
                .unwrap_or_default();
            for (key, held) in due {
                let still = match backend.inspect(&key.0).await {
                    Ok(Some(h)) => h
                        .holders
                        .iter()
                        .find(|l| l.fencing_token == held.fencing_token)
                        .map(|l| l.remaining),
                    Ok(None) => None,
                    // The backend is down: look again next time.
                    Err(_) => continue,
                };
                let Some(mut m) = self.map() else { return };
                match (still, m.get_mut(&key)) {
                    // Renewed meanwhile, here or elsewhere.
                    (_, Some(h)) if h.until > now => {}
                    (Some(remaining), Some(h)) => h.until = Instant::now() + remaining,
                    (None, Some(_)) => {
                        m.remove(&key);
                        drop(m);
                        let took = held.until.saturating_duration_since(held.granted);
                        metrics::held(self.prefixes.of(&key.0), took, true);
                    }
                    // Released meanwhile.
                    (_, None) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_tracked_while_metrics_are_off() {
        let off = HeldLeases::new(false, Prefixes::default());
        off.granted(
            "r",
            &Token::new("t".into()),
            1,
            Instant::now(),
            Duration::from_secs(1),
        );
        assert!(off.map().is_none());
    }

    #[test]
    fn a_release_ends_the_entry_and_a_renewal_moves_its_end() {
        let on = HeldLeases::new(true, Prefixes::default());
        let t = Token::new("t".into());
        let start = Instant::now();
        on.granted("r", &t, 7, start, Duration::from_secs(1));
        on.renewed("r", &t, start, Duration::from_secs(5));
        let until = on.map().unwrap().values().next().unwrap().until;
        assert_eq!(until, start + Duration::from_secs(5));
        on.ended("r", &t, None);
        assert_eq!(on.map().unwrap().len(), 1);
        on.ended("r", &t, Some(true));
        assert!(on.map().unwrap().is_empty());
    }
}
