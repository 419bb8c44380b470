//! The inbound data path: accept, mTLS handshake, HTTP, authorization,
//! forwarding.
//!
//! Per request, in order: reserve the audit slot (none: 503), normalise the
//! path (unsafe: 400), strip identity headers the caller sent, evaluate the
//! policy on the input document, then either answer the deny or forward to
//! the upstream with the verified identity. Every branch ends in exactly one
//! audit record, and every decision in one `portcullis_requests_total`
//! increment, a caller hanging up after it included (as a 499).

mod activity;
mod balance;
pub mod body;
pub(crate) mod breaker;
mod chunked;
mod exchange;
mod framing;
pub mod path;
pub mod pool;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::audit::{self, AuditSink, Event, Kind};
use crate::config::PolicyMode;
use crate::drain;
use crate::identity::{IdentitySnapshot, SpiffeId};
use crate::metrics::Metrics;
use crate::policy::input::{BodyFacts, RequestFacts};
use crate::policy::{CacheUse, Decision, PolicySnapshot};
use crate::tls::{self, PeerIdentity};

pub type Body = Either<pool::PooledBody, Full<Bytes>>;

/// Headers that carry the caller's identity to the service. Only the proxy
/// may set them: whatever the caller sent under these names is removed.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub const X_SPIFFE_ID: HeaderName = HeaderName::from_static("x-spiffe-id");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Connection-level headers (RFC 9110 7.6.1) that must not be forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

#[derive(Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_list_bytes: usize,
    pub max_request_body_bytes: usize,
    /// No request in flight for this long: the connection is closed.
    pub idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    /// Streams a peer may open and reset before the server accepted them
    /// (the HTTP/2 rapid-reset attack) before the connection gets GOAWAY.
    pub h2_max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for a peer's protocol errors before
    /// the connection gets GOAWAY.
    pub h2_max_local_error_reset_streams: usize,
}

/// The local service, reached through a pool of keep-alive connections.
pub struct Upstream {
    /// Per worker thread (see [`Upstream::for_worker`]): its connections
    /// are driven by the runtime that made them.
    pool: Arc<pool::Pool>,
    timeout: Duration,
    /// One for the service, whichever worker sees its failures.
    breaker: Arc<breaker::Breaker>,
}

/// When the circuit breaker opens, and for how long.
pub struct BreakerSettings {
    pub failures: u32,
    pub cooldown: Duration,
}

impl Upstream {
    pub fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        timeout: Duration,
        breaker: BreakerSettings,
        metrics: &Metrics,
    ) -> Upstream {
        Upstream {
            pool: pool::Pool::new(addr, connect_timeout),
            timeout,
            breaker: Arc::new(breaker::Breaker::new(
                breaker.failures,
                breaker.cooldown,
                metrics.circuit_breaker_state.clone(),
            )),
        }
    }

    /// The same service with a pool of its own and the shared breaker.
    pub fn for_worker(&self) -> Upstream {
        Upstream {
            pool: self.pool.empty_twin(),
            timeout: self.timeout,
            breaker: self.breaker.clone(),
        }
    }
}

/// Everything the data path needs, passed in so tests can build their own.
pub struct Shared {
    pub identity: Arc<ArcSwap<IdentitySnapshot>>,
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    pub metrics: Arc<Metrics>,
    pub audit: AuditSink,
    pub policy_mode: PolicyMode,
    /// 0: bodies are never read for the policy.
    pub max_body_bytes: usize,
    pub upstream: Upstream,
    pub limits: Limits,
    pub rate_limiter: Arc<crate::ratelimit::RateLimiter>,
}

impl Shared {
    /// What one worker thread serves with: everything shared, except an
    /// upstream pool of its own.
    pub fn for_worker(&self) -> Shared {
        Shared {
            identity: self.identity.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            audit: self.audit.clone(),
            policy_mode: self.policy_mode,
            max_body_bytes: self.max_body_bytes,
            upstream: self.upstream.for_worker(),
            limits: self.limits.clone(),
            rate_limiter: self.rate_limiter.clone(),
        }
    }
}

/// What a request knows about the connection it arrived on.
struct ConnCtx {
    peer_addr: SocketAddr,
    peer: PeerIdentity,
    own_id: SpiffeId,
    protocol: &'static str,
    /// Made once per connection rather than per request: the same for
    /// every request on it.
    peer_addr_text: String,
    identity_headers: IdentityHeaders,
}

/// The values of the identity headers, which depend only on the
/// connection. Cloning a `HeaderValue` shares its bytes.
struct IdentityHeaders {
    xfcc: HeaderValue,
    spiffe_id: HeaderValue,
}

