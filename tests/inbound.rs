//! The whole inbound path, in process: real TLS with certificates made in
//! the test, the real policy engine on the shipped policy, a real upstream
//! that records what it receives.

mod common;

use common::*;
use portcullis::certs::{DevCa, LeafSpec};

#[tokio::test]
async fn allowed_request_reaches_upstream_with_verified_identity_only() {
    let mut h = Harness::start().await;
    let (client, hash) = h.pki.client_with(&LeafSpec::svid(CHECKOUT), &[b"http/1.1"]);
    let reply = h
        .call(
            client,
            "POST",
            "/v1/payments",
            &[
                ("idempotency-key", "k-1"),
                // Forged identity headers: must never reach the service.
                ("x-spiffe-id", REPORTING),
                (
                    "x-forwarded-client-cert",
                    "By=x;Hash=y;URI=spiffe://pay.example/ns/x/sa/admin",
                ),
            ],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = h.service.received();
    assert_eq!(got.len(), 1);
    let headers = &got[0].headers;
    assert_eq!(headers.get_all("x-spiffe-id").iter().count(), 1);
    assert_eq!(headers["x-spiffe-id"], CHECKOUT);
    assert_eq!(headers.get_all("x-forwarded-client-cert").iter().count(), 1);
    assert_eq!(
        headers["x-forwarded-client-cert"],
        format!("By={SIDECAR};Hash={hash};URI={CHECKOUT}").as_str()
    );
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(got[0].uri, "/v1/payments");
    let request_id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(headers["x-request-id"], request_id.as_str());

    let events = h.stop().await;
    let reqs = requests(&events);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["request_id"], request_id.as_str());
    assert_eq!(reqs[0]["decision"]["allowed"], true);
    assert_eq!(reqs[0]["source"]["spiffe_id"], CHECKOUT);
    assert_eq!(reqs[0]["response"]["status"], 200);
    assert_eq!(reqs[0]["request"]["method"], "POST");
}

#[tokio::test]
async fn denied_request_gets_403_with_reason_and_never_reaches_upstream() {
    let mut h = Harness::start().await;
    let reply = h
        .call(
            h.pki.client(FRONTEND),
            "POST",
            "/v1/payments",
            &[("idempotency-key", "k")],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 403);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains(FRONTEND),
        "reason should name the caller: {reason}"
    );
    assert_eq!(
        body["request_id"],
        reply.headers["x-request-id"].to_str().unwrap()
    );
    assert!(
        h.service.received().is_empty(),
        "a denied request reached the service"
    );

    let events = h.stop().await;
    let reqs = requests(&events);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["decision"]["allowed"], false);
    assert_eq!(reqs[0]["decision"]["reason"], reason);
    assert_eq!(reqs[0]["response"]["status"], 403);
    assert_eq!(
        reqs[0]["decision"]["policy_revision"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
}

#[tokio::test]
async fn http2_is_served_and_forwarded() {
    let h = Harness::start().await;
    let (client, _) = h.pki.client_with(&LeafSpec::svid(REPORTING), &[b"h2"]);
    let reply = h
        .call(client, "GET", "/v1/reports/daily?date=2026-11-25", &[])
        .await
        .unwrap();
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(reply.status, 200);
    let got = h.service.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].uri, "/v1/reports/daily?date=2026-11-25");
    assert_eq!(got[0].headers["x-spiffe-id"], REPORTING);
}

