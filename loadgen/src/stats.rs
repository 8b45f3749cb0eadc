//! Latency histograms (hdrhistogram, 3 significant figures, microseconds)
//! and the percentile summary every report uses.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest trackable latency: 10 minutes in microseconds.
const MAX_US: u64 = 600_000_000;

/// A new latency histogram in microseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid")
}

/// Record a latency in nanoseconds (clamped into range).
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    let _ = h.record((ns / 1_000).clamp(1, MAX_US));
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// 99.99th percentile.
    pub p9999: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Summarise a microsecond histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            p9999: ms(h.value_at_quantile(0.9999)),
            max: ms(h.max()),
        }
    }

    /// One table row.
    pub fn row(&self, label: &str) -> String {
        format!(
            "{label:<22} {:>9} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>9.3}",
            self.count, self.p50, self.p90, self.p99, self.p999, self.p9999, self.max
        )
    }

    /// Table header matching [`Percentiles::row`].
    pub fn header() -> String {
        format!(
            "{:<22} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
        )
    }
}

/// The histogram itself, as (value in µs, count) pairs of every recorded
/// bucket: enough to merge runs or recompute any percentile later.
pub fn raw(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Rebuild a histogram from [`raw`] pairs.
pub fn from_raw(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = histogram();
    for &(v, n) in pairs {
        let _ = h.record_n(v.clamp(1, MAX_US), n);
    }
    h
}

/// Percentile curve points (percentile, ms) for plotting.
pub fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut pts = Vec::new();
    if h.is_empty() {
        return pts;
    }
    for q in [
        0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0,
    ] {
        pts.push((q * 100.0, h.value_at_quantile(q) as f64 / 1000.0));
    }
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trips() {
        let mut h = histogram();
        for i in 1..=5000u64 {
            record_ns(&mut h, i * 7_000);
        }
        let back = from_raw(&raw(&h));
        assert_eq!(Percentiles::of(&back), Percentiles::of(&h));
    }

    #[test]
    fn percentiles_in_ms() {
        let mut h = histogram();
        for i in 1..=1000u64 {
            record_ns(&mut h, i * 1_000_000);
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max - 1000.0).abs() < 1.0, "{p:?}");
    }
}
