//! The audit trail under load, under tampering, with a writer that cannot
//! write, and against its JSON Schema: the evidence issue 3 asks for.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis::audit::{self, Hasher};
use portcullis::config::OnFull;
use rustls::pki_types::ServerName;

/// A Luhn-valid test card number, sent in the path, the query and a header.
const PAN: &str = "4111111111111111";

/// One keep-alive HTTP/1.1 connection over mTLS that sends `n` requests
/// and returns their statuses.
async fn keep_alive_client(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    n: usize,
    allowed: bool,
) -> Vec<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::with_capacity(n);
    for k in 0..n {
        let (method, path) = match (allowed, k % 3) {
            (true, 0) => ("POST", "/v1/payments".to_string()),
            (true, 1) => ("GET", format!("/v1/payments/p{k}?card={PAN}")),
            (true, _) => ("GET", format!("/v1/payments/{PAN}")),
            (false, _) => (
                "POST",
                format!("/v1/payments?pan=4111-1111-1111-1111&k={k}"),
            ),
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("idempotency-key", format!("k-{k}"))
            .header("authorization", "Bearer secret-token-value")
            .header("x-card", "4111 1111 1111 1111")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    statuses
}

/// 20,000 requests from 16 concurrent keep-alive clients, half of them
/// denied. Returns how long the load took.
async fn load(h: &Harness, total: usize) -> std::time::Duration {
    let clients = 16;
    let per = total / clients;
    let checkout = h.pki.client(CHECKOUT);
    let frontend = h.pki.client(FRONTEND);
    let addr = h.running().inbound_addr;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let allowed = c % 2 == 0;
            let tls = if allowed {
                checkout.clone()
            } else {
                frontend.clone()
            };
            tokio::spawn(keep_alive_client(addr, tls, per, allowed))
        })
        .collect();
    let mut ok = 0;
    let mut denied = 0;
    for (c, t) in tasks.into_iter().enumerate() {
        for status in t.await.unwrap() {
            match (c % 2 == 0, status) {
                (true, 200) => ok += 1,
                (false, 403) => denied += 1,
                other => panic!("client {c}: unexpected {other:?}"),
            }
        }
    }
    assert_eq!(ok + denied, total);
    started.elapsed()
}

fn trail_files(audit_path: &Path) -> Vec<PathBuf> {
    let dir = audit_path.parent().unwrap();
    let name = audit_path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&name))
        .collect()
}

fn read_events(files: &[PathBuf]) -> (String, Vec<serde_json::Value>) {
    let mut all = String::new();
    for f in files {
        all.push_str(&std::fs::read_to_string(f).unwrap());
    }
    let events = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (all, events)
}