/// Each ALPN outcome has its own connection type (proxy.rs): HTTP/1.1 and
/// h2 are served directly, and a client that negotiated nothing is sniffed,
/// so both HTTP/1.1 and HTTP/2 with prior knowledge still work without ALPN.
#[tokio::test]
async fn every_alpn_outcome_is_served_and_forwarded_with_identity() {
    use http_body_util::{BodyExt, Empty};
    let h = Harness::start().await;
    let addr = h.running().inbound_addr;
    let path = "/v1/payments/pay_1001";

    for alpn in [&[b"http/1.1".as_slice()][..], &[], &[b"h2".as_slice()]] {
        let (client, _) = h.pki.client_with(&LeafSpec::svid(CHECKOUT), alpn);
        let reply = h.call(client, "GET", path, &[]).await.unwrap();
        assert_eq!(reply.status, 200, "ALPN {alpn:?}: {:?}", reply.body);
        let expected = if alpn.is_empty() || alpn[0] == b"http/1.1" {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_2
        };
        assert_eq!(reply.version, expected, "ALPN {alpn:?}");
    }

    // No ALPN, HTTP/2 with prior knowledge.
    let (client, _) = h.pki.client_with(&LeafSpec::svid(CHECKOUT), &[]);
    let tls = connect_tls(addr, client).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost:{}{path}", addr.port()))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();

    let got = h.service.received();
    assert_eq!(got.len(), 4, "every call reaches the service once");
    for r in &got {
        assert_eq!(r.uri, path);
        assert_eq!(r.headers["x-spiffe-id"], CHECKOUT);
    }
}

