//! The public room directory, as other servers ask for it (`/_matrix/federation/v1/publicRooms`)
//! for their users browsing this server's rooms: the same pages the client API gives.

use actix_web::web;
use ruma::api::federation::directory::{get_public_rooms, get_public_rooms_filtered};

use crate::{
    api::client::directory::{directory_of, directory_page, with_page},
    error::Result,
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(public_rooms).add(public_rooms_filtered);
}

/// GET /_matrix/federation/v1/publicRooms
async fn public_rooms(
    state: web::Data<AppState>,
    request: Ruma<get_public_rooms::v1::Request>,
) -> Result<get_public_rooms::v1::Response> {
    let body = &request.body;
    let directory = directory_of(&body.room_network)?;
    let page = directory_page(&state, directory, body.limit, body.since.as_deref(), None).await?;
    Ok(with_page!(get_public_rooms::v1::Response::new(), page))
}

/// POST /_matrix/federation/v1/publicRooms
async fn public_rooms_filtered(
    state: web::Data<AppState>,
    request: Ruma<get_public_rooms_filtered::v1::Request>,
) -> Result<get_public_rooms_filtered::v1::Response> {
    let body = &request.body;
    let directory = directory_of(&body.room_network)?;
    let term = body.filter.generic_search_term.as_deref();
    let page = directory_page(&state, directory, body.limit, body.since.as_deref(), term).await?;
    Ok(with_page!(get_public_rooms_filtered::v1::Response::new(), page))
}
