#![doc = include_str!("../README.md")]

pub mod auth;
pub mod keys;
pub mod pdu;
pub mod resolve;
pub mod signing_key;
