//! Which regorus evaluation mode should decide each request?
//!
//! Runs the shipped `policies/` against a set of realistic inputs in every
//! mode, checks that every mode reaches the same decision as the one
//! `PolicySnapshot::evaluate` ships with, and prints ns/decision (median of
//! several runs). A mode that disagrees on any input is disqualified however
//! fast it is: a faster wrong answer is an authorization bypass.
//!
//! `cargo bench --bench policy_modes` (add `-- --quick` for a short run).
//!
//! Run it with `RUST_BACKTRACE` unset: regorus builds `anyhow` errors on its
//! hot path, and with backtrace capture on the interpreter modes measured
//! ~40% slower.
//!
//! Known disagreement (regorus 0.14.1): the RVM returns undefined for
//! `x := "a" if { some q in [1]; q == 2 } else := "b"` where the
//! interpreter returns "b". The shipped policy keeps its `some` loops out
//! of `else` chains, and `PolicySnapshot` only uses the RVM after checking
//! it agrees with the interpreter on the policy's test inputs.
//! `tests/fixtures/else_after_some.rego` is the policy's earlier shape,
//! which the RVM gets wrong: this bench shows it DISAGREES.
//!
//! Four suites: the shipped and the earlier policy, each also with a
//! 1,000-entry allow-list added to `data.access.workloads`. "whole
//! decision" adds the time `build_input` takes for a typical request.
//! `cargo bench --bench decision` (criterion) measures the whole decision
//! as shipped.

use std::hint::black_box;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue};
use portcullis::policy::{
    build_input, Decision, EvaluatorMode, InputHeaders, PolicySnapshot, RequestFacts,
};
use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::utils::limits::{set_fallback_execution_timer_config, ExecutionTimerConfig};
use regorus::{CompiledPolicy, Engine, Value};

const QUERY: &str = "data.portcullis.authz.allow";
const TIMEOUT: Duration = Duration::from_millis(100);

fn timer() -> ExecutionTimerConfig {
    ExecutionTimerConfig {
        limit: TIMEOUT,
        check_interval: NonZeroU32::new(64).expect("non-zero"),
    }
}

struct Request {
    who: &'static str,
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    idempotency_key: bool,
}

const REQUESTS: &[Request] = &[
    req("shop/sa/checkout", "POST", "/v1/payments", None, true),
    req("shop/sa/checkout", "POST", "/v1/payments", None, false),
    req(
        "shop/sa/checkout",
        "GET",
        "/v1/payments/pay_8a7f",
        None,
        false,
    ),
    req(
        "shop/sa/checkout",
        "DELETE",
        "/v1/payments/pay_8a7f",
        None,
        false,
    ),
    req(
        "support/sa/refunds",
        "POST",
        "/v1/payments/pay_8a7f/refunds",
        None,
        true,
    ),
    req("support/sa/refunds", "POST", "/v1/payments", None, true),
    req(
        "finance/sa/reporting",
        "GET",
        "/v1/reports",
        Some("from=2026-01-01&to=2026-02-01"),
        false,
    ),
    req(
        "finance/sa/reporting",
        "GET",
        "/v1/reports/2026/11/daily.csv",
        None,
        false,
    ),
    req("monitoring/sa/prober", "GET", "/readyz", None, false),
    req("shop/sa/frontend", "GET", "/healthz", None, false),
    req("shop/sa/frontend", "POST", "/v1/payments", None, true),
    req("unknown/sa/new-service", "GET", "/v1/reports", None, false),
];

const fn req(
    who: &'static str,
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    idempotency_key: bool,
) -> Request {
    Request {
        who,
        method,
        path,
        query,
        idempotency_key,
    }
}

fn inputs() -> Vec<Value> {
    let addr: SocketAddr = "10.12.3.44:51522".parse().expect("addr");
    let mut out: Vec<Value> = REQUESTS
        .iter()
        .map(|r| {
            let mut h = HeaderMap::new();
            for (k, v) in [
                ("content-type", "application/json"),
                ("accept", "application/json"),
                ("user-agent", "payments-client/2.4.1 (rust)"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
                ("x-request-id", "5b0c6a38-7c52-4f69-9d1e-7e3b1e6a2c11"),
                ("content-length", "312"),
            ] {
                h.insert(k, HeaderValue::from_static(v));
            }
            if r.idempotency_key {
                h.insert(
                    "idempotency-key",
                    HeaderValue::from_static("c0ffee00-1111-2222-3333-444455556666"),
                );
            }
            let id = format!("spiffe://pay.example/ns/{}", r.who);
            let id_path = format!("/ns/{}", r.who);
            build_input(&RequestFacts {
                request_id: "5b0c6a38-7c52-4f69-9d1e-7e3b1e6a2c11",
                method: r.method,
                path: r.path,
                query: r.query,
                host: "payments.pay.svc",
                scheme: "https",
                protocol: "HTTP/2",
                headers: InputHeaders::all(&h),
                source_spiffe_id: &id,
                source_trust_domain: "pay.example",
                source_path: &id_path,
                source_addr: addr,
                destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
                time: SystemTime::now(),
            })
        })
        .collect();
    // A caller from another trust domain, and a malformed input.
    let mut foreign = out[2].clone();
    if let Ok(obj) = foreign.as_object_mut() {
        obj.insert(
            Value::from("source"),
            Value::from_json_str(
                r#"{"spiffe_id": "spiffe://evil.example/ns/shop/sa/checkout",
                    "trust_domain": "evil.example", "path": "/ns/shop/sa/checkout"}"#,
            )
            .expect("json"),
        );
    }
    out.push(foreign);
    out.push(Value::new_object());
    out
}

