#![doc = include_str!("../README.md")]

pub mod pdu;
pub mod signing_key;
