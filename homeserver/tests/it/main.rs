//! Hearth's integration tests: the real server on a loopback port, on SQLite and on Postgres.

mod accounts;
mod common;
mod errors;
mod interop;
mod storage;
