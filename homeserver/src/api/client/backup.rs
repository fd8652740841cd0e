//! Server-side key backup: `room_keys/version[/{version}]` and
//! `room_keys/keys[/{roomId}[/{sessionId}]]`.
//!
//! The server stores what clients encrypted for a backup key it never sees. Keys go only into
//! the current (newest) version; a client still writing to an older one is told which is
//! current (`M_WRONG_ROOM_KEYS_VERSION`). A session uploaded again replaces the stored one only
//! if it is better ([`BackupKey::better_than`]).

use std::collections::BTreeMap;

use actix_web::{http::StatusCode, web};
use ruma::{
    OwnedRoomId, UInt, UserId,
    api::{
        client::backup::{
            KeyBackupData, RoomKeyBackup, add_backup_keys, add_backup_keys_for_room,
            add_backup_keys_for_session, create_backup_version, delete_backup_keys,
            delete_backup_keys_for_room, delete_backup_keys_for_session, delete_backup_version,
            get_backup_info, get_backup_keys, get_backup_keys_for_room, get_backup_keys_for_session,
            get_latest_backup_info, update_backup_version,
        },
        error::WrongRoomKeysVersionErrorData,
    },
    serde::Raw,
};
use serde_json::{Value, json};

use crate::{
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::{BackupKey, BackupVersion},
};

/// Most sessions one upload may carry.
const MAX_SESSIONS_PER_UPLOAD: usize = 10_000;

pub(super) fn routes(router: &mut Router) {
    router
        .add(create_version)
        .add(latest_version)
        .add(get_version)
        .add(update_version)
        .add(delete_version)
        .add(put_keys)
        .add(put_room_keys)
        .add(put_session_key)
        .add(get_keys)
        .add(get_room_keys)
        .add(get_session_key)
        .add(delete_keys)
        .add(delete_room_keys)
        .add(delete_session_key);
}

fn unknown_version() -> Error {
    Error::not_found("unknown backup version")
}

/// A version number from a path or query (anything else names no version).
fn parse_version(version: &str) -> Result<i64> {
    version.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(unknown_version)
}

/// Checks `{"algorithm": "...", "auth_data": ...}` and returns its algorithm name. `auth_data`
/// is opaque to the server and kept as given, whatever its JSON type: the spec describes an
/// object, but Synapse takes any value (SyTest sends a string) and only the backup's owner
/// reads it.
fn check_algorithm(json: &str) -> Result<String> {
    let value: Value = serde_json::from_str(json).map_err(|e| Error::bad_json(e.to_string()))?;
    let algorithm =
        value["algorithm"].as_str().ok_or_else(|| Error::bad_json("`algorithm` must be a string"))?;
    if value["auth_data"].is_null() {
        return Err(Error::missing_param("`auth_data` is required"));
    }
    Ok(algorithm.to_owned())
}

fn raw<T>(json: &str) -> Result<Raw<T>> {
    serde_json::value::RawValue::from_string(json.to_owned()).map(Raw::from_json).map_err(Error::internal)
}

fn count(n: i64) -> UInt {
    UInt::try_from(u64::try_from(n).unwrap_or(0)).unwrap_or_default()
}

/// The version keys may be read from or deleted in (any that exists).
async fn existing(state: &AppState, user: &UserId, version: &str) -> Result<BackupVersion> {
    state.store.backup_version(user, Some(parse_version(version)?)).await?.ok_or_else(unknown_version)
}

/// The version keys may be written to: the current one.
async fn current(state: &AppState, user: &UserId, version: &str) -> Result<i64> {
    let latest = state.store.backup_version(user, None).await?.ok_or_else(unknown_version)?;
    if version.parse::<i64>().ok() != Some(latest.version) {
        return Err(Error::new(
            StatusCode::FORBIDDEN,
            ErrorKind::WrongRoomKeysVersion(WrongRoomKeysVersionErrorData::new(latest.version.to_string())),
            format!("version {version} is not the current backup version {}", latest.version),
        ));
    }
    Ok(latest.version)
}

