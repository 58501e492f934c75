//! Retrying `UNAVAILABLE` with jittered exponential backoff.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use tonic::Status;

use crate::client::Endpoints;
use crate::error::is_retryable;

/// How calls that fail with `UNAVAILABLE` are repeated.
///
/// The delay before retry *n* (counting from 0) is drawn at random between half and all of
/// `min(initial_backoff × 2ⁿ, max_backoff)` ("equal jitter"), so clients that failed together do
/// not retry together. Retrying stops at whichever comes first: `max_attempts` calls in all, or
/// the next delay ending more than `max_elapsed` after the first call started.
///
/// Only `UNAVAILABLE` is retried. Every lockd RPC is safe to repeat: `Acquire` is repeated with
/// the same client-chosen token, so a retry whose first attempt was granted (but whose reply was
/// lost) gets that same lease back instead of leaving an orphaned lock.
///
/// ```
/// use std::time::Duration;
/// use lockd_client::RetryPolicy;
///
/// let patient = RetryPolicy::default()
///     .max_attempts(20)
///     .max_elapsed(Duration::from_secs(60));
/// let impatient = RetryPolicy::none();
/// # let _ = (patient, impatient);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_elapsed: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, backoff from 100 ms doubling up to 2 s, within 15 s in all: long enough to
    /// ride out a lockd or Redis restart.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// No retries: every call is made once.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The largest number of calls, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The delay before the first retry (before jitter); it doubles with each retry.
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// The largest delay between two attempts (before jitter).
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// The time after which no new attempt is started, counted from the first attempt.
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = limit;
        self
    }

    /// The jittered delay before retry number `retry` (0 for the first retry).
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(30));
        let ceiling = self
            .initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff);
        let half = ceiling / 2;
        half + half.mul_f64(random_unit())
    }

    /// Runs `op` until it succeeds, fails with an error that is not retryable, or the policy's
    /// bounds are reached; returns the last result.
    #[cfg(test)]
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.run_observed(op, |_| {}).await
    }

    /// [`run`](Self::run) for calls to `endpoints`: after a retryable failure, the client
    /// moves on to the next endpoint.
    pub(crate) async fn run_on<T, F, Fut>(
        &self,
        endpoints: &Endpoints,
        mut op: F,
    ) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let used = std::sync::atomic::AtomicUsize::new(endpoints.current());
        let op = || {
            used.store(endpoints.current(), std::sync::atomic::Ordering::Relaxed);
            op()
        };
        self.run_observed(op, |_| {
            endpoints.failed(used.load(std::sync::atomic::Ordering::Relaxed));
        })
        .await
    }

    /// The retry loop, calling `failed` after each retryable failure.
    async fn run_observed<T, F, Fut>(
        &self,
        mut op: F,
        failed: impl Fn(&Status),
    ) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let status = match op().await {
                Ok(value) => return Ok(value),
                Err(status) => status,
            };
            if is_retryable(&status) {
                failed(&status);
            }
            attempt += 1;
            if !is_retryable(&status) || attempt >= self.max_attempts {
                return Err(status);
            }
            let delay = self.backoff(attempt - 1);
            if started.elapsed() + delay > self.max_elapsed {
                return Err(status);
            }
            tracing::debug!(attempt, ?delay, error = %status.message(), "lockd unavailable; retrying");
            sleep(delay).await;
        }
    }
}

/// A random number in `[0, 1)`, good enough for jitter: std's `RandomState` is seeded from the
/// OS once per thread and gives a different key to each instance, so no RNG crate is needed.
fn random_unit() -> f64 {
    let bits = RandomState::new().hash_one(0u8);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_up_to_the_cap_with_jitter() {
        let p = RetryPolicy::default()
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(1));
        for _ in 0..100 {
            let first = p.backoff(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = p.backoff(40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_up_to_max_attempts() {
        let p = RetryPolicy::default().max_attempts(3);
        let mut calls = 0;
        let result: Result<(), Status> = p
            .run(|| {
                calls += 1;
                async { Err(Status::unavailable("down")) }
            })
            .await;
        assert_eq!(result.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(calls, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_are_not_retried() {
        let mut calls = 0;
        let result: Result<(), Status> = RetryPolicy::default()
            .run(|| {
                calls += 1;
                async { Err(Status::invalid_argument("resource: empty")) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retrying_stops_at_max_elapsed() {
        let p = RetryPolicy::default()
            .max_attempts(1000)
            .max_elapsed(Duration::from_secs(3));
        let start = Instant::now();
        let mut calls = 0;
        let _ = p
            .run(|| {
                calls += 1;
                async { Err::<(), _>(Status::unavailable("down")) }
            })
            .await;
        assert!(start.elapsed() <= Duration::from_secs(3));
        assert!(calls > 2 && calls < 1000);
    }
}
