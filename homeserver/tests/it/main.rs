//! Hearth's integration tests: the real server on a loopback port, on SQLite and on Postgres.

// A panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod accounts;
mod appservice;
mod around;
mod cli;
mod cluster;
mod common;
mod directory;
mod discovery;
mod dns;
mod durability;
mod e2ee;
mod errors;
mod faults;
mod features;
mod federated_chat;
mod federation;
mod federation_edus;
mod federation_intake;
mod guests;
mod hardening;
mod interop;
mod limits;
mod providers;
mod push;
mod recaptcha;
mod room_versions;
mod rooms;
mod self_destruct;
mod storage;
mod stream;
mod sweep;
mod synapse;
mod sync_shape;
mod threepid;
mod tls;
