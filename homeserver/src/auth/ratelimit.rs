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
//! With Redis configured the buckets live there, shared by every worker of the deployment, so
//! the limits hold for the whole deployment (one Lua script refills and spends a bucket in one
//! atomic step, on Redis's clock). Without it, or while Redis is out of reach, they live in the
//! process: a worker that cannot reach Redis still limits, by its own share.

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
    /// Requests one other server makes of the federation API.
    FederationRequest,
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

/// What a request does to a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spend {
    /// Take a token, or wait.
    Take,
    /// Wait if there is no token, take nothing.
    Peek,
    /// Take a token even into debt (at most one burst deep).
    Charge,
    /// Give a token back.
    Refund,
}

impl Spend {
    fn name(self) -> &'static str {
        match self {
            Self::Take => "take",
            Self::Peek => "peek",
            Self::Charge => "charge",
            Self::Refund => "refund",
        }
    }
}

/// Refills bucket `KEYS[1]` at `ARGV[1]` tokens a second up to `ARGV[2]`, applies spend
/// `ARGV[3]`, and answers -1 (go ahead) or the milliseconds to wait. Idle buckets expire once
/// full again.
const BUCKET_SCRIPT: &str = r"
local rate, burst, spend = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(b[1]) or burst
local updated = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) / 1000 * rate)
local ok = true
if spend == 'take' then
    if tokens >= 1 then tokens = tokens - 1 else ok = false end
elseif spend == 'peek' then
    ok = tokens >= 1
elseif spend == 'charge' then
    tokens = math.max(tokens - 1, -burst)
else
    tokens = math.min(tokens + 1, burst)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if ok then return -1 end
return math.ceil((1 - tokens) / rate * 1000)
";

/// The buckets of every worker, in Redis.
struct SharedBuckets {
    client: redis::Client,
    connection: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    script: redis::Script,
    prefix: String,
}

impl std::fmt::Debug for SharedBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuckets").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SharedBuckets {
    /// Spends from the shared bucket: `Ok(None)` to go ahead, `Ok(Some(wait))` to wait.
    async fn spend(
        &self,
        action: Action,
        key: &str,
        rate: Rate,
        spend: Spend,
    ) -> redis::RedisResult<Option<Duration>> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(Duration::from_secs(1)))
                    .set_number_of_retries(1);
                redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        let mut connection = connection.clone();
        let wait: i64 = self
            .script
            .key(format!("{}:ratelimit:{action:?}:{key}", self.prefix))
            .arg(rate.per_second)
            .arg(rate.burst)
            .arg(spend.name())
            .invoke_async(&mut connection)
            .await?;
        Ok(u64::try_from(wait).ok().map(Duration::from_millis))
    }
}

#[derive(Debug)]
pub struct RateLimiter {
    enabled: bool,
    rates: HashMap<Action, Rate>,
    /// This process's buckets: all of them without Redis, and the fallback while it is away.
    buckets: Mutex<HashMap<(Action, String), Bucket>>,
    shared: Option<SharedBuckets>,
}

/// Buckets above this count trigger a sweep of full (idle) ones, bounding memory.
const SWEEP_AT: usize = 100_000;

impl RateLimiter {
    pub fn new(enabled: bool, rates: impl IntoIterator<Item = (Action, Rate)>) -> Self {
        Self {
            enabled,
            rates: rates.into_iter().collect(),
            buckets: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// Keeps the buckets in Redis (under `prefix`), shared by every worker.
    pub fn shared_through(mut self, redis_url: &str, prefix: &str) -> anyhow::Result<Self> {
        self.shared = Some(SharedBuckets {
            client: redis::Client::open(redis_url)?,
            connection: tokio::sync::OnceCell::new(),
            script: redis::Script::new(BUCKET_SCRIPT),
            prefix: prefix.to_owned(),
        });
        Ok(self)
    }

    /// Takes one request from the client IP's bucket, or says how long to wait.
    pub async fn check_ip(&self, action: Action, ip: IpAddr) -> Result<()> {
        self.check(action, &ip.to_string()).await
    }

    /// Takes one request from the bucket of `key` (an IP, an address), or says how long to wait.
    pub async fn check(&self, action: Action, key: &str) -> Result<()> {
        self.update(action, key, Spend::Take).await
    }

    /// Takes one request from the bucket of the user making it, unless they are exempt (an
    /// application service, see [`super::AuthedUser::exempt_from_rate_limits`]).
    pub async fn check_user(&self, action: Action, user: &super::AuthedUser) -> Result<()> {
        if user.exempt_from_rate_limits() {
            return Ok(());
        }
        self.check(action, user.user_id.as_str()).await
    }

    /// Says how long to wait if the bucket of `key` is empty, without taking from it.
    pub async fn peek(&self, action: Action, key: &str) -> Result<()> {
        self.update(action, key, Spend::Peek).await
    }

    /// Takes one from the bucket of `key` even if that leaves it in debt (at most one burst
    /// deep): for outcomes counted after the fact, where requests running at once all passed
    /// [`RateLimiter::peek`] and each must still pay.
    pub async fn charge(&self, action: Action, key: &str) {
        let _ = self.update(action, key, Spend::Charge).await;
    }

    /// Starts a password check: takes one failure from the account's budget (when there is an
    /// account) and from the client IP's, or refuses with 429 while either is empty, even a
    /// right password. [`PasswordAttempt::succeeded`] gives them back.
    pub async fn password_attempt(&self, account: Option<&str>, ip: IpAddr) -> Result<PasswordAttempt<'_>> {
        let mut taken = Vec::new();
        let keys = account
            .map(|a| (Action::PasswordFailure, a.to_owned()))
            .into_iter()
            .chain([(Action::PasswordFailureFromIp, ip.to_string())]);
        for (action, key) in keys {
            if let Err(e) = self.check(action, &key).await {
                PasswordAttempt { limiter: self, taken }.succeeded().await;
                return Err(e);
            }
            taken.push((action, key));
        }
        Ok(PasswordAttempt { limiter: self, taken })
    }

    fn rate(&self, action: Action) -> Option<Rate> {
        self.rates.get(&action).filter(|_| self.enabled).copied()
    }

    /// Refills the bucket of `key` and spends from it: in Redis when shared (in the process
    /// while Redis is out of reach).
    async fn update(&self, action: Action, key: &str, spend: Spend) -> Result<()> {
        let Some(rate) = self.rate(action) else {
            return Ok(());
        };
        if let Some(shared) = &self.shared {
            match shared.spend(action, key, rate, spend).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => return Err(Error::limit_exceeded(wait.max(Duration::from_millis(1)))),
                Err(error) => {
                    tracing::warn!(%error, "rate limits: Redis is out of reach, limiting in this process")
                }
            }
        }
        self.update_local(action, key, rate, spend)
    }