fn to_key(room_id: &str, session_id: &str, data: &Raw<KeyBackupData>) -> Result<BackupKey> {
    let value: Value = serde_json::from_str(data.json().get())
        .map_err(|e| Error::bad_json(format!("session {session_id}: {e}")))?;
    let number = |field: &str| {
        value[field].as_u64().and_then(|n| i64::try_from(n).ok()).ok_or_else(|| {
            Error::bad_json(format!("session {session_id}: `{field}` must be a non-negative integer"))
        })
    };
    let is_verified = value["is_verified"]
        .as_bool()
        .ok_or_else(|| Error::bad_json(format!("session {session_id}: `is_verified` must be a boolean")))?;
    // Opaque to the server, like a version's `auth_data`: kept as given (Synapse takes any JSON
    // value; SyTest sends a string), but it must be there.
    if value["session_data"].is_null() {
        return Err(Error::missing_param(format!("session {session_id}: `session_data` is required")));
    }
    if session_id.is_empty() {
        return Err(Error::bad_json("empty session id"));
    }
    Ok(BackupKey {
        room_id: room_id.to_owned(),
        session_id: session_id.to_owned(),
        first_message_index: number("first_message_index")?,
        forwarded_count: number("forwarded_count")?,
        is_verified,
        session_data: value["session_data"].to_string(),
    })
}

fn to_data(key: &BackupKey) -> Result<Raw<KeyBackupData>> {
    let session_data: Value = serde_json::from_str(&key.session_data).map_err(Error::internal)?;
    raw(&json!({
        "first_message_index": key.first_message_index,
        "forwarded_count": key.forwarded_count,
        "is_verified": key.is_verified,
        "session_data": session_data,
    })
    .to_string())
}

async fn store_keys(
    state: &AppState,
    user: &UserId,
    version: &str,
    keys: Vec<BackupKey>,
) -> Result<(String, UInt)> {
    if keys.len() > MAX_SESSIONS_PER_UPLOAD {
        return Err(Error::invalid_param(format!("at most {MAX_SESSIONS_PER_UPLOAD} sessions per upload")));
    }
    let version = current(state, user, version).await?;
    let (etag, n) = state.store.put_backup_keys(user, version, &keys).await?;
    Ok((etag.to_string(), count(n)))
}

async fn remove_keys(
    state: &AppState,
    user: &UserId,
    version: &str,
    room: Option<&str>,
    session: Option<&str>,
) -> Result<(String, UInt)> {
    let version = existing(state, user, version).await?.version;
    let (etag, n) = state.store.delete_backup_keys(user, version, room, session).await?;
    Ok((etag.to_string(), count(n)))
}

/// POST /_matrix/client/v3/room_keys/version
async fn create_version(
    state: web::Data<AppState>,
    request: Ruma<create_backup_version::v3::Request>,
) -> Result<create_backup_version::v3::Response> {
    let json = request.body.algorithm.json().get();
    check_algorithm(json)?;
    let version = state.store.create_backup_version(&request.sender.user_id, json).await?;
    Ok(create_backup_version::v3::Response::new(version.to_string()))
}

/// GET /_matrix/client/v3/room_keys/version
async fn latest_version(
    state: web::Data<AppState>,
    request: Ruma<get_latest_backup_info::v3::Request>,
) -> Result<get_latest_backup_info::v3::Response> {
    let found = state
        .store
        .backup_version(&request.sender.user_id, None)
        .await?
        .ok_or_else(|| Error::not_found("no current backup version"))?;
    Ok(get_latest_backup_info::v3::Response::new(
        raw(&found.algorithm)?,
        count(found.count),
        found.etag.to_string(),
        found.version.to_string(),
    ))
}

