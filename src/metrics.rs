//! Prometheus metrics. One registry is made in `app` and passed in, so a test
//! can build the whole proxy with a registry of its own and read the values.
//!
//! Label values are fixed sets (decision, status class, handshake result,
//! error kind): a raw path or an identity never becomes a label.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use prometheus::Error;

const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const POLICY_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.01, 0.05,
    0.1,
];

#[derive(Clone)]
pub struct Metrics {
    /// decision = allow | deny | would_deny | error; status = 2xx..5xx.
    pub requests: Requests,
    pub policy_eval_duration: Histogram,
    /// result = hit | miss | uncacheable; one per policy decision of an
    /// inbound request (evaluation errors are not decisions).
    pub policy_decision_cache: IntCounterVec,
    /// `policy_decision_cache` by result, looked up once (see [`Handles`]).
    decision_cache_results: Arc<[OnceLock<IntCounter>; 3]>,
    /// result = ok | no_client_cert | untrusted_chain | bad_svid |
    /// wrong_trust_domain | expired | protocol_error | timeout
    pub tls_handshakes: IntCounterVec,
    pub open_connections: IntGauge,
    pub connections_refused: IntCounter,
    pub svid_expiry: IntGauge,
    /// trust_domain = the own one and those in `[identity.federation]`.
    pub bundle_expiry: IntGaugeVec,
    /// result = ok | error
    pub identity_reloads: IntCounterVec,
    /// result = ok | error
    pub policy_reloads: IntCounterVec,
    pub audit_written: IntCounter,
    pub audit_dropped: IntCounter,
    pub audit_syncs: IntCounter,
    /// kind = connect | timeout | protocol | circuit_open
    pub upstream_errors: IntCounterVec,
    pub rate_limited: IntCounter,
    /// limit = header_bytes | body_bytes | header_timeout | idle_timeout |
    /// h2_reset_flood
    pub limits_exceeded: IntCounterVec,
    /// 0 closed, 1 open, 2 half-open.
    pub circuit_breaker_state: IntGauge,
    /// The `portcullis_outbound_*` families: traffic the app sends through
    /// `[outbound]`. Separate families, so the inbound ones keep their
    /// names and labels.
    pub outbound: Outbound,
}

