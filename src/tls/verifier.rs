//! X.509-SVID verification: RFC 5280 chain validation by webpki, then every
//! X.509-SVID rule of DESIGN.md that webpki does not enforce itself.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::{crypto_provider, HandshakeFailure, TrustBundles};
use crate::identity::{SpiffeId, SpiffeIdError};

/// Below this an RSA key is factorable by well-funded attackers (NIST SP 800-131A).
const MIN_RSA_BITS: usize = 2048;

/// Which side of the connection the SVID authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidUsage {
    Client,
    Server,
}

impl SvidUsage {
    fn webpki(self) -> webpki::KeyUsage {
        match self {
            SvidUsage::Client => webpki::KeyUsage::client_auth(),
            SvidUsage::Server => webpki::KeyUsage::server_auth(),
        }
    }

    fn eku_name(self) -> &'static str {
        match self {
            SvidUsage::Client => "clientAuth",
            SvidUsage::Server => "serverAuth",
        }
    }
}

/// Why a certificate chain is not an acceptable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("no certificate was presented")]
    NoCertificate,
    #[error("leaf certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("leaf certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("leaf URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    InvalidSpiffeId { uri: String, source: SpiffeIdError },
    #[error("no trust bundle for trust domain {trust_domain:?} (SPIFFE ID {spiffe_id})")]
    NoBundle {
        trust_domain: String,
        spiffe_id: String,
    },
    #[error("certificate has expired: {0}")]
    Expired(String),
    #[error("certificate is not valid yet: {0}")]
    NotYetValid(String),
    #[error("chain does not verify to the trust bundle of {trust_domain:?}: {reason}")]
    UntrustedChain {
        trust_domain: String,
        reason: String,
    },
    #[error("leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("leaf certificate has no key usage extension; digitalSignature is required")]
    NoKeyUsage,
    #[error("leaf certificate key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf certificate key usage has keyCertSign")]
    KeyCertSign,
    #[error("leaf certificate key usage has cRLSign")]
    CrlSign,
    #[error("leaf certificate extended key usage excludes {0}")]
    EkuExcludesUsage(&'static str),
    #[error("leaf certificate has a weak {bits}-bit RSA key (minimum {MIN_RSA_BITS})")]
    WeakKey { bits: usize },
}

/// A refused client certificate: why, and the SPIFFE ID it claimed when
/// one could be read, so the refusal can name who tried.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Rejected {
    pub presented: Option<SpiffeId>,
    pub error: SvidError,
}

impl SvidError {
    pub fn failure(&self) -> HandshakeFailure {
        match self {
            SvidError::NoCertificate => HandshakeFailure::NoClientCert,
            SvidError::NoBundle { .. } => HandshakeFailure::WrongTrustDomain,
            SvidError::Expired(_) | SvidError::NotYetValid(_) => HandshakeFailure::Expired,
            SvidError::UntrustedChain { .. } => HandshakeFailure::UntrustedChain,
            SvidError::Malformed(_)
            | SvidError::UriSanCount(_)
            | SvidError::InvalidSpiffeId { .. }
            | SvidError::LeafIsCa
            | SvidError::NoKeyUsage
            | SvidError::NoDigitalSignature
            | SvidError::KeyCertSign
            | SvidError::CrlSign
            | SvidError::EkuExcludesUsage(_)
            | SvidError::WeakKey { .. } => HandshakeFailure::BadSvid,
        }
    }
}

/// Verifies `chain` (leaf first) as an X.509-SVID and returns its SPIFFE ID.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: UnixTime,
    usage: SvidUsage,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
    verify_parts(
        leaf,
        intermediates,
        bundles,
        now,
        usage,
        crypto_provider().signature_verification_algorithms,
    )
}

fn verify_parts(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: UnixTime,
    usage: SvidUsage,
    algs: WebPkiSupportedAlgorithms,
) -> Result<SpiffeId, SvidError> {
    let cert = parse_leaf(leaf)?;
    let id = spiffe_id_of(&cert)?;
    // The SPIFFE ID picks the bundle: a chain from another trust domain's CA
    // must never vouch for this one.
    let anchors = bundles
        .anchors_for(id.trust_domain())
        .ok_or_else(|| SvidError::NoBundle {
            trust_domain: id.trust_domain().to_owned(),
            spiffe_id: id.to_string(),
        })?;

    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| SvidError::Malformed(format!("{e:?}")))?;
    ee.verify_for_usage(
        algs.all,
        anchors,
        intermediates,
        now,
        usage.webpki(),
        None,
        None,
    )
    .map_err(|e| chain_error(e, id.trust_domain(), usage))?;

    check_leaf_rules(&cert, usage)?;
    Ok(id)
}

