//! The SPIFFE ID parser on arbitrary text: never panics, and what it
//! accepts round-trips and names a non-empty trust domain and path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text);
        assert!(text.len() <= 2048);
        assert!(!id.trust_domain().is_empty());
        assert!(id.path().starts_with('/') && id.path().len() > 1);
        assert_eq!(SpiffeId::parse(id.as_str()).ok(), Some(id));
    }
});
