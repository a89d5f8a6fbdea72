//! Rates and quotas: at most N messages or recipients per window, per
//! principal or per client address.
//!
//! Time comes from the caller (`now`), never from the system, so limits are
//! tested by moving a [`crate::clock::ManualClock`]. The counters live in a
//! moka cache only so that idle keys are evicted and memory stays bounded;
//! moka's own clock decides nothing else.
//!
//! Windows are fixed and start at the first event counted after the
//! previous window ended: simple to explain ("100 messages, then wait until
//! an hour after the first"), and the retry hint is exact. A client can
//! therefore send up to twice the limit across a window boundary; Postfix's
//! anvil has the same property.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use moka::sync::Cache;

/// The running counters, shared by every policy generation: a reload must
/// not hand everybody a fresh quota. Cheap to clone (one cache).
#[derive(Clone)]
pub struct RateLimiter {
    cache: Cache<RateKey, Arc<Mutex<Window>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("keys", &self.cache.entry_count())
            .finish()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// One counter: which rule, whom, what, over how long.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RateKey {
    /// Empty for the top-level `rates`.
    pub rule: String,
    pub subject: Subject,
    pub kind: Kind,
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    /// Folded `DOMAIN\user`.
    Principal(String),
    Client(IpAddr),
}

impl Subject {
    /// IPv6 clients are counted by /64: a single host is normally handed a
    /// whole /64, and counting each of its 2^64 addresses apart would make
    /// a per-client limit meaningless.
    pub fn client(ip: IpAddr) -> Subject {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                Subject::Client(IpAddr::V6(bits.into()))
            }
            v4 => Subject::Client(v4),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Messages,
    Recipients,
}

/// One event to count against one limit.
#[derive(Debug, Clone)]
pub(crate) struct Charge {
    pub key: RateKey,
    pub limit: u32,
    pub cost: u32,
}

#[derive(Debug)]
struct Window {
    start: SystemTime,
    count: u64,
}

impl Window {
    fn roll(&mut self, now: SystemTime, window: Duration) {
        // A clock that moved backwards keeps the current window: the count
        // must not be forgiven by a time step.
        if now >= self.start + window {
            self.start = now;
            self.count = 0;
        }
    }
}

impl RateLimiter {
    /// Up to a million counters, each dropped after a day unused (the
    /// longest window a policy should use; see [`RateLimiter::with_capacity`]).
    pub fn new() -> Self {
        Self::with_capacity(1_000_000, Duration::from_secs(24 * 3600))
    }

    /// `idle` must be at least the longest window in the policy
    /// ([`super::Policy::longest_window`]): a counter evicted before its
    /// window ends would forgive what it counted.
    pub fn with_capacity(max_keys: u64, idle: Duration) -> Self {
        RateLimiter {
            cache: Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(idle)
                .build(),
        }
    }

    /// Counters currently held (approximate, as moka's count is).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// Counts every charge if all of them fit; otherwise counts none and
    /// returns the longest wait and the index of the charge that needs it.
    ///
    /// All counters are locked together (in address order, so two callers
    /// cannot deadlock) so that a refusal never leaves some counted.
    pub(crate) fn charge(
        &self,
        now: SystemTime,
        charges: &[Charge],
    ) -> Result<(), (Duration, usize)> {
        if charges.is_empty() {
            return Ok(());
        }
        let mut slots: Vec<(Arc<Mutex<Window>>, usize)> = charges
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let w = self.cache.get_with(c.key.clone(), || {
                    Arc::new(Mutex::new(Window {
                        start: now,
                        count: 0,
                    }))
                });
                (w, i)
            })
            .collect();
        slots.sort_by_key(|(w, _)| Arc::as_ptr(w) as usize);
        // The same limit written twice is one counter: lock it once.
        slots.dedup_by(|b, a| Arc::ptr_eq(&a.0, &b.0));
        let mut guards: Vec<(MutexGuard<'_, Window>, usize)> = slots
            .iter()
            .map(|(w, i)| (w.lock().unwrap_or_else(|e| e.into_inner()), *i))
            .collect();
        let mut worst: Option<(Duration, usize)> = None;
        for (w, i) in &mut guards {
            let c = &charges[*i];
            w.roll(now, c.key.window);
            if w.count + u64::from(c.cost) > u64::from(c.limit) {
                let wait = (w.start + c.key.window)
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO);
                if worst.is_none_or(|(longest, _)| longest < wait) {
                    worst = Some((wait, *i));
                }
            }
        }
        if let Some(w) = worst {
            return Err(w);
        }
        for (w, i) in &mut guards {
            w.count += u64::from(charges[*i].cost);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn charge(rule: &str, ip: [u8; 4], limit: u32, window: u64) -> Charge {
        Charge {
            key: RateKey {
                rule: rule.into(),
                subject: Subject::client(IpAddr::from(ip)),
                kind: Kind::Messages,
                window: Duration::from_secs(window),
            },
            limit,
            cost: 1,
        }
    }

    #[test]
    fn fixed_window_refuses_then_recovers() {
        let clock = ManualClock::default();
        let rl = RateLimiter::new();
        let c = [charge("r", [10, 0, 0, 1], 3, 60)];
        for _ in 0..3 {
            assert_eq!(rl.charge(clock.now(), &c), Ok(()));
        }
        clock.advance(Duration::from_secs(20));
        assert_eq!(
            rl.charge(clock.now(), &c),
            Err((Duration::from_secs(40), 0))
        );
        clock.advance(Duration::from_secs(40));
        assert_eq!(rl.charge(clock.now(), &c), Ok(()));
    }

    #[test]
    fn a_refusal_counts_nothing() {
        let clock = ManualClock::default();
        let rl = RateLimiter::new();
        let roomy = charge("a", [10, 0, 0, 1], 10, 60);
        let tight = charge("b", [10, 0, 0, 1], 1, 60);
        assert!(rl
            .charge(clock.now(), &[roomy.clone(), tight.clone()])
            .is_ok());
        for _ in 0..5 {
            assert_eq!(
                rl.charge(clock.now(), &[roomy.clone(), tight.clone()]),
                Err((Duration::from_secs(60), 1))
            );
        }
        // Only the first charge counted against `roomy`.
        for _ in 0..9 {
            assert!(rl.charge(clock.now(), std::slice::from_ref(&roomy)).is_ok());
        }
        assert!(rl.charge(clock.now(), &[roomy]).is_err());
    }

    #[test]
    fn duplicate_keys_do_not_deadlock() {
        let clock = ManualClock::default();
        let rl = RateLimiter::new();
        let c = charge("a", [10, 0, 0, 1], 2, 60);
        assert!(rl.charge(clock.now(), &[c.clone(), c.clone()]).is_ok());
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Subject::client(a), Subject::client(b));
        assert_ne!(Subject::client(a), Subject::client(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            Subject::client(mapped),
            Subject::Client("10.0.0.1".parse().unwrap())
        );
    }
}
