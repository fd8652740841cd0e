//! Token buckets for what invites abuse: logins and registrations per client IP, one-time codes
//! per IP and per address.
//!
//! The buckets live in the process; with several workers each enforces its own share, which
//! bounds abuse by (workers × limit). A shared Redis-backed limiter comes with the queue work.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Login,
    Register,
    /// Codes a client IP has sent.
    CodeFromIp,
    /// Codes sent to one address.
    CodeToAddress,
}

#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    enabled: bool,
    rates: HashMap<Action, Rate>,
    buckets: Mutex<HashMap<(Action, String), Bucket>>,
}

/// Buckets above this count trigger a sweep of full (idle) ones, bounding memory.
const SWEEP_AT: usize = 100_000;

impl RateLimiter {
    pub fn new(enabled: bool, rates: impl IntoIterator<Item = (Action, Rate)>) -> Self {
        Self { enabled, rates: rates.into_iter().collect(), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from the client IP's bucket, or says how long to wait.
    pub fn check_ip(&self, action: Action, ip: IpAddr) -> Result<()> {
        self.check(action, &ip.to_string())
    }

    /// Takes one request from the bucket of `key` (an IP, an address), or says how long to wait.
    pub fn check(&self, action: Action, key: &str) -> Result<()> {
        let Some(rate) = self.rates.get(&action).filter(|_| self.enabled) else {
            return Ok(());
        };
        let now = Instant::now();
        let burst = f64::from(rate.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|(a, _), b| {
                let per_second = self.rates.get(a).map_or(1.0, |r| r.per_second);
                b.tokens + now.duration_since(b.updated).as_secs_f64() * per_second < burst
            });
        }
        let bucket =
            buckets.entry((action, key.to_owned())).or_insert(Bucket { tokens: burst, updated: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.updated).as_secs_f64() * rate.per_second).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / rate.per_second;
            Err(Error::limit_exceeded(Duration::from_secs_f64(wait.max(0.001))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_limited_per_ip() {
        let limiter = RateLimiter::new(true, [(Action::Login, Rate { per_second: 0.001, burst: 2 })]);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(limiter.check_ip(Action::Login, a).is_ok());
        assert!(limiter.check_ip(Action::Login, a).is_ok());
        assert!(limiter.check_ip(Action::Login, a).is_err());
        assert!(limiter.check_ip(Action::Login, b).is_ok(), "another IP has its own bucket");
        assert!(limiter.check_ip(Action::Register, a).is_ok(), "unconfigured actions are not limited");
        let off = RateLimiter::new(false, [(Action::Login, Rate { per_second: 0.001, burst: 1 })]);
        for _ in 0..5 {
            assert!(off.check_ip(Action::Login, a).is_ok());
        }
    }
}