#[tokio::test]
async fn unsafe_paths_are_refused_before_policy_and_safe_ones_normalised() {
    let mut h = Harness::start().await;
    let reporting = h.pki.client(REPORTING);
    for bad in [
        "/v1/reports/..%2Fpayments",
        "/v1/../../etc",
        "/v1/reports/..;/payments",
    ] {
        let reply = h.call(reporting.clone(), "GET", bad, &[]).await.unwrap();
        assert_eq!(reply.status, 400, "{bad}");
    }
    // Encoded dot segments are resolved before policy: reporting may not
    // read payments, whatever the spelling.
    let reply = h
        .call(
            reporting.clone(),
            "GET",
            "/v1/reports/%2e%2e/payments/p1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 403);
    assert!(h.service.received().is_empty());
    let reply = h
        .call(reporting.clone(), "GET", "//v1/reports/./daily", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(h.service.received()[0].uri, "/v1/reports/daily");
    // The query goes with the normalised path, not with the path as sent.
    let reply = h
        .call(reporting, "GET", "/v1//reports/daily?date=2026-11-25", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        h.service.received()[1].uri,
        "/v1/reports/daily?date=2026-11-25"
    );
    let events = h.stop().await;
    let requests = requests(&events);
    assert_eq!(requests.len(), 6);
    // The audit trail names the target that was authorized and forwarded.
    let paths: Vec<&str> = requests
        .iter()
        .filter(|e| e["response"]["status"] == 200)
        .filter_map(|e| e["request"]["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        ["/v1/reports/daily", "/v1/reports/daily?date=2026-11-25"]
    );
}

#[tokio::test]
async fn refused_handshakes_are_counted_by_reason_and_audited() {
    let mut h = Harness::start().await;
    let now = time::OffsetDateTime::now_utc();
    let mut expired = LeafSpec::svid(CHECKOUT);
    expired.not_before = now - time::Duration::days(2);
    expired.not_after = now - time::Duration::days(1);
    let mut two_uris = LeafSpec::svid(CHECKOUT);
    two_uris.uris.push(REPORTING.into());
    let rogue = DevCa::new(TD).unwrap();

    let cases = [
        ("no_client_cert", h.pki.anonymous()),
        ("expired", h.pki.client_with(&expired, &[b"http/1.1"]).0),
        ("bad_svid", h.pki.client_with(&two_uris, &[b"http/1.1"]).0),
        (
            "untrusted_chain",
            h.pki
                .client_from(&rogue, &LeafSpec::svid(CHECKOUT), &[b"http/1.1"])
                .0,
        ),
    ];
    for (reason, client) in cases {
        let result = h.call(client, "GET", "/v1/payments/p1", &[]).await;
        assert!(result.is_err(), "{reason}: handshake should be refused");
        let metrics = h.running().metrics.clone();
        eventually(reason, || {
            metrics.tls_handshakes.with_label_values(&[reason]).get() == 1
        })
        .await;
    }
    // The accept loop is undisturbed: a good client still gets through.
    let ok = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert!(h.service.received().len() == 1);

    let text = h.scrape().await;
    assert_eq!(
        sample(
            &text,
            r#"portcullis_tls_handshakes_total{result="expired"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&text, r#"portcullis_tls_handshakes_total{result="ok"}"#),
        1.0
    );

    let events = h.stop().await;
    let rejected: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "handshake_rejected")
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    for reason in ["no_client_cert", "expired", "bad_svid", "untrusted_chain"] {
        assert!(
            rejected.iter().any(|d| d.starts_with(reason)),
            "{reason} not audited: {rejected:?}"
        );
    }
}

#[tokio::test]
async fn upstream_down_gives_fast_503() {
    let mut h = Harness::start().await;
    // Replace the upstream with a port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let pki_config_dir = h.pki.dir.path().to_owned();
    let mut config = h.pki.config(&shipped_policy(), dead_addr);
    config.audit.path = pki_config_dir.join("audit2.log").display().to_string();
    h.running.take().unwrap().shutdown().await;
    let running = portcullis::app::start(config).await.unwrap();
    let started = std::time::Instant::now();
    let reply = portcullis::demo::call(
        running.inbound_addr,
        h.pki.client(CHECKOUT),
        "GET",
        "/v1/payments/p1",
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"], "upstream_error");
    assert_eq!(
        running
            .metrics
            .upstream_errors
            .with_label_values(&["connect"])
            .get(),
        1
    );
    running.shutdown().await;
}

#[tokio::test]
async fn metrics_move_with_decisions() {
    let h = Harness::start().await;
    let before = h.scrape().await;
    assert_eq!(
        sample(
            &before,
            r#"portcullis_requests_total{decision="allow",status="2xx"}"#
        ),
        0.0
    );
    let checkout = h.pki.client(CHECKOUT);
    for _ in 0..3 {
        let r = h
            .call(checkout.clone(), "GET", "/v1/payments/p1", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let r = h
        .call(checkout, "DELETE", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let after = h.scrape().await;
    assert_eq!(
        sample(
            &after,
            r#"portcullis_requests_total{decision="allow",status="2xx"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(
            &after,
            r#"portcullis_requests_total{decision="deny",status="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "portcullis_policy_evaluation_duration_seconds_count"
        ),
        4.0
    );
    assert!(sample(&after, "portcullis_svid_expiry_timestamp_seconds") > 1.7e9);
    assert_eq!(
        sample(&after, r#"portcullis_policy_reloads_total{result="ok"}"#),
        1.0
    );
}

#[tokio::test]
async fn admin_endpoints_report_state() {
    let h = Harness::start().await;
    let admin = h.running().admin_addr;
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    assert_eq!(admin_get(admin, "/readyz").await, (200, "ready\n".into()));
    let (status, body) = admin_get(admin, "/policy").await;
    assert_eq!(status, 200);
    let policy: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        policy["revision"],
        h.running().policy.load().revision.as_str()
    );
    assert!(policy["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "authz.rego"));
    // The shipped policy passes the RVM agreement check.
    assert_eq!(policy["evaluator"], "rvm", "{policy}");
    assert!(policy["evaluator_reason"]
        .as_str()
        .unwrap()
        .contains("agrees with the interpreter"));
    let (status, body) = admin_get(admin, "/config").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["identity"]["trust_domain"], TD);
    assert_eq!(admin_get(admin, "/nope").await.0, 404);
}

#[tokio::test]
async fn policy_error_is_a_500_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.rego"),
        "package portcullis.authz\nimport rego.v1\nallow := {\"allowed\": \"yes\"}\n",
    )
    .unwrap();
    let mut h = Harness::start_with(dir.path(), |_| {}).await;
    let reply = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 500);
    assert!(h.service.received().is_empty());
    let events = h.stop().await;
    let reqs = requests(&events);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["decision"]["allowed"], false);
    assert!(reqs[0]["decision"]["reason"]
        .as_str()
        .unwrap()
        .contains("allowed"));
}

#[tokio::test]
async fn policy_may_choose_deny_status_and_add_upstream_headers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.rego"),
        r#"package portcullis.authz
import rego.v1
default allow := {"allowed": false, "http_status": 429, "reason": "slow down"}
allow := {"allowed": true, "headers": {"x-caller-team": "shop"}} if {
    input.attributes.request.http.method == "GET"
}
"#,
    )
    .unwrap();
    let h = Harness::start_with(dir.path(), |_| {}).await;
    let checkout = h.pki.client(CHECKOUT);
    let r = h.call(checkout.clone(), "POST", "/x", &[]).await.unwrap();
    assert_eq!(r.status, 429);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["reason"], "slow down");
    let r = h
        .call(checkout, "GET", "/x", &[("x-caller-team", "forged")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(h.service.received()[0].headers["x-caller-team"], "shop");
}

#[tokio::test]
async fn startup_refuses_bad_identity_and_policy_naming_the_cause() {
    let pki = Pki::new();
    let upstream = "127.0.0.1:9".parse().unwrap();

    let mut c = pki.config(&shipped_policy(), upstream);
    let other = pki.ca.issue(&LeafSpec::svid(SIDECAR)).unwrap();
    let wrong_key = pki.dir.path().join("other.key");
    std::fs::write(&wrong_key, &other.key_pem).unwrap();
    c.identity.key = wrong_key.clone();
    let err = portcullis::app::start(c).await.err().unwrap().to_string();
    assert!(
        err.contains("does not match") && err.contains("other.key"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.rego"),
        "package portcullis.authz\nallow if {\n",
    )
    .unwrap();
    let c = pki.config(dir.path(), upstream);
    let err = portcullis::app::start(c).await.err().unwrap().to_string();
    assert!(err.contains("bad.rego"), "{err}");

    let mut c = pki.config(&shipped_policy(), upstream);
    c.identity.trust_domain = "other.example".into();
    let err = portcullis::app::start(c).await.err().unwrap().to_string();
    assert!(err.contains("trust domain"), "{err}");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    // An upstream that answers only when told to, so a request is provably
    // in flight while the drain starts.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (arrived_tx, arrived_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = s.read(&mut buf).await.unwrap();
        arrived_tx.send(()).unwrap();
        release_rx.await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
            .await
            .unwrap();
    });
    let pki = Pki::new();
    let config = pki.config(&shipped_policy(), upstream);
    let audit_path = std::path::PathBuf::from(&config.audit.path);
    let running = portcullis::app::start(config).await.unwrap();
    let addr = running.inbound_addr;
    let call = tokio::spawn(portcullis::demo::call(
        addr,
        pki.client(CHECKOUT),
        "GET",
        "/v1/payments/p1",
        &[],
        "",
    ));
    arrived_rx.await.unwrap();
    let shutdown = tokio::spawn(running.shutdown());
    // New connections are refused once draining has begun.
    let admin_probe = async {
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        false
    };
    assert!(admin_probe.await, "listener still accepting while draining");
    release_tx.send(()).unwrap();
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"done");
    assert!(shutdown.await.unwrap(), "drain did not complete");
    let text = std::fs::read_to_string(audit_path).unwrap();
    assert!(portcullis::audit::verify(&text).is_ok());
    assert!(text
        .lines()
        .last()
        .unwrap()
        .contains("\"kind\":\"shutdown\""));
    assert!(text.contains("\"status\":200"));
}

#[tokio::test]
async fn circuit_opens_on_a_dead_upstream_and_closes_when_it_returns() {
    let mut h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.breaker_failures = 2;
        c.inbound.breaker_cooldown_ms = 200;
    })
    .await;
    let checkout = h.pki.client(CHECKOUT);
    let get = |c| h.call(c, "GET", "/v1/payments/p1", &[]);
    assert_eq!(get(checkout.clone()).await.unwrap().status, 200);

    // Kill the service: its listener and open connections go away.
    let addr = h.service.addr;
    h.service = portcullis::demo::DemoService::start().await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            h.call(checkout.clone(), "GET", "/v1/payments/p1", &[])
                .await
                .unwrap()
                .status,
            503
        );
    }
    let metrics = h.running().metrics.clone();
    assert_eq!(
        metrics.circuit_breaker_state.get(),
        1,
        "circuit should be open"
    );
    let started = std::time::Instant::now();
    let reply = h
        .call(checkout.clone(), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 503);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(
        metrics
            .upstream_errors
            .with_label_values(&["circuit_open"])
            .get(),
        1
    );

    // Bring it back on the same address: after the cooldown a probe closes
    // the circuit and requests flow again.
    let revived = portcullis::demo::DemoService::start_on(addr).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let status = h
            .call(checkout.clone(), "GET", "/v1/payments/p1", &[])
            .await
            .unwrap()
            .status;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "circuit never closed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.circuit_breaker_state.get(), 0);
    assert_eq!(revived.received().len(), 1);
}