impl IdentityHeaders {
    /// `By=<own id>;Hash=<sha256 of the peer leaf>;URI=<peer id>`, Envoy's
    /// XFCC. `None` only if a value is not a valid header value, which a
    /// verified SPIFFE ID and hex never are.
    fn new(own_id: &SpiffeId, peer: &PeerIdentity) -> Option<IdentityHeaders> {
        let xfcc = format!(
            "By={};Hash={};URI={}",
            own_id, peer.leaf_sha256, peer.spiffe_id
        );
        Some(IdentityHeaders {
            xfcc: HeaderValue::from_str(&xfcc).ok()?,
            spiffe_id: HeaderValue::from_str(peer.spiffe_id.as_str()).ok()?,
        })
    }
}

/// Accepts until draining starts, then waits for the connections it
/// accepted. One failed accept or handshake never ends the loop. `slots`
/// is shared by every accept loop on the listener.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    (balance, me): (Arc<balance::Balance>, usize),
    drain: drain::Watch,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = drain.signaled() => break,
            r = async {
                balance.turn(me).await;
                listener.accept().await
            } => r,
            // Reaps finished connections so the set holds only live ones.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, peer_addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.connections_refused.inc();
            tracing::warn!(peer = %peer_addr, "connection limit reached, closing connection");
            continue;
        };
        let seat = balance.seat(me);
        let shared = shared.clone();
        let drain = drain.clone();
        conns.spawn(async move {
            shared.metrics.open_connections.inc();
            handle_connection(tcp, peer_addr, &shared, drain).await;
            shared.metrics.open_connections.dec();
            drop(slot);
            drop(seat);
        });
    }
    // Closed now, not when the last connection ends: new connections are
    // refused while the ones in hand drain.
    drop(listener);
    drop(drain);
    while conns.join_next().await.is_some() {}
}

/// The HTTP/1.1 settings, on hyper's builder or on the sniffing one's
/// (the two are different types with the same methods).
macro_rules! http1_limits {
    ($builder:expr, $limits:expr) => {
        $builder
            // Our own timer (activity.rs) times heads: hyper's would also
            // run between keep-alive requests and cut idle clients short.
            .header_read_timeout(None)
            // hyper's own cap sits above ours so that an oversized head
            // normally reaches our counted 431; hyper answers 431 itself
            // beyond it.
            .max_buf_size($limits.max_header_list_bytes.saturating_mul(2).max(8192))
    };
}

