//! The outbound data path: the app calls a loopback listener with plain
//! HTTP/1.1 or HTTP/2 (prior knowledge), and Portcullis originates mTLS to
//! the route its `Host` names, as this workload.
//!
//! Per request, in order: reserve the audit slot (none: 503), find the
//! route (none: 502 naming the host, nothing leaves), normalise the path
//! (unsafe: 400), ask `policy.egress_query` if one is set (deny: 403,
//! nothing leaves), then forward over a pooled connection to the route
//! whose server proved an accepted SPIFFE ID (otherwise 502). Every branch
//! ends in one audit record with `direction = "outbound"` and one
//! `portcullis_outbound_requests_total` increment.

pub mod connector;
pub mod route;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use self::connector::{ConnectError, Connector, ServerPeer};
use self::route::RouteSpec;
use crate::audit::{self, AuditSink, Event, Kind};
use crate::config::{self, PolicyMode};
use crate::drain;
use crate::identity::IdentitySnapshot;
use crate::metrics::Metrics;
use crate::policy::input::{build_input, RequestFacts};
use crate::policy::PolicySnapshot;
use crate::proxy::breaker::Breaker;
use crate::proxy::{self, error_response, json_response, path, Body};

/// The outbound side, built once by the app from `[outbound]`.
pub struct Outbound {
    routes: HashMap<String, Route>,
    request_timeout: Duration,
    max_connections: usize,
    header_read_timeout: Duration,
    identity: Arc<ArcSwap<IdentitySnapshot>>,
    policy: Arc<ArcSwap<PolicySnapshot>>,
    metrics: Arc<Metrics>,
    audit: AuditSink,
    policy_mode: PolicyMode,
}

/// One route: its pool of verified connections and its circuit breaker.
struct Route {
    spec: RouteSpec,
    client: Client<Connector, Incoming>,
    breaker: Breaker,
}

/// What the outbound side is given by the app.
pub struct Deps {
    pub identity: Arc<ArcSwap<IdentitySnapshot>>,
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    pub metrics: Arc<Metrics>,
    pub audit: AuditSink,
    /// `dry_run` applies to the egress rule as to the inbound one.
    pub policy_mode: PolicyMode,
}

impl Outbound {
    pub fn new(cfg: &config::Outbound, deps: Deps) -> Result<Outbound, config::Error> {
        // Trust domains were checked by `Config::validate`; here only the
        // shape matters.
        let specs = route::parse_all(&cfg.routes, None)?;
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let routes = specs
            .into_iter()
            .map(|spec| {
                let connector = Connector::new(connector::Settings {
                    route: spec.clone(),
                    identity: deps.identity.clone(),
                    connect_timeout,
                    metrics: deps.metrics.outbound.clone(),
                    audit: deps.audit.clone(),
                });
                let client = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_millis(cfg.idle_timeout_ms))
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(connector);
                let gauge = deps
                    .metrics
                    .outbound
                    .circuit_state
                    .with_label_values(&[spec.host.as_str()]);
                let breaker = Breaker::new(
                    cfg.breaker_failures,
                    Duration::from_millis(cfg.breaker_cooldown_ms),
                    gauge,
                );
                (
                    spec.host.clone(),
                    Route {
                        spec,
                        client,
                        breaker,
                    },
                )
            })
            .collect();
        Ok(Outbound {
            routes,
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
            max_connections: cfg.max_connections,
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
            identity: deps.identity,
            policy: deps.policy,
            metrics: deps.metrics,
            audit: deps.audit,
            policy_mode: deps.policy_mode,
        })
    }
}

/// Accepts the app's connections until draining starts. The listener is on
/// loopback (config validation refuses anything else), so the caller is
/// the pod itself and is not authenticated further.
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>, drain: drain::Watch) {
    // Still bounded: a looping or leaking app must not exhaust the
    // sidecar's file descriptors, which inbound traffic needs too.
    let slots = Arc::new(Semaphore::new(outbound.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = drain.signaled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(peer = %peer, "outbound connection limit reached, closing connection");
                    continue;
                };
                let (outbound, drain) = (outbound.clone(), drain.clone());
                tokio::spawn(async move {
                    handle_connection(tcp, peer, outbound, drain).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn handle_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    outbound: Arc<Outbound>,
    drain: drain::Watch,
) {
    let _ = tcp.set_nodelay(true);
    let header_read_timeout = outbound.header_read_timeout;
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let outbound = outbound.clone();
        async move { Ok::<_, Infallible>(handle_request(req, peer, &outbound).await) }
    });
    // `auto` tells HTTP/1.1 from the HTTP/2 prior-knowledge preface.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    if let Err(e) = proxy::until_drained(conn, &drain).await {
        tracing::debug!(peer = %peer, error = %e, "outbound connection ended with an error");
    }
}

