//! The policy input document from an arbitrary request: never panics, is
//! always JSON, and its path fields say what was asked.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::policy::input::{build_input, RequestFacts};

fuzz_target!(|data: &[u8]| {
    // Fields separated by NUL: path, query (absent when empty), host, then
    // header name/value pairs.
    let mut fields = data.split(|b| *b == 0);
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let path = text(fields.next());
    let query = fields.next().map(|q| String::from_utf8_lossy(q).into_owned());
    let host = text(fields.next());
    let mut headers = HeaderMap::new();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let facts = RequestFacts {
        request_id: "fuzz",
        method: "GET",
        path: &path,
        query: query.as_deref(),
        host: &host,
        scheme: "https",
        protocol: "HTTP/1.1",
        headers: &headers,
        source_spiffe_id: "spiffe://pay.example/ns/shop/sa/checkout",
        source_trust_domain: "pay.example",
        source_path: "/ns/shop/sa/checkout",
        source_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 5000)),
        destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
        time: UNIX_EPOCH + Duration::from_secs(u64::from(data.len() as u32) * 86_400),
    };
    let input = build_input(&facts);
    let json = serde_json::to_string(&input).expect("the input document is JSON");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("and parses back");
    let full = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    assert_eq!(doc["attributes"]["request"]["http"]["path"].as_str(), Some(full.as_str()));
    let segments = path.split('/').filter(|s| !s.is_empty()).count();
    assert_eq!(doc["parsed_path"].as_array().map(Vec::len), Some(segments));
    assert_eq!(
        doc["attributes"]["request"]["http"]["headers"].as_object().map(|o| o.len()),
        Some(headers.keys_len())
    );
});
