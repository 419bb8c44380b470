//! The decision object's fields on the real data path, deny reasons, and
//! dry-run rollout.

mod common;

use common::*;
use portcullis::config::PolicyMode;

fn policy_dir(rego: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.rego"), rego).unwrap();
    dir
}

const ENVOY_FIELDS: &str = r#"package portcullis.authz
import rego.v1

default allow := {
	"allowed": false,
	"http_status": 401,
	"body": "{\"message\": \"who are you?\"}",
	"headers": {"content-type": "application/json", "www-authenticate": "Bearer"},
	"reason": "no bearer token",
}

allow := {
	"allowed": true,
	"headers": {"x-tenant": "eu", "x-tags": ["a", "b"]},
	"request_headers_to_remove": ["authorization", "cookie"],
	"response_headers_to_add": {"x-policy": "checked"},
} if startswith(input.attributes.request.http.headers.authorization, "Bearer ")
"#;

#[tokio::test]
async fn allow_object_shapes_the_upstream_request_and_the_response() {
    let dir = policy_dir(ENVOY_FIELDS);
    let h = Harness::start_with(dir.path(), |_| {}).await;
    let r = h
        .call(
            h.pki.client(CHECKOUT),
            "GET",
            "/v1/payments/p1",
            &[
                ("authorization", "Bearer abc"),
                ("cookie", "s=1"),
                ("x-tenant", "forged"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-policy"], "checked");
    let got = &h.service.received()[0];
    assert_eq!(got.headers["x-tenant"], "eu");
    let tags: Vec<_> = got.headers.get_all("x-tags").iter().collect();
    assert_eq!(tags, ["a", "b"]);
    assert!(!got.headers.contains_key("authorization"));
    assert!(!got.headers.contains_key("cookie"));
    assert_eq!(got.headers["x-spiffe-id"], CHECKOUT);
}

#[tokio::test]
async fn deny_object_chooses_status_body_and_headers_and_the_reason_is_audited() {
    let dir = policy_dir(ENVOY_FIELDS);
    let mut h = Harness::start_with(dir.path(), |_| {}).await;
    let r = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(&r.body[..], br#"{"message": "who are you?"}"#);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert!(r.headers.contains_key("x-request-id"));
    assert!(h.service.received().is_empty());
    let events = h.stop().await;
    let reqs = requests(&events);
    assert_eq!(reqs[0]["decision"]["reason"], "no bearer token");
    assert_eq!(reqs[0]["response"]["status"], 401);
}

#[tokio::test]
async fn a_deny_without_reason_names_the_query_and_revision() {
    let dir = policy_dir("package portcullis.authz\nimport rego.v1\ndefault allow := false\n");
    let mut h = Harness::start_with(dir.path(), |_| {}).await;
    let revision = h.running().policy.load().revision.clone();
    let r = h
        .call(h.pki.client(CHECKOUT), "GET", "/x", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let reason = body["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("data.portcullis.authz.allow") && reason.contains(&revision[..12]),
        "{reason}"
    );
    let events = h.stop().await;
    assert_eq!(requests(&events)[0]["decision"]["reason"], reason.as_str());
}

#[tokio::test]
async fn a_decision_field_of_the_wrong_type_is_a_500_naming_the_field() {
    for (field, value) in [
        ("body", "1"),
        ("response_headers_to_add", "[\"x\"]"),
        ("request_headers_to_remove", "\"cookie\""),
        ("headers", "{\"x\": 1}"),
    ] {
        let dir = policy_dir(&format!(
            "package portcullis.authz\nimport rego.v1\nallow := {{\"allowed\": true, \"{field}\": {value}}}\n"
        ));
        let mut h = Harness::start_with(dir.path(), |_| {}).await;
        let r = h
            .call(h.pki.client(CHECKOUT), "GET", "/x", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 500, "{field}");
        assert!(h.service.received().is_empty(), "{field}");
        let events = h.stop().await;
        let reason = requests(&events)[0]["decision"]["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(reason.contains(field), "{field}: {reason}");
    }
}

#[tokio::test]
async fn dry_run_forwards_denials_counts_them_and_marks_the_audit_event() {
    let mut h =
        Harness::start_with(&shipped_policy(), |c| c.policy.mode = PolicyMode::DryRun).await;
    let frontend = h.pki.client(FRONTEND);
    let r = h
        .call(
            frontend,
            "POST",
            "/v1/payments",
            &[("idempotency-key", "k")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "dry run must not block");
    let r = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(h.service.received().len(), 2);
    let metrics = h.scrape().await;
    assert_eq!(
        sample(
            &metrics,
            r#"portcullis_requests_total{decision="would_deny",status="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"portcullis_requests_total{decision="allow",status="2xx"}"#
        ),
        1.0
    );
    let (_, policy) = admin_get(h.running().admin_addr, "/policy").await;
    assert!(policy.contains("\"dry_run\""), "{policy}");

    let events = h.stop().await;
    let reqs = requests(&events);
    let denied = reqs[0];
    assert_eq!(denied["decision"]["allowed"], false);
    assert_eq!(denied["decision"]["dry_run"], true);
    let reason = denied["decision"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("dry run, would deny: ") && reason.contains(FRONTEND),
        "{reason}"
    );
    assert_eq!(denied["response"]["status"], 200);
    assert_eq!(reqs[1]["decision"]["allowed"], true);
    assert_eq!(reqs[1]["decision"]["dry_run"], true);
}

#[tokio::test]
async fn dry_run_forwards_a_policy_error_too() {
    let dir =
        policy_dir("package portcullis.authz\nimport rego.v1\nallow := {\"allowed\": \"yes\"}\n");
    let mut h = Harness::start_with(dir.path(), |c| c.policy.mode = PolicyMode::DryRun).await;
    let r = h
        .call(h.pki.client(CHECKOUT), "GET", "/x", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let events = h.stop().await;
    let reason = requests(&events)[0]["decision"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("policy evaluation failed"), "{reason}");
}

#[tokio::test]
async fn enforce_mode_events_carry_no_dry_run_field() {
    let mut h = Harness::start().await;
    h.call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    let events = h.stop().await;
    assert!(requests(&events)[0]["decision"].get("dry_run").is_none());
}
