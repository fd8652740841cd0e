//! End-to-end encryption keys: `keys/upload`, `keys/query`, `keys/claim`, `keys/changes`, and
//! the device-list and key-count parts of `/sync`.
//!
//! The server holds public keys only. It checks the shape of what is uploaded, that a device's
//! identity keys never change, and that signed one-time keys are signed by the device that
//! uploaded them when its identity keys carry a valid self-signature; and it hands each one-time
//! key to exactly one claimer. A device's self-signature itself is not required to verify: the
//! spec leaves that check to clients (which make it before trusting a device), and Synapse
//! does not make it (SyTest uploads made-up keys).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use actix_web::{http::StatusCode, web};
use ruma::{
    CanonicalJsonObject, DeviceId, OneTimeKeyAlgorithm, OwnedUserId, RoomId, UInt, UserId,
    api::client::keys::{
        claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys,
    },
    serde::{Base64, Raw},
    signatures::{to_canonical_json_string_for_signing, verify_canonical_json_bytes},
};
use serde_json::{Value, json};

use super::room::parse_token;
use crate::{
    auth::uia::{self, UiaRequest},
    error::{Error, ErrorKind, Result},
    rooms::{
        self,
        client_event::raw,
        recent::{Mark, device_key},
    },
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::{ClaimedKey, KeyConflict, SignedTarget, keys::identity_of},
};

/// Most one-time or fallback keys one upload may carry.
const MAX_KEYS_PER_UPLOAD: usize = 1000;
/// Most devices one query or claim may name in all.
const MAX_DEVICES_PER_REQUEST: usize = 10_000;
/// Largest key object accepted, in bytes.
const MAX_KEY_BYTES: usize = 16 * 1024;

pub(super) fn routes(router: &mut Router) {
    router
        .add(upload_keys)
        .add(get_keys)
        .add(claim_keys)
        .add(get_key_changes)
        .add(upload_signing_keys)
        .add(upload_signatures);
}

fn bad_key(message: impl Into<String>) -> Error {
    Error::new(StatusCode::BAD_REQUEST, ErrorKind::BadJson, message)
}

fn parse_object(json: &str, what: &str) -> Result<CanonicalJsonObject> {
    if json.len() > MAX_KEY_BYTES {
        return Err(Error::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::TooLarge,
            format!("{what} is too large"),
        ));
    }
    serde_json::from_str(json).map_err(|e| bad_key(format!("{what} is not a JSON object: {e}")))
}

/// Checks the ed25519 signature of `signer` with key `key_id` (whose public half is `public_key`,
/// unpadded base64) on `object`.
fn check_signature(
    object: &CanonicalJsonObject,
    signer: &str,
    key_id: &str,
    public_key: &str,
    what: &str,
) -> Result<()> {
    let signature = object
        .get("signatures")
        .and_then(|s| s.as_object())
        .and_then(|s| s.get(signer))
        .and_then(|s| s.as_object())
        .and_then(|s| s.get(key_id))
        .and_then(|s| s.as_str())
        .ok_or_else(|| bad_key(format!("{what} is not signed by {key_id}")))?;
    let signature = Base64::<ruma::serde::base64::Standard>::parse(signature)
        .map_err(|_| bad_key(format!("the signature of {what} is not base64")))?;
    let public_key = Base64::<ruma::serde::base64::Standard>::parse(public_key)
        .map_err(|_| bad_key(format!("the key {key_id} is not base64")))?;
    let canonical = to_canonical_json_string_for_signing(object).map_err(|e| bad_key(e.to_string()))?;
    verify_canonical_json_bytes(
        &ruma::SigningKeyAlgorithm::Ed25519,
        public_key.as_bytes(),
        signature.as_bytes(),
        canonical.as_bytes(),
    )
    .map_err(|_| bad_key(format!("the signature of {what} by {key_id} does not verify")))
}