async fn handle_request(
    req: Request<Incoming>,
    peer: SocketAddr,
    out: &Outbound,
) -> Response<Body> {
    let started = Instant::now();
    // One wall-clock read for the audit timestamp and the policy's `time`,
    // as on the inbound side.
    let arrived = SystemTime::now();
    let request_id = crate::proxy::new_request_id();
    let identity = out.identity.load_full();
    let policy = out.policy.load_full();
    let method = req.method().as_str().to_owned();
    let host = route::request_host(req.headers(), req.uri());
    let route = host.as_deref().and_then(|h| out.routes.get(h));

    let mut event = Event::at(Kind::Request, arrived);
    event.request_id = Some(request_id.clone());
    event.direction = Some(audit::Direction::Outbound);
    event.source = Some(audit::Source {
        spiffe_id: Some(identity.spiffe_id.as_str().to_owned()),
        address: peer.to_string(),
    });
    event.destination = route.map(|r| audit::Destination {
        host: r.spec.host.clone(),
        address: r.spec.address.clone(),
        spiffe_id: None,
        expected: r.spec.server.describe(),
    });
    event.request = Some(audit::Request {
        method: method.clone(),
        path: audit::redact_pans(
            req.uri()
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/"),
        )
        .into_owned(),
        headers: Some(out.audit.header_policy().redact(req.headers())),
    });
    let Some(mut record) = out.audit.reserve(event, started) else {
        out.metrics
            .outbound
            .requests
            .record("error", 503, started.elapsed().as_secs_f64());
        return proxy::refuse_unaudited(&out.audit, &request_id);
    };

    let dry_run = out.policy_mode == PolicyMode::DryRun;
    let outcome = proxy::Outcome {
        requests: &out.metrics.outbound.requests,
        policy_revision: &policy.revision,
        dry_run,
    };
    // Egress decisions are not cached.
    let finish = |mut record: audit::RequestRecord,
                  decision: &str,
                  allowed: bool,
                  reason: String,
                  response: Response<Body>| {
        outcome.decide(&mut record, allowed, &reason, false);
        outcome.complete(record, decision, response)
    };

    let Some(route) = route else {
        let named = host.unwrap_or_default();
        let reason = if named.is_empty() {
            "the request names no host (Host or :authority); nothing was sent".to_owned()
        } else {
            format!("no [[outbound.route]] for host {named:?}; nothing was sent")
        };
        tracing::info!(request_id, host = %named, "{reason}");
        let resp = json_response(
            StatusCode::BAD_GATEWAY,
            serde_json::json!({
                "error": "unrouted",
                "host": named,
                "reason": reason,
                "request_id": request_id,
            }),
            &request_id,
        );
        return finish(record, "unrouted", false, reason, resp);
    };

    let path = match path::normalize(req.uri().path()) {
        Ok(p) => p,
        Err(e) => {
            let reason = format!("request path refused before policy: {e}");
            let resp = proxy::bad_request(&reason, &request_id);
            return finish(record, "deny", false, reason, resp);
        }
    };
    let query = req.uri().query().map(str::to_owned);
    let target = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    if let Some(r) = record.event.request.as_mut() {
        r.path = audit::redact_pans(&target).into_owned();
    }

    let (mut parts, body) = req.into_parts();
    let principal = route.spec.server.principal();
    let protocol = match parts.version {
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    };
    let facts = RequestFacts {
        request_id: &request_id,
        method: &method,
        path: &path,
        query: query.as_deref(),
        host: &route.spec.host,
        scheme: "http",
        protocol,
        headers: policy.input_headers(&parts.headers),
        source_spiffe_id: identity.spiffe_id.as_str(),
        source_trust_domain: identity.spiffe_id.trust_domain(),
        source_path: identity.spiffe_id.path(),
        source_addr: peer,
        destination_spiffe_id: &principal,
        time: arrived,
    };
    // A refusal is (reason, metric label, response); in dry-run it is only
    // recorded, and the request goes on as `would_deny`.
    let verdict = match policy.evaluate_egress(build_input(&facts)) {
        None => Ok(format!("routed to {}", route.spec.host)),
        Some(Ok(decision)) if decision.allowed => Ok(decision.reason.unwrap_or_else(|| {
            format!(
                "allowed by {}",
                policy.egress_query.as_deref().unwrap_or("")
            )
        })),
        Some(Ok(decision)) => {
            let reason = decision.reason.clone().unwrap_or_else(|| {
                format!(
                    "egress to {} denied by {}",
                    route.spec.host,
                    policy.egress_query.as_deref().unwrap_or("")
                )
            });
            let resp = error_response(
                proxy::denial_status(decision.http_status),
                "forbidden",
                &reason,
                &request_id,
                Some(&policy.revision),
            );
            Err((reason, "deny", resp))
        }
        Some(Err(e)) => {
            let reason = format!("egress policy evaluation failed: {e}");
            let resp = proxy::policy_error(&reason, &request_id, &policy.revision);
            Err((reason, "error", resp))
        }
    };
    let (label, allowed, reason) = match verdict {
        Ok(reason) => ("allow", true, reason),
        Err((reason, _, _)) if dry_run => {
            tracing::info!(request_id, host = %route.spec.host, "dry run, would deny egress: {}", audit::redact_pans(&reason));
            (
                "would_deny",
                false,
                format!("dry run, would deny: {reason}"),
            )
        }
        Err((reason, label, resp)) => {
            tracing::info!(request_id, host = %route.spec.host, "egress refused by policy: {}", audit::redact_pans(&reason));
            return finish(record, label, false, reason, resp);
        }
    };

    proxy::strip_hop_by_hop(&mut parts.headers);
    // The server's sidecar sets the verified identity itself; anything the
    // app put under these names would only be stripped there.
    parts.headers.remove(&proxy::XFCC);
    parts.headers.remove(&proxy::X_SPIFFE_ID);
    // The app named the outbound listener (and maybe its port); the server
    // is told the route's host, which must also agree with `:authority`
    // when the connection is HTTP/2.
    if let Ok(v) = HeaderValue::from_str(&route.spec.host) {
        parts.headers.insert(HOST, v);
    }
    parts.uri = match proxy::upstream_uri("https", &route.spec.host, target) {
        Ok(uri) => uri,
        Err(reason) => {
            let resp = proxy::bad_request(&reason, &request_id);
            return finish(record, "deny", false, reason, resp);
        }
    };
    // hyper speaks HTTP/2 on a connection whose server chose h2 by ALPN,
    // whatever the app spoke to us.
    parts.version = Version::HTTP_11;

    let Some(admission) = route.breaker.admit() else {
        out.metrics
            .outbound
            .upstream_errors
            .with_label_values(&["circuit_open"])
            .inc();
        let message = format!(
            "circuit to {} open after repeated failures; not tried",
            route.spec.host
        );
        let resp = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            &message,
            &request_id,
            None,
        );
        return finish(record, label, allowed, format!("{reason}; {message}"), resp);
    };
    // Decided before the request goes: an app that hangs up while it is
    // with the server drops this future at the await below, and what was
    // decided must still reach the trail and the metrics.
    outcome.decide(&mut record, allowed, &reason, false);
    let hang_up = outcome.hang_up(label, started);
    let sent = tokio::time::timeout(
        out.request_timeout,
        route.client.request(Request::from_parts(parts, body)),
    )
    .await;
    std::mem::forget(hang_up);
    admission.record(proxy::breaker_success(&sent));
    let (kind, status, error, message) = match sent {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            if let Some(ServerPeer(server)) = parts.extensions.get::<ServerPeer>() {
                if let Some(d) = record.event.destination.as_mut() {
                    d.spiffe_id = Some(server.spiffe_id.as_str().to_owned());
                }
            }
            proxy::strip_hop_by_hop(&mut parts.headers);
            proxy::set_request_id(&mut parts.headers, &request_id);
            let resp = Response::from_parts(parts, Either::Left(body.into()));
            return outcome.complete(record, label, resp);
        }
        Ok(Err(e)) => match connect_error(&e) {
            Some(c) if c.is_refusal() => (
                c.kind(),
                StatusCode::BAD_GATEWAY,
                "egress_refused",
                c.to_string(),
            ),
            Some(c) => (
                c.kind(),
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                c.to_string(),
            ),
            None => (
                "protocol",
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("upstream failed: {}", proxy::error_chain(&e)),
            ),
        },
        Err(_) => (
            "timeout",
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!(
                "{} did not answer within {:?}",
                route.spec.host, out.request_timeout
            ),
        ),
    };
    out.metrics
        .outbound
        .upstream_errors
        .with_label_values(&[kind])
        .inc();
    tracing::warn!(request_id, host = %route.spec.host, kind, "{}", audit::redact_pans(&message));
    let resp = error_response(status, error, &message, &request_id, None);
    // A server that could not prove the route's identity is a refusal, not
    // an outage: the request was not allowed to leave.
    let (label, allowed) = if kind == "refused" {
        ("refused", false)
    } else {
        (label, allowed)
    };
    finish(record, label, allowed, format!("{reason}; {message}"), resp)
}

/// The connector's own error inside hyper-util's, if that is what failed.
fn connect_error(e: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        source = err.source();
    }
    None
}
