#![doc = include_str!("../README.md")]

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod ruma_wrapper;
pub mod server;
pub mod state;
pub mod storage;
