//! Property tests of the parsers that see attacker-controlled input: the
//! SPIFFE ID grammar, the path normaliser, the X.509-SVID checks and the
//! policy input document. They never panic, and what they accept obeys the
//! rules DESIGN.md states. The fuzz targets in `fuzz/` drive the same code.

use portcullis::identity::SpiffeId;
use portcullis::proxy::path::normalize;
use proptest::prelude::*;

fn id_like() -> impl Strategy<Value = String> {
    // Mostly valid pieces with occasional bad ones, so both sides of every
    // rule get exercised.
    let segment = prop_oneof![
        8 => "[A-Za-z0-9._-]{1,10}",
        1 => "[A-Za-z0-9._%/:@?#-]{0,6}",
        1 => proptest::sample::select(vec![".", "..", ""]).prop_map(str::to_owned),
    ];
    let scheme = prop_oneof![
        8 => Just("spiffe://"),
        1 => proptest::sample::select(vec!["SPIFFE://", "spiffe:/", "http://", ""]),
    ];
    let td = prop_oneof![8 => "[a-z0-9.-]{1,16}", 1 => "[a-z0-9._A-Z:@-]{0,16}"];
    (scheme, td, proptest::collection::vec(segment, 0..5))
        .prop_map(|(scheme, td, segs)| format!("{scheme}{td}/{}", segs.join("/")))
}

