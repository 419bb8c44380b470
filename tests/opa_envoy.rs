//! Policies from the OPA-Envoy documentation, unchanged, with
//! `policy.query = "data.envoy.authz.allow"`, decided on the real data path.

mod common;

use common::*;

/// The OPA-Envoy standalone tutorial's policy, as published: a JWT bearer
/// check with `io.jwt.decode_verify`, `time.now_ns`, `glob.match`, an import
/// alias, and a body rule using `parsed_body` and `base64url.decode`.
const TUTORIAL: &str = r#"package envoy.authz

import input.attributes.request.http as http_request

default allow := false

token := {"valid": valid, "payload": payload} if {
	[_, encoded] := split(http_request.headers.authorization, " ")
	[valid, _, payload] := io.jwt.decode_verify(encoded, {"secret": "secret"})
}

allow if {
	is_token_valid
	action_allowed
}

is_token_valid if {
	token.valid
	now := time.now_ns() / 1000000000
	token.payload.nbf <= now
	now < token.payload.exp
}

action_allowed if {
	http_request.method == "GET"
	token.payload.role == "guest"
	glob.match("/people*", ["/"], http_request.path)
}

action_allowed if {
	http_request.method == "GET"
	token.payload.role == "admin"
	glob.match("/people*", ["/"], http_request.path)
}

action_allowed if {
	http_request.method == "POST"
	token.payload.role == "admin"
	glob.match("/people", ["/"], http_request.path)
	lower(input.parsed_body.firstname) == base64url.decode(token.payload.sub)
}
"#;

/// The OPA-Envoy README's decision-object example.
const DECISION_OBJECT: &str = r#"package envoy.authz

import input.attributes.request.http as http_request

default allow := {
	"allowed": false,
	"headers": {"x-ext-auth-allow": "no"},
	"body": "Unauthorized Request",
	"http_status": 301,
}

allow := response if {
	http_request.method == "GET"
	response := {
		"allowed": true,
		"headers": {"x-ext-auth-allow": "yes"},
		"request_headers_to_remove": ["one-auth-header", "another-auth-header"],
		"response_headers_to_add": {"x-foo": "bar"},
		"http_status": 200,
	}
}
"#;

/// Rules on `parsed_path` and `parsed_query`, as the OPA-Envoy docs show.
const PARSED_PATH: &str = r#"package envoy.authz

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	input.parsed_path == ["people"]
	input.parsed_query.lang == ["en"]
}

allow if {
	input.attributes.request.http.method == "GET"
	input.parsed_path[0] == "people"
	count(input.parsed_path) == 2
}
"#;

// HS256 with secret "secret", valid until 2100; sub = base64url("alice"|"bob").
const GUEST: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiZ3Vlc3QiLCJzdWIiOiJZV3hwWTJVIiwibmJmIjoxNTE0ODUxMTM5LCJleHAiOjQxMDI0NDQ4MDB9.FeLpfHQlhPatyunTKeZpqaMSqPeI01LOpkzz8XvKNJk";
const ADMIN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYWRtaW4iLCJzdWIiOiJZbTlpIiwibmJmIjoxNTE0ODUxMTM5LCJleHAiOjQxMDI0NDQ4MDB9.MXKBip1sbpbsSe0LyguV77PQzlsHt12xnGRT2pUcNXE";
const EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYWRtaW4iLCJzdWIiOiJZbTlpIiwibmJmIjoxNTE0ODUxMTM5LCJleHAiOjE2NDEwODE1Mzl9.WCxNAveAVAdRCmkpIObOTaSd0AJRECY2Ch2Qdic3kU8";
const FORGED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYWRtaW4iLCJzdWIiOiJZbTlpIiwibmJmIjoxNTE0ODUxMTM5LCJleHAiOjQxMDI0NDQ4MDB9.lK-GTErgxO0IeQGD5x4uHciHLQ6mV_TJLSYLmkYywnc";

async fn envoy(
    rego: &str,
    tweak: impl FnOnce(&mut portcullis::config::Config),
) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.rego"), rego).unwrap();
    let h = Harness::start_with(dir.path(), |c| {
        c.policy.query = "data.envoy.authz.allow".into();
        tweak(c);
    })
    .await;
    (h, dir)
}

#[tokio::test]
async fn tutorial_jwt_policy_runs_unchanged() {
    let (h, _dir) = envoy(TUTORIAL, |_| {}).await;
    let client = h.pki.client(CHECKOUT);
    let status = |token: &'static str, method: &'static str, path: &'static str| {
        let client = client.clone();
        let h = &h;
        async move {
            let auth = format!("Bearer {token}");
            let headers: Vec<(&str, &str)> = if token.is_empty() {
                vec![]
            } else {
                vec![("authorization", auth.as_str())]
            };
            h.call(client, method, path, &headers)
                .await
                .unwrap()
                .status
                .as_u16()
        }
    };
    assert_eq!(status(GUEST, "GET", "/people").await, 200);
    assert_eq!(status(ADMIN, "GET", "/people").await, 200);
    // glob.match with "/" as delimiter: `*` stays within one segment.
    assert_eq!(status(ADMIN, "GET", "/people/1").await, 403);
    assert_eq!(status(GUEST, "POST", "/people").await, 403);
    assert_eq!(status(EXPIRED, "GET", "/people").await, 403);
    assert_eq!(status(FORGED, "GET", "/people").await, 403);
    assert_eq!(status("", "GET", "/people").await, 403);
    assert_eq!(status(ADMIN, "GET", "/accounts").await, 403);
}

#[tokio::test]
async fn readme_decision_object_runs_unchanged() {
    let (h, _dir) = envoy(DECISION_OBJECT, |_| {}).await;
    let client = h.pki.client(CHECKOUT);
    let r = h
        .call(
            client.clone(),
            "GET",
            "/people",
            &[("one-auth-header", "1"), ("another-auth-header", "2")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-foo"], "bar");
    let got = &h.service.received()[0];
    assert_eq!(got.headers["x-ext-auth-allow"], "yes");
    assert!(!got.headers.contains_key("one-auth-header"));
    assert!(!got.headers.contains_key("another-auth-header"));

    let r = h.call(client, "DELETE", "/people", &[]).await.unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(&r.body[..], b"Unauthorized Request");
    assert_eq!(r.headers["x-ext-auth-allow"], "no");
    assert_eq!(h.service.received().len(), 1);
}

#[tokio::test]
async fn parsed_path_and_query_rules_run_unchanged() {
    let (h, _dir) = envoy(PARSED_PATH, |_| {}).await;
    let client = h.pki.client(CHECKOUT);
    for (path, want) in [
        ("/people?lang=en", 200),
        ("/people?lang=fr", 403),
        ("/people", 403),
        ("/people/42", 200),
        ("/people/42/x", 403),
        ("/places/42", 403),
    ] {
        let r = h.call(client.clone(), "GET", path, &[]).await.unwrap();
        assert_eq!(r.status.as_u16(), want, "{path}");
    }
}