type Eval<'a> = Box<dyn FnMut(&Value) -> Result<Decision, String> + 'a>;

fn decision(v: anyhow::Result<Value>) -> Result<Decision, String> {
    let v = v.map_err(|e| e.to_string())?;
    Decision::from_value(&v).map_err(|e| e.to_string())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, where a short run still checks the modes agree.
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
        || std::env::var_os("RUST_LIB_BACKTRACE").is_some_and(|v| v != "0")
    {
        println!("warning: backtrace capture is on; interpreter timings will be inflated");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = root.join("policies");

    // CompiledPolicy::eval_with_input builds its engine internally and only
    // honours the process-wide fallback timer; install one so every mode
    // pays for time-limit checks alike.
    set_fallback_execution_timer_config(Some(timer()));

    // The earlier shape, with `some` inside the `else` chain; it passes the
    // shipped tests on the interpreter.
    let earlier = tempfile::tempdir().expect("tempdir");
    for (from, name) in [
        (
            root.join("tests/fixtures/else_after_some.rego"),
            "authz.rego",
        ),
        (shipped.join("authz_test.rego"), "authz_test.rego"),
        (shipped.join("data.json"), "data.json"),
    ] {
        std::fs::copy(from, earlier.path().join(name)).expect("copy");
    }
    let report = portcullis::policy::run_tests(earlier.path(), None).expect("tests");
    println!(
        "earlier policy shape: {}/{} shipped Rego tests pass",
        report.passed,
        report.results.len()
    );
    assert!(report.all_passed(), "{report:#?}");

    // Both shapes again with 1,000 more workloads in data.access.workloads.
    let big = |policy_dir: &Path| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(shipped.join("data.json")).expect("data"),
        )
        .expect("json");
        for n in 0..1000 {
            data["access"]["workloads"][format!("spiffe://pay.example/ns/team{n}/sa/svc{n}")] =
                serde_json::json!([{"method": "GET", "path": format!("/v1/team{n}/**")}]);
        }
        std::fs::write(dir.path().join("data.json"), data.to_string()).expect("write");
        for name in ["authz.rego", "authz_test.rego"] {
            std::fs::copy(policy_dir.join(name), dir.path().join(name)).expect("copy");
        }
        dir
    };
    let shipped_big = big(&shipped);
    let earlier_big = big(earlier.path());

    let build_ns = time_build_input(quick);
    println!("\nbuild_input (typical request): {build_ns} ns\n");
    for (title, dir) in [
        ("shipped policy", shipped.as_path()),
        ("earlier shape (else after some)", earlier.path()),
        (
            "shipped policy, 1,000-entry allow-list in data",
            shipped_big.path(),
        ),
        (
            "earlier shape, 1,000-entry allow-list in data",
            earlier_big.path(),
        ),
    ] {
        suite(title, dir, quick, build_ns);
    }
}