/// Metrics of the outbound (mTLS origination) path.
#[derive(Clone)]
pub struct Outbound {
    /// decision = allow | deny | would_deny | unrouted | refused | error;
    /// status = 2xx..5xx.
    pub requests: Requests,
    /// result = ok | wrong_server_id | untrusted_chain | bad_svid |
    /// wrong_trust_domain | expired | protocol_error | timeout
    pub handshakes: IntCounterVec,
    /// kind = resolve | connect (refused, or no mTLS connection within
    /// the connect timeout) | timeout (no response head in time) | protocol
    /// | refused (server identity) | circuit_open
    pub upstream_errors: IntCounterVec,
    /// route = the route's host (configured, so bounded); 0 closed, 1 open,
    /// 2 half-open.
    pub circuit_state: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Metrics, Error> {
        let m = Metrics {
            requests: Requests::new(
                ("portcullis_requests_total", "HTTP requests by policy decision and response status class"),
                ("portcullis_request_duration_seconds", "Time from request head to response head, by decision"),
            )?,
            policy_eval_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "portcullis_policy_evaluation_duration_seconds",
                    "Time to build the policy input and evaluate the query",
                )
                .buckets(POLICY_BUCKETS.to_vec()),
            )?,
            policy_decision_cache: IntCounterVec::new(
                Opts::new(
                    "portcullis_policy_decision_cache_total",
                    "Policy decisions by how the decision cache served them",
                ),
                &["result"],
            )?,
            decision_cache_results: Arc::default(),
            tls_handshakes: IntCounterVec::new(
                Opts::new(
                    "portcullis_tls_handshakes_total",
                    "Inbound TLS handshakes by result",
                ),
                &["result"],
            )?,
            open_connections: IntGauge::new(
                "portcullis_open_connections",
                "Inbound connections currently open",
            )?,
            connections_refused: IntCounter::new(
                "portcullis_connections_refused_total",
                "Inbound connections closed at accept because the connection limit was reached",
            )?,
            svid_expiry: IntGauge::new(
                "portcullis_svid_expiry_timestamp_seconds",
                "Unix time at which the sidecar's own SVID expires",
            )?,
            bundle_expiry: IntGaugeVec::new(
                Opts::new(
                    "portcullis_bundle_expiry_timestamp_seconds",
                    "Unix time at which the first anchor of a trust domain's bundle expires",
                ),
                &["trust_domain"],
            )?,
            identity_reloads: IntCounterVec::new(
                Opts::new(
                    "portcullis_identity_reloads_total",
                    "Identity (SVID and bundle) updates by result; an error keeps the last good one",
                ),
                &["result"],
            )?,
            policy_reloads: IntCounterVec::new(
                Opts::new("portcullis_policy_reloads_total", "Policy loads by result"),
                &["result"],
            )?,
            audit_written: IntCounter::new(
                "portcullis_audit_events_written_total",
                "Audit events written to the sink",
            )?,
            audit_dropped: IntCounter::new(
                "portcullis_audit_dropped_total",
                "Audit events that could not be written",
            )?,
            audit_syncs: IntCounter::new(
                "portcullis_audit_fsyncs_total",
                "Syncs of the audit file to disk (audit.fsync)",
            )?,
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "portcullis_upstream_errors_total",
                    "Failures talking to the local service, by kind",
                ),
                &["kind"],
            )?,
            limits_exceeded: IntCounterVec::new(
                Opts::new(
                    "portcullis_request_limits_exceeded_total",
                    "Requests refused, or connections closed, because they exceeded a limit",
                ),
                &["limit"],
            )?,
            rate_limited: IntCounter::new(
                "portcullis_rate_limited_total",
                "Requests refused with 429 because their caller was over its rate limit",
            )?,
            circuit_breaker_state: IntGauge::new(
                "portcullis_upstream_circuit_state",
                "Upstream circuit breaker: 0 closed, 1 open, 2 half-open",
            )?,
            outbound: Outbound::new(registry)?,
        };
        m.requests.register(registry)?;
        registry.register(Box::new(m.policy_eval_duration.clone()))?;
        registry.register(Box::new(m.policy_decision_cache.clone()))?;
        registry.register(Box::new(m.tls_handshakes.clone()))?;
        registry.register(Box::new(m.open_connections.clone()))?;
        registry.register(Box::new(m.connections_refused.clone()))?;
        registry.register(Box::new(m.svid_expiry.clone()))?;
        registry.register(Box::new(m.bundle_expiry.clone()))?;
        registry.register(Box::new(m.identity_reloads.clone()))?;
        registry.register(Box::new(m.policy_reloads.clone()))?;
        registry.register(Box::new(m.audit_written.clone()))?;
        registry.register(Box::new(m.audit_dropped.clone()))?;
        registry.register(Box::new(m.audit_syncs.clone()))?;
        registry.register(Box::new(m.upstream_errors.clone()))?;
        registry.register(Box::new(m.rate_limited.clone()))?;
        registry.register(Box::new(m.limits_exceeded.clone()))?;
        registry.register(Box::new(m.circuit_breaker_state.clone()))?;
        // Families with labels appear in the exposition only once a child
        // exists; pre-create the fixed sets so dashboards and alerts see
        // zeros rather than absent series.
        precreate(&m.tls_handshakes, &["ok", "no_client_cert"]);
        precreate(&m.tls_handshakes, HANDSHAKE_FAILURES);
        for limit in [
            "header_bytes",
            "body_bytes",
            "header_timeout",
            "idle_timeout",
            "h2_reset_flood",
        ] {
            m.limits_exceeded.with_label_values(&[limit]);
        }
        for result in ["ok", "error"] {
            m.policy_reloads.with_label_values(&[result]);
            m.identity_reloads.with_label_values(&[result]);
        }
        for result in CACHE_RESULTS {
            m.policy_decision_cache.with_label_values(&[result]);
        }
        for kind in ["connect", "timeout", "protocol", "circuit_open"] {
            m.upstream_errors.with_label_values(&[kind]);
        }
        Ok(m)
    }

    /// Counts one inbound decision by how the cache served it: `result`
    /// is `"hit"`, `"miss"` or `"uncacheable"`.
    pub fn count_decision_cache(&self, result: &str) {
        match CACHE_RESULTS.iter().position(|r| *r == result) {
            Some(i) => self.decision_cache_results[i]
                .get_or_init(|| self.policy_decision_cache.with_label_values(&[result]))
                .inc(),
            None => self
                .policy_decision_cache
                .with_label_values(&[result])
                .inc(),
        }
    }
}

// === impl Outbound ===

impl Outbound {
    fn new(registry: &Registry) -> Result<Outbound, Error> {
        let m = Outbound {
            requests: Requests::new(
                (
                    "portcullis_outbound_requests_total",
                    "Outbound requests from the app by decision and response status class",
                ),
                (
                    "portcullis_outbound_request_duration_seconds",
                    "Outbound time from request head to response head, by decision",
                ),
            )?,
            handshakes: IntCounterVec::new(
                Opts::new(
                    "portcullis_outbound_tls_handshakes_total",
                    "mTLS handshakes originated to routed servers, by result",
                ),
                &["result"],
            )?,
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "portcullis_outbound_upstream_errors_total",
                    "Failures reaching routed servers, by kind",
                ),
                &["kind"],
            )?,
            circuit_state: IntGaugeVec::new(
                Opts::new(
                    "portcullis_outbound_circuit_state",
                    "Per-route circuit breaker: 0 closed, 1 open, 2 half-open",
                ),
                &["route"],
            )?,
        };
        m.requests.register(registry)?;
        registry.register(Box::new(m.handshakes.clone()))?;
        registry.register(Box::new(m.upstream_errors.clone()))?;
        registry.register(Box::new(m.circuit_state.clone()))?;
        precreate(&m.handshakes, &["ok", "wrong_server_id"]);
        precreate(&m.handshakes, HANDSHAKE_FAILURES);
        precreate(
            &m.upstream_errors,
            &[
                "resolve",
                "connect",
                "timeout",
                "protocol",
                "refused",
                "circuit_open",
            ],
        );
        Ok(m)
    }
}