/// A device keys object from `user`'s `device`, in the spec's shape (Synapse's checks): it must
/// name them and have `algorithms` (strings), `keys` (strings) and `signatures` (user to key id
/// to string). Returns the device's ed25519 key if its self-signature verifies.
fn check_device_keys(
    object: &CanonicalJsonObject,
    user: &UserId,
    device: &DeviceId,
) -> Result<Option<String>> {
    let field = |name: &str| object.get(name).and_then(|v| v.as_str());
    if field("user_id") != Some(user.as_str()) || field("device_id") != Some(device.as_str()) {
        return Err(bad_key("device_keys must name the uploading user and device"));
    }
    let keys =
        object.get("keys").and_then(|k| k.as_object()).ok_or_else(|| bad_key("device_keys has no keys"))?;
    if keys.values().any(|key| key.as_str().is_none()) {
        return Err(bad_key("device_keys' keys must be strings"));
    }
    let algorithms = object
        .get("algorithms")
        .and_then(|a| a.as_array())
        .ok_or_else(|| bad_key("device_keys has no algorithms"))?;
    if algorithms.iter().any(|a| a.as_str().is_none()) {
        return Err(bad_key("device_keys' algorithms must be strings"));
    }
    let signatures = object
        .get("signatures")
        .and_then(|s| s.as_object())
        .ok_or_else(|| bad_key("device_keys has no signatures"))?;
    let well_formed = signatures
        .values()
        .all(|by| by.as_object().is_some_and(|by| by.values().all(|signature| signature.as_str().is_some())));
    if !well_formed {
        return Err(bad_key("device_keys' signatures must map users to key ids to signatures"));
    }
    Ok(verified_identity(object, user, device))
}

/// The device's ed25519 key, if its keys object carries one and is signed by it.
fn verified_identity(object: &CanonicalJsonObject, user: &UserId, device: &DeviceId) -> Option<String> {
    let ed25519_id = format!("ed25519:{device}");
    let ed25519 = object.get("keys")?.as_object()?.get(&ed25519_id)?.as_str()?.to_owned();
    check_signature(object, user.as_str(), &ed25519_id, &ed25519, "device_keys").ok()?;
    Some(ed25519)
}

/// Splits `algorithm:key_id` and checks a one-time or fallback key: signed keys must be signed
/// by the device (when its identity key is known: self-signed, see [`verified_identity`]).
fn check_one_time_key(
    id: &str,
    json: &str,
    user: &UserId,
    device: &DeviceId,
    ed25519: Option<&str>,
) -> Result<(String, String, String)> {
    let (algorithm, key_id) =
        id.split_once(':').ok_or_else(|| bad_key(format!("`{id}` is not algorithm:key_id")))?;
    if algorithm.is_empty() || key_id.is_empty() || id.len() > 255 {
        return Err(bad_key(format!("`{id}` is not algorithm:key_id")));
    }
    if json.len() > MAX_KEY_BYTES {
        return Err(bad_key(format!("key {id} is too large")));
    }
    if algorithm.starts_with("signed_") {
        let object = parse_object(json, &format!("key {id}"))?;
        if object.get("key").and_then(|k| k.as_str()).is_none() {
            return Err(bad_key(format!("key {id} has no key")));
        }
        if let Some(ed25519) = ed25519 {
            check_signature(
                &object,
                user.as_str(),
                &format!("ed25519:{device}"),
                ed25519,
                &format!("key {id}"),
            )?;
        }
    } else {
        let value: Value = serde_json::from_str(json).map_err(|e| bad_key(format!("key {id}: {e}")))?;
        if !value.is_string() && !value.is_object() {
            return Err(bad_key(format!("key {id} is neither a key nor a signed key")));
        }
    }
    Ok((algorithm.to_owned(), key_id.to_owned(), json.to_owned()))
}

