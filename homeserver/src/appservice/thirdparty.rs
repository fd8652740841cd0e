//! Third-party networks: the client API's `/thirdparty/*` lookups, answered by asking the
//! application services that bridge to those networks (`/_matrix/app/v1/thirdparty/*`).
//!
//! Protocol metadata is passed through as the services send it, checked only for what a
//! client needs to read it (an object with an `instances` list), as Synapse does: bridges send
//! instances without the `fields` and `network_id` that ruma's `ProtocolInstance` requires.
//! Users and locations are parsed into ruma's types, and entries that do not parse are dropped.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use ruma::{
    OwnedRoomAliasId, OwnedUserId,
    api::appservice::thirdparty::{
        get_location_for_protocol, get_location_for_room_alias, get_protocol, get_user_for_protocol,
        get_user_for_user_id,
    },
    thirdparty::{Location, User},
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{Appservice, Appservices, CallError, QUERY_TIMEOUT};

/// How long a service's metadata for a protocol is reused before it is asked again (it
/// describes the bridge, not its users: it changes with the bridge's configuration).
const PROTOCOL_CACHE_TTL: Duration = Duration::from_secs(300);

/// Protocol metadata by (service id, protocol), with when it was fetched.
pub(super) type ProtocolCache = std::collections::HashMap<(String, String), (Instant, Map<String, Value>)>;

/// Metadata of a protocol as the services describe it, by protocol name.
pub type Protocols = BTreeMap<String, Map<String, Value>>;

/// Parses a service's answer, refusing JSON nested deeper than the server accepts anywhere.
fn parse<T: DeserializeOwned>(answer: &[u8]) -> Option<T> {
    (crate::json::depth(answer) <= crate::json::MAX_JSON_DEPTH)
        .then(|| serde_json::from_slice(answer).ok())?
}

/// A list answer: its entries of type `T`, without those that do not parse.
fn parse_list<T: DeserializeOwned>(answer: &[u8]) -> Vec<T> {
    parse::<Vec<Value>>(answer)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| serde_json::from_value(entry).ok())
        .collect()
}

impl Appservices {
    /// What the services that declare `only` (or any protocol) say of their protocols, merged:
    /// the first service's description with every service's `instances`, as Synapse merges them.
    /// An instance with a `network_id` gets the `instance_id` that `/publicRooms` takes
    /// (`<service id>|<network id>`).
    pub async fn protocols(&self, only: Option<&str>) -> Protocols {
        let asked: Vec<(&Appservice, &str)> = self
            .list
            .iter()
            .filter(|service| service.url().is_some())
            .flat_map(|service| {
                let protocols = service.registration.protocols.as_deref().unwrap_or_default();
                protocols.iter().map(move |p| (service.as_ref(), p.as_str()))
            })
            .filter(|(_, protocol)| only.is_none_or(|only| only == *protocol))
            .collect();
        let answers =
            join_all(asked.iter().map(|(service, protocol)| self.protocol(service, protocol))).await;
        let mut merged = Protocols::new();
        for ((_, protocol), answer) in asked.into_iter().zip(answers) {
            let Some(mut answer) = answer else { continue };
            match merged.get_mut(protocol) {
                None => {
                    merged.insert(protocol.to_owned(), answer);
                }
                Some(first) => {
                    let more = answer.remove("instances").unwrap_or_default();
                    if let (Some(Value::Array(instances)), Value::Array(more)) =
                        (first.get_mut("instances"), more)
                    {
                        instances.extend(more);
                    }
                }
            }
        }
        merged
    }