// `RequiredEkuNotFound` is deprecated but still a variant webpki may return;
// matching it keeps the classification right if it ever does.
#[allow(deprecated)]
fn chain_error(e: webpki::Error, trust_domain: &str, usage: SvidUsage) -> SvidError {
    match e {
        webpki::Error::CertExpired { .. } => SvidError::Expired(format!("{e:?}")),
        webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid(format!("{e:?}")),
        // These are properties of the leaf itself, not of the chain, so they
        // are reported as a bad SVID like the rules checked below.
        webpki::Error::CaUsedAsEndEntity => SvidError::LeafIsCa,
        webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => {
            SvidError::EkuExcludesUsage(usage.eku_name())
        }
        other => SvidError::UntrustedChain {
            trust_domain: trust_domain.to_owned(),
            reason: format!("{other:?}"),
        },
    }
}

fn parse_leaf<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::Malformed(
            "trailing data after certificate".into(),
        )),
        Err(e) => Err(SvidError::Malformed(e.to_string())),
    }
}

/// The SPIFFE ID of a leaf: its one and only URI SAN.
fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(format!("subjectAltName: {e}")))?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    // Taking the first of several URIs (as some proxies do) would let a CA
    // that signs one extra SAN mint a second identity.
    match (uris.next(), uris.count()) {
        (Some(uri), 0) => SpiffeId::parse(uri).map_err(|source| SvidError::InvalidSpiffeId {
            uri: uri.to_owned(),
            source,
        }),
        (None, _) => Err(SvidError::UriSanCount(0)),
        (Some(_), more) => Err(SvidError::UriSanCount(more + 1)),
    }
}

fn check_leaf_rules(cert: &X509Certificate<'_>, usage: SvidUsage) -> Result<(), SvidError> {
    let malformed =
        |what: &str, e: x509_parser::error::X509Error| SvidError::Malformed(format!("{what}: {e}"));
    let bc = cert
        .basic_constraints()
        .map_err(|e| malformed("basicConstraints", e))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::LeafIsCa);
    }

    let ku = cert
        .key_usage()
        .map_err(|e| malformed("keyUsage", e))?
        .ok_or(SvidError::NoKeyUsage)?
        .value;
    if ku.key_cert_sign() {
        return Err(SvidError::KeyCertSign);
    }
    if ku.crl_sign() {
        return Err(SvidError::CrlSign);
    }
    if !ku.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }

    // webpki already enforced this; checked again so the rule does not depend
    // on the chain validator's EKU policy.
    if let Some(eku) = cert
        .extended_key_usage()
        .map_err(|e| malformed("extendedKeyUsage", e))?
    {
        let allowed = match usage {
            SvidUsage::Client => eku.value.client_auth,
            SvidUsage::Server => eku.value.server_auth,
        };
        if !allowed {
            return Err(SvidError::EkuExcludesUsage(usage.eku_name()));
        }
    }

    // A key we cannot parse is a key we cannot judge: refuse it.
    let key = cert
        .public_key()
        .parsed()
        .map_err(|e| malformed("subjectPublicKeyInfo", e))?;
    if let PublicKey::RSA(rsa) = key {
        let bits = rsa_modulus_bits(rsa.modulus);
        if bits < MIN_RSA_BITS {
            return Err(SvidError::WeakKey { bits });
        }
    }
    Ok(())
}

/// Counted here because x509-parser's `key_size()` assumes a leading zero
/// byte and misreports moduli encoded without one.
fn rsa_modulus_bits(modulus: &[u8]) -> usize {
    let significant = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    match significant.first() {
        Some(first) => significant.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

/// The SPIFFE ID of an already verified leaf, for use after the handshake.
pub(super) fn leaf_spiffe_id(leaf: &CertificateDer<'_>) -> Option<SpiffeId> {
    spiffe_id_of(&parse_leaf(leaf).ok()?).ok()
}

/// The handshake signature checks, identical for both verifiers: webpki's,
/// with the algorithms of the one crypto provider (`self.algs`).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Wrapped as `Other` so classify_handshake_error can recover the exact
/// cause from the io::Error that tokio-rustls hands back.
fn rejected(end_entity: &CertificateDer<'_>, error: SvidError) -> rustls::Error {
    let rejected = Rejected {
        presented: leaf_spiffe_id(end_entity),
        error,
    };
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(rejected))))
}