fn path_like() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        // Literal pieces, not regexes.
        proptest::sample::select(vec![
            "a", "v1", ".", "..", "%2e", "%2E%2e", "%2F", "%5c", "\\", "", ";x", "..;", "%41",
            "%zz", "%00", "~", "%7E",
        ]),
        0..8,
    )
    .prop_map(|parts| format!("/{}", parts.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn spiffe_id_accepts_only_the_grammar(s in id_like()) {
        if let Ok(id) = SpiffeId::parse(&s) {
            prop_assert!(s.len() <= 2048);
            prop_assert_eq!(id.as_str(), s.as_str());
            let rest = s.strip_prefix("spiffe://").expect("scheme");
            let (td, path) = rest.split_once('/').expect("a path");
            prop_assert!(!td.is_empty());
            prop_assert!(td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
            prop_assert_eq!(id.trust_domain(), td);
            prop_assert_eq!(id.path(), format!("/{path}"));
            for seg in path.split('/') {
                prop_assert!(!seg.is_empty() && seg != "." && seg != "..");
                prop_assert!(seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            }
            // Parsing is a fixed point.
            prop_assert_eq!(SpiffeId::parse(id.as_str()).ok(), Some(id));
        }
    }

    #[test]
    fn spiffe_id_never_panics_on_anything(s in any::<String>()) {
        let _ = SpiffeId::parse(&s);
    }

    #[test]
    fn normalised_paths_are_safe_and_stable(raw in path_like()) {
        if let Ok(p) = normalize(&raw) {
            prop_assert!(p.starts_with('/'));
            prop_assert!(!p.contains("//"));
            for seg in p.split('/') {
                prop_assert!(seg != "." && seg != "..");
                prop_assert!(!seg.starts_with("..;") && !seg.starts_with(".;"));
            }
            let lower = p.to_ascii_lowercase();
            prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e") && !lower.contains("%00"));
            prop_assert!(!p.contains('\\'));
            prop_assert_eq!(normalize(&p), Ok(p.clone()));
        }
    }

    #[test]
    fn normalise_never_panics_on_anything(s in any::<String>()) {
        let _ = normalize(&s);
    }
}

/// The strategies above must reach the accepting side of the parsers, or
/// the properties about accepted input would hold vacuously.
#[test]
fn strategies_produce_accepted_inputs() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = id_like();
    let accepted = (0..4000)
        .filter(|_| {
            let s = strategy.new_tree(&mut runner).unwrap().current();
            SpiffeId::parse(&s).is_ok()
        })
        .count();
    assert!(
        accepted > 40,
        "only {accepted} of 4000 generated IDs were valid"
    );

    let paths = path_like();
    let normalised = (0..4000)
        .filter(|_| normalize(&paths.new_tree(&mut runner).unwrap().current()).is_ok())
        .count();
    assert!(
        normalised > 40,
        "only {normalised} of 4000 generated paths were accepted"
    );
}

// === SVID checks on attacker-controlled DER ===

mod svid {
    use std::sync::OnceLock;

    use portcullis::certs::{DevCa, LeafSpec};
    use portcullis::tls::{verify_svid, SvidUsage, TrustBundles};
    use proptest::prelude::*;
    use rustls::pki_types::{CertificateDer, UnixTime};

    const CALLER: &str = "spiffe://pay.example/ns/shop/sa/checkout";

    /// One dev CA and one valid client SVID it issued, made once.
    fn pki() -> &'static (TrustBundles, Vec<u8>) {
        static PKI: OnceLock<(TrustBundles, Vec<u8>)> = OnceLock::new();
        PKI.get_or_init(|| {
            let ca = DevCa::new("pay.example").unwrap();
            let leaf = ca.issue(&LeafSpec::svid(CALLER)).unwrap();
            let bundles = TrustBundles::from_pem("pay.example", ca.cert_pem().as_bytes()).unwrap();
            (bundles, leaf.cert_der.as_ref().to_vec())
        })
    }

    fn check(der: Vec<u8>) -> bool {
        let (bundles, _) = pki();
        verify_svid(
            &[CertificateDer::from(der)],
            bundles,
            UnixTime::now(),
            SvidUsage::Client,
        )
        .is_ok()
    }

    #[test]
    fn the_unmutated_svid_is_accepted() {
        // Otherwise "mutations are refused" would hold vacuously.
        assert!(check(pki().1.clone()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_der_is_never_accepted(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            prop_assert!(!check(bytes));
        }

        #[test]
        fn der_shaped_noise_is_never_accepted(
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            // A SEQUENCE with a plausible length gets past the first byte
            // checks of every parser.
            let mut der = vec![0x30, 0x82];
            der.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
            der.extend(body);
            prop_assert!(!check(der));
        }

        #[test]
        fn a_mutated_real_svid_is_never_accepted(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut der = pki().1.clone();
            for (at, xor) in &flips {
                let i = at.index(der.len());
                der[i] ^= xor;
            }
            if let Some(cut) = cut {
                der.truncate(cut.index(der.len()));
            }
            // Flips can cancel each other out; only a changed cert counts.
            prop_assume!(der != pki().1);
            prop_assert!(!check(der));
        }
    }
}

// === the policy input document from arbitrary requests ===

mod input {
    use std::time::{Duration, UNIX_EPOCH};

    use http::{HeaderMap, HeaderName, HeaderValue};
    use portcullis::policy::input::{build_input, RequestFacts};
    use proptest::prelude::*;

    fn headers() -> impl Strategy<Value = HeaderMap> {
        proptest::collection::vec(
            (
                "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,24}",
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            0..8,
        )
        .prop_map(|pairs| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                // What the HTTP layer would have refused is not a request.
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(&value),
                ) {
                    map.append(n, v);
                }
            }
            map
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_request_yields_a_json_document_that_says_what_was_asked(
            path in any::<String>(),
            query in proptest::option::of(any::<String>()),
            method in "[A-Z]{1,10}",
            host in any::<String>(),
            headers in headers(),
            secs in 0u64..4_102_444_800,
        ) {
            let facts = RequestFacts {
                request_id: "r-1",
                method: &method,
                path: &path,
                query: query.as_deref(),
                host: &host,
                scheme: "https",
                protocol: "HTTP/2",
                headers: portcullis::policy::InputHeaders::all(&headers),
                source_spiffe_id: "spiffe://pay.example/ns/shop/sa/checkout",
                source_trust_domain: "pay.example",
                source_path: "/ns/shop/sa/checkout",
                source_addr: "127.0.0.1:5000".parse().unwrap(),
                destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
                time: UNIX_EPOCH + Duration::from_secs(secs),
            };
            let input = build_input(&facts);
            let text = serde_json::to_string(&input).expect("serialisable");
            let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");

            let http = &doc["attributes"]["request"]["http"];
            let full = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            prop_assert_eq!(http["path"].as_str(), Some(full.as_str()));
            prop_assert_eq!(http["method"].as_str(), Some(method.as_str()));
            prop_assert_eq!(http["host"].as_str(), Some(host.as_str()));

            // One parsed_path element per non-empty segment; a segment
            // without escapes is passed through as it is.
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let parsed = doc["parsed_path"].as_array().expect("parsed_path array");
            prop_assert_eq!(parsed.len(), segments.len());
            for (seg, got) in segments.iter().zip(parsed) {
                if !seg.contains('%') {
                    prop_assert_eq!(got.as_str(), Some(*seg));
                }
            }

            let parsed_query = doc["parsed_query"].as_object().expect("parsed_query object");
            prop_assert_eq!(parsed_query.is_empty(), query.as_deref().unwrap_or("").split('&').all(str::is_empty));
            for values in parsed_query.values() {
                let values = values.as_array().expect("values array");
                prop_assert!(!values.is_empty() && values.iter().all(|v| v.is_string()));
            }

            let sent = doc["attributes"]["request"]["http"]["headers"].as_object().expect("headers object");
            prop_assert_eq!(sent.len(), headers.keys_len());
            for name in headers.keys() {
                let got = sent[name.as_str()].as_str().expect("header value string");
                for v in headers.get_all(name) {
                    let lossy = String::from_utf8_lossy(v.as_bytes());
                    prop_assert!(got.contains(lossy.as_ref()));
                }
            }
        }
    }
}
