//! Portcullis: a zero-trust sidecar proxy for payment services.
#![forbid(unsafe_code)]

pub mod policy;
