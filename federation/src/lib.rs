#![doc = include_str!("../README.md")]

pub mod signing_key;
