//! Wall-clock time as an injected dependency.
//!
//! Policy code never calls `SystemTime::now()` itself: NTLM timestamp windows,
//! lockouts and rate limits are tested by moving a [`ManualClock`] instead of
//! sleeping.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A source of wall-clock time.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The operating system's clock, for production.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to.
///
/// Setters take `&self` so one clock can sit behind an `Arc` shared by the
/// code under test and the test itself.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    pub fn set(&self, to: SystemTime) {
        *self.lock() = to;
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.lock();
        *now += by;
    }

    pub fn rewind(&self, by: Duration) {
        let mut now = self.lock();
        *now -= by;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SystemTime> {
        // A panic elsewhere while holding the lock cannot leave a SystemTime
        // half-written, so a poisoned lock is still usable.
        self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for ManualClock {
    /// Starts at a fixed, recognisable instant (2024-01-01T00:00:00Z) so test
    /// output is reproducible.
    fn default() -> Self {
        Self::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.lock()
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> SystemTime {
        (**self).now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = Arc::new(ManualClock::default());
        let shared: Arc<dyn Clock> = clock.clone();
        let t0 = shared.now();
        assert_eq!(shared.now(), t0);
        clock.advance(Duration::from_secs(90));
        assert_eq!(shared.now(), t0 + Duration::from_secs(90));
        clock.rewind(Duration::from_secs(30));
        assert_eq!(shared.now(), t0 + Duration::from_secs(60));
        clock.set(t0);
        assert_eq!(shared.now(), t0);
    }
}
