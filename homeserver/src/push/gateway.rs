//! Talking to push gateways: the Push Gateway API's `POST /_matrix/push/v1/notify`, with ruma's
//! request and response types.
//!
//! A pusher's URL is chosen by its user, so the server must not become a way to reach what only
//! it can reach. Unless `push.allow_private_addresses` is set, a gateway is only called on a
//! public address: IP literals are checked before the request, names as they resolve (in the
//! client's resolver, so a name cannot resolve to a public address when checked and to a private
//! one when connected). Redirects are not followed and no proxy is used.

use std::{net::IpAddr, sync::Arc, time::Duration};

use ruma::api::{
    IncomingResponseExt, OutgoingRequestExt,
    push_gateway::send_event_notification::v1::{Notification, Request, Response},
};

use crate::{
    config::PushConfig,
    outbound::{PublicOnly, RefusedAddress, is_public},
};

/// The path the spec requires of an HTTP pusher's URL.
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// Largest gateway answer read, in bytes (a list of rejected pushkeys).
const MAX_ANSWER_BYTES: usize = 65_536;

/// What became of one request to a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The gateway took it; these pushkeys are no longer valid.
    Delivered { rejected: Vec<String> },
    /// Worth trying again later: the gateway was out of reach, timed out or answered 5xx/429.
    Retry(String),
    /// Trying again would not help: the gateway refused the request (4xx), or its address is
    /// not one the server may call.
    GiveUp(String),
}

/// Checks a pusher URL as a client sets it: `http` or `https`, a host, and the spec's path; with
/// `allow_private` off, a literal address must be public.
pub fn check_url(url: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("data.url is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("data.url must be an http:// or https:// URL".to_owned());
    }
    let Some(host) = parsed.host_str().filter(|host| !host.is_empty()) else {
        return Err("data.url has no host".to_owned());
    };
    if parsed.path() != NOTIFY_PATH {
        return Err(format!("data.url must have the path {NOTIFY_PATH}"));
    }
    // IPv6 literals are written in brackets.
    let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
    if let Some(ip) = literal
        && !allow_private
        && !is_public(ip)
    {
        return Err(format!("data.url names {ip}, which is not a public address"));
    }
    Ok(parsed)
}

/// The HTTP client for push gateways.
pub struct Gateway {
    http: reqwest::Client,
    allow_private: bool,
}

impl Gateway {
    pub fn new(config: &PushConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(config.request_timeout_secs);
        let builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(PublicOnly::new(config.allow_private_addresses)));
        let http = crate::outbound::trust_extra_ca(builder, Some(&config.extra_ca_file))
            .map_err(|e| e.context("push.extra_ca_file"))?
            .build()?;
        Ok(Self { http, allow_private: config.allow_private_addresses })
    }

    /// Sends one notification to the gateway at `url` (a pusher's `data.url`).
    pub async fn notify(&self, url: &str, notification: Notification) -> Outcome {
        self.post(url, notification, false).await
    }

    /// Sends a badge update: a notification of counts only. Gateways (Sygnal among them) read a
    /// missing count as "no change", so a zero is written out, where ruma leaves it out as the
    /// spec suggests for counts that come with an event.
    pub async fn badge(&self, url: &str, notification: Notification) -> Outcome {
        self.post(url, notification, true).await
    }

    async fn post(&self, url: &str, notification: Notification, explicit_counts: bool) -> Outcome {
        let target = match check_url(url, self.allow_private) {
            Ok(target) => target,
            Err(why) => return Outcome::GiveUp(why),
        };
        let unread = notification.counts.unread;
        // Synapse still sends an event's id as `id` too (the Push Gateway API's name before
        // `event_id`), except in `event_id_only` notifications (which have no `type`).
        let legacy_id = notification.event_type.as_ref().and(notification.event_id.clone());
        let request = match Request::new(notification).try_into_http_request::<Vec<u8>>(
            &target.origin().ascii_serialization(),
            (),
            (),
        ) {
            Ok(request) => request,
            Err(e) => return Outcome::GiveUp(format!("could not build the request: {e}")),
        };
        let mut body = request.into_body();
        // What ruma writes, with what Synapse writes besides (gateways and the compliance suite
        // read it): a badge's zero, the legacy `id`, a member event's `membership`, and each
        // device's `data` even when empty.
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(mut value) => {
                let notification = &mut value["notification"];
                if explicit_counts {
                    notification["counts"]["unread"] = u64::from(unread).into();
                }
                if let Some(id) = legacy_id {
                    notification["id"] = id.as_str().into();
                }
                if notification["type"] == "m.room.member"
                    && let Some(membership) = notification["content"]["membership"].as_str()
                {
                    notification["membership"] = membership.to_owned().into();
                }
                if let Some(devices) = notification["devices"].as_array_mut() {
                    for device in devices.iter_mut().filter_map(serde_json::Value::as_object_mut) {
                        device.entry("data").or_insert_with(|| serde_json::json!({}));
                    }
                }
                body = value.to_string().into_bytes();
            }
            Err(e) => return Outcome::GiveUp(format!("could not build the request: {e}")),
        }
        let sent = self
            .http
            .post(target)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
                while let Some(cause) = source {
                    if let Some(refused) = cause.downcast_ref::<RefusedAddress>() {
                        return Outcome::GiveUp(refused.to_string());
                    }
                    source = cause.source();
                }
                return Outcome::Retry(format!("the gateway is out of reach: {error}"));
            }
        };
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            return Outcome::Retry(format!("the gateway answered {status}"));
        }
        if !status.is_success() {
            return Outcome::GiveUp(format!("the gateway refused the notification: {status}"));
        }
        let Ok(bytes) = read_limited(response).await else {
            return Outcome::Retry("the gateway's answer was cut off".to_owned());
        };
        let answer = http::Response::builder().status(status.as_u16()).body(bytes.as_slice());
        let rejected = answer
            .ok()
            .and_then(|answer| Response::try_from_http_response(answer).ok())
            .map(|answer| answer.rejected)
            .unwrap_or_default();
        Outcome::Delivered { rejected }
    }
}

/// The body of a response, at most [`MAX_ANSWER_BYTES`] of it.
async fn read_limited(mut response: reqwest::Response) -> reqwest::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_ANSWER_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn pusher_urls_need_http_a_host_and_the_spec_path() {
        let ok = "https://push.example.org/_matrix/push/v1/notify";
        assert!(check_url(ok, false).is_ok());
        assert!(check_url("https://push.example.org:8443/_matrix/push/v1/notify", false).is_ok());
        for bad in [
            "ftp://push.example.org/_matrix/push/v1/notify",
            "https://push.example.org/",
            "https://push.example.org/_matrix/push/v1/notify/extra",
            "not a url",
            "https://127.0.0.1/_matrix/push/v1/notify",
            "http://[::1]:8080/_matrix/push/v1/notify",
            "http://10.0.0.1/_matrix/push/v1/notify",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_url("http://127.0.0.1:9/_matrix/push/v1/notify", true).is_ok());
    }
}
