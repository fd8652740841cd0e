//! This server's keys (`/_matrix/key/v2/server`), and other servers' as a notary
//! (`/_matrix/key/v2/query`): their documents as they signed them, signed by this server too.

use actix_web::web;
use ruma::{
    CanonicalJsonObject, ServerName,
    api::federation::discovery::{
        ServerSigningKeys, get_remote_server_keys, get_remote_server_keys_batch, get_server_keys,
    },
    serde::Raw,
};

use crate::{
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::now_ms,
};

/// How long other servers may rely on this server's key document (Synapse's default).
const VALIDITY_MS: u64 = 24 * 3600 * 1000;
/// The most servers one batch query may ask about.
const MAX_SERVERS_PER_QUERY: usize = 50;

pub(super) fn routes(router: &mut Router) {
    router.add(server_keys).add(query_one).add(query_batch);
}

/// This server's key document, signed.
fn own_document(state: &AppState) -> Result<CanonicalJsonObject> {
    let old: Vec<federation::keys::OldKey> = state
        .config
        .federation
        .old_signing_keys
        .iter()
        .map(|old| federation::keys::OldKey {
            key_id: old.key_id.clone(),
            public_key: old.public_key.clone(),
            expired_ts: old.expired_ts,
        })
        .collect();
    let until = u64::try_from(now_ms()).unwrap_or_default().saturating_add(VALIDITY_MS);
    federation::keys::own_key_document(&state.server_name, &state.signing_key, &old, until)
        .map_err(Error::internal)
}

fn raw(document: &CanonicalJsonObject) -> Result<Raw<ServerSigningKeys>> {
    let text = ruma::CanonicalJsonValue::Object(document.clone()).to_string();
    serde_json::value::RawValue::from_string(text).map(Raw::from_json).map_err(Error::internal)
}

/// GET /_matrix/key/v2/server
async fn server_keys(
    state: web::Data<AppState>,
    _: Ruma<get_server_keys::v2::Request>,
) -> Result<get_server_keys::v2::Response> {
    Ok(get_server_keys::v2::Response::new(raw(&own_document(&state)?)?))
}

/// GET /_matrix/key/v2/server/{keyId}: the deprecated form, which older servers and SyTest still
/// call. The whole document is the answer, whatever the key id (as the spec has servers do).
pub(super) async fn server_keys_by_id(state: web::Data<AppState>) -> Result<actix_web::HttpResponse> {
    let document = ruma::CanonicalJsonValue::Object(own_document(&state)?).to_string();
    Ok(actix_web::HttpResponse::Ok().content_type("application/json").body(document))
}

/// The key documents of `server` this server can vouch for, each also signed by this server.
async fn notarised(state: &AppState, server: &ServerName) -> Result<Vec<Raw<ServerSigningKeys>>> {
    if server == state.server_name {
        return Ok(vec![raw(&own_document(state)?)?]);
    }
    let documents = match state.remote()?.keys.documents(state, server).await {
        Ok(documents) => documents,
        // A server that cannot be reached has no keys to give; the others are still answered.
        Err(error) => {
            tracing::info!(%error, %server, "no keys to notarise");
            Vec::new()
        }
    };
    documents
        .iter()
        .map(|text| {
            let mut document: CanonicalJsonObject = serde_json::from_str(text).map_err(Error::internal)?;
            ruma::signatures::sign_json(
                state.server_name.as_str(),
                state.signing_key.key_pair(),
                &mut document,
            )
            .map_err(Error::internal)?;
            raw(&document)
        })
        .collect()
}

/// GET /_matrix/key/v2/query/{serverName}
async fn query_one(
    state: web::Data<AppState>,
    request: Ruma<get_remote_server_keys::v2::Request>,
) -> Result<get_remote_server_keys::v2::Response> {
    Ok(get_remote_server_keys::v2::Response::new(notarised(&state, &request.body.server_name).await?))
}

/// POST /_matrix/key/v2/query
async fn query_batch(
    state: web::Data<AppState>,
    request: Ruma<get_remote_server_keys_batch::v2::Request>,
) -> Result<get_remote_server_keys_batch::v2::Response> {
    let servers = &request.body.server_keys;
    if servers.len() > MAX_SERVERS_PER_QUERY {
        return Err(Error::invalid_param(format!("at most {MAX_SERVERS_PER_QUERY} servers per query")));
    }
    let mut all = Vec::new();
    for server in servers.keys() {
        all.extend(notarised(&state, server).await?);
    }
    Ok(get_remote_server_keys_batch::v2::Response::new(all))
}
