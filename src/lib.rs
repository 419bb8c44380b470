//! Portcullis: a zero-trust sidecar proxy for payment services.
#![forbid(unsafe_code)]

pub mod certs;
pub mod identity;
pub mod tls;