/// GET /_matrix/client/v3/room_keys/version/{version}
async fn get_version(
    state: web::Data<AppState>,
    request: Ruma<get_backup_info::v3::Request>,
) -> Result<get_backup_info::v3::Response> {
    let found = existing(&state, &request.sender.user_id, &request.body.version).await?;
    Ok(get_backup_info::v3::Response::new(
        raw(&found.algorithm)?,
        count(found.count),
        found.etag.to_string(),
        found.version.to_string(),
    ))
}

/// PUT /_matrix/client/v3/room_keys/version/{version}
async fn update_version(
    state: web::Data<AppState>,
    request: Ruma<update_backup_version::v3::Request>,
) -> Result<update_backup_version::v3::Response> {
    let user = &request.sender.user_id;
    let found = existing(&state, user, &request.body.version).await?;
    let json = request.body.algorithm.json().get();
    let algorithm = check_algorithm(json)?;
    if check_algorithm(&found.algorithm)? != algorithm {
        return Err(Error::invalid_param("the algorithm of a backup version cannot change"));
    }
    // The body may repeat the version; if it does, it must be this one.
    let body: Value = serde_json::from_str(json).map_err(|e| Error::bad_json(e.to_string()))?;
    // Written as a number by some clients (SyTest's Perl): equal is equal.
    let names = |v: &Value| match v {
        Value::String(text) => *text == request.body.version,
        Value::Number(n) => n.to_string() == request.body.version,
        _ => false,
    };
    if body.get("version").is_some_and(|v| !names(v)) {
        return Err(Error::invalid_param("the body names another version than the path"));
    }
    let mut stored = body;
    if let Some(object) = stored.as_object_mut() {
        object.remove("version");
    }
    if !state.store.update_backup_version(user, found.version, &stored.to_string()).await? {
        return Err(unknown_version());
    }
    Ok(update_backup_version::v3::Response::new())
}

/// DELETE /_matrix/client/v3/room_keys/version/{version}
async fn delete_version(
    state: web::Data<AppState>,
    request: Ruma<delete_backup_version::v3::Request>,
) -> Result<delete_backup_version::v3::Response> {
    let version = parse_version(&request.body.version)?;
    if !state.store.delete_backup_version(&request.sender.user_id, version).await? {
        return Err(unknown_version());
    }
    Ok(delete_backup_version::v3::Response::new())
}

/// PUT /_matrix/client/v3/room_keys/keys
async fn put_keys(
    state: web::Data<AppState>,
    request: Ruma<add_backup_keys::v3::Request>,
) -> Result<add_backup_keys::v3::Response> {
    let body = &request.body;
    let mut keys = Vec::new();
    for (room, backup) in &body.rooms {
        for (session, data) in &backup.sessions {
            keys.push(to_key(room.as_str(), session, data)?);
        }
    }
    let (etag, n) = store_keys(&state, &request.sender.user_id, &body.version, keys).await?;
    Ok(add_backup_keys::v3::Response::new(etag, n))
}

/// PUT /_matrix/client/v3/room_keys/keys/{roomId}
async fn put_room_keys(
    state: web::Data<AppState>,
    request: Ruma<add_backup_keys_for_room::v3::Request>,
) -> Result<add_backup_keys_for_room::v3::Response> {
    let body = &request.body;
    let keys = body
        .sessions
        .iter()
        .map(|(session, data)| to_key(body.room_id.as_str(), session, data))
        .collect::<Result<Vec<_>>>()?;
    let (etag, n) = store_keys(&state, &request.sender.user_id, &body.version, keys).await?;
    Ok(add_backup_keys_for_room::v3::Response::new(etag, n))
}

/// PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}
async fn put_session_key(
    state: web::Data<AppState>,
    request: Ruma<add_backup_keys_for_session::v3::Request>,
) -> Result<add_backup_keys_for_session::v3::Response> {
    let body = &request.body;
    let key = to_key(body.room_id.as_str(), &body.session_id, &body.session_data)?;
    let (etag, n) = store_keys(&state, &request.sender.user_id, &body.version, vec![key]).await?;
    Ok(add_backup_keys_for_session::v3::Response::new(etag, n))
}