/// The HTTP/2 settings, on either builder.
macro_rules! http2_limits {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_concurrent_streams($limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams($limits.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams($limits.h2_max_local_error_reset_streams)
            .max_header_list_size(
                u32::try_from($limits.max_header_list_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
            )
    };
}

async fn handle_connection(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    shared: &Arc<Shared>,
    drain: drain::Watch,
) {
    let _ = tcp.set_nodelay(true);
    // The snapshot is fixed for this connection: a rotation affects only
    // handshakes that start after it.
    let identity = shared.identity.load_full();
    let acceptor = TlsAcceptor::from(identity.server_config.clone());
    let stream =
        match tokio::time::timeout(shared.limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let (failure, message) = tls::classify_handshake_error(&e);
                let presented = tls::presented_spiffe_id(&e);
                reject_handshake(shared, peer_addr, presented, failure.label(), &message);
                return;
            }
            Err(_) => {
                reject_handshake(
                    shared,
                    peer_addr,
                    None,
                    "timeout",
                    "handshake did not finish in time",
                );
                return;
            }
        };
    let (_, conn) = stream.get_ref();
    let Some(peer) = tls::peer_identity(conn) else {
        reject_handshake(
            shared,
            peer_addr,
            None,
            "bad_svid",
            "no SPIFFE ID in the verified client certificate",
        );
        return;
    };
    let Some(identity_headers) = IdentityHeaders::new(&identity.spiffe_id, &peer) else {
        // Never forward a request without the identity the service relies on.
        reject_handshake(
            shared,
            peer_addr,
            Some(peer.spiffe_id.to_string()),
            "bad_svid",
            "the client's SPIFFE ID cannot be carried in a header",
        );
        return;
    };
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let protocol = match alpn.as_deref() {
        Some(b"h2") => "HTTP/2",
        _ => "HTTP/1.1",
    };
    shared
        .metrics
        .tls_handshakes
        .with_label_values(&["ok"])
        .inc();
    tracing::debug!(peer = %peer_addr, spiffe_id = %peer.spiffe_id, protocol, "connection authenticated");

    let ctx = Arc::new(ConnCtx {
        peer_addr,
        peer,
        own_id: identity.spiffe_id.clone(),
        protocol,
        peer_addr_text: peer_addr.to_string(),
        identity_headers,
    });
    let ctx_id = ctx.peer.spiffe_id.clone();
    let activity = activity::Activity::new(
        protocol == "HTTP/1.1",
        shared.limits.idle_timeout,
        shared.limits.header_read_timeout,
    );
    let svc_shared = shared.clone();
    let svc_activity = activity.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        let shared = svc_shared.clone();
        let in_flight = svc_activity.request_started();
        async move {
            // Boxed: hyper keeps a slot sized for this future in every
            // connection, idle or not, and the handler's state (about 3 KB)
            // need only exist while a request does.
            let resp = boxed(|| handle_request(req, &ctx, &shared)).await;
            Ok::<_, Infallible>(resp.map(|body| activity::Tracked::new(body, in_flight)))
        }
    });

    let io = TokioIo::new(activity::Watched::new(stream, activity.clone()));
    let limits = &shared.limits;
    // ALPN names the protocol; only a client that negotiated none is
    // sniffed (HTTP/2 with prior knowledge). Each connection future is
    // boxed at its own size: one sized for the HTTP/2 state machine would
    // make every idle HTTP/1.1 connection carry it (issue 7 measured
    // memory per idle keep-alive connection).
    let served = match alpn.as_deref() {
        Some(b"http/1.1") => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            http1_limits!(builder, limits);
            let conn = builder.serve_connection(io, service);
            Box::pin(drive(conn, shared, &activity, &drain, peer_addr)).await
        }
        Some(b"h2") => {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            http2_limits!(builder, limits);
            let conn = builder.serve_connection(io, service);
            Box::pin(drive(conn, shared, &activity, &drain, peer_addr)).await
        }
        _ => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            http1_limits!(builder.http1(), limits);
            http2_limits!(builder.http2(), limits);
            let conn = builder.serve_connection(io, service);
            Box::pin(drive(conn, shared, &activity, &drain, peer_addr)).await
        }
    };
    if let Err(e) = served {
        if is_h2_calm_down(e.as_ref()) {
            shared
                .metrics
                .limits_exceeded
                .with_label_values(&["h2_reset_flood"])
                .inc();
            tracing::warn!(peer = %peer_addr, spiffe_id = %ctx_id, "closed an HTTP/2 connection with GOAWAY: too many reset streams");
        } else {
            tracing::debug!(peer = %peer_addr, error = %e, "connection ended with an error");
        }
    }
}

/// Boxes the future `make` returns, built in its allocation. `Box::pin(f())`
/// builds the future on the stack and then copies all of it, though only
/// its arguments are set: 3 KB per request for the request handler
/// (docs/performance.md, "Sixth round").
fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Serves one authenticated connection until it ends, draining starts, or
/// it sits idle (or mid-head) too long. `Ok` also when a timer closed it.
async fn drive<C>(
    conn: C,
    shared: &Shared,
    activity: &activity::Activity,
    drain: &drain::Watch,
    peer_addr: SocketAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: GracefulConnection,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.signaled() => {
            // Finish the requests in hand, refuse new ones, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        expired = activity.expired() => {
            let (label, why) = match expired {
                activity::Expired::Idle => {
                    // Nothing in flight: close_notify (HTTP/1.1) or GOAWAY
                    // (HTTP/2), then the close; a peer that does not let
                    // the shutdown finish is dropped after a grace period.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, conn.as_mut()).await;
                    ("idle_timeout", "closed a connection idle for longer than the idle timeout")
                }
                // A slowloris gets no graceful close: its head would never
                // end, so hyper would wait for it.
                activity::Expired::HeaderRead => (
                    "header_timeout",
                    "closed a connection that did not send its request head in time",
                ),
            };
            shared.metrics.limits_exceeded.with_label_values(&[label]).inc();
            tracing::info!(peer = %peer_addr, "{why}");
            return Ok(());
        }
    };
    result.map_err(Into::into)
}

/// Serves one connection to its end; once draining starts, it finishes the
/// requests in hand, refuses new ones, then closes.
pub(crate) async fn until_drained<I, S, B>(
    conn: auto::Connection<'_, I, S, TokioExecutor>,
    drain: &drain::Watch,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    TokioExecutor: auto::HttpServerConnExec<S::Future, B>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Whether the connection ended because h2 sent GOAWAY ENHANCE_YOUR_CALM
/// of its own accord: too many streams reset by the peer before they were
/// served (rapid reset) or by us for its errors.
fn is_h2_calm_down(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away()
                && h2.is_library()
                && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = err.source();
    }
    false
}

