//! The shipped `policies/` directory: its own Rego tests pass, and real
//! decisions made through the proxy's input builder say why they deny.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use portcullis::policy::{
    build_input, run_tests, CacheUse, Decision, EvaluatorMode, InputHeaders, PolicySnapshot,
    RequestFacts,
};
use proptest::prelude::*;

const QUERY: &str = "data.portcullis.authz.allow";

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn snapshot() -> PolicySnapshot {
    PolicySnapshot::load(&policies_dir(), QUERY, Duration::from_millis(100)).unwrap()
}

fn decide(
    snap: &PolicySnapshot,
    spiffe_id: &str,
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Decision {
    let rest = spiffe_id.strip_prefix("spiffe://").unwrap();
    let (trust_domain, id_path) = rest.split_at(rest.find('/').unwrap());
    let addr: SocketAddr = "10.0.0.7:51522".parse().unwrap();
    let facts = RequestFacts {
        request_id: "test-request",
        method,
        path,
        query,
        host: "payments",
        scheme: "https",
        protocol: "HTTP/2",
        headers: InputHeaders::all(headers),
        source_spiffe_id: spiffe_id,
        source_trust_domain: trust_domain,
        source_path: id_path,
        source_addr: addr,
        destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
        time: SystemTime::now(),
    };
    snap.evaluate(build_input(&facts)).unwrap()
}

const CHECKOUT: &str = "spiffe://pay.example/ns/shop/sa/checkout";
const FRONTEND: &str = "spiffe://pay.example/ns/shop/sa/frontend";
const REPORTING: &str = "spiffe://pay.example/ns/finance/sa/reporting";

#[test]
fn shipped_rego_tests_all_pass() {
    let report = run_tests(&policies_dir(), None).unwrap();
    let failures: Vec<_> = report
        .results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}:{} {} {:?}", r.file, r.line, r.name, r.failure))
        .collect();
    assert!(failures.is_empty(), "failing Rego tests: {failures:#?}");
    assert!(report.passed > 10, "only {} tests ran", report.passed);
    assert_eq!(report.passed, report.results.len());
}

#[test]
fn loads_with_revision_and_files() {
    let snap = snapshot();
    assert_eq!(snap.files, ["authz.rego", "authz_test.rego", "data.json"]);
    assert_eq!(snap.revision.len(), 64);
    assert_eq!(snap.query, QUERY);
}

#[test]
fn checkout_creates_payment_with_idempotency_key() {
    let mut h = HeaderMap::new();
    h.insert("idempotency-key", HeaderValue::from_static("k-1"));
    h.insert("content-type", HeaderValue::from_static("application/json"));
    let d = decide(&snapshot(), CHECKOUT, "POST", "/v1/payments", None, &h);
    assert!(d.allowed, "{d:?}");
    assert_eq!(
        d.reason.as_deref(),
        Some("spiffe://pay.example/ns/shop/sa/checkout may POST /v1/payments")
    );
}

#[test]
fn missing_idempotency_key_is_denied_with_reason() {
    let d = decide(
        &snapshot(),
        CHECKOUT,
        "POST",
        "/v1/payments",
        None,
        &HeaderMap::new(),
    );
    assert!(!d.allowed);
    assert_eq!(d.http_status, Some(400));
    assert_eq!(
        d.reason.as_deref(),
        Some("POST /v1/payments requires the idempotency-key header")
    );
}

#[test]
fn frontend_is_denied_naming_caller_and_request() {
    let mut h = HeaderMap::new();
    h.insert("idempotency-key", HeaderValue::from_static("k-1"));
    let d = decide(&snapshot(), FRONTEND, "POST", "/v1/payments", None, &h);
    assert!(!d.allowed);
    assert_eq!(d.http_status, Some(403));
    assert_eq!(
        d.reason.as_deref(),
        Some("spiffe://pay.example/ns/shop/sa/frontend may not POST /v1/payments")
    );
}

#[test]
fn reporting_reads_reports_and_query_is_kept_out_of_reason() {
    let snap = snapshot();
    let h = HeaderMap::new();
    let d = decide(
        &snap,
        REPORTING,
        "GET",
        "/v1/reports/2026/11",
        Some("format=csv"),
        &h,
    );
    assert!(d.allowed, "{d:?}");
    let d = decide(
        &snap,
        REPORTING,
        "DELETE",
        "/v1/reports/2026",
        Some("card=4111"),
        &h,
    );
    assert!(!d.allowed);
    assert_eq!(
        d.reason.as_deref(),
        Some("spiffe://pay.example/ns/finance/sa/reporting may not DELETE /v1/reports/2026")
    );
}

