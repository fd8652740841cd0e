//! Guest accounts may use only the endpoints the spec lists for guests ("Guest access", plus
//! what Synapse lets guests call where the spec is loose); the rest answer
//! `403 M_GUEST_ACCESS_FORBIDDEN`. The gate is applied once, by the request extractors, from the
//! endpoint's method and path template, so no handler checks it.

use actix_web::http::StatusCode;

use crate::error::{Error, ErrorKind, Result};

/// The endpoints open to guests: method and path after `/_matrix/client/<version>/`, with `*`
/// for a path variable.
const ALLOWED: &[(&str, &str)] = &[
    ("GET", "sync"),
    ("GET", "events"),
    ("GET", "initialSync"),
    ("GET", "rooms/*/state"),
    ("GET", "rooms/*/state/*"),
    ("GET", "rooms/*/state/*/*"),
    ("PUT", "rooms/*/state/*"),
    ("PUT", "rooms/*/state/*/*"),
    ("GET", "rooms/*/messages"),
    ("GET", "rooms/*/members"),
    ("GET", "rooms/*/joined_members"),
    ("GET", "rooms/*/event/*"),
    ("GET", "rooms/*/context/*"),
    ("GET", "rooms/*/initialSync"),
    ("POST", "rooms/*/join"),
    ("POST", "join/*"),
    ("POST", "rooms/*/leave"),
    ("PUT", "rooms/*/send/*/*"),
    ("POST", "rooms/*/send/*"),
    ("PUT", "rooms/*/typing/*"),
    ("POST", "rooms/*/receipt/*/*"),
    ("POST", "rooms/*/read_markers"),
    ("GET", "profile/*"),
    ("GET", "profile/*/displayname"),
    ("PUT", "profile/*/displayname"),
    ("GET", "profile/*/avatar_url"),
    ("PUT", "profile/*/avatar_url"),
    ("GET", "user/*/account_data/*"),
    ("PUT", "user/*/account_data/*"),
    ("GET", "user/*/rooms/*/account_data/*"),
    ("PUT", "user/*/rooms/*/account_data/*"),
    ("POST", "user/*/filter"),
    ("GET", "user/*/filter/*"),
    ("GET", "account/whoami"),
    ("POST", "logout"),
    ("GET", "devices"),
    ("GET", "devices/*"),
    ("PUT", "devices/*"),
    ("POST", "keys/upload"),
    ("POST", "keys/query"),
    ("POST", "keys/claim"),
    ("GET", "keys/changes"),
    ("PUT", "sendToDevice/*/*"),
    ("GET", "pushrules"),
    ("GET", "pushrules/"),
    ("GET", "voip/turnServer"),
    ("GET", "capabilities"),
    ("GET", "publicRooms"),
    ("GET", "presence/*/status"),
    ("PUT", "presence/*/status"),
    ("GET", "versions"),
];

/// Whether a guest may call `method` on the endpoint registered under `template` (a path
/// template like `/_matrix/client/v3/rooms/{roomId}/messages`).
pub fn allowed(method: &str, template: &str) -> bool {
    let Some(rest) = template.strip_prefix("/_matrix/client/") else {
        return false;
    };
    // The version segment: v3, r0, v1, or `unstable` (whose vendor-prefixed paths fall out).
    let Some((_, path)) = rest.split_once('/') else {
        return false;
    };
    ALLOWED.iter().any(|(allowed_method, pattern)| {
        *allowed_method == method && {
            let mut got = path.split('/');
            let mut want = pattern.split('/');
            loop {
                match (got.next(), want.next()) {
                    (None, None) => break true,
                    (Some(segment), Some("*")) if segment.starts_with('{') => {}
                    (Some(segment), Some(expected)) if segment == expected => {}
                    _ => break false,
                }
            }
        }
    })
}

/// Refuses a guest on an endpoint not open to guests.
pub fn check(is_guest: bool, method: &str, template: Option<&str>) -> Result<()> {
    if is_guest && !template.is_some_and(|template| allowed(method, template)) {
        return Err(Error::new(
            StatusCode::FORBIDDEN,
            ErrorKind::GuestAccessForbidden,
            "guest accounts cannot use this endpoint",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn guests_reach_only_the_listed_endpoints() {
        assert!(allowed("GET", "/_matrix/client/v3/sync"));
        assert!(allowed("GET", "/_matrix/client/r0/rooms/{roomId}/messages"));
        assert!(allowed("PUT", "/_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}"));
        assert!(allowed("PUT", "/_matrix/client/v3/profile/{userId}/displayname"));
        assert!(!allowed("POST", "/_matrix/client/v3/createRoom"));
        assert!(!allowed("DELETE", "/_matrix/client/v3/devices/{deviceId}"));
        assert!(!allowed("GET", "/_matrix/client/v3/rooms/{roomId}/messages/extra"));
        assert!(!allowed("GET", "/_matrix/client/v3/rooms/literal/messages"), "only a variable matches `*`");
        assert!(!allowed("GET", "/_hearth/client/v1/threepid/submit_token"));
    }
}