/// How long an idle connection's graceful close may take before it is
/// dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

fn reject_handshake(
    shared: &Shared,
    peer_addr: SocketAddr,
    presented: Option<String>,
    reason: &str,
    message: &str,
) {
    shared
        .metrics
        .tls_handshakes
        .with_label_values(&[reason])
        .inc();
    let message = audit::redact_pans(message);
    tracing::warn!(peer = %peer_addr, presented = ?presented, reason, "TLS handshake refused: {message}");
    shared.audit.record(Event::handshake_rejected(
        peer_addr, presented, reason, &message,
    ));
}

async fn handle_request(req: Request<Incoming>, ctx: &ConnCtx, shared: &Shared) -> Response<Body> {
    let started = Instant::now();
    // One wall-clock read for the audit timestamp and the policy's `time`.
    let arrived = SystemTime::now();
    let request_id = new_request_id();
    let policy = shared.policy.load_full();
    let method = req.method().as_str().to_owned();
    let raw_target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");

    let mut event = Event::at(Kind::Request, arrived);
    event.request_id = Some(request_id.clone());
    event.source = Some(audit::Source {
        spiffe_id: Some(ctx.peer.spiffe_id.as_str().to_owned()),
        address: ctx.peer_addr_text.clone(),
    });
    event.request = Some(audit::Request {
        method: method.clone(),
        path: audit::redact_pans(raw_target).into_owned(),
        headers: Some(shared.audit.header_policy().redact(req.headers())),
    });
    let Some(mut record) = shared.audit.reserve(event, started) else {
        shared
            .metrics
            .requests
            .record("error", 503, started.elapsed().as_secs_f64());
        return refuse_unaudited(&shared.audit, &request_id);
    };

    let dry_run = shared.policy_mode == PolicyMode::DryRun;
    // Set once the policy has decided; read when the audit event is made.
    // Atomic rather than a Cell only because the future must be Send.
    let from_cache = std::sync::atomic::AtomicBool::new(false);
    let outcome = Outcome {
        requests: &shared.metrics.requests,
        policy_revision: &policy.revision,
        dry_run,
    };
    let decide = |record: &mut audit::RequestRecord, allowed: bool, reason: &str| {
        let cached = from_cache.load(std::sync::atomic::Ordering::Relaxed);
        outcome.decide(record, allowed, reason, cached);
    };
    let finish = |mut record: audit::RequestRecord,
                  decision: &str,
                  allowed: bool,
                  reason: String,
                  response: Response<Body>| {
        decide(&mut record, allowed, &reason);
        outcome.complete(record, decision, response)
    };

    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    if header_bytes > shared.limits.max_header_list_bytes {
        return over_limit(Limit::HeaderBytes, shared, record, &request_id, finish);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.limits.max_request_body_bytes as u64) {
        return over_limit(Limit::BodyBytes, shared, record, &request_id, finish);
    }
    if let Err(why) = framing::check(&req) {
        let reason = format!("malformed request refused before policy: {why}");
        tracing::info!(request_id, peer = %ctx.peer.spiffe_id, "{reason}");
        let resp = bad_request(&reason, &request_id);
        return finish(record, "deny", false, reason, resp);
    }

    let path = match path::normalize(req.uri().path()) {
        Ok(p) => p,
        Err(e) => {
            let reason = format!("request path refused before policy: {e}");
            tracing::info!(request_id, peer = %ctx.peer.spiffe_id, "{}", audit::redact_pans(&reason));
            let resp = bad_request(&reason, &request_id);
            return finish(record, "deny", false, reason, resp);
        }
    };
    if let crate::ratelimit::Verdict::Limited { retry_after } = shared
        .rate_limiter
        .check(ctx.peer.spiffe_id.as_str(), &path)
    {
        shared.metrics.rate_limited.inc();
        let reason = format!("{} is over its rate limit", ctx.peer.spiffe_id);
        tracing::info!(request_id, "{reason}");
        let mut resp = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &reason,
            &request_id,
            None,
        );
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return finish(record, "deny", false, reason, resp);
    }
    let query = req.uri().query().map(str::to_owned);
    // Whether the target to forward and audit differs from the one that
    // came. Not only when the path changed: a target that is only a query
    // (`?q`, which HTTP/2 might carry) reports its path as "/" and must be
    // rebuilt as "/?q".
    let normalised = !(raw_target.starts_with('/') && req.uri().path() == path);
    // The event already holds the target as it came, redacted.
    if let Some(r) = record.event.request.as_mut().filter(|_| normalised) {
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        r.path = audit::redact_pans(&target).into_owned();
    }

    let (mut parts, body) = req.into_parts();
    // The policy must never see, nor the service receive, an identity the
    // caller chose.
    parts.headers.remove(&XFCC);
    parts.headers.remove(&X_SPIFFE_ID);
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();

    // Bodies are read only when asked for, only for formats the policy can
    // be shown parsed, and only up to the limit; the rest streams later.
    let (body, body_prefix) = match (shared.max_body_bytes, body::kind(&parts.headers)) {
        (limit, Some(kind)) if limit > 0 => {
            // Boxed for the same reason as the upstream call below.
            match boxed(|| {
                body::read_prefix(
                    body,
                    &parts.headers,
                    limit,
                    shared.limits.header_read_timeout,
                )
            })
            .await
            {
                Ok((replay, prefix)) => (replay, Some((kind, prefix))),
                Err(e) => {
                    let reason = e.to_string();
                    tracing::info!(request_id, peer = %ctx.peer.spiffe_id, "{reason}");
                    let status = match e {
                        body::Error::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
                        body::Error::Read(_) => StatusCode::BAD_REQUEST,
                    };
                    let resp = error_response(status, "bad_request", &reason, &request_id, None);
                    return finish(record, "deny", false, reason, resp);
                }
            }
        }
        _ => (body::Replay::new(body), None),
    };

    let eval_started = Instant::now();
    let facts = RequestFacts {
        request_id: &request_id,
        method: &method,
        path: &path,
        query: query.as_deref(),
        host: &host,
        scheme: "https",
        protocol: ctx.protocol,
        headers: policy.input_headers(&parts.headers),
        source_spiffe_id: ctx.peer.spiffe_id.as_str(),
        source_trust_domain: ctx.peer.spiffe_id.trust_domain(),
        source_path: ctx.peer.spiffe_id.path(),
        source_addr: ctx.peer_addr,
        destination_spiffe_id: ctx.own_id.as_str(),
        time: arrived,
    };
    let body_facts = body_prefix.as_ref().map(|(kind, prefix)| BodyFacts {
        kind: *kind,
        complete: prefix.complete.as_deref(),
        truncated: prefix.truncated,
    });
    let evaluated = policy.evaluate_request(&facts, body_facts);
    shared
        .metrics
        .policy_eval_duration
        .observe(eval_started.elapsed().as_secs_f64());
    if let Ok(d) = &evaluated {
        shared.metrics.count_decision_cache(d.cache.label());
        from_cache.store(
            d.cache == CacheUse::Hit,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    // In dry-run a deny or a policy error is only recorded here; the
    // request goes on as if allowed, but nothing the policy asked for is
    // applied to it.
    let mut would_deny: Option<String> = None;
    let decision = match evaluated {
        Ok(d) => d,
        Err(e) => {
            let reason = format!("policy evaluation failed: {e}");
            if dry_run {
                tracing::warn!(
                    request_id,
                    peer = %ctx.peer.spiffe_id,
                    method,
                    path = %audit::redact_pans(&path),
                    "dry run, forwarding anyway: {}",
                    audit::redact_pans(&reason)
                );
                would_deny = Some(reason);
                Decision::default()
            } else {
                tracing::error!(request_id, peer = %ctx.peer.spiffe_id, "{}", audit::redact_pans(&reason));
                let resp = policy_error(&reason, &request_id, &policy.revision);
                return finish(record, "error", false, reason, resp);
            }
        }
    };

    if !decision.allowed && would_deny.is_none() {
        let reason = decision.reason.clone().unwrap_or_else(|| {
            format!(
                "denied by {} (policy revision {})",
                policy.query,
                short(&policy.revision)
            )
        });
        if dry_run {
            // Logs get what the audit trail gets: card numbers masked.
            tracing::info!(
                request_id,
                peer = %ctx.peer.spiffe_id,
                method,
                path = %audit::redact_pans(&path),
                "dry run, would deny: {}",
                audit::redact_pans(&reason)
            );
            would_deny = Some(reason);
        } else {
            tracing::info!(
                request_id,
                peer = %ctx.peer.spiffe_id,
                method,
                path = %audit::redact_pans(&path),
                "denied: {}",
                audit::redact_pans(&reason)
            );
            // A policy may choose the status (a redirect included, as
            // OPA-Envoy allows), but never a success: nothing was served.
            let status = denial_status(decision.http_status);
            let mut resp = match &decision.body {
                Some(body) => policy_body_response(status, body, &request_id),
                None => error_response(
                    status,
                    "forbidden",
                    &reason,
                    &request_id,
                    Some(&policy.revision),
                ),
            };
            add_policy_headers(resp.headers_mut(), &decision.headers);
            add_policy_headers(resp.headers_mut(), &decision.response_headers_to_add);
            return finish(record, "deny", false, reason, resp);
        }
    }

    let (label, allowed, reason) = match would_deny {
        Some(reason) => (
            "would_deny",
            false,
            format!("dry run, would deny: {reason}"),
        ),
        None => (
            "allow",
            true,
            decision
                .reason
                .clone()
                .unwrap_or_else(|| format!("allowed by {}", policy.query)),
        ),
    };
    // Only an enforced allow shapes the request and response.
    let applied = if allowed {
        decision
    } else {
        Decision::default()
    };
    strip_hop_by_hop(&mut parts.headers);
    for name in &applied.request_headers_to_remove {
        parts.headers.remove(name.as_str());
    }
    add_policy_headers(&mut parts.headers, &applied.headers);
    set_identity_headers(&mut parts.headers, ctx, &request_id);
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    // Origin-form: the connection already names the service. When
    // normalising left the path as it came (nearly always), that is the
    // caller's own path and query, already parsed.
    let unchanged = parts.uri.path_and_query().filter(|_| !normalised).cloned();
    let target = match (unchanged, &query) {
        (Some(pq), _) => Ok(Uri::from(pq)),
        (None, Some(q)) => Uri::try_from(format!("{path}?{q}")),
        (None, None) => Uri::try_from(path),
    };
    parts.uri = match target {
        Ok(uri) => uri,
        Err(e) => {
            let reason = format!("cannot forward the request target: {e}");
            let resp = bad_request(&reason, &request_id);
            return finish(record, "deny", false, reason, resp);
        }
    };
    // The upstream leg is HTTP/1.1 on loopback, whatever the caller spoke.
    parts.version = Version::HTTP_11;

    let upstream = &shared.upstream;
    let Some(admission) = upstream.breaker.admit() else {
        shared
            .metrics
            .upstream_errors
            .with_label_values(&["circuit_open"])
            .inc();
        let message = "upstream circuit open after repeated failures; not tried".to_string();
        let resp = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            &message,
            &request_id,
            None,
        );
        return finish(record, label, allowed, format!("{reason}; {message}"), resp);
    };
    // Decided before the request goes: a caller that hangs up while it is
    // with the service drops this future at the await below, and what was
    // decided must still reach the trail (the record's drop writes it as
    // a 499) and the metrics (the guard counts it).
    decide(&mut record, allowed, &reason);
    let hang_up = outcome.hang_up(label, started);
    // Boxed: hyper keeps a slot sized for this request's future in every
    // connection, idle or not, and the connect path inside `send` would
    // make it a kilobyte larger (issue 7 measures memory per idle
    // connection).
    let send = boxed(|| {
        upstream.pool.send(Request::from_parts(
            parts,
            // Counted while streaming: the body is never buffered whole.
            Limited::new(body, shared.limits.max_request_body_bytes),
        ))
    });
    let sent = tokio::time::timeout(upstream.timeout, send).await;
    std::mem::forget(hang_up);
    admission.record(breaker_success(&sent));
    let (kind, status, message) = match sent {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            set_request_id(&mut parts.headers, &request_id);
            add_policy_headers(&mut parts.headers, &applied.response_headers_to_add);
            let resp = Response::from_parts(parts, Either::Left(body));
            return outcome.complete(record, label, resp);
        }
        Ok(Err(e)) if is_length_limit(&e) => {
            return over_limit(Limit::BodyBytes, shared, record, &request_id, finish);
        }
        Ok(Err(e)) if e.is_connect() => (
            "connect",
            StatusCode::SERVICE_UNAVAILABLE,
            format!("upstream unavailable: {}", error_chain(&e)),
        ),
        Ok(Err(e)) => (
            "protocol",
            StatusCode::BAD_GATEWAY,
            format!("upstream failed: {}", error_chain(&e)),
        ),
        Err(_) => (
            "timeout",
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream did not answer within {:?}", upstream.timeout),
        ),
    };
    shared
        .metrics
        .upstream_errors
        .with_label_values(&[kind])
        .inc();
    tracing::warn!(request_id, kind, "{}", audit::redact_pans(&message));
    let resp = error_response(status, "upstream_error", &message, &request_id, None);
    finish(record, label, allowed, format!("{reason}; {message}"), resp)
}