#[tokio::test]
async fn caller_over_its_rate_gets_429_while_others_are_unaffected() {
    let mut h = Harness::start_with(&shipped_policy(), |c| {
        // Slow enough that no token comes back during the test.
        c.rate_limit.requests_per_second = 0.01;
        c.rate_limit.burst = 2;
    })
    .await;
    let checkout = h.pki.client(CHECKOUT);
    for _ in 0..2 {
        let r = h
            .call(checkout.clone(), "GET", "/v1/payments/p1", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let limited = h
        .call(checkout, "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(limited.status, 429);
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    // Another identity has its own bucket.
    let r = h
        .call(h.pki.client(REPORTING), "GET", "/v1/reports/daily", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(h.service.received().len(), 3);
    assert_eq!(h.running().metrics.rate_limited.get(), 1);
    let events = h.stop().await;
    let limited: Vec<_> = requests(&events)
        .into_iter()
        .filter(|e| e["response"]["status"] == 429)
        .collect();
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0]["decision"]["allowed"], false);
    assert!(limited[0]["decision"]["reason"]
        .as_str()
        .unwrap()
        .contains("rate limit"));
}

#[tokio::test]
async fn oversized_headers_and_bodies_are_refused_and_counted() {
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.max_header_list_bytes = 2048;
        c.inbound.max_request_body_bytes = 1024;
    })
    .await;
    let checkout = h.pki.client(CHECKOUT);
    let big = "x".repeat(3000);
    let r = h
        .call(
            checkout.clone(),
            "GET",
            "/v1/payments/p1",
            &[("x-big", &big)],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 431);

    // Declared too large: refused before anything is forwarded.
    let r = portcullis::demo::call(
        h.running().inbound_addr,
        checkout.clone(),
        "POST",
        "/v1/payments",
        &[("idempotency-key", "k")],
        &"y".repeat(2000),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413);

    // Chunked, no length: counted while streaming.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(h.running().inbound_addr)
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(checkout.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut raw = b"POST /v1/payments HTTP/1.1\r\nHost: localhost\r\nidempotency-key: k\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        raw.extend_from_slice(b"200\r\n");
        raw.extend_from_slice(&[b'z'; 512]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    tls.write_all(&raw).await.unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    let ok = h
        .call(checkout, "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let m = &h.running().metrics;
    assert_eq!(
        m.limits_exceeded.with_label_values(&["header_bytes"]).get(),
        1
    );
    assert_eq!(
        m.limits_exceeded.with_label_values(&["body_bytes"]).get(),
        2
    );
    // Only the last request, and none of the oversized bodies in full,
    // reached the service.
    let got = h.service.received();
    assert!(
        got.iter().all(|r| r.body.len() <= 1024),
        "an oversized body was forwarded whole"
    );
    assert_eq!(got.iter().filter(|r| r.method == "GET").count(), 1);
}

#[tokio::test]
async fn slowloris_is_cut_off_without_hurting_a_good_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.header_read_timeout_ms = 300;
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(h.running().inbound_addr)
        .await
        .unwrap();
    let mut slow = tokio_rustls::TlsConnector::from(h.pki.client(CHECKOUT))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    slow.write_all(b"GET /v1/payments/p1 HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // A good client is served while the slow one dangles.
    let ok = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the slow connection was never closed");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(250),
        "{elapsed:?}"
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    limit_count_reaches(h.running(), "header_timeout", 1).await;
    assert_eq!(h.service.received().len(), 1);
}

#[tokio::test]
async fn connection_limit_refuses_extra_connections_only() {
    let h = Harness::start_with(&shipped_policy(), |c| c.inbound.max_connections = 1).await;
    // Hold the single slot with an established, authenticated connection.
    let tcp = tokio::net::TcpStream::connect(h.running().inbound_addr)
        .await
        .unwrap();
    let held = tokio_rustls::TlsConnector::from(h.pki.client(CHECKOUT))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let metrics = h.running().metrics.clone();
    eventually("connection open", || metrics.open_connections.get() == 1).await;
    let refused = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await;
    assert!(refused.is_err(), "a connection over the limit was served");
    assert_eq!(metrics.connections_refused.get(), 1);
    drop(held);
    eventually("slot released", || metrics.open_connections.get() == 0).await;
    let ok = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}

/// Writes one keep-alive GET and reads its response head and
/// Content-Length body; returns the status.
async fn keep_alive_get<S>(tls: &mut S, path: &str) -> u16
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tls.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a Content-Length response");
    while buf.len() < head_end + length {
        let n = tls.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_and_active_ones_kept() {
    use tokio::io::AsyncReadExt;
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.idle_timeout_ms = 300;
        // Far longer, so that only the idle timer can close these.
        c.inbound.header_read_timeout_ms = 30_000;
    })
    .await;
    let addr = h.running().inbound_addr;
    let mut idle = connect_tls(addr, h.pki.client(CHECKOUT)).await;
    let mut active = connect_tls(addr, h.pki.client(CHECKOUT)).await;
    assert_eq!(keep_alive_get(&mut idle, "/v1/payments/p1").await, 200);
    let went_idle = std::time::Instant::now();

    // The active client keeps one connection busy for four idle periods.
    let busy = tokio::spawn(async move {
        for _ in 0..12 {
            assert_eq!(keep_alive_get(&mut active, "/v1/payments/p1").await, 200);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        active
    });

    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("the idle connection was never closed");
    assert_eq!(read.unwrap(), 0, "expected a clean EOF (close_notify)");
    let waited = went_idle.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(250),
        "{waited:?}"
    );
    let metrics = h.running().metrics.clone();
    let closed = |limit: &str| metrics.limits_exceeded.with_label_values(&[limit]).get();
    eventually("idle close counted", || closed("idle_timeout") == 1).await;

    let mut active = busy.await.unwrap();
    // Still open and served after 1.2 s of traffic at 100 ms gaps.
    assert_eq!(keep_alive_get(&mut active, "/v1/payments/p1").await, 200);
    assert_eq!(closed("idle_timeout"), 1);
    assert_eq!(closed("header_timeout"), 0);
    assert_eq!(h.service.received().len(), 14);
}

/// A resumed TLS session skips the client's certificate: the sidecar would
/// go on trusting an SVID issued under a CA since removed from the bundle,
/// or one that has expired, for as long as the session lived. So no session
/// is ever resumed, whatever the client offers.
#[tokio::test]
async fn no_tls_session_is_resumed_and_every_connection_is_verified() {
    use std::sync::Arc;
    let mut h = Harness::start().await;
    let versions: [&[&rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];
    for versions in versions {
        let issued = h.pki.ca.issue(&LeafSpec::svid(CHECKOUT)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(h.pki.ca.cert_der()).unwrap();
        // rustls' default client keeps sessions and offers them again.
        let mut client =
            rustls::ClientConfig::builder_with_provider(portcullis::tls::crypto_provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(issued.chain(), issued.key_der())
                .unwrap();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = Arc::new(client);
        // A whole exchange, so that any ticket the server sends is read.
        let reply = h
            .call(client.clone(), "GET", "/v1/payments/pay_1001", &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let second = connect_tls(h.running().inbound_addr, client).await;
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "{versions:?}"
        );
    }
    // Four handshakes counted, none of them resumed (a full handshake with
    // client auth required always runs the client verifier). A TLS 1.3
    // client is done before the server has read its Finished, so the
    // count may trail the client by a moment.
    let ok = r#"portcullis_tls_handshakes_total{result="ok"}"#;
    eventually_async(
        std::time::Duration::from_secs(10),
        "4 handshakes counted",
        || async { sample(&h.scrape().await, ok) >= 4.0 },
    )
    .await;
    assert_eq!(sample(&h.scrape().await, ok), 4.0);
    h.stop().await;
}
