//! The admin listener: plain HTTP, loopback by default, read-only GETs.
//!
//! `/metrics` (Prometheus text), `/healthz` (the process answers), `/readyz`
//! (identity valid, policy loaded, listening), `/config` (the effective
//! configuration), `/policy` (what policy is in force).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::drain;
use crate::identity::workload_api::SourceHealth;
use crate::identity::IdentitySnapshot;
use crate::policy::reload::LastReload;
use crate::policy::PolicySnapshot;

pub struct State {
    pub registry: Registry,
    pub config: Arc<Config>,
    pub identity: Arc<ArcSwap<IdentitySnapshot>>,
    pub identity_health: Arc<SourceHealth>,
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    pub policy_reload: Arc<ArcSwap<LastReload>>,
    /// Set once the inbound listener accepts, cleared when draining starts.
    pub listening: Arc<AtomicBool>,
}

pub async fn serve(listener: TcpListener, state: Arc<State>, drain: drain::Watch) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = drain.signaled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn route(req: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/metrics" => match crate::metrics::render(&state.registry) {
            Ok(body) => {
                let mut r = text(StatusCode::OK, &body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let problems = readiness_problems(state, SystemTime::now());
            if problems.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {}\n", problems.join("; ")),
                )
            }
        }
        "/config" => json(StatusCode::OK, &state.config.redacted()),
        "/policy" => {
            let p = state.policy.load();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "revision": p.revision,
                    "query": p.query,
                    "egress_query": p.egress_query,
                    "files": p.files,
                    "loaded_at": crate::audit::timestamp(p.loaded_at),
                    "mode": state.config.policy.mode,
                    "evaluator": p.evaluator,
                    "evaluator_reason": p.evaluator_reason,
                    "decision_cache": p.decision_cache().to_json(),
                    "last_reload": state.policy_reload.load().to_json(),
                }),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Empty when ready; otherwise every reason it is not.
pub fn readiness_problems(state: &State, now: SystemTime) -> Vec<String> {
    let mut problems = Vec::new();
    let identity = state.identity.load();
    // Readiness turns false identity.min_remaining before the SVID expires,
    // so Kubernetes stops routing to a pod whose identity is about to lapse.
    let margin = state.config.identity.min_remaining;
    if now >= identity.not_after {
        problems.push(format!(
            "SVID {} (serial {}) expired at {}",
            identity.spiffe_id,
            identity.serial,
            crate::audit::timestamp(identity.not_after),
        ));
    } else if !identity.is_valid_at(now, margin) {
        problems.push(format!(
            "SVID {} (serial {}) expires at {}, within identity.min_remaining ({}s)",
            identity.spiffe_id,
            identity.serial,
            crate::audit::timestamp(identity.not_after),
            margin.as_secs()
        ));
    }
    if let Some(problem) = state.identity_health.problem() {
        problems.push(problem.to_string());
    }
    if !state.listening.load(Ordering::Acquire) {
        problems.push("inbound listener is not accepting".into());
    }
    problems
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).unwrap_or_default();
    let mut r = text(status, &(body + "\n"));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