    fn update_local(&self, action: Action, key: &str, rate: Rate, spend: Spend) -> Result<()> {
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
        let tokens = &mut bucket.tokens;
        let go = match spend {
            Spend::Take if *tokens >= 1.0 => {
                *tokens -= 1.0;
                true
            }
            Spend::Take => false,
            Spend::Peek => *tokens >= 1.0,
            Spend::Charge => {
                *tokens = (*tokens - 1.0).max(-burst);
                true
            }
            Spend::Refund => {
                *tokens = (*tokens + 1.0).min(burst);
                true
            }
        };
        if go {
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / rate.per_second;
            Err(Error::limit_exceeded(Duration::from_secs_f64(wait.max(0.001))))
        }
    }

    async fn refund(&self, action: Action, key: &str) {
        let _ = self.update(action, key, Spend::Refund).await;
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
    pub async fn succeeded(self) {
        for (action, key) in &self.taken {
            self.limiter.refund(*action, key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn burst_then_limited_per_ip() {
        let limiter = RateLimiter::new(true, [(Action::Login, Rate { per_second: 0.001, burst: 2 })]);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(limiter.check_ip(Action::Login, a).await.is_ok());
        assert!(limiter.check_ip(Action::Login, a).await.is_ok());
        assert!(limiter.check_ip(Action::Login, a).await.is_err());
        assert!(limiter.check_ip(Action::Login, b).await.is_ok(), "another IP has its own bucket");
        assert!(limiter.check_ip(Action::Register, a).await.is_ok(), "unconfigured actions are not limited");
        let off = RateLimiter::new(false, [(Action::Login, Rate { per_second: 0.001, burst: 1 })]);
        for _ in 0..5 {
            assert!(off.check_ip(Action::Login, a).await.is_ok());
        }
    }

    #[tokio::test]
    async fn only_failed_passwords_count() {
        let slow = Rate { per_second: 0.001, burst: 2 };
        let limiter =
            RateLimiter::new(true, [(Action::PasswordFailure, slow), (Action::PasswordFailureFromIp, slow)]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..5 {
            limiter.password_attempt(Some("@a:x"), ip).await.unwrap().succeeded().await;
        }
        let _failed = limiter.password_attempt(Some("@a:x"), ip).await.unwrap();
        let _failed = limiter.password_attempt(Some("@a:x"), ip).await.unwrap();
        assert!(
            limiter.password_attempt(Some("@a:x"), ip).await.is_err(),
            "locked, even for the right password"
        );
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(
            limiter.password_attempt(Some("@a:x"), other).await.is_err(),
            "the account is locked from any IP"
        );
        assert!(
            limiter.password_attempt(Some("@b:x"), ip).await.is_err(),
            "the IP is locked for any account"
        );
        limiter.password_attempt(Some("@b:x"), other).await.unwrap().succeeded().await;
    }

    #[tokio::test]
    async fn peek_then_charge_counts_outcomes() {
        let limiter = RateLimiter::new(true, [(Action::Register, Rate { per_second: 0.001, burst: 2 })]);
        for _ in 0..10 {
            limiter.peek(Action::Register, "ip").await.unwrap();
        }
        limiter.charge(Action::Register, "ip").await;
        limiter.charge(Action::Register, "ip").await;
        limiter.charge(Action::Register, "ip").await;
        assert!(limiter.peek(Action::Register, "ip").await.is_err());
    }
}
