//! The services every handler reaches through `web::Data<AppState>`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use federation::signing_key::SigningKey;
use ruma::{OwnedDeviceId, OwnedServerName, OwnedUserId};

use crate::{
    auth::{
        jwt_login::JwtLogin,
        ratelimit::{Action, Rate, RateLimiter},
        tokens::{self, TokenService},
    },
    config::Config,
    storage::{Storage, stream::StreamWriter},
    threepid::{
        delivery::{EmailSender, SmsSender, SmtpSender, TwilioSender},
        templates::Templates,
    },
};

pub struct AppState {
    pub config: Config,
    /// Signs this server's events (and later its federation requests).
    pub signing_key: SigningKey,
    /// This process's writer of stream positions.
    pub stream: Arc<StreamWriter>,
    /// Typing and presence.
    pub ephemeral: crate::rooms::ephemeral::Ephemeral,
    /// Recent stream changes in memory, which `/sync` reads instead of the database.
    pub recent: crate::rooms::recent::Recent,
    /// The newest stream position announced here (this process's writes, and other workers'
    /// through [`crate::notifier`]); `/sync` long-polls wait on it.
    notifier: tokio::sync::watch::Sender<i64>,
    /// Wakes the syncs of devices whose envelopes went to a queue outside the stream.
    pub bells: crate::notifier::Bells,
    /// Publishes this process's positions to the other workers, when Redis is configured.
    pub(crate) publisher: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<crate::notifier::Update>>,
    pub server_name: OwnedServerName,
    pub store: Arc<dyn Storage>,
    /// To-device messages waiting for their devices.
    pub queue: Arc<dyn crate::queue::EnvelopeQueue>,
    /// Delivery to push gateways.
    pub push: crate::push::Push,
    pub tokens: TokenService,
    pub limiter: RateLimiter,
    /// Delivery of one-time codes, when configured.
    pub email: Option<Arc<dyn EmailSender>>,
    pub sms: Option<Arc<dyn SmsSender>>,
    pub templates: Templates,
    pub jwt_login: Option<JwtLogin>,
    /// Calls to other servers, when this one federates.
    remote: Option<crate::remote::Remote>,
    /// Sends events to other servers; set at start when this server federates.
    pub(crate) outbox: std::sync::OnceLock<crate::remote::outbox::Outbox>,
    /// The registration captcha's verifier, when one is configured.
    pub recaptcha: Option<crate::auth::recaptcha::Recaptcha>,
    /// The registered application services.
    pub appservices: crate::appservice::Appservices,
    /// Keys the HMAC that one-time codes are stored as.
    code_key: Vec<u8>,
    /// Seals the to-device cursors in sync tokens.
    pub cursors: crate::queue::CursorSeal,
    /// A fingerprint of the token secret (SHA-256 of it with a label), which every worker of a
    /// deployment compares at start (`server::check_identity`).
    pub secret_fingerprint: String,
    code_swept: Mutex<Option<Instant>>,
    uia_cleaned: Mutex<Option<Instant>>,
    last_seen: Mutex<HashMap<(OwnedUserId, OwnedDeviceId), Instant>>,
}

/// A device's "last seen" is written at most this often.
const LAST_SEEN_EVERY: Duration = Duration::from_secs(60);

