//! HTTP APIs. `client` is the client-server API; federation comes with its own module.

pub mod client;
