//! Portcullis: a zero-trust sidecar proxy for payment services.
#![forbid(unsafe_code)]
pub mod config;
pub mod audit;
pub mod drain;
pub mod metrics;
