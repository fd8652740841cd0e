//! The `m.login.recaptcha` stage: a client's reCAPTCHA answer, checked with the verifier
//! (`registration.recaptcha`).
//!
//! The client shows the captcha with the site key it finds in the stage's `params` and sends the
//! token the widget gave it; the server asks the verifier (Google's `siteverify`, or a service
//! with the same API) whether that token is a solved captcha, passing its secret key and the
//! client's IP.

use std::{net::IpAddr, time::Duration};

use serde::Deserialize;

use crate::config::{RecaptchaConfig, Secret};

/// The longest answer token accepted (Google's are 500 to 2,000 characters): the verifier is not
/// asked about anything larger.
const MAX_RESPONSE_BYTES: usize = 8 * 1024;

/// How long the verifier may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Recaptcha {
    http: reqwest::Client,
    url: String,
    secret: Secret,
    /// The site key clients show the captcha with.
    pub public_key: String,
    /// Whether every registration flow asks for it.
    pub required: bool,
}

/// Why an answer did not pass.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the captcha answer was not accepted")]
    Wrong,
    #[error("the captcha could not be checked: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct Verdict {
    success: bool,
}

impl Recaptcha {
    /// The verifier of the configuration, or `None` when no captcha is configured.
    pub fn from_config(config: &RecaptchaConfig) -> anyhow::Result<Option<Self>> {
        if config.public_key.is_empty() {
            return Ok(None);
        }
        let builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        let http = crate::outbound::trust_extra_ca(builder, Some(&config.extra_ca_file))
            .map_err(|e| e.context("registration.recaptcha.extra_ca_file"))?
            .build()?;
        Ok(Some(Self {
            http,
            url: config.siteverify_url.clone(),
            secret: config.private_key.clone(),
            public_key: config.public_key.clone(),
            required: config.required,
        }))
    }

    /// Asks the verifier whether `response` is a solved captcha of the client at `client_ip`.
    pub async fn verify(&self, response: &str, client_ip: IpAddr) -> Result<(), Refused> {
        if response.is_empty() || response.len() > MAX_RESPONSE_BYTES {
            return Err(Refused::Wrong);
        }
        let ip = client_ip.to_string();
        let form = [("secret", self.secret.expose()), ("response", response), ("remoteip", &ip)];
        let answer = self
            .http
            .post(&self.url)
            .form(&form)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Refused::Unavailable(e.without_url().to_string()))?;
        let verdict: Verdict = answer.json().await.map_err(|e| Refused::Unavailable(e.to_string()))?;
        match verdict.success {
            true => Ok(()),
            false => Err(Refused::Wrong),
        }
    }
}
