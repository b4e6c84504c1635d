//! Recording what a measurement saw: HDR latency histograms (one per worker, so
//! recording never contends), success, error and unexpected-status counters, and
//! the once-a-second progress line on stderr.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency a histogram holds (longer ones are clamped to it).
pub const MAX_LATENCY_US: u64 = 120_000_000;

/// An empty latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

/// Records one latency, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// Latency percentiles of a measurement, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// How many latencies these figures summarise.
    pub samples: u64,
}

impl Latency {
    /// The percentiles of a histogram of microseconds; `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            samples: h.len(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the workers of one measurement share with its controller.
pub struct Recorder {
    /// One interval histogram per worker; the controller drains them each second.
    slots: Vec<Mutex<Histogram<u64>>>,
    ok: AtomicU64,
    errors: AtomicU64,
    unexpected: Mutex<BTreeMap<u16, u64>>,
    measuring: AtomicBool,
}

impl Recorder {
    /// A recorder for `workers` workers, not yet measuring.
    pub fn new(workers: usize) -> Self {
        Self {
            slots: (0..workers.max(1))
                .map(|_| Mutex::new(histogram()))
                .collect(),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            unexpected: Mutex::new(BTreeMap::new()),
            measuring: AtomicBool::new(false),
        }
    }

    /// Whether results count now (false during warm-up and after the end).
    pub fn is_measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    /// Starts or stops counting.
    pub fn set_measuring(&self, on: bool) {
        self.measuring.store(on, Ordering::Relaxed);
    }

    /// A request answered as expected, after `latency`; kept only if `measured`.
    pub fn success(&self, worker: usize, latency: Duration, measured: bool) {
        if measured {
            self.ok.fetch_add(1, Ordering::Relaxed);
            record(&mut lock(&self.slots[worker % self.slots.len()]), latency);
        }
    }

    /// A request answered with another status than expected.
    pub fn unexpected(&self, status: u16, measured: bool) {
        if measured {
            *lock(&self.unexpected).entry(status).or_default() += 1;
        }
    }

    /// A request that got no answer (connection error, timeout).
    pub fn error(&self, measured: bool) {
        if measured {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Successes counted so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Errors counted so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Unexpected statuses counted so far, by status.
    pub fn unexpected_counts(&self) -> BTreeMap<u16, u64> {
        lock(&self.unexpected).clone()
    }

    /// Everything recorded since the last drain, merged; the workers' slots are
    /// emptied.
    pub fn drain(&self) -> Histogram<u64> {
        let mut merged = histogram();
        for slot in &self.slots {
            let mut h = lock(slot);
            // Same bounds everywhere: adding cannot fail.
            let _ = merged.add(&*h);
            h.reset();
        }
        merged
    }
}

/// The once-a-second progress line of a measurement, on stderr.
pub struct Progress {
    label: String,
    last_ok: u64,
    last_errors: u64,
    last_other: u64,
}

impl Progress {
    /// Progress of the measurement called `label`.
    pub fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            last_ok: 0,
            last_errors: 0,
            last_other: 0,
        }
    }

    /// Prints one line: the rates since the last line and the interval's latency.
    pub fn line(
        &mut self,
        elapsed: Duration,
        phase: &str,
        rec: &Recorder,
        interval: &Histogram<u64>,
        extra: &str,
    ) {
        let ok = rec.ok();
        let errors = rec.errors();
        let other: u64 = rec.unexpected_counts().values().sum();
        let latency = Latency::of(interval).map_or_else(String::new, |l| {
            format!(
                "  p50 {:.2} ms  p99 {:.2} ms  max {:.1} ms",
                l.p50_ms, l.p99_ms, l.max_ms
            )
        });
        eprintln!(
            "[{}] {:>5.1}s {phase:<8} {:>8}/s{latency}  errors {}  other {}{extra}",
            self.label,
            elapsed.as_secs_f64(),
            ok - self.last_ok,
            errors - self.last_errors,
            other - self.last_other,
        );
        self.last_ok = ok;
        self.last_errors = errors;
        self.last_other = other;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds() {
        let rec = Recorder::new(2);
        for i in 1..=1000u64 {
            rec.success((i % 2) as usize, Duration::from_micros(i * 10), true);
        }
        rec.success(0, Duration::from_secs(1), false);
        let h = rec.drain();
        let l = Latency::of(&h).unwrap();
        assert_eq!(l.samples, 1000);
        assert!((l.p50_ms - 5.0).abs() < 0.01, "{l:?}");
        assert!((l.p99_ms - 9.9).abs() < 0.01, "{l:?}");
        assert!(l.max_ms < 10.01, "unmeasured samples are not kept");
        assert!(Latency::of(&rec.drain()).is_none(), "drained");
    }

    #[test]
    fn huge_latencies_are_clamped_not_lost() {
        let mut h = histogram();
        record(&mut h, Duration::from_secs(3600));
        assert_eq!(h.len(), 1);
    }
}