#[test]
fn other_trust_domain_is_denied() {
    let d = decide(
        &snapshot(),
        "spiffe://evil.example/ns/shop/sa/checkout",
        "GET",
        "/healthz",
        None,
        &HeaderMap::new(),
    );
    assert!(!d.allowed);
    assert_eq!(
        d.reason.as_deref(),
        Some("spiffe://evil.example/ns/shop/sa/checkout is not in trust domain pay.example")
    );
}

#[test]
fn any_workload_of_the_trust_domain_may_get_healthz() {
    let d = decide(
        &snapshot(),
        FRONTEND,
        "GET",
        "/healthz",
        None,
        &HeaderMap::new(),
    );
    assert!(d.allowed, "{d:?}");
}

#[test]
fn snapshot_is_shared_across_threads() {
    let snap = std::sync::Arc::new(snapshot());
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let snap = snap.clone();
            std::thread::spawn(move || {
                (0..50).all(|_| {
                    decide(
                        &snap,
                        CHECKOUT,
                        "GET",
                        "/v1/payments/pay_1",
                        None,
                        &HeaderMap::new(),
                    )
                    .allowed
                })
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
}

fn snapshot_in(dir: &Path, evaluator: EvaluatorMode) -> PolicySnapshot {
    PolicySnapshot::load_checked(dir, QUERY, Duration::from_millis(500), true, evaluator).unwrap()
}

/// The shipped policy is decided by the RVM, and the RVM and the
/// interpreter agree on requests the Rego tests never made.
#[test]
fn shipped_policy_runs_on_the_rvm_and_agrees_beyond_its_tests() {
    let rvm = snapshot_in(&policies_dir(), EvaluatorMode::Auto);
    assert_eq!(rvm.evaluator, "rvm", "{}", rvm.evaluator_reason);
    let interp = snapshot_in(&policies_dir(), EvaluatorMode::Interpreter);
    assert_eq!(interp.evaluator, "interpreter");

    let callers = [
        CHECKOUT,
        "spiffe://pay.example/ns/support/sa/refunds",
        "spiffe://pay.example/ns/finance/sa/reporting",
        "spiffe://pay.example/ns/shop/sa/frontend",
        "spiffe://pay.example/ns/other/sa/unknown",
        "spiffe://evil.example/ns/shop/sa/checkout",
    ];
    let paths = [
        "/",
        "/healthz",
        "/v1/payments",
        "/v1/payments/pay_1",
        "/v1/payments/pay_1/refunds",
        "/v1/payments/pay_1/refunds/r_2",
        "/v1/reports",
        "/v1/reports/2026/11",
    ];
    let mut with_key = HeaderMap::new();
    with_key.insert("idempotency-key", HeaderValue::from_static("k-1"));
    let mut compared = 0;
    for caller in callers {
        for method in ["GET", "POST", "DELETE"] {
            for path in paths {
                for headers in [&HeaderMap::new(), &with_key] {
                    let a = decide(&rvm, caller, method, path, None, headers);
                    let b = decide(&interp, caller, method, path, None, headers);
                    assert_eq!(a, b, "{caller} {method} {path} {headers:?}");
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, 288);
}

/// The policy's earlier shape puts `some` loops inside an `else` chain,
/// which regorus 0.14.1's RVM gets wrong; the shipped tests catch it and
/// the interpreter keeps deciding.
#[test]
fn policy_the_rvm_gets_wrong_falls_back_to_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        root.join("tests/fixtures/else_after_some.rego"),
        dir.path().join("authz.rego"),
    )
    .unwrap();
    for name in ["authz_test.rego", "data.json"] {
        std::fs::copy(policies_dir().join(name), dir.path().join(name)).unwrap();
    }
    let snap = snapshot_in(dir.path(), EvaluatorMode::Auto);
    assert_eq!(snap.evaluator, "interpreter");
    assert!(
        snap.evaluator_reason.contains(
            "the RVM disagrees with the interpreter on the input of data.portcullis.authz_test."
        ),
        "{}",
        snap.evaluator_reason
    );
    let d = decide(
        &snap,
        CHECKOUT,
        "DELETE",
        "/v1/payments/pay_1",
        None,
        &HeaderMap::new(),
    );
    assert!(!d.allowed);
    assert_eq!(d.http_status, Some(403), "{d:?}");
}

// === the decision cache on the shipped policy ===

/// One request as the proxy would build it, with the per-request fields
/// (id, peer address, time) chosen by the caller.
struct Req<'a> {
    caller: &'a str,
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
    request_id: &'a str,
    peer: SocketAddr,
    time: SystemTime,
}

impl<'a> Req<'a> {
    fn new(caller: &'a str, method: &'a str, path: &'a str, headers: &'a HeaderMap) -> Self {
        Req {
            caller,
            method,
            path,
            headers,
            request_id: "req-1",
            peer: "10.0.0.7:51522".parse().unwrap(),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_600_800),
        }
    }

    fn input(&self) -> regorus::Value {
        let rest = self.caller.strip_prefix("spiffe://").unwrap();
        let (trust_domain, id_path) = rest.split_at(rest.find('/').unwrap());
        build_input(&RequestFacts {
            request_id: self.request_id,
            method: self.method,
            path: self.path,
            query: None,
            host: "payments",
            scheme: "https",
            protocol: "HTTP/2",
            headers: InputHeaders::all(self.headers),
            source_spiffe_id: self.caller,
            source_trust_domain: trust_domain,
            source_path: id_path,
            source_addr: self.peer,
            destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
            time: self.time,
        })
    }
}

#[test]
fn shipped_policy_is_cacheable_and_keys_on_what_it_reads() {
    let snap = snapshot();
    let cache = snap.decision_cache();
    assert!(cache.enabled(), "{}", cache.reason());
    assert_eq!(cache.capacity(), 10_000);
    // The whole headers map is read (object.get on it), so headers are
    // part of every key.
    assert_eq!(
        cache.reads_display(),
        [
            "input.attributes.request.http.headers",
            "input.attributes.request.http.method",
            "input.attributes.request.http.path",
            "input.attributes.source.principal",
            "input.parsed_path",
            "input.source.trust_domain",
        ]
    );
}

#[test]
fn only_requests_the_policy_cannot_tell_apart_share_a_decision() {
    let snap = snapshot();
    let mut with_key = HeaderMap::new();
    with_key.insert("idempotency-key", HeaderValue::from_static("k-1"));
    let base = Req::new(CHECKOUT, "POST", "/v1/payments", &with_key);
    let first = snap.evaluate(base.input()).unwrap();
    assert!(first.allowed, "{first:?}");
    assert_eq!(first.cache, CacheUse::Miss);

    // Differs only in the per-request fields: served from the cache.
    let again = Req {
        request_id: "req-2",
        peer: "10.9.9.9:40000".parse().unwrap(),
        time: SystemTime::now(),
        ..Req::new(CHECKOUT, "POST", "/v1/payments", &with_key)
    };
    let hit = snap.evaluate(again.input()).unwrap();
    assert_eq!(hit.cache, CacheUse::Hit);
    assert_eq!(hit, first);
    assert_eq!(hit.reason, first.reason);

    // Differs in something it reads: evaluated, and decided differently.
    let empty = HeaderMap::new();
    let mut other_key = HeaderMap::new();
    other_key.insert("idempotency-key", HeaderValue::from_static(""));
    let changed = [
        Req::new(CHECKOUT, "GET", "/v1/payments", &with_key),
        Req::new(CHECKOUT, "POST", "/v1/payments/p1", &with_key),
        Req::new(FRONTEND, "POST", "/v1/payments", &with_key),
        Req::new(CHECKOUT, "POST", "/v1/payments", &empty),
        Req::new(CHECKOUT, "POST", "/v1/payments", &other_key),
        Req::new(
            "spiffe://evil.example/ns/shop/sa/checkout",
            "POST",
            "/v1/payments",
            &with_key,
        ),
    ];
    for req in &changed {
        let d = snap.evaluate(req.input()).unwrap();
        assert_eq!(
            d.cache,
            CacheUse::Miss,
            "{} {} {}",
            req.caller,
            req.method,
            req.path
        );
        assert!(
            !d.allowed,
            "{} {} {}: {d:?}",
            req.caller, req.method, req.path
        );
        assert_ne!(d.reason, first.reason);
    }
    // A header the policy never asks about still changes the key: the
    // policy reads the whole map.
    let mut traced = with_key.clone();
    traced.insert("traceparent", HeaderValue::from_static("00-abc-01"));
    let d = snap
        .evaluate(Req::new(CHECKOUT, "POST", "/v1/payments", &traced).input())
        .unwrap();
    assert_eq!(d.cache, CacheUse::Miss);
    assert_eq!(d, first);
}

#[test]
fn requests_with_a_body_are_evaluated_every_time() {
    let snap = snapshot();
    let h = HeaderMap::new();
    let req = Req::new(CHECKOUT, "GET", "/v1/payments/p1", &h);
    for _ in 0..2 {
        let mut input = req.input();
        portcullis::policy::input::add_body(
            &mut input,
            portcullis::policy::input::BodyKind::Json,
            Some(b"{}"),
            false,
        );
        let d = snap.evaluate(input).unwrap();
        assert!(d.allowed);
        assert_eq!(d.cache, CacheUse::Uncacheable);
    }
    assert_eq!(snap.decision_cache().len(), 0);
}

#[test]
fn the_cache_holds_at_most_its_capacity() {
    let snap = snapshot().with_decision_cache(4);
    let h = HeaderMap::new();
    for i in 0..50 {
        let path = format!("/v1/payments/p{i}");
        let d = snap
            .evaluate(Req::new(CHECKOUT, "GET", &path, &h).input())
            .unwrap();
        assert!(d.allowed);
        assert!(snap.decision_cache().len() <= 4);
    }
    let off = snapshot().with_decision_cache(0);
    assert!(!off.decision_cache().enabled());
    let d = off
        .evaluate(Req::new(CHECKOUT, "GET", "/v1/payments/p1", &h).input())
        .unwrap();
    assert_eq!(d.cache, CacheUse::Uncacheable);
}

fn cached_and_uncached() -> &'static (PolicySnapshot, PolicySnapshot) {
    static SNAPSHOTS: std::sync::OnceLock<(PolicySnapshot, PolicySnapshot)> =
        std::sync::OnceLock::new();
    SNAPSHOTS.get_or_init(|| {
        let uncached = snapshot().with_decision_cache(0);
        // Smaller than the 72 keys below, so that eviction happens too.
        let cached = snapshot().with_decision_cache(32);
        (cached, uncached)
    })
}

