//! No card number survives into anything Portcullis writes: property tests
//! over generated paths, queries and headers, and one run through the real
//! sidecar with its tracing logs captured.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http::{HeaderMap, HeaderName, HeaderValue};
use portcullis::audit::{redact_pans, HeaderPolicy, SECRET_HEADERS, WITHHELD};
use proptest::prelude::*;

fn luhn_check_digit(body: &[u8]) -> u8 {
    // The check digit makes the sum of the doubled-every-second sum 0 mod 10.
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &d)| {
            let d = u32::from(d);
            if k % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// A Luhn-valid PAN of 13-19 digits: its digits, and how it is written
/// (plain, or in groups of 4 with spaces, dashes or `+`).
fn pan() -> impl Strategy<Value = (String, String)> {
    (
        prop::collection::vec(0u8..10, 12..=18),
        prop_oneof![Just(""), Just(" "), Just("-"), Just("+")],
    )
        .prop_map(|(mut body, sep)| {
            let check = luhn_check_digit(&body);
            body.push(check);
            let digits: String = body.iter().map(|d| char::from(b'0' + d)).collect();
            let written = digits
                .as_bytes()
                .chunks(4)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(sep);
            (digits, written)
        })
}

/// Text around a PAN: letters and URL punctuation, sometimes a digit group
/// with a separator right next to it (`id 12-4111-...`).
fn before() -> impl Strategy<Value = String> {
    ("[a-z/=&?._]{0,8}", prop::option::of("[0-9]{1,4}[ -]"))
        .prop_map(|(a, b)| format!("{a}{}", b.unwrap_or_default()))
}

fn after() -> impl Strategy<Value = String> {
    (prop::option::of("[ -][0-9]{1,4}"), "[a-z/=&?._]{0,8}")
        .prop_map(|(a, b)| format!("{}{b}", a.unwrap_or_default()))
}

fn survives(output: &str, digits: &str) -> bool {
    let squeezed: String = output
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '+'))
        .collect();
    squeezed.contains(digits)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_pan_survives_in_a_path_or_query(
        (digits, written) in pan(),
        pre in before(),
        post in after(),
        in_query in any::<bool>(),
    ) {
        let target = if in_query {
            format!("/v1/payments?{pre}{written}{post}")
        } else {
            format!("/v1/{pre}{written}{post}/charge")
        };
        let out = redact_pans(&target);
        prop_assert!(!survives(&out, &digits), "{target} -> {out}");
        prop_assert!(out.contains('*'), "{target} -> {out}");
    }

    #[test]
    fn no_pan_survives_in_a_header_and_secrets_never_appear(
        (digits, written) in pan(),
        pre in before(),
        post in after(),
        name in "x-[a-z]{1,10}",
        secret in "[A-Za-z0-9]{8,24}",
        which in 0..SECRET_HEADERS.len(),
    ) {
        let mut headers = HeaderMap::new();
        let value = format!("{pre}{written}{post}");
        headers.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(&value).unwrap(),
        );
        headers.insert(SECRET_HEADERS[which], HeaderValue::from_str(&secret).unwrap());
        headers.insert("x-custom-secret", HeaderValue::from_str(&secret).unwrap());
        let out = HeaderPolicy::new(&["X-Custom-Secret".into()]).redact(&headers);
        let written_out = serde_json::to_string(&out).unwrap();
        prop_assert!(!survives(&written_out, &digits), "{value} -> {written_out}");
        prop_assert!(!written_out.contains(&secret), "{written_out}");
        prop_assert_eq!(out[SECRET_HEADERS[which]].as_str(), WITHHELD);
    }
}

/// A `tracing` writer that keeps everything logged in this process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn pans_and_credentials_stay_out_of_the_audit_trail_and_the_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .init();

    let mut h = Harness::start_with(&shipped_policy(), |c| {
        c.audit.redact_headers = vec!["x-session".into()];
    })
    .await;
    let headers = [
        ("idempotency-key", "k-4111111111111111"),
        ("authorization", "Bearer tok-SECRET-1"),
        ("cookie", "sid=SECRET-2"),
        ("x-api-key", "SECRET-3"),
        ("x-session", "SECRET-4"),
        ("x-card", "5500-0000-0000-0004"),
    ];
    let calls = [
        (
            CHECKOUT,
            "GET",
            "/v1/payments/4111111111111111?pan=5500+0000+0000+0004",
        ),
        // Denied: the deny path logs the path and the reason.
        (
            FRONTEND,
            "GET",
            "/v1/cards/4111111111111111/charge?x=4111-1111-1111-1111",
        ),
        // Refused before policy.
        (CHECKOUT, "GET", "/v1/4111111111111111/..%2Fx"),
    ];
    for (who, method, path) in calls {
        h.call(h.pki.client(who), method, path, &headers)
            .await
            .unwrap();
    }
    let events = h.stop().await;
    assert_eq!(requests(&events).len(), 3);
    let trail = std::fs::read_to_string(&h.audit_path).unwrap();
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("denied"), "the deny was not logged: {logs}");
    for (what, text) in [("audit trail", &trail), ("logs", &logs)] {
        for secret in [
            "4111111111111111",
            "4111-1111-1111-1111",
            "5500+0000+0000+0004",
            "5500-0000-0000-0004",
            "SECRET-1",
            "SECRET-2",
            "SECRET-3",
            "SECRET-4",
        ] {
            assert!(!text.contains(secret), "{secret} in the {what}:\n{text}");
        }
    }
    assert!(trail.contains("411111******1111"), "{trail}");
}
