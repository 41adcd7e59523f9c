//! Lock-free measures the pipeline's stages record into and the progress
//! display, the summary and `/metrics` read: a histogram with power-of-two
//! buckets. Recording is two relaxed atomic additions, so a stage can
//! record every message; reading sums the buckets. Depends on nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets of a duration histogram in microseconds: the last one, past
/// 2^30 us (18 minutes, beyond any SMTP timeout), counts everything longer.
pub const DURATION_BUCKETS: usize = 32;

/// A histogram of integer values (microseconds, rows) with power-of-two
/// buckets: bucket 0 holds 0 and 1, bucket `i` holds `(2^(i-1), 2^i]`, so
/// `2^i` is the bucket's inclusive upper bound (Prometheus's `le`); the
/// last bucket also holds everything larger.
#[derive(Debug)]
pub struct Histogram<const N: usize = DURATION_BUCKETS> {
    buckets: [AtomicU64; N],
    sum: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
        }
    }
}

/// The histogram's content at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Each bucket's inclusive upper bound and count (not cumulative); the
    /// last bound is `None`: unbounded.
    pub buckets: Vec<(Option<u64>, u64)>,
    /// The sum of every value recorded.
    pub sum: u64,
    /// Values recorded.
    pub count: u64,
}

impl<const N: usize> Histogram<N> {
    /// Adds one value.
    pub fn observe(&self, v: u64) {
        let i = match v {
            0 | 1 => 0,
            v => (64 - (v - 1).leading_zeros()) as usize,
        };
        self.buckets[i.min(N - 1)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Adds one duration, in microseconds.
    pub fn record(&self, d: Duration) {
        self.observe(d.as_micros().min(u64::MAX as u128) as u64);
    }

    /// Bucket `i`'s upper bound (`None` for the last, unbounded, one).
    fn bound(i: usize) -> Option<u64> {
        (i + 1 < N).then(|| 1u64 << i)
    }

    /// The buckets, sum and count now (each read on its own: a value
    /// recorded meanwhile may show in one and not yet in another).
    pub fn snapshot(&self) -> Snapshot {
        let buckets: Vec<(Option<u64>, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (Self::bound(i), b.load(Ordering::Relaxed)))
            .collect();
        Snapshot {
            count: buckets.iter().map(|(_, c)| c).sum(),
            sum: self.sum.load(Ordering::Relaxed),
            buckets,
        }
    }

    /// The `q` quantile (0..=1) as the upper bound of its bucket (the
    /// largest bound for the last bucket); zero when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let s = self.snapshot();
        if s.count == 0 {
            return 0;
        }
        let rank = ((s.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, (_, c)) in s.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return 1u64 << i.min(N - 2);
            }
        }
        1u64 << (N - 2)
    }

    /// [`Histogram::quantile`] of a duration histogram.
    pub fn quantile_duration(&self, q: f64) -> Duration {
        Duration::from_micros(self.quantile(q))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Histogram;

    #[test]
    fn each_value_lands_in_the_bucket_whose_bound_is_the_first_not_below_it() {
        let h = Histogram::<6>::default();
        for v in [0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 1000] {
            h.observe(v);
        }
        let s = h.snapshot();
        let counts: Vec<u64> = s.buckets.iter().map(|(_, c)| *c).collect();
        // le 1: 0, 1; le 2: 2; le 4: 3, 4; le 8: 5, 8; le 16: 9, 16; rest: 17, 1000.
        assert_eq!(counts, vec![2, 1, 2, 2, 2, 2]);
        let bounds: Vec<Option<u64>> = s.buckets.iter().map(|(b, _)| *b).collect();
        assert_eq!(
            bounds,
            vec![Some(1), Some(2), Some(4), Some(8), Some(16), None]
        );
        assert_eq!(s.count, 11);
        assert_eq!(s.sum, 1065);
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = Histogram::<27>::default();
        assert_eq!(h.quantile(0.5), 0, "empty");
        for _ in 0..90 {
            h.record(Duration::from_micros(300));
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(20));
        }
        assert_eq!(h.quantile(0.5), 512);
        assert_eq!(h.quantile(0.9), 512);
        assert_eq!(h.quantile(0.99), 32_768);
        assert_eq!(h.quantile_duration(0.99), Duration::from_micros(32_768));
    }
}