/// Indexes into the tables below, then the per-request fields. The space
/// of what the policy reads is small (72 combinations) so that sequences
/// repeat requests, and meet pairs that differ in one read field (a
/// header, the method, the caller) and are decided differently.
fn request_like() -> impl Strategy<Value = (usize, usize, usize, usize, u16, u8, u64)> {
    (
        0..3usize,
        0..2usize,
        0..3usize,
        0..4usize,
        1..4u16,
        0..3u8,
        0..3u64,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For inputs from a small space (so that repeats, hits and evictions
    /// happen), the cached snapshot decides exactly as the uncached one.
    #[test]
    fn cached_evaluation_equals_uncached(reqs in proptest::collection::vec(request_like(), 1..60)) {
        let (cached, uncached) = cached_and_uncached();
        let callers = [CHECKOUT, FRONTEND, "spiffe://evil.example/ns/shop/sa/checkout"];
        let methods = ["GET", "POST"];
        let paths = ["/healthz", "/v1/payments", "/v1/payments/p1"];
        for (c, m, p, hdr, port, id, t) in reqs {
            let mut headers = HeaderMap::new();
            if hdr & 1 == 1 {
                headers.insert("idempotency-key", HeaderValue::from_static("k-1"));
            }
            if hdr & 2 == 2 {
                headers.insert("accept", HeaderValue::from_static("*/*"));
            }
            let request_id = format!("req-{id}");
            let req = Req {
                request_id: &request_id,
                peer: SocketAddr::from(([10, 0, 0, 7], port)),
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(t),
                ..Req::new(callers[c], methods[m], paths[p], &headers)
            };
            let want = uncached.evaluate(req.input()).unwrap();
            let got = cached.evaluate(req.input()).unwrap();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(&got.reason, &want.reason);
            prop_assert_eq!(got.http_status, want.http_status);
            prop_assert_ne!(got.cache, CacheUse::Uncacheable);
            prop_assert!(cached.decision_cache().len() <= 32);
        }
    }
}
