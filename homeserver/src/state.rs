//! The services every handler reaches through `web::Data<AppState>`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{OwnedDeviceId, OwnedServerName, OwnedUserId};

use crate::{
    auth::{
        ratelimit::{Action, Rate, RateLimiter},
        tokens::{self, TokenService},
    },
    config::Config,
    storage::Storage,
};

pub struct AppState {
    pub config: Config,
    pub server_name: OwnedServerName,
    pub store: Arc<dyn Storage>,
    pub tokens: TokenService,
    pub limiter: RateLimiter,
    last_seen: Mutex<HashMap<(OwnedUserId, OwnedDeviceId), Instant>>,
    uia_cleaned: Mutex<Option<Instant>>,
}

/// A device's "last seen" is written at most this often.
const LAST_SEEN_EVERY: Duration = Duration::from_secs(60);

impl AppState {
    pub fn new(config: Config, store: Arc<dyn Storage>) -> anyhow::Result<Self> {
        let server_name = OwnedServerName::try_from(config.server_name.as_str())?;
        let secret = if config.auth.token_secret.is_empty() {
            tokens::load_or_create_secret(&config.data_dir)?
        } else {
            config.auth.token_secret.as_bytes().to_vec()
        };
        let tokens = TokenService::new(
            &secret,
            server_name.as_str(),
            Duration::from_secs(config.auth.access_token_lifetime_secs),
        );
        let limits = &config.rate_limits;
        let limiter = RateLimiter::new(
            limits.enabled,
            [
                (Action::Login, Rate { per_second: limits.login_per_second, burst: limits.login_burst }),
                (
                    Action::Register,
                    Rate { per_second: limits.register_per_second, burst: limits.register_burst },
                ),
            ],
        );
        Ok(Self {
            config,
            server_name,
            store,
            tokens,
            limiter,
            last_seen: Mutex::new(HashMap::new()),
            uia_cleaned: Mutex::new(None),
        })
    }

    /// Whether the device's last-seen record is due for a write (and, if so, marks it written).
    pub fn last_seen_due(&self, user_id: &OwnedUserId, device_id: &OwnedDeviceId) -> bool {
        let now = Instant::now();
        let mut seen = self.last_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() > 100_000 {
            seen.retain(|_, at| now.duration_since(*at) < LAST_SEEN_EVERY);
        }
        match seen.get(&(user_id.clone(), device_id.clone())) {
            Some(at) if now.duration_since(*at) < LAST_SEEN_EVERY => false,
            _ => {
                seen.insert((user_id.clone(), device_id.clone()), now);
                true
            }
        }
    }

    /// Whether expired UIA sessions are due to be swept (at most once a minute per process).
    pub fn uia_cleanup_due(&self) -> bool {
        let now = Instant::now();
        let mut last = self.uia_cleaned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some(at) if now.duration_since(at) < Duration::from_secs(60) => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}
