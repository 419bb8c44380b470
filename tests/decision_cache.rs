//! The policy decision cache on the real data path: hits are counted,
//! audited as cached, and never change what is decided.

mod common;

use common::*;

const HIT: &str = "portcullis_policy_decision_cache_total{result=\"hit\"}";
const MISS: &str = "portcullis_policy_decision_cache_total{result=\"miss\"}";
const UNCACHEABLE: &str = "portcullis_policy_decision_cache_total{result=\"uncacheable\"}";

#[tokio::test]
async fn identical_requests_hit_and_are_audited_like_evaluated_ones() {
    let mut h = Harness::start().await;
    let client = h.pki.client(CHECKOUT);
    get_twice_ok(&h, &client, "/v1/payments/p1").await;
    let denied = h
        .call(client.clone(), "GET", "/v1/reports", &[])
        .await
        .unwrap();
    assert_eq!(denied.status, 403);
    // The denied path was evaluated, not served the allow.
    let again = h.call(client, "GET", "/v1/reports", &[]).await.unwrap();
    assert_eq!(again.status, 403);
    assert_eq!(h.service.received().len(), 2);

    let metrics = h.scrape().await;
    assert_eq!(sample(&metrics, HIT), 2.0, "{metrics}");
    assert_eq!(sample(&metrics, MISS), 2.0, "{metrics}");
    assert_eq!(sample(&metrics, UNCACHEABLE), 0.0, "{metrics}");

    let (status, body) = admin_get(h.running().admin_addr, "/policy").await;
    assert_eq!(status, 200);
    let policy: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cache = &policy["decision_cache"];
    assert_eq!(cache["enabled"], true, "{body}");
    assert_eq!(cache["entries"], 2, "{body}");
    assert_eq!(cache["capacity"], 10_000, "{body}");
    assert!(cache["reads"]
        .as_array()
        .unwrap()
        .contains(&"input.attributes.request.http.headers".into()));
    assert!(cache["reason"]
        .as_str()
        .unwrap()
        .contains("repeat across requests"));

    let events = h.stop().await;
    let reqs = requests(&events);
    assert_eq!(reqs.len(), 4);
    let validator = schema();
    for e in &reqs {
        assert!(validator.is_valid(e), "{e}");
    }
    let cached: Vec<bool> = reqs
        .iter()
        .map(|e| e["decision"].get("cached").is_some())
        .collect();
    assert_eq!(cached, [false, true, false, true]);
    assert_eq!(reqs[1]["decision"]["cached"], true);
    // Same decision, each with its own request id.
    assert_eq!(reqs[0]["decision"]["allowed"], true);
    assert_eq!(reqs[0]["decision"]["reason"], reqs[1]["decision"]["reason"]);
    assert_eq!(
        reqs[0]["decision"]["policy_revision"],
        reqs[1]["decision"]["policy_revision"]
    );
    assert_ne!(reqs[0]["request_id"], reqs[1]["request_id"]);
    assert_eq!(reqs[2]["decision"]["allowed"], false);
    assert_eq!(reqs[2]["response"]["status"], 403);
    assert_eq!(reqs[2]["decision"]["reason"], reqs[3]["decision"]["reason"]);
}

#[tokio::test]
async fn a_policy_reading_the_request_time_is_never_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.rego"),
        "package portcullis.authz\nimport rego.v1\n\
         default allow := false\nallow if input.attributes.request.time != \"\"\n",
    )
    .unwrap();
    let h = Harness::start_with(dir.path(), |_| {}).await;
    let client = h.pki.client(CHECKOUT);
    get_twice_ok(&h, &client, "/v1/x").await;
    let metrics = h.scrape().await;
    assert_eq!(sample(&metrics, UNCACHEABLE), 2.0, "{metrics}");
    assert_eq!(sample(&metrics, HIT), 0.0, "{metrics}");
    let (_, body) = admin_get(h.running().admin_addr, "/policy").await;
    let policy: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(policy["decision_cache"]["enabled"], false, "{body}");
    assert!(policy["decision_cache"]["reason"]
        .as_str()
        .unwrap()
        .contains("input.attributes.request.time"));
}

#[tokio::test]
async fn decision_cache_zero_turns_it_off() {
    let h = Harness::start_with(&shipped_policy(), |c| c.policy.decision_cache = 0).await;
    let client = h.pki.client(CHECKOUT);
    get_twice_ok(&h, &client, "/v1/payments/p1").await;
    let metrics = h.scrape().await;
    assert_eq!(sample(&metrics, UNCACHEABLE), 2.0, "{metrics}");
    let (_, body) = admin_get(h.running().admin_addr, "/config").await;
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["policy"]["decision_cache"], 0, "{body}");
}

#[tokio::test]
async fn with_input_headers_a_trace_id_does_not_defeat_the_cache() {
    let mut h = Harness::start_with(&shipped_policy(), |c| {
        c.policy.input_headers = Some(vec!["Idempotency-Key".into()]);
    })
    .await;
    let client = h.pki.client(CHECKOUT);
    let post = |trace: &'static str, key: Option<&'static str>| {
        let client = client.clone();
        let h = &h;
        async move {
            let mut headers = vec![("traceparent", trace)];
            headers.extend(key.map(|k| ("idempotency-key", k)));
            h.call(client, "POST", "/v1/payments", &headers)
                .await
                .unwrap()
        }
    };
    const T1: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const T2: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const T3: &str = "00-5cf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert_eq!(post(T1, Some("k-1")).await.status, 200);
    // Another trace id only: the same request to the policy.
    assert_eq!(post(T2, Some("k-1")).await.status, 200);
    // The listed header is still the policy's to read.
    let missing = post(T3, None).await;
    assert_eq!(missing.status, 400, "{:?}", missing.body);

    let metrics = h.scrape().await;
    assert_eq!(sample(&metrics, HIT), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, MISS), 2.0, "{metrics}");
    // The list limits what the policy sees, not what the service gets.
    let received = h.service.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].headers["traceparent"], T2);
    let (_, body) = admin_get(h.running().admin_addr, "/config").await;
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        config["policy"]["input_headers"],
        serde_json::json!(["Idempotency-Key"]),
        "{body}"
    );

    let events = h.stop().await;
    let reqs = requests(&events);
    let cached: Vec<bool> = reqs
        .iter()
        .map(|e| e["decision"].get("cached").is_some())
        .collect();
    assert_eq!(cached, [false, true, false]);
    assert_eq!(reqs[2]["response"]["status"], 400);
}

/// The same allowed request twice, on fresh connections.
async fn get_twice_ok(h: &Harness, client: &std::sync::Arc<rustls::ClientConfig>, path: &str) {
    for _ in 0..2 {
        let r = h.call(client.clone(), "GET", path, &[]).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    }
}
