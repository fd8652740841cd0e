//! Other servers' signing keys: fetched from the server itself (`GET /_matrix/key/v2/server`)
//! or, when it does not answer, from the notaries configured (`/_matrix/key/v2/query`, the
//! document then signed by the notary too), checked ([`federation::keys::verify_key_document`]),
//! kept in the database with the document they came from, and in memory.
//!
//! A key is trusted until the `valid_until_ts` of the document that listed it, and never for
//! more than seven days after it was fetched (the spec's cap for room versions 5 and later),
//! then fetched again. A key id nobody knows sends one fetch to its server, then no other for
//! [`REFETCH_AFTER`]: requests signed with made-up key ids cannot make this server hammer
//! another.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use federation::keys::ServerKeys;
use ruma::{
    CanonicalJsonObject, MilliSecondsSinceUnixEpoch, ServerName,
    api::federation::discovery::{get_remote_server_keys, get_server_keys},
};

use super::RemoteError;
use crate::{
    state::AppState,
    storage::{ServerKeyRecord, now_ms},
};

/// The longest a fetched key is trusted without fetching it again.
const MAX_TRUST_MS: i64 = 7 * 24 * 3600 * 1000;
/// The shortest time between two fetches of one server's keys.
const REFETCH_AFTER: Duration = Duration::from_secs(30);
/// Entries kept in memory before the cache is cleared.
const CACHE_CAPACITY: usize = 10_000;

#[derive(Debug, Default)]
pub struct RemoteKeys {
    /// (server, key id) → (public key, trusted until, ms).
    cache: Mutex<HashMap<(String, String), (String, i64)>>,
    /// When each server's keys were last fetched.
    fetched: Mutex<HashMap<String, Instant>>,
}

impl RemoteKeys {
    /// The public key (unpadded base64) `key_id` of `server`, if it is one the server uses now.
    pub async fn current_key(
        &self,
        state: &AppState,
        server: &ServerName,
        key_id: &str,
    ) -> Result<Option<String>, RemoteError> {
        if server == state.server_name {
            let own = &state.signing_key;
            return Ok((own.key_id() == key_id).then(|| own.public_key_base64()));
        }
        let now = now_ms();
        if let Some(key) = self.cached(server, key_id, now) {
            return Ok(Some(key));
        }
        let stored = state.store.server_keys(server.as_str()).await.map_err(|e| storage_error(server, e))?;
        self.remember(&stored);
        if let Some(key) = self.cached(server, key_id, now) {
            return Ok(Some(key));
        }
        if !self.may_fetch(server) {
            return Ok(None);
        }
        let fetched = self.fetch(state, server).await?;
        state.store.store_server_keys(&fetched).await.map_err(|e| storage_error(server, e))?;
        self.remember(&fetched);
        Ok(self.cached(server, key_id, now))
    }

    /// The key documents of `server` this server holds (as that server signed them), fetching
    /// them first when none is still valid: what a notary serves.
    pub async fn documents(&self, state: &AppState, server: &ServerName) -> Result<Vec<String>, RemoteError> {
        let valid = |keys: &[ServerKeyRecord]| {
            keys.iter().any(|k| k.expired_ts.is_none() && k.valid_until_ts > now_ms())
        };
        let mut keys =
            state.store.server_keys(server.as_str()).await.map_err(|e| storage_error(server, e))?;
        if !valid(&keys) && self.may_fetch(server) {
            let fetched = self.fetch(state, server).await?;
            state.store.store_server_keys(&fetched).await.map_err(|e| storage_error(server, e))?;
            self.remember(&fetched);
            keys = fetched;
        }
        let mut documents: Vec<String> = keys.into_iter().map(|k| k.document).collect();
        documents.sort();
        documents.dedup();
        Ok(documents)
    }

