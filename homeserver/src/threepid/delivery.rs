//! Sending codes: email over SMTP (lettre) and SMS through a Twilio-style Messages API
//! (reqwest). Each sits behind a small trait so the server holds whichever is configured.

use std::time::Duration;

use async_trait::async_trait;
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart},
    transport::smtp::authentication::Credentials,
};

use crate::config::{EmailConfig, SmsConfig, SmtpTls};

/// Why a message could not be handed to the provider. The text is safe to show a client: it
/// never contains the message.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the address was refused: {0}")]
    Address(String),
    #[error("the mail server failed: {0}")]
    Smtp(String),
    #[error("the SMS provider failed: {0}")]
    Sms(String),
}

#[async_trait]
pub trait EmailSender: Send + Sync {
    async fn send(&self, to: &str, subject: &str, text: String, html: String) -> Result<(), DeliveryError>;
}

#[async_trait]
pub trait SmsSender: Send + Sync {
    /// `to` is E.164 with its `+`.
    async fn send(&self, to: &str, body: &str) -> Result<(), DeliveryError>;
}

pub struct SmtpSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl SmtpSender {
    pub fn new(config: &EmailConfig) -> anyhow::Result<Self> {
        let host = config.smtp_host.as_str();
        let mut builder = match config.smtp_tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)?,
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host)?,
        };
        builder = builder.port(config.smtp_port).timeout(Some(Duration::from_secs(config.timeout_secs)));
        if !config.smtp_username.is_empty() {
            builder = builder.credentials(Credentials::new(
                config.smtp_username.clone(),
                config.smtp_password.expose().to_owned(),
            ));
        }
        Ok(Self { transport: builder.build(), from: config.from.parse()? })
    }
}

#[async_trait]
impl EmailSender for SmtpSender {
    async fn send(&self, to: &str, subject: &str, text: String, html: String) -> Result<(), DeliveryError> {
        let to: Mailbox =
            to.parse().map_err(|e: lettre::address::AddressError| DeliveryError::Address(e.to_string()))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|e| DeliveryError::Smtp(e.to_string()))?;
        self.transport.send(message).await.map(drop).map_err(|e| DeliveryError::Smtp(e.to_string()))
    }
}

pub struct TwilioSender {
    http: reqwest::Client,
    url: String,
    account_sid: String,
    auth_token: String,
    from: String,
}

impl TwilioSender {
    pub fn new(config: &SmsConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(config.timeout_secs)).build()?;
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            config.base_url.trim_end_matches('/'),
            percent_encoding::utf8_percent_encode(&config.account_sid, percent_encoding::NON_ALPHANUMERIC)
        );
        Ok(Self {
            http,
            url,
            account_sid: config.account_sid.clone(),
            auth_token: config.auth_token.expose().to_owned(),
            from: config.from.clone(),
        })
    }
}

#[async_trait]
impl SmsSender for TwilioSender {
    async fn send(&self, to: &str, body: &str) -> Result<(), DeliveryError> {
        let response = self
            .http
            .post(&self.url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .form(&[("To", to), ("From", self.from.as_str()), ("Body", body)])
            .send()
            .await
            .map_err(|e| {
                DeliveryError::Sms(if e.is_timeout() {
                    "no answer in time".to_owned()
                } else {
                    "unreachable".to_owned()
                })
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Sms(format!("it answered {}", status.as_u16())))
        }
    }
}
