//! Property tests of the parsers that see attacker-controlled input: the
//! SPIFFE ID grammar and the path normaliser. They never panic, and what
//! they accept obeys the rules DESIGN.md states.

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