    /// One service's metadata for one protocol, from the cache or asked for.
    async fn protocol(&self, service: &Appservice, protocol: &str) -> Option<Map<String, Value>> {
        let key = (service.id().to_owned(), protocol.to_owned());
        if let Some((fetched, answer)) = self.protocol_cache().get(&key)
            && fetched.elapsed() < PROTOCOL_CACHE_TTL
        {
            return Some(answer.clone());
        }
        let request = get_protocol::v1::Request::new(protocol.to_owned());
        let answer = match self.lookup(service, request).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::debug!(appservice = service.id(), protocol, %error, "protocol query");
                return None;
            }
        };
        let Some(mut answer) = parse::<Map<String, Value>>(&answer) else {
            tracing::warn!(
                appservice = service.id(),
                protocol,
                "protocol metadata that is not a JSON object"
            );
            return None;
        };
        let Some(Value::Array(instances)) = answer.get_mut("instances") else {
            tracing::warn!(
                appservice = service.id(),
                protocol,
                "protocol metadata without an instances list"
            );
            return None;
        };
        for instance in instances.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(network) = instance.get("network_id").and_then(Value::as_str) {
                let id = format!("{}|{network}", service.id());
                instance.insert("instance_id".to_owned(), id.into());
            }
        }
        self.protocol_cache().insert(key, (Instant::now(), answer.clone()));
        Some(answer)
    }

    fn protocol_cache(&self) -> std::sync::MutexGuard<'_, ProtocolCache> {
        self.protocol_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Third-party users of `protocol` matching `fields`, from every service that bridges it.
    pub async fn third_party_users(&self, protocol: &str, fields: &BTreeMap<String, String>) -> Vec<User> {
        self.ask_all(Some(protocol), || {
            let mut request = get_user_for_protocol::v1::Request::new(protocol.to_owned());
            request.fields = fields.clone();
            request
        })
        .await
    }

    /// Third-party locations of `protocol` matching `fields`, from every service that bridges it.
    pub async fn third_party_locations(
        &self,
        protocol: &str,
        fields: &BTreeMap<String, String>,
    ) -> Vec<Location> {
        self.ask_all(Some(protocol), || {
            let mut request = get_location_for_protocol::v1::Request::new(protocol.to_owned());
            request.fields = fields.clone();
            request
        })
        .await
    }

    /// The third-party users behind a Matrix user, from every service with a protocol.
    pub async fn third_party_users_for(&self, user: &OwnedUserId) -> Vec<User> {
        self.ask_all(None, || get_user_for_user_id::v1::Request::new(user.clone())).await
    }

    /// The third-party locations behind a Matrix room alias, from every service with a protocol.
    pub async fn third_party_locations_for(&self, alias: &OwnedRoomAliasId) -> Vec<Location> {
        self.ask_all(None, || get_location_for_room_alias::v1::Request::new(alias.clone())).await
    }

    /// Asks every service that bridges `protocol` (any protocol: `None`) at once, and
    /// concatenates their lists. A service that fails or times out adds nothing.
    async fn ask_all<R, T>(&self, protocol: Option<&str>, request: impl Fn() -> R) -> Vec<T>
    where
        R: ruma::api::OutgoingRequest<PathBuilder = ruma::api::path_builder::SinglePath>,
        for<'a> R::Authentication: ruma::api::auth_scheme::AuthScheme<Input<'a> = &'a str>,
        T: DeserializeOwned,
    {
        let services = self.list.iter().filter(|service| {
            let protocols = service.registration.protocols.as_deref().unwrap_or_default();
            service.url().is_some()
                && match protocol {
                    Some(protocol) => protocols.iter().any(|p| p == protocol),
                    None => !protocols.is_empty(),
                }
        });
        let answers = join_all(services.map(|service| async {
            match self.lookup(service, request()).await {
                Ok(answer) => parse_list(&answer),
                Err(error) => {
                    tracing::debug!(appservice = service.id(), %error, "third-party lookup");
                    Vec::new()
                }
            }
        }))
        .await;
        answers.into_iter().flatten().collect()
    }

    /// One request to a service, bounded per service: lookups of made-up names must not open
    /// connections without end.
    pub(super) async fn lookup<R>(&self, service: &Appservice, request: R) -> Result<Vec<u8>, CallError>
    where
        R: ruma::api::OutgoingRequest<PathBuilder = ruma::api::path_builder::SinglePath>,
        for<'a> R::Authentication: ruma::api::auth_scheme::AuthScheme<Input<'a> = &'a str>,
    {
        let _permit = service.queries.acquire().await.map_err(|_| CallError::Timeout)?;
        self.call(service, request, None, QUERY_TIMEOUT).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_nested_deeper_than_the_server_accepts_are_ignored() {
        let deep = format!(
            "{}{}",
            "[".repeat(crate::json::MAX_JSON_DEPTH + 1),
            "]".repeat(crate::json::MAX_JSON_DEPTH + 1)
        );
        assert!(parse::<Value>(deep.as_bytes()).is_none());
        let shallow =
            format!("{}{}", "[".repeat(crate::json::MAX_JSON_DEPTH), "]".repeat(crate::json::MAX_JSON_DEPTH));
        assert!(parse::<Value>(shallow.as_bytes()).is_some());
    }

    #[test]
    fn list_entries_that_do_not_parse_are_dropped() {
        let answer = br#"[{"userid": "@a:example.org", "protocol": "irc", "fields": {}},
            {"userid": "not a user id", "protocol": "irc", "fields": {}}, 7]"#;
        let users: Vec<User> = parse_list(answer);
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].userid, "@a:example.org");
        assert!(parse_list::<User>(b"{\"not\": \"a list\"}").is_empty());
    }
}