async fn load_test(max_bytes: u64) {
    const TOTAL: usize = 20_000;
    let mut h = Harness::start_with(&shipped_policy(), |c| {
        c.audit.max_bytes = max_bytes;
        c.audit.keep_files = 1_000;
        // Four engineers share two cores: the policy's 100 ms budget is
        // not what this test is about.
        c.policy.eval_timeout_ms = 10_000;
    })
    .await;
    let took = load(&h, TOTAL).await;
    let drained = h.running.take().unwrap().shutdown().await;
    assert!(drained);
    let files = trail_files(&h.audit_path);
    let verified = audit::verify_files(&files, &Hasher::Sha256).unwrap();
    let (text, events) = read_events(&files);
    let requests = events.iter().filter(|e| e["kind"] == "request").count();
    assert_eq!(requests, TOTAL);
    assert_eq!(verified.events as usize, events.len());
    assert!(verified.gaps.is_empty());
    let allowed = events
        .iter()
        .filter(|e| e["kind"] == "request" && e["decision"]["allowed"] == true)
        .count();
    assert!(allowed > 0 && allowed < TOTAL, "{allowed}");
    // Nothing that must never be written was written.
    for secret in [
        PAN,
        "4111-1111-1111-1111",
        "4111 1111 1111 1111",
        "secret-token-value",
    ] {
        assert!(!text.contains(secret), "{secret} in the audit trail");
    }
    eprintln!(
        "load: {TOTAL} requests in {took:?} ({:.0}/s), {} audit file(s), max_bytes {max_bytes}",
        TOTAL as f64 / took.as_secs_f64(),
        files.len()
    );
    if max_bytes > 0 {
        assert!(files.len() > 3, "rotation did not happen: {files:?}");
        // The CLI takes the rotated files in any order (here: directory order).
        let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let (ok, out) = verify_cli(&paths, None).await;
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!("{} events verified", events.len())),
            "{out}"
        );
        let rotated = events.iter().filter(|e| e["kind"] == "rotated").count();
        assert_eq!(rotated, files.len() - 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_20000_requests_are_each_audited_once_and_verify() {
    load_test(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_with_rotation_every_300kb_keeps_one_chain() {
    load_test(300_000).await;
}

/// A short real trail: startup, policy, allowed, denied, a refused
/// handshake, shutdown.
async fn real_trail() -> (tempfile::TempDir, PathBuf, String) {
    let mut h = Harness::start().await;
    h.call(
        h.pki.client(CHECKOUT),
        "POST",
        "/v1/payments",
        &[("idempotency-key", "k1"), ("cookie", "sid=abc")],
    )
    .await
    .unwrap();
    h.call(h.pki.client(FRONTEND), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    for _ in 0..3 {
        h.call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p2", &[])
            .await
            .unwrap();
    }
    assert!(h.call(h.pki.anonymous(), "GET", "/", &[]).await.is_err());
    let metrics = h.running().metrics.clone();
    eventually("handshake rejection", || {
        metrics
            .tls_handshakes
            .with_label_values(&["no_client_cert"])
            .get()
            == 1
    })
    .await;
    h.stop().await;
    let text = std::fs::read_to_string(&h.audit_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.log");
    (dir, path, text)
}

async fn verify_cli(files: &[&Path], key: Option<&Path>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("audit").arg("verify").args(files);
    if let Some(k) = key {
        cmd.arg("--key-file").arg(k);
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn verify_names_the_tampered_line_in_a_real_trail() {
    let (_dir, path, text) = real_trail().await;
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 8, "{text}");
    std::fs::write(&path, &text).unwrap();
    let (ok, out) = verify_cli(&[&path], None).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{} events verified", lines.len())),
        "{out}"
    );

    let join = |ls: Vec<&str>| ls.join("\n") + "\n";
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    let mut removed = lines.clone();
    removed.remove(4);
    let mut inserted = lines.clone();
    inserted.insert(5, lines[2]);
    let cases = [
        (
            "edited",
            text.replacen("\"status\":403", "\"status\":200", 1),
            lines
                .iter()
                .position(|l| l.contains("\"status\":403"))
                .unwrap()
                + 1,
        ),
        ("removed", join(removed), 5),
        ("reordered", join(swapped), 4),
        ("inserted", join(inserted), 6),
        ("bad JSON", text.replacen(lines[2], &lines[2][..20], 1), 3),
    ];
    for (why, tampered, line) in cases {
        std::fs::write(&path, tampered).unwrap();
        let (ok, out) = verify_cli(&[&path], None).await;
        assert!(!ok, "{why}: {out}");
        assert!(
            out.contains(&format!("copy.log:{line}: chain broken: {why}")),
            "{why}, expected line {line}: {out}"
        );
    }
}

#[tokio::test]
async fn hmac_trail_verifies_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit.key");
    std::fs::write(&key, "an audit key of more than sixteen bytes\n").unwrap();
    let key_for_config = key.clone();
    let mut h = Harness::start_with(&shipped_policy(), move |c| {
        c.audit.hmac_key_file = Some(key_for_config);
    })
    .await;
    h.call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    h.running.take().unwrap().shutdown().await;
    let (ok, out) = verify_cli(&[&h.audit_path], Some(&key)).await;
    assert!(ok, "{out}");
    assert!(out.contains("hmac-sha256"), "{out}");
    let (ok, out) = verify_cli(&[&h.audit_path], None).await;
    assert!(!ok, "verified without the key: {out}");

    // An attacker without the key edits a line and recomputes a
    // self-consistent plain SHA-256 chain: it fails under the key.
    let text = std::fs::read_to_string(&h.audit_path).unwrap();
    let mut prev = audit::GENESIS.to_string();
    let forged: String = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v["kind"] == "request" {
                v["response"]["status"] = 500.into();
            }
            v["prev"] = prev.clone().into();
            v.as_object_mut().unwrap().remove("hash");
            let mut body = v.to_string();
            prev = Hasher::Sha256.hash(body.as_bytes());
            body.pop();
            format!("{body},\"hash\":\"{prev}\"}}\n")
        })
        .collect();
    let copy = dir.path().join("forged.log");
    std::fs::write(&copy, forged).unwrap();
    let (ok, _) = verify_cli(&[&copy], None).await;
    assert!(ok, "the forged chain is self-consistent without a key");
    let (ok, out) = verify_cli(&[&copy], Some(&key)).await;
    assert!(!ok, "{out}");
    assert!(out.contains("forged.log:1: chain broken: edited"), "{out}");
}

/// /dev/full opens fine and fails every write with ENOSPC: the writer
/// cannot write, so fail_closed must refuse requests instead of serving
/// them unaudited.
#[tokio::test]
async fn fail_closed_refuses_requests_while_the_trail_cannot_be_written() {
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.audit.path = "/dev/full".into();
        c.audit.on_full = OnFull::FailClosed;
    })
    .await;
    // The startup event's write fails first.
    let running = h.running();
    eventually("writer failing", || running.audit_failing()).await;
    for _ in 0..5 {
        let reply = h
            .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 503, "{:?}", reply.body);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["error"], "audit_unavailable");
    }
    assert!(
        h.service.received().is_empty(),
        "a request reached the service unaudited"
    );
    let scrape = h.scrape().await;
    assert_eq!(
        sample(
            &scrape,
            r#"portcullis_requests_total{decision="error",status="5xx"}"#
        ),
        5.0
    );
    let mut h = h;
    h.running.take().unwrap().shutdown().await;
}

