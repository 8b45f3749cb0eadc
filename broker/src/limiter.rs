//! Rate limits: [`TokenBucket`] (a connection's frames, the node's
//! handshakes) and [`KeyedLimiter`], for requests that cost the broker real
//! work before it knows who is asking (logins and registrations hash a
//! password: ~35 ms of CPU each).
//!
//! Keyed limits: one token bucket per key (a client address, a user name), rate
//! and burst per minute; an empty bucket answers `429` with `Retry-After`
//! and costs no hashing. The table of buckets is bounded
//! ([`MAX_KEYS`]): when it is full, buckets that have refilled (and so
//! carry no state worth keeping) are dropped; if all are still draining,
//! the oldest half goes (their keys start full again, which only ever
//! lets more through, never less).

use std::{collections::HashMap, hash::Hash, time::Duration};

use parking_lot::Mutex;
use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Take one token if available.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Most keys one limiter remembers.
pub const MAX_KEYS: usize = 65_536;

/// Token buckets by key.
pub struct KeyedLimiter<K> {
    per_minute: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `per_minute` requests per minute per key, with a burst of as many;
    /// 0 disables the limit.
    pub fn new(per_minute: u32) -> Self {
        KeyedLimiter {
            per_minute: per_minute as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `key`; `Err(wait)` if there is none yet.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        if self.per_minute <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let rate = self.per_minute / 60.0;
        let mut b = self.buckets.lock();
        if b.len() >= MAX_KEYS && !b.contains_key(key) {
            let full = self.per_minute;
            b.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f64() * rate < full
            });
            if b.len() >= MAX_KEYS {
                let mut ages: Vec<Instant> = b.values().map(|(_, t)| *t).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                b.retain(|_, (_, last)| *last > cut);
            }
        }
        let (tokens, last) = b.entry(key.clone()).or_insert((self.per_minute, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(self.per_minute);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.buckets.lock().len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_burst() {
        let mut b = TokenBucket::new(1.0, 3.0);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }

    #[test]
    fn burst_then_refusal_with_a_wait_per_key() {
        let l = KeyedLimiter::new(6);
        for _ in 0..6 {
            assert!(l.check(&"a").is_ok());
        }
        let wait = l.check(&"a").expect_err("empty");
        assert!(
            wait <= Duration::from_secs(10) && wait > Duration::from_secs(9),
            "{wait:?}"
        );
        assert!(l.check(&"b").is_ok(), "keys are independent");
        let off = KeyedLimiter::new(0);
        assert!((0..1000).all(|_| off.check(&"a").is_ok()));
    }

    #[test]
    fn the_table_stays_bounded() {
        let l = KeyedLimiter::new(10);
        for k in 0..(MAX_KEYS + 10) {
            let _ = l.check(&k);
        }
        assert!(l.len() <= MAX_KEYS);
    }
}
