//! HTTP APIs: `client` is the client-server API, `federation` the server-server API.

pub mod client;
pub mod federation;
