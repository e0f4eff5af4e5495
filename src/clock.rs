//! Time as the rest of the code sees it: an injectable clock, so that tests of timeouts
//! and backoff move time forward by hand instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A point in time (microseconds since the Unix epoch, UTC). Defined with the wire
/// protocol, since every timestamp the server sends is one; re-exported here because the
/// clock is where the rest of the server gets it.
pub use morag_jobs_client::wire::Timestamp;

/// Where the current time comes from.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The real wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that only moves when a test says so. Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    micros: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            micros: Arc::new(AtomicI64::new(start.as_micros())),
        }
    }

    /// Starts at the real current time, so timestamps in responses look plausible.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now())
    }

    pub fn advance(&self, duration: Duration) {
        self.micros
            .fetch_add(duration.as_micros() as i64, Ordering::SeqCst);
    }

    pub fn set(&self, time: Timestamp) {
        self.micros.store(time.as_micros(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.micros.load(Ordering::SeqCst))
    }
}

pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_microseconds() {
        let t = Timestamp::from_micros(1_796_000_000_123_456);
        let text = t.to_rfc3339();
        assert!(text.ends_with('Z'), "{text}");
        assert_eq!(Timestamp::parse_rfc3339(&text), Some(t));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(Timestamp::from_micros(0));
        assert_eq!(clock.now(), Timestamp::from_micros(0));
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.clone().now(), Timestamp::from_micros(2_000_000));
    }

    #[test]
    fn since_never_goes_negative() {
        let a = Timestamp::from_micros(10);
        let b = Timestamp::from_micros(20);
        assert_eq!(b.since(a), Duration::from_micros(10));
        assert_eq!(a.since(b), Duration::ZERO);
    }
}