/// Handshake results both directions share (`tls::HandshakeFailure`
/// labels, and the handshake timeout).
const HANDSHAKE_FAILURES: &[&str] = &[
    "untrusted_chain",
    "bad_svid",
    "wrong_trust_domain",
    "expired",
    "protocol_error",
    "timeout",
];

/// Families with labels appear in the exposition only once a child exists;
/// pre-creating the fixed sets lets dashboards and alerts see zeros rather
/// than absent series.
fn precreate(family: &IntCounterVec, values: &[&str]) {
    for value in values {
        family.with_label_values(&[*value]);
    }
}

/// A request counter by decision and status class, with its duration
/// histogram by decision: the same pair for each direction.
#[derive(Clone)]
pub struct Requests {
    total: IntCounterVec,
    duration: HistogramVec,
    handles: Arc<Handles>,
}

/// The results of `portcullis_policy_decision_cache_total`.
const CACHE_RESULTS: [&str; 3] = ["hit", "miss", "uncacheable"];

/// The decisions [`Requests::record`] keeps series handles for.
const DECISIONS: [&str; 4] = ["allow", "deny", "error", "would_deny"];

/// Series handles, each looked up on first use and kept: a lookup hashes
/// the label values and takes the vector's lock, which every worker thread
/// shares, on each request otherwise. Made on first use (not up front) so
/// the exposition still lists only the series that happened.
#[derive(Default)]
struct Handles {
    /// By decision, then status class (1xx..5xx).
    total: [[OnceLock<IntCounter>; 5]; 4],
    duration: [OnceLock<Histogram>; 4],
}

impl Requests {
    /// `(name, help)` of the counter, then of the histogram.
    fn new(total: (&str, &str), duration: (&str, &str)) -> Result<Requests, Error> {
        Ok(Requests {
            total: IntCounterVec::new(Opts::new(total.0, total.1), &["decision", "status"])?,
            duration: HistogramVec::new(
                HistogramOpts::new(duration.0, duration.1).buckets(LATENCY_BUCKETS.to_vec()),
                &["decision"],
            )?,
            handles: Arc::default(),
        })
    }

    fn register(&self, registry: &Registry) -> Result<(), Error> {
        registry.register(Box::new(self.total.clone()))?;
        registry.register(Box::new(self.duration.clone()))
    }

    /// Requests counted so far with this decision and status class
    /// (`"2xx"`...).
    pub fn count(&self, decision: &str, status_class: &str) -> u64 {
        self.total
            .with_label_values(&[decision, status_class])
            .get()
    }

    pub fn record(&self, decision: &str, status: u16, seconds: f64) {
        let class = status_class(status);
        let class_index = usize::from(class.as_bytes()[0] - b'1');
        if let Some(d) = DECISIONS.iter().position(|d| *d == decision) {
            self.handles.total[d][class_index]
                .get_or_init(|| self.total.with_label_values(&[decision, class]))
                .inc();
            self.handles.duration[d]
                .get_or_init(|| self.duration.with_label_values(&[decision]))
                .observe(seconds);
            return;
        }
        self.total
            .with_label_values(&[decision, status_class(status)])
            .inc();
        self.duration
            .with_label_values(&[decision])
            .observe(seconds);
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The Prometheus text exposition of everything in `registry`.
pub fn render(registry: &Registry) -> Result<String, Error> {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| Error::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exposed_with_bounded_labels() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        m.requests.record("allow", 200, 0.001);
        m.requests.record("deny", 403, 0.001);
        let text = render(&registry).unwrap();
        assert!(text.contains(r#"portcullis_requests_total{decision="allow",status="2xx"} 1"#));
        assert!(text.contains(r#"portcullis_requests_total{decision="deny",status="4xx"} 1"#));
        assert!(text.contains(r#"portcullis_tls_handshakes_total{result="untrusted_chain"} 0"#));
        assert!(text.contains("portcullis_svid_expiry_timestamp_seconds 0"));
        // A second registration on the same registry is refused, which is
        // why nothing here is global.
        assert!(Metrics::new(&registry).is_err());
    }
}