/// GET /_matrix/client/v3/room_keys/keys
async fn get_keys(
    state: web::Data<AppState>,
    request: Ruma<get_backup_keys::v3::Request>,
) -> Result<get_backup_keys::v3::Response> {
    let user = &request.sender.user_id;
    let version = existing(&state, user, &request.body.version).await?.version;
    let mut rooms: BTreeMap<OwnedRoomId, BTreeMap<String, Raw<KeyBackupData>>> = BTreeMap::new();
    for key in state.store.backup_keys(user, version, None, None).await? {
        let Ok(room) = OwnedRoomId::try_from(key.room_id.as_str()) else { continue };
        rooms.entry(room).or_default().insert(key.session_id.clone(), to_data(&key)?);
    }
    Ok(get_backup_keys::v3::Response::new(
        rooms.into_iter().map(|(room, sessions)| (room, RoomKeyBackup::new(sessions))).collect(),
    ))
}

/// GET /_matrix/client/v3/room_keys/keys/{roomId}
async fn get_room_keys(
    state: web::Data<AppState>,
    request: Ruma<get_backup_keys_for_room::v3::Request>,
) -> Result<get_backup_keys_for_room::v3::Response> {
    let user = &request.sender.user_id;
    let body = &request.body;
    let version = existing(&state, user, &body.version).await?.version;
    let sessions = state
        .store
        .backup_keys(user, version, Some(body.room_id.as_str()), None)
        .await?
        .iter()
        .map(|key| Ok((key.session_id.clone(), to_data(key)?)))
        .collect::<Result<_>>()?;
    Ok(get_backup_keys_for_room::v3::Response::new(sessions))
}

/// GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}
async fn get_session_key(
    state: web::Data<AppState>,
    request: Ruma<get_backup_keys_for_session::v3::Request>,
) -> Result<get_backup_keys_for_session::v3::Response> {
    let user = &request.sender.user_id;
    let body = &request.body;
    let version = existing(&state, user, &body.version).await?.version;
    let key = state
        .store
        .backup_keys(user, version, Some(body.room_id.as_str()), Some(&body.session_id))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::not_found("no such session in this backup"))?;
    Ok(get_backup_keys_for_session::v3::Response::new(to_data(&key)?))
}

/// DELETE /_matrix/client/v3/room_keys/keys
async fn delete_keys(
    state: web::Data<AppState>,
    request: Ruma<delete_backup_keys::v3::Request>,
) -> Result<delete_backup_keys::v3::Response> {
    let (etag, n) = remove_keys(&state, &request.sender.user_id, &request.body.version, None, None).await?;
    Ok(delete_backup_keys::v3::Response::new(etag, n))
}

/// DELETE /_matrix/client/v3/room_keys/keys/{roomId}
async fn delete_room_keys(
    state: web::Data<AppState>,
    request: Ruma<delete_backup_keys_for_room::v3::Request>,
) -> Result<delete_backup_keys_for_room::v3::Response> {
    let body = &request.body;
    let (etag, n) =
        remove_keys(&state, &request.sender.user_id, &body.version, Some(body.room_id.as_str()), None)
            .await?;
    Ok(delete_backup_keys_for_room::v3::Response::new(etag, n))
}

/// DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}
async fn delete_session_key(
    state: web::Data<AppState>,
    request: Ruma<delete_backup_keys_for_session::v3::Request>,
) -> Result<delete_backup_keys_for_session::v3::Response> {
    let body = &request.body;
    let room = Some(body.room_id.as_str());
    let (etag, n) =
        remove_keys(&state, &request.sender.user_id, &body.version, room, Some(&body.session_id)).await?;
    Ok(delete_backup_keys_for_session::v3::Response::new(etag, n))
}
