//! Policy hot reload on the running app: swaps under load, broken sets
//! refused with the last good one kept, the Kubernetes ConfigMap layout.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use portcullis::policy::PolicySnapshot;

/// One generation of a policy set whose rule and data must come from the
/// same generation: a half-loaded set (new rule, old data) denies, and its
/// own test says so.
fn generation(n: u32) -> Vec<(&'static str, String)> {
    vec![
        (
            "authz.rego",
            format!(
                r#"package portcullis.authz
import rego.v1
default allow := {{"allowed": false, "reason": "not a caller of generation {n}"}}
allow := {{"allowed": true, "headers": {{"x-policy-generation": data.gen{n}.name}}}} if {{
	input.source.spiffe_id in data.gen{n}.callers
}}
"#
            ),
        ),
        (
            "authz_test.rego",
            format!(
                r#"package portcullis.authz_test
import rego.v1
test_checkout_allowed if data.portcullis.authz.allow.allowed with input as {{"source": {{"spiffe_id": "{CHECKOUT}"}}}}
"#
            ),
        ),
        (
            "data.json",
            format!(r#"{{"gen{n}": {{"name": "{n}", "callers": ["{CHECKOUT}"]}}}}"#),
        ),
    ]
}

/// A ConfigMap volume update, the way the kubelet does it.
fn configmap(root: &Path, version: u32, files: &[(&str, String)]) {
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    kubelet_swap(root, &format!("2026_11_25_{version}"), &files);
}

fn revision_of(files: &[(&str, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    PolicySnapshot::load_checked(
        dir.path(),
        "data.portcullis.authz.allow",
        Duration::from_secs(1),
        true,
        portcullis::policy::EvaluatorMode::Auto,
    )
    .unwrap()
    .revision
}

fn fast_reload(c: &mut portcullis::config::Config) {
    c.policy.reload_interval_ms = 20;
}

async fn policy_doc(h: &Harness) -> serde_json::Value {
    let (status, body) = admin_get(h.running().admin_addr, "/policy").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_swaps_under_load_never_fail_a_request_or_mix_generations() {
    let root = tempfile::tempdir().unwrap();
    configmap(root.path(), 1, &generation(1));
    let gen_of: HashMap<String, &str> = [
        (revision_of(&generation(1)), "1"),
        (revision_of(&generation(2)), "2"),
    ]
    .into_iter()
    .collect();
    let mut h = Harness::start_with(root.path(), fast_reload).await;
    let stop = AtomicBool::new(false);
    let client = h.pki.client(CHECKOUT);

    let load = futures_util::future::join_all((0..4).map(|_| async {
        let mut statuses = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let r = h
                .call(client.clone(), "GET", "/v1/payments/p1", &[])
                .await
                .unwrap();
            statuses.push(r.status.as_u16());
        }
        statuses
    }));
    let swaps = async {
        for version in 2..=5u32 {
            let generation_no = 2 - version % 2;
            configmap(root.path(), version, &generation(generation_no));
            let want = revision_of(&generation(generation_no));
            let policy = h.running().policy.clone();
            eventually("the new generation to be in force", || {
                policy.load().revision == want
            })
            .await;
            // Let requests run on this generation for a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
    };
    let (statuses, ()) = tokio::join!(load, swaps);
    let statuses: Vec<u16> = statuses.into_iter().flatten().collect();
    assert!(statuses.len() > 20, "only {} requests", statuses.len());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let metrics = h.scrape().await;
    assert_eq!(
        sample(&metrics, r#"portcullis_policy_reloads_total{result="ok"}"#),
        5.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"portcullis_policy_reloads_total{result="error"}"#
        ),
        0.0
    );

    // Every request was decided by exactly one whole generation: the header
    // the service received comes from the generation the audit names.
    let received: HashMap<String, String> = h
        .service
        .received()
        .iter()
        .map(|r| {
            (
                r.headers["x-request-id"].to_str().unwrap().to_owned(),
                r.headers["x-policy-generation"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    let events = h.stop().await;
    let reqs = requests(&events);
    assert_eq!(reqs.len(), statuses.len());
    let mut seen = std::collections::BTreeSet::new();
    for e in reqs {
        let generation = gen_of[e["decision"]["policy_revision"].as_str().unwrap()];
        let id = e["request_id"].as_str().unwrap();
        assert_eq!(received[id], generation, "{e}");
        seen.insert(generation);
    }
    assert_eq!(seen.len(), 2, "load never straddled a swap");
    let loaded = events
        .iter()
        .filter(|e| e["kind"] == "policy_loaded")
        .count();
    assert_eq!(loaded, 5, "startup plus four reloads");
}

#[tokio::test]
async fn broken_set_is_refused_and_the_last_good_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in generation(1) {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let mut h = Harness::start_with(dir.path(), fast_reload).await;
    let good = h.running().policy.load().revision.clone();
    let checkout = h.pki.client(CHECKOUT);

    // A syntax error, written in place as an editor without rename would.
    std::fs::write(
        dir.path().join("authz.rego"),
        "package portcullis.authz\nimport rego.v1\n\nallow if {\n  input.x ==\n}\n",
    )
    .unwrap();
    let last = h.running().policy_reload.clone();
    eventually("the broken set to be refused", || !last.load().ok).await;
    let doc = policy_doc(&h).await;
    assert_eq!(doc["revision"], good.as_str());
    assert_eq!(doc["last_reload"]["result"], "error");
    let error = doc["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("authz.rego:6:"), "{error}");
    assert_eq!(admin_get(h.running().admin_addr, "/readyz").await.0, 200);
    let r = h
        .call(checkout.clone(), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the last good set still decides");

    // Compiles, but its own tests fail: refused too, naming the test.
    let tmp = dir.path().join(".authz.rego.swp");
    std::fs::write(
        &tmp,
        "package portcullis.authz\nimport rego.v1\ndefault allow := false\n",
    )
    .unwrap();
    std::fs::rename(&tmp, dir.path().join("authz.rego")).unwrap();
    eventually("the failing set to be refused", || {
        last.load()
            .error
            .as_deref()
            .is_some_and(|e| e.contains("test_checkout_allowed"))
    })
    .await;
    let error = last.load().error.clone().unwrap();
    assert!(error.contains("authz_test.rego:3"), "{error}");
    assert_eq!(h.running().policy.load().revision, good);

    // Fixed: loaded, and the status says so.
    std::fs::write(dir.path().join("authz.rego"), &generation(1)[0].1).unwrap();
    std::fs::write(
        dir.path().join("data.json"),
        format!(r#"{{"gen1": {{"name": "1b", "callers": ["{CHECKOUT}"]}}}}"#),
    )
    .unwrap();
    eventually("the fixed set to load", || last.load().ok).await;
    assert_ne!(h.running().policy.load().revision, good);
    let r = h
        .call(checkout, "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(h.service.received()[1].headers["x-policy-generation"], "1b");

    // Two refusals at least; a loaded machine may also catch the in-place
    // write half done, which is refused and counted like any other. Every
    // refusal is both counted and audited.
    let metrics = h.scrape().await;
    let errors = sample(
        &metrics,
        r#"portcullis_policy_reloads_total{result="error"}"#,
    );
    assert!(errors >= 2.0, "{errors}");
    let events = h.stop().await;
    let rejected: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "policy_rejected")
        .collect();
    assert_eq!(rejected.len() as f64, errors, "{events:#?}");
    let detail = |e: &&serde_json::Value| e["detail"].as_str().unwrap().to_owned();
    assert!(rejected
        .iter()
        .map(detail)
        .any(|d| d.contains("authz.rego:6:")));
    assert!(rejected
        .iter()
        .map(detail)
        .any(|d| d.contains("test_checkout_allowed")));
}

#[tokio::test]
async fn a_refused_set_at_startup_names_the_failing_test() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = generation(1);
    files[2].1 = r#"{"gen1": {"name": "1", "callers": []}}"#.to_owned();
    for (name, text) in &files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let pki = Pki::new();
    let config = pki.config(dir.path(), "127.0.0.1:9".parse().unwrap());
    let err = portcullis::app::start(config.clone()).await.err().unwrap();
    assert!(err.to_string().contains("test_checkout_allowed"), "{err}");
    let mut config = config;
    config.policy.require_tests_pass = false;
    let running = portcullis::app::start(config).await.unwrap();
    assert!(running.shutdown().await);
}
