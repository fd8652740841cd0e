//! The server-server API, served on the federation listener (`listen.federation`).
//!
//! Requests from other servers are authenticated with X-Matrix ([`xmatrix`]): the handler's
//! `sender` is the server that signed the request.

mod directory;
mod e2ee;
mod history;
mod keys;
mod membership;
mod query;
mod transactions;
mod v1;
pub mod xmatrix;

use actix_web::web;
use ruma::api::federation::discovery::get_server_version;

use crate::{
    error::Result,
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// Every ruma endpoint of the federation listener.
pub fn router() -> Router {
    let mut router = Router::default();
    router.add(version);
    keys::routes(&mut router);
    query::routes(&mut router);
    directory::routes(&mut router);
    membership::routes(&mut router);
    history::routes(&mut router);
    transactions::routes(&mut router);
    e2ee::routes(&mut router);
    router
}

/// Deprecated forms of endpoints that other servers still call, which ruma has no types for.
pub fn configure_deprecated(config: &mut web::ServiceConfig) {
    v1::configure(config);
    let path = "/_matrix/key/v2/server/{keyId}";
    config.service(
        web::resource(path)
            .app_data(crate::ruma_wrapper::PathTemplate(path))
            .route(web::get().to(keys::server_keys_by_id))
            .default_service(web::to(crate::ruma_wrapper::method_not_allowed)),
    );
}

/// The endpoints outside ruma's types.
pub fn configure_custom(config: &mut web::ServiceConfig) {
    configure_deprecated(config);
    // Widgets' OpenID tokens, checked by integration managers (no X-Matrix: the token is the
    // credential). Also served on the client listener, where some deployments route it.
    let path = "/_matrix/federation/v1/openid/userinfo";
    config.service(
        web::resource(path)
            .app_data(crate::ruma_wrapper::PathTemplate(path))
            .route(web::get().to(super::client::openid_userinfo))
            .default_service(web::to(crate::ruma_wrapper::method_not_allowed)),
    );
}

/// GET /_matrix/federation/v1/version
async fn version(
    _: web::Data<AppState>,
    _: Ruma<get_server_version::v1::Request>,
) -> Result<get_server_version::v1::Response> {
    let mut server = get_server_version::v1::Server::new();
    server.name = Some("Hearth".to_owned());
    server.version = Some(env!("CARGO_PKG_VERSION").to_owned());
    let mut response = get_server_version::v1::Response::new();
    response.server = Some(server);
    Ok(response)
}