#[tokio::test]
async fn fail_open_serves_and_counts_every_lost_event() {
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.audit.path = "/dev/full".into();
        c.audit.on_full = OnFull::FailOpen;
    })
    .await;
    for _ in 0..5 {
        let reply = h
            .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    let metrics = h.running().metrics.clone();
    // startup + policy_loaded + 5 requests, every one counted (gap events
    // that could not be written carry counts, they are not counted twice).
    eventually("every event counted as dropped", || {
        metrics.audit_dropped.get() >= 7
    })
    .await;
    assert_eq!(metrics.audit_written.get(), 0);
    let mut h = h;
    h.running.take().unwrap().shutdown().await;
    assert_eq!(metrics.audit_dropped.get(), 8, "shutdown event too");
}

#[tokio::test]
async fn chain_continues_across_a_sidecar_restart() {
    let mut h = Harness::start().await;
    h.call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    h.running.take().unwrap().shutdown().await;
    let mut config = h.pki.config(&shipped_policy(), h.service.addr);
    config.audit.path = h.audit_path.display().to_string();
    h.running = Some(portcullis::app::start(config).await.unwrap());
    h.call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    let events = h.stop().await;
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "startup").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(requests(&events).len(), 2);
}

#[tokio::test]
async fn every_emitted_line_matches_the_json_schema() {
    let validator = schema();
    let (_dir, _path, mut text) = real_trail().await;

    // The kinds a short run does not produce: gap, rotated, svid_rotated.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let metrics =
        Arc::new(portcullis::metrics::Metrics::new(&prometheus::Registry::new()).unwrap());
    let mut options = audit::Options::new(path.to_str().unwrap(), 16);
    options.max_bytes = 300;
    let (sink, writer) = audit::start_with(options, metrics).unwrap();
    sink.refused();
    sink.record(audit::Event::svid_rotated(
        SIDECAR,
        std::time::SystemTime::now(),
        b"leaf der",
        "renewed",
    ));
    sink.record(audit::Event::shutdown("bye"));
    writer.finish().await;
    let files = trail_files(&path);
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, out) = verify_cli(&paths, None).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("0 event(s) could not be written, 1 request(s) were refused unrecorded"),
        "{out}"
    );
    for f in &files {
        text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    let mut kinds = std::collections::BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(errors.is_empty(), "line {}: {errors:?}\n{line}", n + 1);
        kinds.insert(value["kind"].as_str().unwrap().to_owned());
    }
    for k in [
        "startup",
        "policy_loaded",
        "request",
        "handshake_rejected",
        "shutdown",
        "gap",
        "rotated",
        "svid_rotated",
    ] {
        assert!(kinds.contains(k), "{k} not exercised: {kinds:?}");
    }
    // The schema is not vacuous: a line with a raw card number in the
    // path's place of a string, or an unknown kind, fails.
    let bad = serde_json::json!({"ts": "x", "seq": 1, "kind": "nope", "prev": "", "hash": ""});
    assert!(!validator.is_valid(&bad));
}

#[tokio::test]
async fn refused_handshakes_name_the_presented_spiffe_id() {
    let mut h = Harness::start().await;
    let rogue = portcullis::certs::DevCa::new(TD).unwrap();
    let untrusted = h
        .pki
        .client_from(
            &rogue,
            &portcullis::certs::LeafSpec::svid(REPORTING),
            &[b"http/1.1"],
        )
        .0;
    assert!(h.call(untrusted, "GET", "/", &[]).await.is_err());
    assert!(h.call(h.pki.anonymous(), "GET", "/", &[]).await.is_err());
    let metrics = h.running().metrics.clone();
    eventually("both refusals", || {
        metrics
            .tls_handshakes
            .with_label_values(&["untrusted_chain"])
            .get()
            == 1
            && metrics
                .tls_handshakes
                .with_label_values(&["no_client_cert"])
                .get()
                == 1
    })
    .await;
    let events = h.stop().await;
    let rejected: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "handshake_rejected")
        .collect();
    assert_eq!(rejected.len(), 2);
    let untrusted = rejected
        .iter()
        .find(|e| e["detail"].as_str().unwrap().starts_with("untrusted_chain"))
        .unwrap();
    assert_eq!(untrusted["source"]["spiffe_id"], REPORTING);
    let anonymous = rejected
        .iter()
        .find(|e| e["detail"].as_str().unwrap().starts_with("no_client_cert"))
        .unwrap();
    assert!(anonymous["source"].get("spiffe_id").is_none());
}