fn time_build_input(quick: bool) -> u128 {
    let (runs, iters) = if quick { (3, 2_000) } else { (9, 20_000) };
    let mut build_times = Vec::new();
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("accept", "application/json"),
        ("user-agent", "payments-client/2.4.1 (rust)"),
        ("idempotency-key", "c0ffee00-1111-2222-3333-444455556666"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    for _ in 0..runs {
        let start = Instant::now();
        for n in 0..iters {
            black_box(build_input(&RequestFacts {
                request_id: "r",
                method: "GET",
                path: "/v1/payments/pay_8a7f",
                query: Some("expand=card"),
                host: "payments",
                scheme: "https",
                protocol: "HTTP/2",
                headers: InputHeaders::all(black_box(&h)),
                source_spiffe_id: "spiffe://pay.example/ns/shop/sa/checkout",
                source_trust_domain: "pay.example",
                source_path: "/ns/shop/sa/checkout",
                source_addr: "10.0.0.7:51522".parse().expect("addr"),
                destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
                time: SystemTime::UNIX_EPOCH + Duration::from_nanos(n as u64),
            }));
        }
        build_times.push(start.elapsed().as_nanos() / iters as u128);
    }
    build_times.sort();
    build_times[runs / 2]
}

fn suite(title: &str, dir: &Path, quick: bool, build_ns: u128) {
    println!("=== {title} ===");

    // Without the decision cache: the inputs repeat, and this times the
    // evaluators, not cache hits.
    let snapshot =
        PolicySnapshot::load_checked(dir, QUERY, TIMEOUT, false, EvaluatorMode::Interpreter)
            .expect("load policies")
            .with_decision_cache(0);
    let auto = PolicySnapshot::load(dir, QUERY, TIMEOUT)
        .expect("load policies")
        .with_decision_cache(0);
    println!(
        "evaluator (auto): {}: {}",
        auto.evaluator, auto.evaluator_reason
    );
    let mut engine = Engine::new();
    engine.set_execution_timer_config(timer());
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("read policies")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in &names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("rego") => {
                engine.add_policy_from_file(p).expect("policy");
            }
            Some("json") => {
                engine
                    .add_data(Value::from_json_file(p).expect("data"))
                    .expect("data");
            }
            _ => {}
        }
    }
    let compiled: CompiledPolicy = engine
        .compile_with_entrypoint(&QUERY.into())
        .expect("compile");
    let program: Arc<Program> =
        Compiler::compile_from_policy(&compiled, &[QUERY]).expect("compile to RVM");
    let data = engine.get_data();
    let new_vm = || {
        let mut vm = RegoVM::new_with_policy(compiled.clone());
        vm.load_program(program.clone());
        vm.set_data(data.clone()).expect("data");
        vm.set_execution_timer_config(Some(timer()));
        vm.set_max_instructions(10_000_000);
        vm
    };
    let mut reused_engine = engine.clone();
    let mut reused_vm = new_vm();

    let mut modes: Vec<(&str, Eval)> = vec![
        (
            "a  engine clone per eval (interpreter)",
            Box::new(|i: &Value| snapshot.evaluate(i.clone()).map_err(|e| e.to_string())),
        ),
        (
            "s  PolicySnapshot::evaluate (auto)",
            Box::new(|i: &Value| auto.evaluate(i.clone()).map_err(|e| e.to_string())),
        ),
        (
            "a' engine reused (per thread)",
            Box::new(|i: &Value| {
                reused_engine.set_input(i.clone());
                decision(reused_engine.eval_rule(QUERY.to_owned()))
            }),
        ),
        (
            "b  CompiledPolicy::eval_with_input",
            Box::new(|i: &Value| decision(compiled.eval_with_input(i.clone()))),
        ),
        (
            "c  RVM, new VM per eval",
            Box::new(|i: &Value| {
                let mut vm = new_vm();
                vm.set_input(i.clone());
                decision(vm.execute().map_err(anyhow::Error::from))
            }),
        ),
        (
            "c' RVM, VM reused (per thread)",
            Box::new(|i: &Value| {
                reused_vm.set_input(i.clone());
                decision(reused_vm.execute().map_err(anyhow::Error::from))
            }),
        ),
    ];

    let inputs = inputs();
    let reference: Vec<_> = inputs
        .iter()
        .map(|i| snapshot.evaluate(i.clone()))
        .collect();
    if !quick {
        println!("reference decisions (mode a):");
    }
    for (n, d) in reference.iter().enumerate().filter(|_| !quick) {
        match d {
            Ok(d) => println!(
                "  #{n:<2} allowed={:<5} status={:?} reason={:?}",
                d.allowed, d.http_status, d.reason
            ),
            Err(e) => println!("  #{n:<2} error {e}"),
        }
    }

    let mut agrees = Vec::new();
    for (name, eval) in &mut modes {
        let mut ok = true;
        for (n, (input, want)) in inputs.iter().zip(&reference).enumerate() {
            let got = eval(input);
            let same = match (&got, want) {
                (Ok(g), Ok(w)) => g == w,
                // Error texts differ between layers; failing is what counts.
                (Err(_), Err(_)) => true,
                _ => false,
            };
            if !same {
                ok = false;
                println!("DISAGREES {name} on input #{n}: got {got:?}, want {want:?}");
            }
        }
        agrees.push(ok);
    }

    let (runs, iters) = if quick { (3, 2_000) } else { (9, 20_000) };
    println!(
        "\nns/decision, median of {runs} runs x {iters} decisions, {} distinct inputs:",
        inputs.len()
    );

    // Warm caches and pools before timing.
    for (_, eval) in &mut modes {
        for i in &inputs {
            let _ = black_box(eval(i));
        }
    }
    // Runs are interleaved across modes so that load from other processes
    // spreads over all modes instead of penalising whichever ran then.
    let mut times = vec![Vec::with_capacity(runs); modes.len()];
    for _ in 0..runs {
        for ((_, eval), t) in modes.iter_mut().zip(&mut times) {
            let start = Instant::now();
            for n in 0..iters {
                let _ = black_box(eval(black_box(&inputs[n % inputs.len()])));
            }
            t.push(start.elapsed().as_nanos() / iters as u128);
        }
    }
    for (((name, _), ok), t) in modes.iter().zip(&agrees).zip(&mut times) {
        t.sort();
        println!(
            "  {:<40} {:>8}   min {:>8}  max {:>8}  whole decision ~{:>6} ns  {}",
            name,
            t[runs / 2],
            t[0],
            t[runs - 1],
            t[runs / 2] + build_ns,
            if *ok {
                "agrees"
            } else {
                "DISAGREES: disqualified"
            }
        );
    }
}
