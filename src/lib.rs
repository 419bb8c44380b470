//! Portcullis: a zero-trust sidecar proxy for payment services.
//!
//! One crate, a library plus the `portcullis` binary. `app` wires the
//! components; each module owns one job and its own error type.
// Denied, not forbidden: the one exception is the audit writer's
// scheduling-policy call (`audit::writer`), with its proof beside it.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod certs;
pub mod config;
pub mod demo;
pub mod drain;
pub mod identity;
pub mod inject;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod rfc3339;
pub mod tls;
pub mod watch;