    fn cached(&self, server: &ServerName, key_id: &str, now: i64) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache
            .get(&(server.to_string(), key_id.to_owned()))
            .filter(|(_, until)| *until > now)
            .map(|(key, _)| key.clone())
    }

    fn remember(&self, keys: &[ServerKeyRecord]) {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() + keys.len() > CACHE_CAPACITY {
            cache.clear();
        }
        for key in keys.iter().filter(|k| k.expired_ts.is_none()) {
            let until = key.valid_until_ts.min(key.fetched_ts.saturating_add(MAX_TRUST_MS));
            cache.insert((key.server_name.clone(), key.key_id.clone()), (key.public_key.clone(), until));
        }
    }

    /// Whether `server`'s keys may be fetched now (and if so, notes that they are).
    fn may_fetch(&self, server: &ServerName) -> bool {
        let mut fetched = self.fetched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if fetched.get(server.as_str()).is_some_and(|last| now.duration_since(*last) < REFETCH_AFTER) {
            return false;
        }
        if fetched.len() >= CACHE_CAPACITY {
            fetched.clear();
        }
        fetched.insert(server.to_string(), now);
        true
    }

    /// `server`'s keys, from the server itself or, when it cannot be asked, from the notaries
    /// configured (`federation.trusted_key_servers`), in their order.
    async fn fetch(
        &self,
        state: &AppState,
        server: &ServerName,
    ) -> Result<Vec<ServerKeyRecord>, RemoteError> {
        let direct = self.fetch_direct(state, server).await;
        let Err(direct_error) = direct else { return direct };
        for notary in &state.config.federation.trusted_key_servers {
            let Ok(notary_name) = <&ServerName>::try_from(notary.server_name.as_str()) else { continue };
            if notary_name == server || notary_name == state.server_name {
                continue;
            }
            match self.fetch_through(state, notary_name, &notary.verify_keys, server).await {
                Ok(records) => return Ok(records),
                Err(error) => {
                    tracing::info!(%server, notary = %notary_name, %error, "a notary did not vouch for a server's keys")
                }
            }
        }
        Err(direct_error)
    }

    /// `server`'s keys, asked of the server itself.
    async fn fetch_direct(
        &self,
        state: &AppState,
        server: &ServerName,
    ) -> Result<Vec<ServerKeyRecord>, RemoteError> {
        let malformed = |why: String| RemoteError::Unreadable { server: server.to_string(), why };
        let answer = state
            .remote()?
            .send(
                &state.server_name,
                state.signing_key.key_pair(),
                server,
                get_server_keys::v2::Request::new(),
            )
            .await?;
        let document: CanonicalJsonObject =
            serde_json::from_str(answer.server_key.json().get()).map_err(|e| malformed(e.to_string()))?;
        let keys =
            federation::keys::verify_key_document(&document, server).map_err(|e| malformed(e.to_string()))?;
        Ok(records_of(server, &keys, &document))
    }

    /// `server`'s keys as `notary` vouches for them: documents signed by `server` itself and by
    /// one of the notary's keys (`verify_keys`, or those it publishes when none are configured);
    /// the one valid the longest is taken.
    async fn fetch_through(
        &self,
        state: &AppState,
        notary: &ServerName,
        verify_keys: &BTreeMap<String, String>,
        server: &ServerName,
    ) -> Result<Vec<ServerKeyRecord>, RemoteError> {
        let malformed = |why: String| RemoteError::Unreadable { server: notary.to_string(), why };
        let notary_keys = match verify_keys.is_empty() {
            false => verify_keys.clone(),
            true => {
                let records = self.fetch_direct(state, notary).await?;
                records
                    .into_iter()
                    .filter(|r| r.expired_ts.is_none())
                    .map(|r| (r.key_id, r.public_key))
                    .collect()
            }
        };
        let request =
            get_remote_server_keys::v2::Request::new(server.to_owned(), MilliSecondsSinceUnixEpoch::now());
        let answer =
            state.remote()?.send(&state.server_name, state.signing_key.key_pair(), notary, request).await?;
        let mut best: Option<(ServerKeys, CanonicalJsonObject)> = None;
        for raw in answer.server_keys.iter().take(MAX_NOTARISED_DOCUMENTS) {
            let document: CanonicalJsonObject =
                serde_json::from_str(raw.json().get()).map_err(|e| malformed(e.to_string()))?;
            let keys = federation::keys::verify_key_document(&document, server)
                .and_then(|keys| {
                    federation::keys::verify_notary_signature(&document, notary, &notary_keys).map(|()| keys)
                })
                .map_err(|e| malformed(e.to_string()))?;
            if best.as_ref().is_none_or(|(kept, _)| keys.valid_until_ts > kept.valid_until_ts) {
                best = Some((keys, document));
            }
        }
        let (keys, document) = best.ok_or_else(|| malformed(format!("no key document of {server}")))?;
        Ok(records_of(server, &keys, &document))
    }
}

/// The most documents of one server taken from a notary's answer.
const MAX_NOTARISED_DOCUMENTS: usize = 10;

/// The keys of a checked key document, as they are kept.
fn records_of(
    server: &ServerName,
    keys: &ServerKeys,
    document: &CanonicalJsonObject,
) -> Vec<ServerKeyRecord> {
    let text = ruma::CanonicalJsonValue::Object(document.clone()).to_string();
    let valid_until_ts = i64::try_from(keys.valid_until_ts).unwrap_or(i64::MAX);
    let fetched_ts = now_ms();
    let record = |key_id: &String, public_key: &String, expired_ts: Option<u64>| ServerKeyRecord {
        server_name: server.to_string(),
        key_id: key_id.clone(),
        public_key: public_key.clone(),
        valid_until_ts,
        expired_ts: expired_ts.map(|ts| i64::try_from(ts).unwrap_or(i64::MAX)),
        document: text.clone(),
        fetched_ts,
    };
    let mut records: Vec<ServerKeyRecord> =
        keys.verify_keys.iter().map(|(id, key)| record(id, key, None)).collect();
    records.extend(keys.old_verify_keys.iter().map(|(id, (key, expired))| record(id, key, Some(*expired))));
    records
}

fn storage_error(server: &ServerName, error: crate::storage::StoreError) -> RemoteError {
    tracing::error!(%error, %server, "reading or storing server keys failed");
    RemoteError::Unreachable { server: server.to_string(), why: "this server's database failed".to_owned() }
}
