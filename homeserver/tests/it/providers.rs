//! The outside services one-time codes travel through, run for real on loopback:
//! - [`SmtpSink`]: aiosmtpd (a real SMTP server from PyPI) storing what it receives;
//! - [`SmsProvider`]: a Twilio-style Messages API endpoint that checks what Hearth sends (Basic
//!   auth, form fields, E.164) and records it. It stands in for a paid service.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine;
use homeserver::config::{Config, Secret, SmtpTls};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::interop::{python, workspace_root};

pub struct SmtpSink {
    pub port: u16,
    dir: PathBuf,
    _child: Child,
}

impl SmtpSink {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hearth-smtp-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(python())
            .arg(workspace_root().join("interop/smtp_sink.py"))
            .arg(&dir)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the SMTP sink");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(20), BufReader::new(stdout).read_line(&mut line))
            .await
            .expect("SMTP sink started in time")
            .unwrap();
        let port = line.trim().parse().expect("SMTP sink port");
        Self { port, dir, _child: child }
    }

    /// Points Hearth's email settings at this server (plain SMTP on loopback).
    pub fn configure(&self, config: &mut Config) {
        config.email.smtp_host = "127.0.0.1".to_owned();
        config.email.smtp_port = self.port;
        config.email.smtp_tls = SmtpTls::None;
        config.email.from = "Hearth Test <noreply@hearth.test>".to_owned();
        config.email.timeout_secs = 5;
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<Value> {
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names.iter().map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()).collect()
    }

    /// Waits for message number `n` (1-based).
    pub async fn message(&self, n: usize) -> Value {
        let started = Instant::now();
        loop {
            if let Some(message) = self.messages().into_iter().nth(n - 1) {
                return message;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no message {n} arrived");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The six-digit code in a message.
pub fn code_in(text: &str) -> String {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(5))
        .find(|&i| {
            bytes[i..i + 6].iter().all(u8::is_ascii_digit)
                && (i == 0 || !bytes[i - 1].is_ascii_digit())
                && bytes.get(i + 6).is_none_or(|b| !b.is_ascii_digit())
        })
        .map(|i| text[i..i + 6].to_owned())
        .unwrap_or_else(|| panic!("no code in {text:?}"))
}

#[derive(Debug, Clone)]
pub struct Sms {
    pub to: String,
    pub from: String,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SmsMode {
    Accept = 0,
    /// Answers 500, as a provider with an outage does.
    Fail = 1,
    /// Never answers in time.
    Hang = 2,
}

struct ProviderState {
    account_sid: String,
    auth_token: String,
    received: Mutex<Vec<Sms>>,
    rejected: Mutex<Vec<String>>,
    mode: AtomicU8,
}

pub struct SmsProvider {
    pub base_url: String,
    state: Arc<ProviderState>,
    handle: actix_web::dev::ServerHandle,
}

pub const SMS_FROM: &str = "+15005550006";

async fn messages(
    request: HttpRequest,
    path: web::Path<String>,
    form: web::Bytes,
    state: web::Data<Arc<ProviderState>>,
) -> HttpResponse {
    let reject = |why: String| {
        state.rejected.lock().unwrap().push(why.clone());
        HttpResponse::BadRequest().json(serde_json::json!({ "message": why }))
    };
    match state.mode.load(Ordering::SeqCst) {
        1 => return HttpResponse::InternalServerError().finish(),
        2 => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return HttpResponse::InternalServerError().finish();
        }
        _ => {}
    }
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", state.account_sid, state.auth_token))
    );
    let auth = request.headers().get("Authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if auth != expected {
        state.rejected.lock().unwrap().push("bad credentials".to_owned());
        return HttpResponse::Unauthorized().finish();
    }
    if path.into_inner() != state.account_sid {
        return reject("wrong account in the path".to_owned());
    }
    let content_type =
        request.headers().get("Content-Type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return reject(format!("content type {content_type}"));
    }
    let fields: Vec<(String, String)> = serde_html_form_decode(&form);
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let (Some(to), Some(from), Some(body)) = (field("To"), field("From"), field("Body")) else {
        return reject(format!("missing fields in {fields:?}"));
    };
    let e164 =
        to.starts_with('+') && (9..=16).contains(&to.len()) && to[1..].chars().all(|c| c.is_ascii_digit());
    if !e164 {
        return reject(format!("To {to} is not E.164"));
    }
    state.received.lock().unwrap().push(Sms { to, from, body });
    HttpResponse::Created().json(serde_json::json!({ "sid": "SM0123456789", "status": "queued" }))
}

/// Decodes `application/x-www-form-urlencoded`.
pub(crate) fn serde_html_form_decode(bytes: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(bytes);
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

impl SmsProvider {
    pub async fn start() -> Self {
        let state = Arc::new(ProviderState {
            account_sid: "ACtest0123456789".to_owned(),
            auth_token: "test-auth-token".to_owned(),
            received: Mutex::new(Vec::new()),
            rejected: Mutex::new(Vec::new()),
            mode: AtomicU8::new(SmsMode::Accept as u8),
        });
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/2010-04-01/Accounts/{sid}/Messages.json", web::post().to(messages))
        })
        .workers(1)
        // No pooled connection outlives `stop`: each request opens its own.
        .keep_alive(actix_web::http::KeepAlive::Disabled)
        .disable_signals()
        .bind("127.0.0.1:0")
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { base_url: format!("http://{addr}"), state, handle }
    }

    pub fn configure(&self, config: &mut Config) {
        config.sms.base_url = self.base_url.clone();
        config.sms.account_sid = self.state.account_sid.clone();
        config.sms.auth_token = Secret(self.state.auth_token.clone());
        config.sms.from = SMS_FROM.to_owned();
        config.sms.timeout_secs = 2;
    }

    pub fn set_mode(&self, mode: SmsMode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Sms> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn rejected(&self) -> Vec<String> {
        self.state.rejected.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}
