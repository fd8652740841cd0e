//! Token buckets for what invites abuse: logins and registrations per client IP, one-time codes
//! per IP and per address, password failures per account and per IP, room events per user.
//!
//! Most actions take a token per request ([`RateLimiter::check`]). Some count only outcomes:
//! a password check takes its tokens before the hash is compared and gives them back when the
//! password was right ([`RateLimiter::password_attempt`]), so only failures count and concurrent
//! guesses cannot slip past; a registration is refused while its budget is empty but charged
//! only when it completes or fails ([`RateLimiter::peek`], [`RateLimiter::charge`]), not for each
//! round trip of its User-Interactive Auth.
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
    /// Wrong passwords (login or UIA) for one account.
    PasswordFailure,
    /// Wrong passwords (login or UIA) from one client IP.
    PasswordFailureFromIp,
    /// Room events, typing and presence one user sends.
    RoomEvent,
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
        self.update(action, key, |tokens| {
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// Says how long to wait if the bucket of `key` is empty, without taking from it.
    pub fn peek(&self, action: Action, key: &str) -> Result<()> {
        self.update(action, key, |tokens| *tokens >= 1.0)
    }

    /// Takes one from the bucket of `key` even if that leaves it in debt (at most one burst
    /// deep): for outcomes counted after the fact, where requests running at once all passed
    /// [`RateLimiter::peek`] and each must still pay.
    pub fn charge(&self, action: Action, key: &str) {
        let Some(burst) = self.rate(action).map(|r| f64::from(r.burst)) else { return };
        let _ = self.update(action, key, |tokens| {
            *tokens = (*tokens - 1.0).max(-burst);
            true
        });
    }

    /// Starts a password check: takes one failure from the account's budget (when there is an
    /// account) and from the client IP's, or refuses with 429 while either is empty, even a
    /// right password. [`PasswordAttempt::succeeded`] gives them back.
    pub fn password_attempt(&self, account: Option<&str>, ip: IpAddr) -> Result<PasswordAttempt<'_>> {
        let mut taken = Vec::new();
        let keys = account
            .map(|a| (Action::PasswordFailure, a.to_owned()))
            .into_iter()
            .chain([(Action::PasswordFailureFromIp, ip.to_string())]);
        for (action, key) in keys {
            if let Err(e) = self.check(action, &key) {
                PasswordAttempt { limiter: self, taken }.succeeded();
                return Err(e);
            }
            taken.push((action, key));
        }
        Ok(PasswordAttempt { limiter: self, taken })
    }

    fn rate(&self, action: Action) -> Option<&Rate> {
        self.rates.get(&action).filter(|_| self.enabled)
    }

    /// Refills the bucket of `key` and lets `take` spend from it; `take` answering false means
    /// the request must wait for the bucket to reach one token.
    fn update(&self, action: Action, key: &str, take: impl FnOnce(&mut f64) -> bool) -> Result<()> {
        let Some(rate) = self.rate(action) else {
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
        if take(&mut bucket.tokens) {
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / rate.per_second;
            Err(Error::limit_exceeded(Duration::from_secs_f64(wait.max(0.001))))
        }
    }

    fn refund(&self, action: Action, key: &str) {
        let Some(burst) = self.rate(action).map(|r| f64::from(r.burst)) else { return };
        let _ = self.update(action, key, |tokens| {
            *tokens = (*tokens + 1.0).min(burst);
            true
        });
    }
}

/// A password check under way, holding one failure of its account's and IP's budgets.
#[must_use = "a right password must give the failure back"]
pub struct PasswordAttempt<'a> {
    limiter: &'a RateLimiter,
    taken: Vec<(Action, String)>,
}

impl PasswordAttempt<'_> {
    /// The password was right: nothing is counted.
    pub fn succeeded(self) {
        for (action, key) in &self.taken {
            self.limiter.refund(*action, key);
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

    #[test]
    fn only_failed_passwords_count() {
        let slow = Rate { per_second: 0.001, burst: 2 };
        let limiter =
            RateLimiter::new(true, [(Action::PasswordFailure, slow), (Action::PasswordFailureFromIp, slow)]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..5 {
            limiter.password_attempt(Some("@a:x"), ip).unwrap().succeeded();
        }
        let _failed = limiter.password_attempt(Some("@a:x"), ip).unwrap();
        let _failed = limiter.password_attempt(Some("@a:x"), ip).unwrap();
        assert!(limiter.password_attempt(Some("@a:x"), ip).is_err(), "locked, even for the right password");
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(limiter.password_attempt(Some("@a:x"), other).is_err(), "the account is locked from any IP");
        assert!(limiter.password_attempt(Some("@b:x"), ip).is_err(), "the IP is locked for any account");
        limiter.password_attempt(Some("@b:x"), other).unwrap().succeeded();
    }

    #[test]
    fn peek_then_charge_counts_outcomes() {
        let limiter = RateLimiter::new(true, [(Action::Register, Rate { per_second: 0.001, burst: 2 })]);
        for _ in 0..10 {
            limiter.peek(Action::Register, "ip").unwrap();
        }
        limiter.charge(Action::Register, "ip");
        limiter.charge(Action::Register, "ip");
        limiter.charge(Action::Register, "ip");
        assert!(limiter.peek(Action::Register, "ip").is_err());
    }
}
