//! Latency recording: one HdrHistogram per RPC and per worker, merged at the end of a run.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded exactly: one minute, in nanoseconds. Longer ones saturate.
const HIGHEST_NS: u64 = 60_000_000_000;

/// An empty histogram of nanoseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    #[allow(
        clippy::expect_used,
        reason = "constant bounds: low 1 >= 1, high >= 2 * low, 3 significant digits <= 5"
    )]
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("valid histogram bounds")
}

/// Adds `from` into `into`. Both come from [`histogram`], so the ranges always match.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    #[allow(
        clippy::expect_used,
        reason = "both histograms have the same constant bounds, so adding cannot overflow them"
    )]
    into.add(from).expect("histograms with equal bounds");
}

/// Records `d` in `h`, saturating at one minute.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
}

/// What one worker (or a whole run, once merged) measured.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Latency per RPC name (`acquire`, `release`, ...) and of a whole operation (`op`).
    pub latency: BTreeMap<&'static str, Histogram<u64>>,
    /// Failed calls per RPC name.
    pub errors: BTreeMap<&'static str, u64>,
    /// The first failure seen, to print.
    pub first_error: Option<String>,
    /// Replies that were not what the scenario expects (an uncontended lock found held).
    pub unexpected: u64,
}

impl Recorder {
    /// Records a latency of `d` for `rpc`.
    pub fn latency(&mut self, rpc: &'static str, d: Duration) {
        record(self.latency.entry(rpc).or_insert_with(histogram), d);
    }

    /// Counts a failure of `rpc`.
    pub fn error(&mut self, rpc: &'static str, e: &crate::error::Error) {
        *self.errors.entry(rpc).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{rpc}: {e}"));
        }
    }

    /// Adds another worker's measurements.
    pub fn merge(&mut self, other: Self) {
        for (rpc, h) in other.latency {
            merge(self.latency.entry(rpc).or_insert_with(histogram), &h);
        }
        for (rpc, n) in other.errors {
            *self.errors.entry(rpc).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.unexpected += other.unexpected;
    }

    /// The number of measured calls of `rpc`.
    pub fn count(&self, rpc: &str) -> u64 {
        self.latency.get(rpc).map_or(0, Histogram::len)
    }

    /// All errors, every RPC together.
    pub fn total_errors(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Summaries of every RPC, with rates over `elapsed`.
    pub fn summaries(&self, elapsed: Duration) -> Vec<Latency> {
        self.latency
            .iter()
            .map(|(rpc, h)| Latency::of(rpc, h, elapsed))
            .collect()
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// The RPC (`acquire`, `release`, `is_locked`, `get_owner`), `op` for a whole operation, or
    /// the name of a derived measurement (`handoff_gap`).
    pub name: String,
    /// Number of samples.
    pub count: u64,
    /// Samples per second of measured time.
    pub per_second: f64,
    /// Median, in microseconds.
    pub p50_us: f64,
    /// 90th percentile, in microseconds.
    pub p90_us: f64,
    /// 99th percentile, in microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, in microseconds.
    pub p999_us: f64,
    /// Largest sample, in microseconds.
    pub max_us: f64,
    /// Mean, in microseconds.
    pub mean_us: f64,
}

impl Latency {
    /// Summarizes `h` (nanoseconds) under `name`.
    pub fn of(name: &str, h: &Histogram<u64>, elapsed: Duration) -> Self {
        let us = |ns: u64| ns as f64 / 1_000.0;
        let secs = elapsed.as_secs_f64();
        Self {
            name: name.to_owned(),
            count: h.len(),
            per_second: if secs > 0.0 {
                h.len() as f64 / secs
            } else {
                0.0
            },
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1_000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_recorders_add_up() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        a.latency("acquire", Duration::from_micros(100));
        b.latency("acquire", Duration::from_micros(300));
        b.latency("release", Duration::from_micros(50));
        a.merge(b);
        assert_eq!(a.count("acquire"), 2);
        assert_eq!(a.count("release"), 1);
        let s = Latency::of("acquire", &a.latency["acquire"], Duration::from_secs(2));
        assert!((s.per_second - 1.0).abs() < 1e-9);
        assert!((s.max_us - 300.0).abs() < 1.0, "{}", s.max_us);
    }
}