/// How a request ends, inbound and outbound alike: the decision goes on
/// its audit record, the record is written with the status sent, and the
/// request is counted under its decision.
pub(crate) struct Outcome<'a> {
    pub(crate) requests: &'a crate::metrics::Requests,
    pub(crate) policy_revision: &'a str,
    pub(crate) dry_run: bool,
}

impl<'a> Outcome<'a> {
    pub(crate) fn decide(
        &self,
        record: &mut audit::RequestRecord,
        allowed: bool,
        reason: &str,
        cached: bool,
    ) {
        record.event.decision = Some(audit::Decision {
            allowed,
            reason: audit::redact_pans(reason).into_owned(),
            policy_revision: self.policy_revision.to_owned(),
            dry_run: self.dry_run,
            cached,
        });
    }

    /// Writes `record`, the decision already on it, and counts the request.
    pub(crate) fn complete(
        &self,
        record: audit::RequestRecord,
        decision: &str,
        response: Response<Body>,
    ) -> Response<Body> {
        let status = response.status().as_u16();
        let elapsed = record.finish(status);
        self.requests
            .record(decision, status, elapsed.as_secs_f64());
        response
    }

    /// A guard to hold while the request is with the server (see
    /// [`HangUp`]).
    pub(crate) fn hang_up(&self, decision: &'static str, started: Instant) -> HangUp<'a> {
        HangUp {
            requests: self.requests,
            decision,
            started,
        }
    }
}

/// Counts a forwarded request whose caller hung up before the server
/// answered: dropped with the request's future, it records the 499 its
/// audit record's drop writes, under the decision that let it through.
/// Forgotten once the server's answer (or failure) is in.
pub(crate) struct HangUp<'a> {
    requests: &'a crate::metrics::Requests,
    decision: &'static str,
    started: Instant,
}

