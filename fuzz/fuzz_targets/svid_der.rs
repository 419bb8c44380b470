//! The X.509-SVID checks on arbitrary DER, as a client or a server
//! certificate: never panic, never accept. A valid SVID needs a signature
//! from the bundle's CA key, which the fuzzer does not have.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis::certs::DevCa;
use portcullis::tls::{verify_svid, SvidUsage, TrustBundles};
use rustls::pki_types::{CertificateDer, UnixTime};

fn bundles() -> &'static TrustBundles {
    static BUNDLES: OnceLock<TrustBundles> = OnceLock::new();
    BUNDLES.get_or_init(|| {
        let ca = DevCa::new("pay.example").expect("dev CA");
        TrustBundles::from_pem("pay.example", ca.cert_pem().as_bytes()).expect("bundle")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let usage = if selector & 1 == 0 {
        SvidUsage::Client
    } else {
        SvidUsage::Server
    };
    // The high bit splits the input into a leaf and an intermediate, so the
    // chain code sees more than one certificate too.
    let chain: Vec<CertificateDer<'_>> = if selector & 0x80 != 0 && rest.len() > 1 {
        let (leaf, intermediate) = rest.split_at(rest.len() / 2);
        vec![CertificateDer::from(leaf), CertificateDer::from(intermediate)]
    } else {
        vec![CertificateDer::from(rest)]
    };
    let verdict = verify_svid(&chain, bundles(), UnixTime::now(), usage);
    assert!(verdict.is_err(), "accepted a certificate the fuzzer made");
});