impl AppState {
    pub fn new(
        config: Config,
        store: Arc<dyn Storage>,
        stream: Arc<StreamWriter>,
        queue: Arc<dyn crate::queue::EnvelopeQueue>,
    ) -> anyhow::Result<Self> {
        let server_name = OwnedServerName::try_from(config.server_name.as_str())?;
        let secret = if config.auth.token_secret.is_empty() {
            tokens::load_or_create_secret(&config.data_dir)?
        } else {
            config.auth.token_secret.expose().as_bytes().to_vec()
        };
        let tokens = TokenService::new(
            &secret,
            server_name.as_str(),
            Duration::from_secs(config.auth.access_token_lifetime_secs),
        );
        let limits = &config.rate_limits;
        let rate = |per_second, burst| Rate { per_second, burst };
        let limiter = RateLimiter::new(
            limits.enabled,
            [
                (Action::Login, rate(limits.login_per_second, limits.login_burst)),
                (Action::Register, rate(limits.register_per_second, limits.register_burst)),
                (Action::CodeFromIp, rate(limits.code_per_ip_per_second, limits.code_per_ip_burst)),
                (
                    Action::CodeToAddress,
                    rate(limits.code_per_address_per_second, limits.code_per_address_burst),
                ),
                (
                    Action::PasswordFailure,
                    rate(
                        limits.password_failures_per_account_per_second,
                        limits.password_failures_per_account_burst,
                    ),
                ),
                (
                    Action::PasswordFailureFromIp,
                    rate(limits.password_failures_per_ip_per_second, limits.password_failures_per_ip_burst),
                ),
                (Action::RoomEvent, rate(limits.events_per_second, limits.events_burst)),
                (
                    Action::FederationRequest,
                    rate(limits.federation_requests_per_second, limits.federation_requests_burst),
                ),
            ],
        );
        // With Redis, every worker spends from the same buckets.
        let limiter = match config.redis.url.is_empty() {
            true => limiter,
            false => limiter.shared_through(&config.redis.url, &config.redis.key_prefix)?,
        };
        let email: Option<Arc<dyn EmailSender>> = match config.sends_email() {
            true => Some(Arc::new(SmtpSender::new(&config.email)?)),
            false => None,
        };
        let sms: Option<Arc<dyn SmsSender>> = match config.sends_sms() {
            true => Some(Arc::new(TwilioSender::new(&config.sms)?)),
            false => None,
        };
        let templates = Templates::load(&config.email.templates_dir)
            .map_err(|e| anyhow::anyhow!("email.templates_dir: {e}"))?;
        let jwt_login = JwtLogin::from_config(&config.jwt_login)?;
        let recaptcha = crate::auth::recaptcha::Recaptcha::from_config(&config.registration.recaptcha)?;
        let remote = match config.federates() {
            true => Some(crate::remote::Remote::new(&config.federation)?),
            false => None,
        };
        let appservices = crate::appservice::Appservices::load(&config)?;
        // Derived from the token secret, so every worker of a deployment agrees on it.
        let code_key = [b"hearth one-time codes:".as_slice(), &secret].concat();
        let key_file = config.signing_key_path();
        let signing_key = SigningKey::load_or_generate(&key_file)
            .map_err(|e| anyhow::anyhow!("signing key {}: {e}", key_file.display()))?;
        let recent_changes = config.limits.recent_changes;
        let push = crate::push::Push::new(&config.push)?;
        Ok(Self {
            config,
            signing_key,
            stream,
            ephemeral: Default::default(),
            recent: crate::rooms::recent::Recent::new(recent_changes),
            notifier: tokio::sync::watch::channel(0).0,
            bells: Default::default(),
            publisher: std::sync::OnceLock::new(),
            server_name,
            store,
            queue,
            push,
            tokens,
            limiter,
            email,
            sms,
            templates,
            jwt_login,
            recaptcha,
            remote,
            outbox: std::sync::OnceLock::new(),
            appservices,
            code_key,
            cursors: crate::queue::CursorSeal::new(&secret),
            secret_fingerprint: tokens::sha256_hex(&format!(
                "hearth token secret fingerprint:{}",
                String::from_utf8_lossy(&secret)
            )),
            code_swept: Mutex::new(None),
            uia_cleaned: Mutex::new(None),
            last_seen: Mutex::new(HashMap::new()),
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

    /// The client for other servers; an error when this server does not federate.
    pub fn remote(&self) -> Result<&crate::remote::Remote, crate::remote::RemoteError> {
        self.remote.as_ref().ok_or(crate::remote::RemoteError::Disabled)
    }

    /// The queues of events for other servers, when this server federates.
    pub fn outbox(&self) -> Option<&crate::remote::outbox::Outbox> {
        self.outbox.get()
    }

    /// Whether expired UIA sessions are due to be swept (at most once a minute per process).
    pub fn uia_cleanup_due(&self) -> bool {
        once_a_minute(&self.uia_cleaned)
    }

    /// Whether stale verification sessions are due to be swept (at most once a minute).
    pub fn code_sweep_due(&self) -> bool {
        once_a_minute(&self.code_swept)
    }

    pub fn code_key(&self) -> &[u8] {
        &self.code_key
    }

    /// Tells waiting syncs that the stream reached `position`.
    pub fn notify(&self, position: i64) {
        self.announce(position);
        self.publish(crate::notifier::Update::Position { position });
    }

    /// Applies a typing or presence change here and tells the other workers.
    pub fn share(&self, update: crate::notifier::Update) {
        self.apply(&update);
        self.publish(update);
    }

    fn publish(&self, update: crate::notifier::Update) {
        if let Some(publisher) = self.publisher.get() {
            let _ = publisher.send(update);
        }
    }

    /// Applies an update (from here or another worker) and wakes the syncs waiting for it.
    pub fn apply(&self, update: &crate::notifier::Update) {
        use crate::notifier::Update;
        match update {
            Update::Position { .. } => {}
            Update::Typing { room_id, user_id, timeout_ms, position } => {
                let timeout = timeout_ms.map(Duration::from_millis);
                self.ephemeral.set_typing(room_id, user_id, timeout, *position);
            }
            Update::Presence { user_id, state, status_msg, position } => {
                self.ephemeral.set_presence(user_id, state, status_msg.clone(), *position);
            }
            Update::ToDevice { devices } => self.bells.ring(devices),
        }
        if let Some(position) = update.position() {
            self.announce(position);
        }
    }

    /// Wakes this process's waiting syncs for `position` (written here or by another worker).
    pub fn announce(&self, position: i64) {
        self.notifier.send_modify(|newest| *newest = (*newest).max(position));
    }

    /// A receiver that wakes when this process writes to the stream.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.notifier.subscribe()
    }

    /// The stream position a read serves up to, with the in-memory window loaded that far: past
    /// every write that had answered when the read began, whichever worker took it, so that a
    /// client reads its own writes (see [`crate::rooms::recent::Recent::catch_up_past_writes`]).
    pub async fn readable(&self) -> crate::error::Result<i64> {
        let mut waker = self.subscribe();
        Ok(self.recent.catch_up_past_writes(&*self.store, &mut waker).await?)
    }
}

/// True at most once a minute for one clock: housekeeping without timers.
fn once_a_minute(last: &Mutex<Option<Instant>>) -> bool {
    let now = Instant::now();
    let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match *last {
        Some(at) if now.duration_since(at) < Duration::from_secs(60) => false,
        _ => {
            *last = Some(now);
            true
        }
    }
}
