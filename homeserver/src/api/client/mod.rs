//! The client-server API, one file per spec area.

mod account;
mod backup;
mod device;
mod directory;
mod discovery;
mod ephemeral;
mod keys;
mod profile;
pub mod push;
mod register;
mod room;
mod session;
mod sync;
mod threepid;
mod to_device;
mod user_data;

pub use self::threepid::configure as configure_custom;
use crate::ruma_wrapper::Router;

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
    sync::routes(&mut router);
    profile::routes(&mut router);
    user_data::routes(&mut router);
    ephemeral::routes(&mut router);
    directory::routes(&mut router);
    push::routes(&mut router);
    keys::routes(&mut router);
    backup::routes(&mut router);
    to_device::routes(&mut router);
    router
}