impl Drop for HangUp<'_> {
    fn drop(&mut self) {
        self.requests
            .record(self.decision, 499, self.started.elapsed().as_secs_f64());
    }
}

/// The size limits a request can exceed before policy.
#[derive(Clone, Copy)]
enum Limit {
    HeaderBytes,
    BodyBytes,
}

/// Refuses a request over a size limit: counted by limit, audited as a
/// deny, answered 431 or 413.
fn over_limit<F>(
    limit: Limit,
    shared: &Shared,
    record: audit::RequestRecord,
    request_id: &str,
    finish: F,
) -> Response<Body>
where
    F: Fn(audit::RequestRecord, &str, bool, String, Response<Body>) -> Response<Body>,
{
    let (label, what, max, status, error) = match limit {
        Limit::HeaderBytes => (
            "header_bytes",
            "request headers exceed",
            shared.limits.max_header_list_bytes,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
        ),
        Limit::BodyBytes => (
            "body_bytes",
            "request body exceeds",
            shared.limits.max_request_body_bytes,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    };
    shared
        .metrics
        .limits_exceeded
        .with_label_values(&[label])
        .inc();
    let reason = format!("{what} {max} bytes");
    let resp = error_response(status, error, &reason, request_id, None);
    finish(record, "deny", false, reason, resp)
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A random (v4) UUID in its hyphenated form, written without going
/// through `Display`.
pub(crate) fn new_request_id() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::new_v4()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

/// The caller's verified identity (see [`IdentityHeaders`]), the request
/// id and the scheme, replacing whatever the caller sent under these names.
fn set_identity_headers(headers: &mut HeaderMap, ctx: &ConnCtx, request_id: &str) {
    headers.insert(XFCC, ctx.identity_headers.xfcc.clone());
    headers.insert(X_SPIFFE_ID, ctx.identity_headers.spiffe_id.clone());
    set_request_id(headers, request_id);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
}

/// A name the policy gives once replaces the header; a name it repeats
/// (an array of values) yields one header line per value.
fn add_policy_headers(headers: &mut HeaderMap, policy_headers: &[(String, String)]) {
    let mut previous: Option<&str> = None;
    for (name, value) in policy_headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) if n != XFCC && n != X_SPIFFE_ID => {
                if previous == Some(name.as_str()) {
                    headers.append(n, v);
                } else {
                    headers.insert(n, v);
                }
                previous = Some(name);
            }
            _ => {
                tracing::warn!(header = %audit::redact_pans(name), "policy header ignored: invalid or reserved")
            }
        }
    }
}

