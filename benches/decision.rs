//! A whole policy decision as the proxy makes it: the input document built
//! from a request, then evaluated by the snapshot (`PolicySnapshot::evaluate`,
//! on whichever engine it chose). Criterion; `cargo bench --bench decision`.
//!
//! Groups: the shipped policy (auto: the RVM, verified), the same on the
//! interpreter, and the shipped policy with a 1,000-entry allow-list added
//! to `data.access.workloads`; plus `build_input` alone. The p50 to report
//! is the "median" in target/criterion/<group>/<id>/new/estimates.json,
//! which this bench also prints after the run.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, Criterion};
use http::{HeaderMap, HeaderValue};
use portcullis::policy::{build_input, EvaluatorMode, InputHeaders, PolicySnapshot, RequestFacts};

const QUERY: &str = "data.portcullis.authz.allow";

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// Without the decision cache: this bench repeats inputs, and times the
/// evaluators, not cache hits.
fn load(dir: &Path, evaluator: EvaluatorMode) -> PolicySnapshot {
    PolicySnapshot::load_checked(dir, QUERY, Duration::from_millis(100), true, evaluator)
        .expect("policies load")
        .with_decision_cache(0)
}

/// The shipped set with 1,000 more workloads, each with its own grant.
fn with_big_allow_list() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["authz.rego", "authz_test.rego"] {
        std::fs::copy(shipped().join(name), dir.path().join(name)).expect("copy");
    }
    let text = std::fs::read_to_string(shipped().join("data.json")).expect("data.json");
    let mut data: serde_json::Value = serde_json::from_str(&text).expect("data.json is JSON");
    for n in 0..1000 {
        data["access"]["workloads"][format!("spiffe://pay.example/ns/team{n}/sa/svc{n}")] =
            serde_json::json!([{"method": "GET", "path": format!("/v1/team{n}/**")}]);
    }
    std::fs::write(dir.path().join("data.json"), data.to_string()).expect("write");
    dir
}

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("accept", "application/json"),
        ("user-agent", "payments-client/2.4.1 (rust)"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("idempotency-key", "c0ffee00-1111-2222-3333-444455556666"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

/// A request the shipped policy allows (checkout creating a payment) and
/// one it denies (the frontend, which holds no grant).
fn facts<'a>(h: &'a HeaderMap, caller: &'a str, caller_path: &'a str) -> RequestFacts<'a> {
    RequestFacts {
        request_id: "5b0c6a38-7c52-4f69-9d1e-7e3b1e6a2c11",
        method: "POST",
        path: "/v1/payments",
        query: None,
        host: "payments.pay.svc",
        scheme: "https",
        protocol: "HTTP/2",
        headers: InputHeaders::all(h),
        source_spiffe_id: caller,
        source_trust_domain: "pay.example",
        source_path: caller_path,
        source_addr: "10.12.3.44:51522".parse().expect("addr"),
        destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
        time: SystemTime::now(),
    }
}

const ALLOWED: (&str, &str) = (
    "spiffe://pay.example/ns/shop/sa/checkout",
    "/ns/shop/sa/checkout",
);
const DENIED: (&str, &str) = (
    "spiffe://pay.example/ns/shop/sa/frontend",
    "/ns/shop/sa/frontend",
);

fn decisions(c: &mut Criterion) {
    let h = headers();
    let big = with_big_allow_list();
    let suites = [
        ("shipped", load(&shipped(), EvaluatorMode::Auto)),
        (
            "shipped-interpreter",
            load(&shipped(), EvaluatorMode::Interpreter),
        ),
        ("allow-list-1000", load(big.path(), EvaluatorMode::Auto)),
    ];
    let mut group = c.benchmark_group("whole_decision");
    for (name, snap) in &suites {
        println!("{name}: {} ({})", snap.evaluator, snap.evaluator_reason);
        for (outcome, (caller, caller_path), want) in
            [("allow", ALLOWED, true), ("deny", DENIED, false)]
        {
            let check = snap
                .evaluate(build_input(&facts(&h, caller, caller_path)))
                .expect("decides");
            assert_eq!(check.allowed, want, "{name}/{outcome}: {check:?}");
            group.bench_function(format!("{name}/{outcome}"), |b| {
                b.iter(|| {
                    let input = build_input(black_box(&facts(&h, caller, caller_path)));
                    black_box(snap.evaluate(input))
                })
            });
        }
    }
    group.finish();

    c.bench_function("build_input", |b| {
        b.iter(|| build_input(black_box(&facts(&h, ALLOWED.0, ALLOWED.1))))
    });
}

/// Prints each benchmark's median (the p50 of per-iteration time over
/// criterion's samples) from the estimates criterion just wrote.
fn print_medians() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion");
    let mut found = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.ends_with("new/estimates.json") {
                found.push(path);
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return;
    }
    println!("\np50 (criterion median) per whole decision:");
    for path in found {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let name = path
            .parent()
            .and_then(Path::parent)
            .and_then(|p| p.strip_prefix(&root).ok())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if let Some(ns) = json["median"]["point_estimate"].as_f64() {
            println!("  {name:<45} {:>9.2} us", ns / 1000.0);
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    targets = decisions
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::args().any(|a| a == "--bench") {
        print_medians();
    }
}
