//! The client-server API, one file per spec area.

mod account;
mod admin;
mod appservice;
mod backup;
mod device;
pub(crate) mod directory;
mod discovery;
mod ephemeral;
pub(crate) mod keys;
mod openid;
pub use directory::resolve as resolve_alias;
pub use openid::userinfo as openid_userinfo;
mod peeking;
mod profile;
pub mod push;
mod register;
mod report;
mod room;
mod session;
mod sync;
mod sync_wire;
mod tags;
mod thirdparty;
mod threepid;
pub(crate) mod to_device;
mod upgrade;
mod user_data;

use actix_web::{HttpResponse, web};
use http::Method;

use crate::ruma_wrapper::Router;

/// A ruma response as the JSON ruma writes, for endpoints that answer in a shape beyond ruma's
/// types (keys Synapse writes as `null` where ruma leaves them out, and the like).
fn response_json<R: ruma::api::OutgoingResponse>(response: R) -> crate::error::Result<serde_json::Value> {
    use ruma::api::OutgoingResponseExt;
    let http = response.try_into_http_response::<Vec<u8>>().map_err(crate::error::Error::internal)?;
    serde_json::from_slice(http.body()).map_err(crate::error::Error::internal)
}

/// Every client-server endpoint Hearth serves.
pub fn router() -> Router {
    let mut router = Router::default();
    discovery::routes(&mut router);
    session::routes(&mut router);
    register::routes(&mut router);
    account::routes(&mut router);
    device::routes(&mut router);
    threepid::routes(&mut router);
    room::routes(&mut router);
    upgrade::routes(&mut router);
    sync::routes(&mut router);
    peeking::routes(&mut router);
    profile::routes(&mut router);
    user_data::routes(&mut router);
    ephemeral::routes(&mut router);
    directory::routes(&mut router);
    push::routes(&mut router);
    keys::routes(&mut router);
    backup::routes(&mut router);
    to_device::routes(&mut router);
    tags::routes(&mut router);
    report::routes(&mut router);
    openid::routes(&mut router);
    admin::routes(&mut router);
    appservice::routes(&mut router);
    thirdparty::routes(&mut router);
    router
}

/// One endpoint the client listener routes: its method and path template, in which `{name}`
/// marks a path variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
}

/// Every endpoint the client listener routes: ruma's, from [`router`] (every path of each request
/// type), and the others, from [`custom`]. Both come from what the server registers, so whatever
/// walks this list (the malformed-input sweep) sees a new endpoint without being told.
pub fn endpoints() -> Vec<Endpoint> {
    let mut all = router().endpoints();
    all.extend(custom().into_iter().map(|(method, path, _)| Endpoint { method, path }));
    all.sort_by(|a, b| (a.path, a.method.as_str()).cmp(&(b.path, b.method.as_str())));
    all.dedup();
    all
}

type CustomRoute = (Method, &'static str, fn() -> actix_web::Route);

/// The endpoints outside ruma's types, in one table that the server registers
/// ([`configure_custom`]) and [`endpoints`] lists.
fn custom() -> Vec<CustomRoute> {
    vec![
        (Method::POST, "/_hearth/client/v1/threepid/submit_token", || web::post().to(threepid::submit_token)),
        // The link in the email: answers with a small HTML page, not JSON.
        (Method::GET, "/_hearth/client/v1/threepid/submit_token", || {
            web::get().to(threepid::submit_token_link)
        }),
        (Method::POST, "/_matrix/client/unstable/chat.hearth.login.otp/requestToken", || {
            web::post().to(threepid::request_login_code)
        }),
        // ruma leaves capabilities with the spec's default out; clients look for them.
        (Method::GET, "/_matrix/client/v3/capabilities", || web::get().to(discovery::get_capabilities)),
        (Method::GET, "/_matrix/client/r0/capabilities", || web::get().to(discovery::get_capabilities)),
        // A federation endpoint that widgets reach through the client's homeserver; also on
        // the federation listener, where the spec puts it.
        (Method::GET, "/_matrix/federation/v1/openid/userinfo", || web::get().to(openid::userinfo)),
        // For load balancers and health checks: plain `OK`.
        (Method::GET, "/health", || web::get().to(|| async { HttpResponse::Ok().body("OK") })),
    ]
}

/// Registers the endpoints of [`custom`]; a known path with another method answers 405
/// `M_UNRECOGNIZED`, as ruma's do.
pub fn configure_custom(config: &mut web::ServiceConfig) {
    let mut paths: std::collections::BTreeMap<&str, Vec<fn() -> actix_web::Route>> = Default::default();
    for (_, path, route) in custom() {
        paths.entry(path).or_default().push(route);
    }
    for (path, routes) in paths {
        // The path template, so that handlers may use the `Ruma<T>` extractor for authentication.
        let resource = web::resource(path).app_data(crate::ruma_wrapper::PathTemplate(path));
        let resource = routes.into_iter().fold(resource, |resource, route| resource.route(route()));
        config.service(resource.default_service(web::to(crate::ruma_wrapper::method_not_allowed)));
    }
}