/// Tags a response with the request's id, which the caller can quote to
/// find the decision in the audit trail.
pub(crate) fn set_request_id(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
}

/// Whether an upstream attempt is a success for its circuit breaker. Only
/// transport failures (no connection, no answer in time) count against the
/// server: a 5xx or a protocol error it chose to send is an answer, not an
/// outage.
pub(crate) fn breaker_success<T, E: ConnectFailure>(
    sent: &Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> bool {
    matches!(sent, Ok(Ok(_))) || matches!(sent, Ok(Err(e)) if !e.is_connect())
}

/// An upstream error that can say whether no connection was made.
pub(crate) trait ConnectFailure {
    fn is_connect(&self) -> bool;
}

impl ConnectFailure for pool::SendError {
    fn is_connect(&self) -> bool {
        pool::SendError::is_connect(self)
    }
}

impl ConnectFailure for hyper_util::client::legacy::Error {
    fn is_connect(&self) -> bool {
        hyper_util::client::legacy::Error::is_connect(self)
    }
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names they have is
    // cheaper than looking up each hop-by-hop name (twice per request).
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A denial with the body the policy wrote (OPA-Envoy's `body`). Plain text
/// unless the policy's own headers say otherwise.
fn policy_body_response(status: StatusCode, body: &str, request_id: &str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body.to_owned()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    set_request_id(resp.headers_mut(), request_id);
    resp
}

/// Answers a request that could not reserve its audit record: serving
/// without one would break the audit promise (`audit.on_full =
/// "fail_closed"`).
pub(crate) fn refuse_unaudited(audit: &AuditSink, request_id: &str) -> Response<Body> {
    let why = if audit.is_failing() {
        "the audit trail cannot be written; request refused"
    } else {
        "the audit trail is not keeping up; request refused"
    };
    tracing::error!(request_id, "{why}");
    audit.refused();
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit_unavailable",
        why,
        request_id,
        None,
    )
}

/// The status of a policy denial: the policy may choose one (a redirect
/// included, as OPA-Envoy allows), but never a success, since nothing was
/// served.
pub(crate) fn denial_status(chosen: Option<u16>) -> StatusCode {
    chosen
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| s.is_redirection() || s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::FORBIDDEN)
}

/// `scheme://authority/target`, the absolute URI the pooled client needs;
/// the error is the refusal reason.
pub(crate) fn upstream_uri(scheme: &str, authority: &str, target: String) -> Result<Uri, String> {
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(target)
        .build()
        .map_err(|e| format!("cannot build the upstream URI: {e}"))
}

/// Policy evaluation failed: fail closed, naming the revision.
pub(crate) fn policy_error(reason: &str, request_id: &str, revision: &str) -> Response<Body> {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "policy_error",
        reason,
        request_id,
        Some(revision),
    )
}