/// POST /_matrix/client/v3/keys/upload
async fn upload_keys(
    state: web::Data<AppState>,
    request: Ruma<upload_keys::v3::Request>,
) -> Result<upload_keys::v3::Response> {
    let user = &request.sender.user_id;
    let device = request.sender.require_device()?;
    let body = &request.body;
    if body.one_time_keys.len() > MAX_KEYS_PER_UPLOAD || body.fallback_keys.len() > MAX_KEYS_PER_UPLOAD {
        return Err(Error::invalid_param(format!("at most {MAX_KEYS_PER_UPLOAD} keys per upload")));
    }
    let mut device_keys = None;
    let mut ed25519 = None;
    if let Some(raw) = &body.device_keys {
        let object = parse_object(raw.json().get(), "device_keys")?;
        ed25519 = check_device_keys(&object, user, device)?;
        let json = ruma::CanonicalJsonValue::Object(object).to_string();
        let identity = identity_of(&json);
        device_keys = Some((json, identity));
    }
    if device_keys.is_none() {
        ed25519 = state
            .store
            .device_keys(user, &[device.to_string()])
            .await?
            .first()
            .and_then(|(_, json)| serde_json::from_str::<CanonicalJsonObject>(json).ok())
            .and_then(|object| verified_identity(&object, user, device));
    }
    let one_time = body
        .one_time_keys
        .iter()
        .map(|(id, key)| check_one_time_key(id.as_str(), key.json().get(), user, device, ed25519.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let fallback = body
        .fallback_keys
        .iter()
        .map(|(id, key)| check_one_time_key(id.as_str(), key.json().get(), user, device, ed25519.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let mut algorithms = BTreeSet::new();
    for (algorithm, _, _) in &fallback {
        if !algorithms.insert(algorithm) {
            return Err(bad_key(format!("more than one fallback key for {algorithm}")));
        }
    }
    if device_keys.is_some() || !one_time.is_empty() || !fallback.is_empty() {
        let store = &state.store;
        let keys = device_keys.as_ref().map(|(json, identity)| (json.as_str(), identity.as_str()));
        let outcome = rooms::at_new_position(&state, |position| async move {
            Ok(store.upload_keys(user, device, keys, &one_time, &fallback, position).await?)
        })
        .await?;
        match outcome {
            // New device keys: the other servers sharing a room with the user are told.
            Ok(()) if device_keys.is_some() => {
                crate::remote::edu::send_device_list_update(&state, user, device, false).await?;
            }
            Ok(()) => {}
            Err(KeyConflict::DeviceKeys) => {
                return Err(bad_key("this device already has different identity keys"));
            }
            Err(KeyConflict::OneTimeKey(id)) => {
                return Err(bad_key(format!("one-time key {id} already exists with a different key")));
            }
        }
    }
    let counts = state.store.one_time_key_counts(user, device).await?;
    Ok(upload_keys::v3::Response::new(to_counts(&counts)))
}

fn to_counts(counts: &BTreeMap<String, u64>) -> BTreeMap<OneTimeKeyAlgorithm, UInt> {
    let mut out: BTreeMap<OneTimeKeyAlgorithm, UInt> = counts
        .iter()
        .map(|(alg, n)| (OneTimeKeyAlgorithm::from(alg.as_str()), UInt::new_saturating(*n)))
        .collect();
    // Clients read a missing count as "unknown", not zero; say zero.
    out.entry(OneTimeKeyAlgorithm::SignedCurve25519).or_insert(UInt::MIN);
    out
}

fn check_request_size(devices: usize) -> Result<()> {
    if devices > MAX_DEVICES_PER_REQUEST {
        return Err(Error::invalid_param(format!("at most {MAX_DEVICES_PER_REQUEST} devices per request")));
    }
    Ok(())
}

/// The keys of a user of this server.
#[derive(Default)]
pub(crate) struct UserKeys {
    pub(crate) devices: BTreeMap<ruma::OwnedDeviceId, Raw<ruma::encryption::DeviceKeys>>,
    pub(crate) master: Option<Raw<ruma::encryption::CrossSigningKey>>,
    pub(crate) self_signing: Option<Raw<ruma::encryption::CrossSigningKey>>,
    pub(crate) user_signing: Option<Raw<ruma::encryption::CrossSigningKey>>,
}

/// The keys of `user` (of this server) for `devices` (none: all), as `requester` is shown them:
/// their user-signing key only to themselves, and on the master key their own signatures of it.
/// `None`: another server asking, shown what any of its users may see.
pub(crate) async fn local_keys(
    state: &AppState,
    user: &UserId,
    devices: &[ruma::OwnedDeviceId],
    requester: Option<&UserId>,
) -> Result<UserKeys> {
    let wanted: Vec<String> = devices.iter().map(ToString::to_string).collect();
    let names: BTreeMap<String, Option<String>> = state
        .store
        .list_devices(user)
        .await?
        .into_iter()
        .map(|d| (d.device_id.to_string(), d.display_name))
        .collect();
    let mut keys = UserKeys::default();
    for (device, json) in state.store.device_keys(user, &wanted).await? {
        let mut value: Value = serde_json::from_str(&json).map_err(Error::internal)?;
        // Always there, as Synapse has it (SyTest reads it), with the name when there is one.
        value["unsigned"] = match names.get(&device) {
            Some(Some(name)) => json!({"device_display_name": name}),
            _ => json!({}),
        };
        keys.devices.insert(ruma::OwnedDeviceId::from(device), raw(&value)?);
    }
    for (usage, json) in state.store.cross_signing_keys(user).await? {
        let mut value: Value = serde_json::from_str(&json).map_err(Error::internal)?;
        match usage.as_str() {
            "master" => {
                // The requester's own signatures of this user's master key are theirs to see.
                if let Some(requester) = requester.filter(|requester| *requester != user) {
                    for (key_id, signature) in state.store.user_signatures(requester, user).await? {
                        value["signatures"][requester.as_str()][key_id] = signature.into();
                    }
                }
                keys.master = Some(raw(&value)?);
            }
            "self_signing" => keys.self_signing = Some(raw(&value)?),
            // A user-signing key is only ever shown to its owner.
            "user_signing" if requester == Some(user) => keys.user_signing = Some(raw(&value)?),
            _ => {}
        }
    }
    Ok(keys)
}

/// POST /_matrix/client/v3/keys/query
///
/// Users of other servers are asked of their servers, all at once, each within the request's
/// `timeout` (10 s by default); a server that does not answer is listed in `failures`.
async fn get_keys(
    state: web::Data<AppState>,
    request: Ruma<get_keys::v3::Request>,
) -> Result<get_keys::v3::Response> {
    let body = &request.body;
    check_request_size(body.device_keys.values().map(|d| d.len().max(1)).sum())?;
    let mut response = get_keys::v3::Response::new();
    let mut remote: BTreeMap<ruma::OwnedServerName, BTreeMap<OwnedUserId, Vec<ruma::OwnedDeviceId>>> =
        BTreeMap::new();
    for (user, devices) in &body.device_keys {
        if user.server_name() != state.server_name {
            remote.entry(user.server_name().to_owned()).or_default().insert(user.clone(), devices.clone());
            continue;
        }
        let keys = local_keys(&state, user, devices, Some(&request.sender.user_id)).await?;
        response.device_keys.insert(user.clone(), keys.devices);
        if let Some(key) = keys.master {
            response.master_keys.insert(user.clone(), key);
        }
        if let Some(key) = keys.self_signing {
            response.self_signing_keys.insert(user.clone(), key);
        }
        if let Some(key) = keys.user_signing {
            response.user_signing_keys.insert(user.clone(), key);
        }
    }
    let timeout = body.timeout.unwrap_or(REMOTE_TIMEOUT).min(REMOTE_TIMEOUT);
    let asked = remote.into_iter().map(|(server, users)| {
        let state = &state;
        async move {
            let request = ruma::api::federation::keys::get_keys::v1::Request::new(users);
            (server.clone(), ask(state, &server, request, timeout).await)
        }
    });
    for (server, answer) in futures_util::future::join_all(asked).await {
        match answer {
            // Only the keys of that server's own users are taken from it.
            Ok(answer) => {
                let of_server = |user: &OwnedUserId| user.server_name() == server;
                response
                    .device_keys
                    .extend(answer.device_keys.into_iter().filter(|(user, _)| of_server(user)));
                response
                    .master_keys
                    .extend(answer.master_keys.into_iter().filter(|(user, _)| of_server(user)));
                response
                    .self_signing_keys
                    .extend(answer.self_signing_keys.into_iter().filter(|(user, _)| of_server(user)));
            }
            Err(failure) => {
                response.failures.insert(server.to_string(), failure);
            }
        }
    }
    Ok(response)
}

/// The longest another server is waited for, for keys.
const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends `request` to `server` within `timeout`; a failure as `failures` lists it.
async fn ask<R>(
    state: &AppState,
    server: &ruma::ServerName,
    request: R,
    timeout: std::time::Duration,
) -> std::result::Result<R::IncomingResponse, Value>
where
    R: ruma::api::OutgoingRequest<PathBuilder = ruma::api::path_builder::SinglePath>,
    R::Authentication: crate::remote::RequestAuth,
{
    let failure = |status: u16, message: String| json!({"status": status, "message": message});
    let remote = state.remote().map_err(|e| failure(503, e.to_string()))?;
    let sent = remote.send(&state.server_name, state.signing_key.key_pair(), server, request);
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(failure(502, error.to_string())),
        Err(_) => Err(failure(504, format!("{server} did not answer in time"))),
    }
}

/// Claims one key per `(user, device, algorithm)` of this server's users; unknown users and
/// devices, and devices without keys left, have none to give.
pub(crate) async fn claim_local(
    state: &AppState,
    wanted: Vec<(OwnedUserId, ruma::OwnedDeviceId, String)>,
) -> Result<BTreeMap<OwnedUserId, claim_keys::v3::OneTimeKeys>> {
    let store = &state.store;
    let claimed: Vec<(OwnedUserId, ruma::OwnedDeviceId, ClaimedKey)> = if wanted.is_empty() {
        Vec::new()
    } else {
        rooms::at_new_position(state, |position| async move {
            let mut claimed = Vec::new();
            for (user, device, algorithm) in wanted {
                if let Some(key) = store.claim_key(&user, &device, &algorithm, position).await? {
                    claimed.push((user, device, key));
                }
            }
            Ok(claimed)
        })
        .await?
    };
    let mut one_time_keys: BTreeMap<OwnedUserId, claim_keys::v3::OneTimeKeys> = BTreeMap::new();
    for (user, device, key) in claimed {
        let raw = serde_json::value::RawValue::from_string(key.json).map_err(Error::internal)?;
        let id = ruma::OwnedOneTimeKeyId::try_from(key.id.as_str()).map_err(Error::internal)?;
        one_time_keys.entry(user).or_default().entry(device).or_default().insert(id, Raw::from_json(raw));
    }
    Ok(one_time_keys)
}

/// Checks a cross-signing key object of `user` for `usage`; returns its key id and public key.
fn check_cross_signing_key(
    object: &CanonicalJsonObject,
    user: &UserId,
    usage: &str,
) -> Result<(String, String)> {
    if object.get("user_id").and_then(|u| u.as_str()) != Some(user.as_str()) {
        return Err(bad_key(format!("the {usage} key must name the uploading user")));
    }
    let usages = object
        .get("usage")
        .and_then(|u| u.as_array())
        .ok_or_else(|| bad_key(format!("the {usage} key has no usage")))?;
    if !usages.iter().any(|u| u.as_str() == Some(usage)) {
        return Err(bad_key(format!("the {usage} key's usage does not include {usage}")));
    }
    let keys = object
        .get("keys")
        .and_then(|k| k.as_object())
        .ok_or_else(|| bad_key(format!("the {usage} key has no keys")))?;
    let mut entries = keys.iter();
    match (entries.next(), entries.next()) {
        (Some((id, public)), None) => {
            let public = public.as_str().unwrap_or_default();
            if id.strip_prefix("ed25519:") != Some(public) || public.is_empty() {
                return Err(bad_key(format!("the {usage} key must be one ed25519 key named after itself")));
            }
            Ok((id.clone(), public.to_owned()))
        }
        _ => Err(bad_key(format!("the {usage} key must hold exactly one key"))),
    }
}

/// POST /_matrix/client/v3/keys/device_signing/upload
async fn upload_signing_keys(
    state: web::Data<AppState>,
    request: Ruma<upload_signing_keys::v3::Request>,
) -> Result<upload_signing_keys::v3::Response> {
    let user = &request.sender.user_id;
    let body = &request.body;
    let stored: BTreeMap<String, String> = state.store.cross_signing_keys(user).await?.into_iter().collect();
    // The first keys need no password (there is nothing to protect yet); replacing them does.
    if stored.contains_key("master") {
        let operation = UiaRequest::password("cross_signing_upload", &request.sender, request.client_ip);
        uia::authenticate(&state, body.auth.as_ref(), operation).await?;
    }
    let mut keys = Vec::new();
    let master = match &body.master_key {
        Some(raw) => {
            let object = parse_object(raw.json().get(), "master_key")?;
            let (id, public) = check_cross_signing_key(&object, user, "master")?;
            keys.push(("master".to_owned(), ruma::CanonicalJsonValue::Object(object).to_string()));
            (id, public)
        }
        None => {
            let json =
                stored.get("master").ok_or_else(|| Error::missing_param("a master key is needed first"))?;
            check_cross_signing_key(&parse_object(json, "master key")?, user, "master")?
        }
    };
    for (usage, raw) in [("self_signing", &body.self_signing_key), ("user_signing", &body.user_signing_key)] {
        if let Some(raw) = raw {
            let object = parse_object(raw.json().get(), usage)?;
            check_cross_signing_key(&object, user, usage)?;
            check_signature(&object, user.as_str(), &master.0, &master.1, &format!("the {usage} key"))?;
            keys.push((usage.to_owned(), ruma::CanonicalJsonValue::Object(object).to_string()));
        }
    }
    if !keys.is_empty() {
        let (store, written) = (&state.store, &keys);
        rooms::at_new_position(&state, |position| async move {
            Ok(store.put_cross_signing_keys(user, written, position).await?)
        })
        .await?;
        // The keys other servers' users may see (not the user-signing key) go to their servers.
        let public = |usage: &str| keys.iter().find(|(u, _)| u == usage).map(|(_, json)| json.as_str());
        crate::remote::edu::send_signing_key_update(&state, user, public("master"), public("self_signing"))
            .await?;
    }
    Ok(upload_signing_keys::v3::Response::new())
}

fn signature_failure(errcode: &str, error: impl Into<String>) -> Result<upload_signatures::v3::Failure> {
    serde_json::from_value(json!({"errcode": errcode, "error": error.into()})).map_err(Error::internal)
}

/// The one signature `signer` made with a key whose public half is in `keys` (`key_id` →
/// public key), checked; returns `(key_id, signature)`.
fn verified_signature(
    object: &CanonicalJsonObject,
    signer: &UserId,
    keys: &BTreeMap<String, String>,
) -> Result<(String, String)> {
    let signatures = object
        .get("signatures")
        .and_then(|s| s.as_object())
        .and_then(|s| s.get(signer.as_str()))
        .and_then(|s| s.as_object())
        .ok_or_else(|| bad_key("no signature by the uploading user"))?;
    for (key_id, signature) in signatures {
        if let (Some(public), Some(signature)) = (keys.get(key_id), signature.as_str()) {
            check_signature(object, signer.as_str(), key_id, public, "the signed key")?;
            return Ok((key_id.clone(), signature.to_owned()));
        }
    }
    Err(bad_key("no signature by a key that may sign this"))
}

/// POST /_matrix/client/v3/keys/signatures/upload
async fn upload_signatures(
    state: web::Data<AppState>,
    request: Ruma<upload_signatures::v3::Request>,
) -> Result<upload_signatures::v3::Response> {
    let signer = &request.sender.user_id;
    check_request_size(request.body.signed_keys.values().map(|k| k.iter().count()).sum())?;
    let own: BTreeMap<String, String> = state.store.cross_signing_keys(signer).await?.into_iter().collect();
    let public_of = |usage: &str| -> Option<(String, String)> {
        let object = parse_object(own.get(usage)?, usage).ok()?;
        check_cross_signing_key(&object, signer, usage).ok()
    };
    let mut response = upload_signatures::v3::Response::new();
    for (user, signed) in &request.body.signed_keys {
        for (key_id, json) in signed.iter() {
            let outcome = sign_one(&state, signer, user, key_id, json.get(), &own, &public_of).await;
            if let Err(error) = outcome {
                let (errcode, message) = match &error {
                    Error::Matrix { kind, message, .. } => (kind.errcode().to_string(), message.clone()),
                    other => return Err(Error::internal(other)),
                };
                let errcode =
                    if errcode == "M_BAD_JSON" { "M_INVALID_SIGNATURE".to_owned() } else { errcode };
                response
                    .failures
                    .entry(user.clone())
                    .or_default()
                    .insert(key_id.to_owned(), signature_failure(&errcode, message)?);
            }
        }
    }
    Ok(response)
}

/// Stores one uploaded signature, after checking it: the signer's self-signing key on their
/// own device, their devices on their own master key, their user-signing key on another
/// user's master key.
async fn sign_one(
    state: &AppState,
    signer: &UserId,
    user: &UserId,
    key_id: &str,
    json: &str,
    own: &BTreeMap<String, String>,
    public_of: &dyn Fn(&str) -> Option<(String, String)>,
) -> Result<()> {
    let object = parse_object(json, key_id)?;
    let store = &state.store;
    if user == signer {
        if let Some((master_id, _)) = public_of("master")
            && master_id.strip_prefix("ed25519:") == Some(key_id)
        {
            // Own master key, signed by one of the user's devices.
            let devices: BTreeMap<String, String> = store
                .device_keys(user, &[])
                .await?
                .into_iter()
                .filter_map(|(device, json)| {
                    let value: Value = serde_json::from_str(&json).ok()?;
                    let id = format!("ed25519:{device}");
                    Some((id.clone(), value["keys"][&id].as_str()?.to_owned()))
                })
                .collect();
            let (signing_key, signature) = verified_signature(&object, signer, &devices)?;
            if own.get("master").map(|m| identity_of(m)) != Some(identity_of(json)) {
                return Err(bad_key("that is not the current master key"));
            }
            let signature = (signer.as_str(), signing_key.as_str(), signature.as_str());
            rooms::at_new_position(state, |position| async move {
                Ok(store.add_key_signature(user, SignedTarget::Master, signature, position).await?)
            })
            .await?;
            return Ok(());
        }
        // Own device, signed by the self-signing key.
        let (ssk_id, ssk) =
            public_of("self_signing").ok_or_else(|| Error::not_found("no self-signing key"))?;
        let stored = store.device_keys(user, &[key_id.to_owned()]).await?;
        let (_, stored) = stored.first().ok_or_else(|| Error::not_found(format!("no device {key_id}")))?;
        if identity_of(stored) != identity_of(json) {
            return Err(bad_key("those are not the device's current keys"));
        }
        let (signing_key, signature) = verified_signature(&object, signer, &BTreeMap::from([(ssk_id, ssk)]))?;
        let signature = (signer.as_str(), signing_key.as_str(), signature.as_str());
        let found = rooms::at_new_position(state, |position| async move {
            Ok(store.add_key_signature(user, SignedTarget::Device(key_id), signature, position).await?)
        })
        .await?;
        return if found { Ok(()) } else { Err(Error::not_found(format!("no device {key_id}"))) };
    }
    // Another user's master key, signed by the signer's user-signing key.
    if user.server_name() != state.server_name {
        return Err(Error::not_found("keys of users on other servers are not available yet"));
    }
    let (usk_id, usk) = public_of("user_signing").ok_or_else(|| Error::not_found("no user-signing key"))?;
    let theirs: BTreeMap<String, String> = store.cross_signing_keys(user).await?.into_iter().collect();
    let master = theirs.get("master").ok_or_else(|| Error::not_found("that user has no master key"))?;
    let (master_id, _) = check_cross_signing_key(&parse_object(master, "master key")?, user, "master")?;
    if master_id.strip_prefix("ed25519:") != Some(key_id) || identity_of(master) != identity_of(json) {
        return Err(bad_key("that is not the user's current master key"));
    }
    let (signing_key, signature) = verified_signature(&object, signer, &BTreeMap::from([(usk_id, usk)]))?;
    let signature = (signing_key.as_str(), signature.as_str());
    rooms::at_new_position(state, |position| async move {
        Ok(store.put_user_signature(signer, user, signature, position).await?)
    })
    .await
}

/// POST /_matrix/client/v3/keys/claim
///
/// Keys of other servers' users are claimed from their servers, as `keys/query` asks them.
async fn claim_keys(
    state: web::Data<AppState>,
    request: Ruma<claim_keys::v3::Request>,
) -> Result<claim_keys::v3::Response> {
    let body = &request.body;
    check_request_size(body.one_time_keys.values().map(BTreeMap::len).sum())?;
    let mut local = Vec::new();
    let mut remote: BTreeMap<
        ruma::OwnedServerName,
        ruma::api::federation::keys::claim_keys::v1::OneTimeKeyClaims,
    > = BTreeMap::new();
    for (user, devices) in &body.one_time_keys {
        if user.server_name() != state.server_name {
            remote.entry(user.server_name().to_owned()).or_default().insert(user.clone(), devices.clone());
            continue;
        }
        for (device, algorithm) in devices {
            local.push((user.clone(), device.clone(), algorithm.to_string()));
        }
    }
    let mut response = claim_keys::v3::Response::new(claim_local(&state, local).await?);
    let timeout = body.timeout.unwrap_or(REMOTE_TIMEOUT).min(REMOTE_TIMEOUT);
    let asked = remote.into_iter().map(|(server, claims)| {
        let state = &state;
        async move {
            let request = ruma::api::federation::keys::claim_keys::v1::Request::new(claims);
            (server.clone(), ask(state, &server, request, timeout).await)
        }
    });
    for (server, answer) in futures_util::future::join_all(asked).await {
        match answer {
            Ok(answer) => response
                .one_time_keys
                .extend(answer.one_time_keys.into_iter().filter(|(user, _)| user.server_name() == server)),
            Err(failure) => {
                response.failures.insert(server.to_string(), failure);
            }
        }
    }
    Ok(response)
}

/// GET /_matrix/client/v3/keys/changes
async fn get_key_changes(
    state: web::Data<AppState>,
    request: Ruma<get_key_changes::v3::Request>,
) -> Result<get_key_changes::v3::Response> {
    let from = parse_token(&request.body.from)?;
    let to = parse_token(&request.body.to)?;
    // Authentication brought the window up to date.
    let upto = state.recent.upto().min(to);
    let (changed, left) = device_list_updates(&state, &request.sender.user_id, from, upto).await?;
    Ok(get_key_changes::v3::Response::new(changed, left))
}

/// Users whose devices `user` must query again, and users `user` no longer shares a room with,
/// after the changes in `(since, upto]`: device list changes of users who share a room with
/// `user` (`user` included), users who newly share one (a join on either side), and users who
/// left the last room they shared.
pub(super) async fn device_list_updates(
    state: &AppState,
    user: &UserId,
    since: i64,
    upto: i64,
) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>)> {
    let recent = &state.recent;
    let device_changes = match recent.all_marked(Mark::DeviceList, since, upto) {
        Some(users) => users,
        None => state.store.device_list_changes(since, upto).await?,
    };
    let memberships_moved =
        recent.all_marked(Mark::Membership, since, upto).is_none_or(|users| !users.is_empty());
    // Keys as only the user sees them (their user-signing key, their signatures of others'
    // master keys) are news to their own devices alone.
    let own_keys = match recent.marked(Mark::OwnKeys, user.as_str(), since, upto) {
        Some(false) => Vec::new(),
        _ => state.store.own_key_changes(user, since, upto).await?,
    };
    if device_changes.is_empty() && !memberships_moved {
        return Ok((
            own_keys.into_iter().filter_map(|u| OwnedUserId::try_from(u).ok()).collect(),
            Vec::new(),
        ));
    }
    let rooms = recent.user_rooms(&*state.store, user, upto).await?;
    let mut shared: BTreeSet<String> = BTreeSet::from([user.to_string()]);
    let mut changed: BTreeSet<String> = BTreeSet::new();
    let mut gone: BTreeSet<String> = BTreeSet::new();
    for (room, membership, _) in rooms.iter() {
        let Ok(room_id) = <&RoomId>::try_from(room.as_str()) else { continue };
        let members = state.store.members(room_id).await?;
        if membership == "join" {
            shared.extend(members.iter().filter(|(_, m)| m == "join").map(|(u, _)| u.clone()));
        }
        if !memberships_moved {
            continue;
        }
        // Membership events of the window: joins bring users to query, leaves may end sharing.
        for event in recent.room_events(&*state.store, room_id, since, upto, 1000, true).await? {
            let Ok(client) = crate::rooms::client_event::ClientEvent::parse(&event) else { continue };
            if client.kind() != "m.room.member" {
                continue;
            }
            let Some(target) = client.state_key() else { continue };
            let target = target.as_str();
            match client.content_str("membership").as_deref() {
                Some("join") if target == user.as_str() => {
                    // The user joined: everyone in the room is new to them.
                    changed.extend(members.iter().filter(|(_, m)| m == "join").map(|(u, _)| u.clone()));
                }
                Some("join") => {
                    changed.insert(target.to_owned());
                }
                Some("leave" | "ban") if target == user.as_str() => {
                    gone.extend(members.iter().map(|(u, _)| u.clone()));
                }
                Some("leave" | "ban") => {
                    gone.insert(target.to_owned());
                }
                _ => {}
            }
        }
    }
    changed.extend(device_changes.into_iter().filter(|u| shared.contains(u)));
    changed.retain(|u| shared.contains(u));
    changed.extend(own_keys);
    let left = gone.into_iter().filter(|u| !shared.contains(u));
    let parse = |u: String| OwnedUserId::try_from(u).ok();
    Ok((changed.into_iter().filter_map(parse).collect(), left.filter_map(parse).collect()))
}

/// Tells everyone who shares a room with `user` that their devices changed (`device` went, or
/// was renamed); here, and on the other servers sharing a room with them.
pub(super) async fn device_list_changed(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
    deleted: bool,
) -> Result<()> {
    mark_device_list_changed(state, user).await?;
    crate::remote::edu::send_device_list_update(state, user, device, deleted).await
}

/// Tells this server's users who share a room with `user` (of any server) that `user`'s devices
/// changed: their next sync lists `user` in `device_lists.changed`.
pub(crate) async fn mark_device_list_changed(state: &AppState, user: &UserId) -> Result<()> {
    let store = &state.store;
    rooms::at_new_position(
        state,
        |position| async move { Ok(store.device_list_changed(user, position).await?) },
    )
    .await
}

/// A device's one-time key counts and unused fallback key types, as of `upto` or later.
pub(super) async fn key_counts(
    state: &AppState,
    user: &UserId,
    device: &DeviceId,
    upto: i64,
) -> Result<Arc<(BTreeMap<OneTimeKeyAlgorithm, UInt>, Vec<OneTimeKeyAlgorithm>)>> {
    let key = device_key(user.as_str(), device.as_str());
    state
        .recent
        .key_counts(&key, upto, || async {
            let counts = to_counts(&state.store.one_time_key_counts(user, device).await?);
            let fallback = state.store.unused_fallback_key_types(user, device).await?;
            Ok((counts, fallback.iter().map(|a| OneTimeKeyAlgorithm::from(a.as_str())).collect()))
        })
        .await
}