/// A rustls client-certificate verifier that admits only valid X.509-SVIDs.
#[derive(Debug)]
pub struct SvidClientVerifier {
    bundles: Arc<TrustBundles>,
    algs: WebPkiSupportedAlgorithms,
}

impl SvidClientVerifier {
    pub fn new(bundles: Arc<TrustBundles>) -> Self {
        SvidClientVerifier {
            bundles,
            algs: crypto_provider().signature_verification_algorithms,
        }
    }

    pub fn bundles(&self) -> &Arc<TrustBundles> {
        &self.bundles
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_parts(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            SvidUsage::Client,
            self.algs,
        )
        .map(|_| ClientCertVerified::assertion())
        .map_err(|error| rejected(end_entity, error))
    }

    signature_checks!();
}

/// A rustls server-certificate verifier for mTLS origination: the same
/// X.509-SVID rules as [`SvidClientVerifier`], for serverAuth. The server
/// name is deliberately ignored: an SVID names a workload by its SPIFFE ID,
/// which the caller matches against its route after the handshake.
#[derive(Debug)]
pub struct SvidServerVerifier {
    bundles: Arc<TrustBundles>,
    algs: WebPkiSupportedAlgorithms,
}

impl SvidServerVerifier {
    pub fn new(bundles: Arc<TrustBundles>) -> Self {
        SvidServerVerifier {
            bundles,
            algs: crypto_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_parts(
            end_entity,
            intermediates,
            &self.bundles,
            now,
            SvidUsage::Server,
            self.algs,
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(|error| rejected(end_entity, error))
    }

    signature_checks!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{DevCa, LeafSpec};
    use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
    use time::{Duration, OffsetDateTime};

    const TD: &str = "pay.example";
    const ID: &str = "spiffe://pay.example/ns/shop/sa/checkout";

    struct Fixture {
        ca: DevCa,
        bundles: TrustBundles,
    }

    fn fixture() -> Fixture {
        let ca = DevCa::new(TD).unwrap();
        let bundles = TrustBundles::from_pem(TD, ca.cert_pem().as_bytes()).unwrap();
        Fixture { ca, bundles }
    }

    impl Fixture {
        fn verify_as(&self, spec: &LeafSpec, usage: SvidUsage) -> Result<SpiffeId, SvidError> {
            let issued = self.ca.issue(spec).unwrap();
            verify_svid(&issued.chain(), &self.bundles, UnixTime::now(), usage)
        }

        fn verify(&self, spec: &LeafSpec) -> Result<SpiffeId, SvidError> {
            self.verify_as(spec, SvidUsage::Client)
        }
    }

    fn svid_with(f: impl FnOnce(&mut LeafSpec)) -> LeafSpec {
        let mut spec = LeafSpec::svid(ID);
        f(&mut spec);
        spec
    }

    #[test]
    fn good_svid_passes_for_client_and_server() {
        let fx = fixture();
        let spec = LeafSpec::svid(ID);
        for usage in [SvidUsage::Client, SvidUsage::Server] {
            let id = fx.verify_as(&spec, usage).unwrap();
            assert_eq!(id.as_str(), ID);
            assert_eq!(id.trust_domain(), TD);
        }
    }

    #[test]
    fn svid_without_eku_passes() {
        // EKU is optional in X.509-SVIDs; only an EKU that excludes the usage fails.
        let fx = fixture();
        assert!(fx
            .verify(&svid_with(|s| s.extended_key_usages.clear()))
            .is_ok());
    }

    #[test]
    fn empty_chain_is_no_client_cert() {
        let fx = fixture();
        let err = verify_svid(&[], &fx.bundles, UnixTime::now(), SvidUsage::Client).unwrap_err();
        assert_eq!(err, SvidError::NoCertificate);
        assert_eq!(err.failure(), HandshakeFailure::NoClientCert);
    }

    #[test]
    fn refusals_name_the_cause() {
        let fx = fixture();
        let now = OffsetDateTime::now_utc();
        type Check = fn(&SvidError) -> bool;
        let cases: Vec<(&str, LeafSpec, HandshakeFailure, Check)> = vec![
            (
                "expired",
                svid_with(|s| {
                    s.not_before = now - Duration::days(10);
                    s.not_after = now - Duration::days(1);
                }),
                HandshakeFailure::Expired,
                |e| matches!(e, SvidError::Expired(_)),
            ),
            (
                "not yet valid",
                svid_with(|s| {
                    s.not_before = now + Duration::days(1);
                    s.not_after = now + Duration::days(8);
                }),
                HandshakeFailure::Expired,
                |e| matches!(e, SvidError::NotYetValid(_)),
            ),
            (
                "trust domain without bundle",
                svid_with(|s| s.uris = vec!["spiffe://other.example/ns/x/sa/y".into()]),
                HandshakeFailure::WrongTrustDomain,
                |e| matches!(e, SvidError::NoBundle { trust_domain, .. } if trust_domain == "other.example"),
            ),
            (
                "two URI SANs",
                svid_with(|s| s.uris.push("spiffe://pay.example/ns/shop/sa/other".into())),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::UriSanCount(2),
            ),
            (
                "no SAN at all",
                svid_with(|s| s.uris.clear()),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::UriSanCount(0),
            ),
            (
                "DNS-only",
                svid_with(|s| {
                    s.uris.clear();
                    s.dns = vec!["checkout.shop.svc".into()];
                }),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::UriSanCount(0),
            ),
            (
                "uppercase trust domain",
                svid_with(|s| s.uris = vec!["spiffe://Pay.example/ns/shop/sa/checkout".into()]),
                HandshakeFailure::BadSvid,
                |e| {
                    matches!(
                        e,
                        SvidError::InvalidSpiffeId {
                            source: SpiffeIdError::UppercaseTrustDomain { .. },
                            ..
                        }
                    )
                },
            ),
            (
                "trailing slash",
                svid_with(|s| s.uris = vec![format!("{ID}/")]),
                HandshakeFailure::BadSvid,
                |e| {
                    matches!(
                        e,
                        SvidError::InvalidSpiffeId {
                            source: SpiffeIdError::TrailingSlash,
                            ..
                        }
                    )
                },
            ),
            (
                "root ID",
                svid_with(|s| s.uris = vec!["spiffe://pay.example".into()]),
                HandshakeFailure::BadSvid,
                |e| {
                    matches!(
                        e,
                        SvidError::InvalidSpiffeId {
                            source: SpiffeIdError::MissingPath,
                            ..
                        }
                    )
                },
            ),
            (
                "root ID with slash",
                svid_with(|s| s.uris = vec!["spiffe://pay.example/".into()]),
                HandshakeFailure::BadSvid,
                |e| {
                    matches!(
                        e,
                        SvidError::InvalidSpiffeId {
                            source: SpiffeIdError::RootPath,
                            ..
                        }
                    )
                },
            ),
            (
                "query",
                svid_with(|s| s.uris = vec![format!("{ID}?admin=1")]),
                HandshakeFailure::BadSvid,
                |e| {
                    matches!(
                        e,
                        SvidError::InvalidSpiffeId {
                            source: SpiffeIdError::Query,
                            ..
                        }
                    )
                },
            ),
            (
                "CA leaf",
                svid_with(|s| s.is_ca = true),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::LeafIsCa,
            ),
            (
                "keyCertSign",
                svid_with(|s| s.key_usages.push(Ku::KeyCertSign)),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::KeyCertSign,
            ),
            (
                "cRLSign",
                svid_with(|s| s.key_usages.push(Ku::CrlSign)),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::CrlSign,
            ),
            (
                "no digitalSignature",
                svid_with(|s| s.key_usages = vec![Ku::KeyAgreement]),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::NoDigitalSignature,
            ),
            (
                "no key usage extension",
                svid_with(|s| s.key_usages.clear()),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::NoKeyUsage,
            ),
            (
                "EKU serverAuth only",
                svid_with(|s| s.extended_key_usages = vec![Eku::ServerAuth]),
                HandshakeFailure::BadSvid,
                |e| *e == SvidError::EkuExcludesUsage("clientAuth"),
            ),
        ];
        for (name, spec, failure, check) in cases {
            let err = fx.verify(&spec).expect_err(name);
            assert!(check(&err), "{name}: unexpected error {err:?}");
            assert_eq!(err.failure(), failure, "{name}: {err}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn wrong_ca_is_untrusted_chain() {
        // The rogue CA has the same subject as the real one, so webpki finds
        // the anchor by name and then fails on the signature.
        let fx = fixture();
        let rogue = DevCa::new(TD).unwrap();
        let issued = rogue.issue(&LeafSpec::svid(ID)).unwrap();
        let err = verify_svid(
            &issued.chain(),
            &fx.bundles,
            UnixTime::now(),
            SvidUsage::Client,
        )
        .unwrap_err();
        assert!(
            matches!(&err, SvidError::UntrustedChain { reason, .. } if reason.contains("InvalidSignature")),
            "{err:?}"
        );
        assert_eq!(err.failure(), HandshakeFailure::UntrustedChain);
    }

    #[test]
    fn bundle_of_another_domain_does_not_vouch() {
        // The CA is trusted, but only for other.example; an ID in pay.example
        // signed by it must not verify against pay.example's bundle.
        let other = DevCa::new("other.example").unwrap();
        let mut bundles = fixture().bundles;
        bundles
            .insert("other.example", vec![other.cert_der()])
            .unwrap();
        let issued = other.issue(&LeafSpec::svid(ID)).unwrap();
        let err = verify_svid(
            &issued.chain(),
            &bundles,
            UnixTime::now(),
            SvidUsage::Client,
        )
        .unwrap_err();
        assert!(
            matches!(&err, SvidError::UntrustedChain { reason, .. } if reason.contains("UnknownIssuer")),
            "{err:?}"
        );
        assert_eq!(err.failure(), HandshakeFailure::UntrustedChain);
    }

    #[test]
    fn eku_client_only_refused_as_server() {
        let fx = fixture();
        let err = fx
            .verify_as(
                &svid_with(|s| s.extended_key_usages = vec![Eku::ClientAuth]),
                SvidUsage::Server,
            )
            .unwrap_err();
        assert_eq!(err, SvidError::EkuExcludesUsage("serverAuth"));
    }

    /// A public key rcgen can certify but never generate: RSA with any modulus.
    struct RsaPublicKey(Vec<u8>);

    impl RsaPublicKey {
        fn with_bits(bits: usize) -> Self {
            // A minimally encoded positive INTEGER whose top bit is bit `bits`.
            let mut modulus = vec![0xffu8; bits.div_ceil(8)];
            modulus[0] = 0xff >> (modulus.len() * 8 - bits);
            if modulus[0] & 0x80 != 0 {
                modulus.insert(0, 0);
            }
            Self::from_modulus(&modulus)
        }

        fn from_modulus(modulus: &[u8]) -> Self {
            let mut body = der(0x02, modulus);
            body.extend(der(0x02, &[0x01, 0x00, 0x01]));
            RsaPublicKey(der(0x30, &body))
        }
    }

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    impl rcgen::PublicKeyData for RsaPublicKey {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }

        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_RSA_SHA256
        }
    }

    #[test]
    fn weak_rsa_leaf_key_is_refused() {
        let fx = fixture();
        let spec = LeafSpec::svid(ID);
        let verify = |bits| {
            let der = fx
                .ca
                .sign_public_key(&spec, &RsaPublicKey::with_bits(bits))
                .unwrap();
            verify_svid(&[der], &fx.bundles, UnixTime::now(), SvidUsage::Client)
        };
        for bits in [1024, 2047] {
            let err = verify(bits).unwrap_err();
            assert_eq!(err, SvidError::WeakKey { bits });
            assert_eq!(err.failure(), HandshakeFailure::BadSvid);
        }
        assert_eq!(verify(2048).unwrap().as_str(), ID);
    }

    #[test]
    fn unparseable_leaf_key_is_refused() {
        // Non-minimal INTEGER (00 7f ...): the key cannot be judged, so it
        // must not slip past the weak-key rule.
        let fx = fixture();
        let mut modulus = vec![0x00, 0x7f];
        modulus.extend([0xff; 255]);
        let der = fx
            .ca
            .sign_public_key(&LeafSpec::svid(ID), &RsaPublicKey::from_modulus(&modulus))
            .unwrap();
        let err = verify_svid(&[der], &fx.bundles, UnixTime::now(), SvidUsage::Client).unwrap_err();
        assert!(
            matches!(&err, SvidError::Malformed(m) if m.contains("subjectPublicKeyInfo")),
            "{err:?}"
        );
        assert_eq!(err.failure(), HandshakeFailure::BadSvid);
    }

    #[test]
    fn rsa_modulus_bits_counts_significant_bits() {
        assert_eq!(rsa_modulus_bits(&[]), 0);
        assert_eq!(rsa_modulus_bits(&[0, 0]), 0);
        assert_eq!(rsa_modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(rsa_modulus_bits(&[0x7f, 0x00]), 15);
        assert_eq!(rsa_modulus_bits(&[0x01]), 1);
    }

    #[test]
    fn garbage_leaf_is_bad_svid() {
        let fx = fixture();
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let err =
            verify_svid(&[junk], &fx.bundles, UnixTime::now(), SvidUsage::Client).unwrap_err();
        assert!(matches!(err, SvidError::Malformed(_)), "{err:?}");
        assert_eq!(err.failure(), HandshakeFailure::BadSvid);
    }
}