pub(crate) fn bad_request(reason: &str, request_id: &str) -> Response<Body> {
    error_response(
        StatusCode::BAD_REQUEST,
        "bad_request",
        reason,
        request_id,
        None,
    )
}

pub fn error_response(
    status: StatusCode,
    error: &str,
    reason: &str,
    request_id: &str,
    policy_revision: Option<&str>,
) -> Response<Body> {
    let mut body = serde_json::json!({
        "error": error,
        "reason": reason,
        "request_id": request_id,
    });
    if let Some(rev) = policy_revision {
        body["policy_revision"] = rev.into();
    }
    json_response(status, body, request_id)
}

/// A JSON body with the request id in `x-request-id`.
pub(crate) fn json_response(
    status: StatusCode,
    body: serde_json::Value,
    request_id: &str,
) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    set_request_id(resp.headers_mut(), request_id);
    resp
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        // As a peer would send them: parsed from bytes, in any case.
        for name in [
            "Connection",
            "Proxy-Connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Authenticate",
            "Proxy-Authorization",
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("x"),
            );
            h.insert("content-type", HeaderValue::from_static("text/plain"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} was kept");
        }
    }

    #[test]
    fn policy_cannot_set_identity_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-tenant", HeaderValue::from_static("forged"));
        let headers = vec![
            ("x-spiffe-id".to_owned(), "spiffe://evil/x".to_owned()),
            ("x-tenant".to_owned(), "eu".to_owned()),
            ("x-tenant".to_owned(), "us".to_owned()),
            ("bad header".to_owned(), "v".to_owned()),
        ];
        add_policy_headers(&mut h, &headers);
        assert_eq!(h.len(), 2);
        let tenants: Vec<_> = h.get_all("x-tenant").iter().collect();
        assert_eq!(tenants, ["eu", "us"]);
    }
}
