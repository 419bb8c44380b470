//! mTLS plumbing: trust bundles, rustls configs for the sidecar and its test
//! clients, and the classification of failed handshakes for metrics and audit.

mod verifier;

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, InconsistentKeys, RootCertStore};
use sha2::{Digest, Sha256};

use crate::identity::{SpiffeId, SpiffeIdError};

pub use verifier::{verify_svid, SvidClientVerifier, SvidError, SvidServerVerifier, SvidUsage};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid trust domain {trust_domain:?}: {source}")]
    InvalidTrustDomain {
        trust_domain: String,
        source: SpiffeIdError,
    },
    #[error("trust bundle for {0:?} contains no certificate")]
    EmptyBundle(String),
    #[error("trust bundle for {trust_domain:?} is not valid PEM: {reason}")]
    BundlePem {
        trust_domain: String,
        reason: String,
    },
    #[error("trust bundle for {trust_domain:?} has an unusable anchor: {reason}")]
    BadAnchor {
        trust_domain: String,
        reason: String,
    },
    #[error("no trust anchors configured")]
    NoAnchors,
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("private key cannot be loaded: {0}")]
    BadKey(rustls::Error),
    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,
    #[error("cannot confirm that the private key matches the leaf certificate")]
    KeyMatchUnknown,
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The only crypto provider Portcullis uses. Passed explicitly everywhere so
/// that no process-wide default (possibly installed by a dependency) applies.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[derive(Debug, Clone)]
struct Bundle {
    certs: Vec<CertificateDer<'static>>,
    // Parsed once at insert so that a bad anchor fails loading, not handshakes.
    anchors: Vec<TrustAnchor<'static>>,
}

/// Trust anchors per trust domain.
#[derive(Debug, Clone, Default)]
pub struct TrustBundles {
    domains: BTreeMap<String, Bundle>,
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the anchors for `trust_domain`, replacing any previous ones.
    pub fn insert(
        &mut self,
        trust_domain: &str,
        anchors: Vec<CertificateDer<'static>>,
    ) -> Result<(), Error> {
        SpiffeId::validate_trust_domain(trust_domain).map_err(|source| {
            Error::InvalidTrustDomain {
                trust_domain: trust_domain.to_owned(),
                source,
            }
        })?;
        if anchors.is_empty() {
            return Err(Error::EmptyBundle(trust_domain.to_owned()));
        }
        let parsed = anchors
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| Error::BadAnchor {
                        trust_domain: trust_domain.to_owned(),
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.domains.insert(
            trust_domain.to_owned(),
            Bundle {
                certs: anchors,
                anchors: parsed,
            },
        );
        Ok(())
    }

    /// Adds the certificates in `pem` as the anchors of `trust_domain`.
    pub fn insert_pem(&mut self, trust_domain: &str, pem: &[u8]) -> Result<(), Error> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::BundlePem {
                trust_domain: trust_domain.to_owned(),
                reason: e.to_string(),
            })?;
        self.insert(trust_domain, certs)
    }

    pub fn from_pem(trust_domain: &str, pem: &[u8]) -> Result<Self, Error> {
        let mut bundles = Self::new();
        bundles.insert_pem(trust_domain, pem)?;
        Ok(bundles)
    }

    pub fn get(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.domains.get(trust_domain).map(|b| b.certs.as_slice())
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> + '_ {
        self.domains.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    fn anchors_for(&self, trust_domain: &str) -> Option<&[TrustAnchor<'static>]> {
        self.domains.get(trust_domain).map(|b| b.anchors.as_slice())
    }

    fn all_anchors(&self) -> impl Iterator<Item = &TrustAnchor<'static>> + '_ {
        self.domains.values().flat_map(|b| b.anchors.iter())
    }
}

/// Why a handshake was refused; the labels are the metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    NoClientCert,
    UntrustedChain,
    BadSvid,
    WrongTrustDomain,
    Expired,
    Protocol,
}

impl HandshakeFailure {
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::NoClientCert => "no_client_cert",
            HandshakeFailure::UntrustedChain => "untrusted_chain",
            HandshakeFailure::BadSvid => "bad_svid",
            HandshakeFailure::WrongTrustDomain => "wrong_trust_domain",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::Protocol => "protocol_error",
        }
    }
}

/// Classifies the error returned by a tokio-rustls server-side `accept`.
pub fn classify_handshake_error(err: &std::io::Error) -> (HandshakeFailure, String) {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => classify_rustls_error(tls),
        None => (HandshakeFailure::Protocol, err.to_string()),
    }
}

/// The SPIFFE ID a refused client certificate presented, when its leaf
/// could be parsed that far: for the audit trail, never for a decision.
pub fn presented_spiffe_id(err: &std::io::Error) -> Option<String> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = tls else {
        return None;
    };
    let rejected = other.0.downcast_ref::<verifier::Rejected>()?;
    rejected.presented.as_ref().map(|id| id.to_string())
}

pub fn classify_rustls_error(err: &rustls::Error) -> (HandshakeFailure, String) {
    use HandshakeFailure as F;
    match err {
        rustls::Error::NoCertificatesPresented => {
            (F::NoClientCert, "client presented no certificate".into())
        }
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::Other(other) => match other
                .0
                .downcast_ref::<verifier::Rejected>()
                .map(|r| &r.error)
                .or_else(|| other.0.downcast_ref::<SvidError>())
            {
                Some(svid) => (svid.failure(), svid.to_string()),
                None => (F::Protocol, err.to_string()),
            },
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => (F::Expired, err.to_string()),
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                (F::UntrustedChain, err.to_string())
            }
            _ => (F::Protocol, err.to_string()),
        },
        other => (F::Protocol, other.to_string()),
    }
}

/// Checks that `key` is the private key of the leaf of `chain`.
pub fn keys_match(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'_>) -> Result<(), Error> {
    if chain.is_empty() {
        return Err(Error::EmptyChain);
    }
    let signing_key = crypto_provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(Error::BadKey)?;
    match CertifiedKey::new(chain.to_vec(), signing_key).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(Error::KeyMismatch)
        }
        // Fail closed: a key we cannot compare is not served.
        Err(rustls::Error::InconsistentKeys(_)) => Err(Error::KeyMatchUnknown),
        Err(e) => Err(Error::Rustls(e)),
    }
}

/// The sidecar's inbound TLS config: TLS 1.3/1.2, client SVID required.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundles: Arc<TrustBundles>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    keys_match(&chain, &key)?;
    if bundles.is_empty() {
        return Err(Error::NoAnchors);
    }
    let verifier = Arc::new(SvidClientVerifier::new(bundles));
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // A resumed session skips the client's certificate: the caller would
    // keep the identity of an SVID since expired, or issued under a CA since
    // removed from the bundle, for as long as the session lived. No session
    // is kept (TLS 1.2) and no ticket sent (TLS 1.3), so every connection is
    // a full handshake through the verifier; it also saves writing two
    // tickets per handshake that callers which do not resume throw away.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The sidecar's outbound TLS config: presents the own SVID and accepts a
/// server only with a valid X.509-SVID from the bundle of its own trust
/// domain; which SPIFFE ID is acceptable is the route's to check.
pub fn origination_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundles: Arc<TrustBundles>,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    keys_match(&chain, &key)?;
    if bundles.is_empty() {
        return Err(Error::NoAnchors);
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SvidServerVerifier::new(bundles)))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // A resumed session re-verifies neither side's certificate: the server
    // would keep seeing a rotated-out SVID, and a route would trust a
    // ticket instead of a chain. Every connection does a full handshake;
    // pooling keeps that rare.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A client config presenting `chain` and verifying servers by name against
/// every anchor in `bundles` (used by the demo and integration tests).
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundles: &TrustBundles,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, Error> {
    keys_match(&chain, &key)?;
    let mut config = client_builder(bundles)?.with_client_auth_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn client_builder(
    bundles: &TrustBundles,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, Error> {
    let mut roots = RootCertStore::empty();
    roots.extend(bundles.all_anchors().cloned());
    if roots.is_empty() {
        return Err(Error::NoAnchors);
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots),
    )
}

/// The verified identity of the peer of an established connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe_id: SpiffeId,
    /// Lowercase hex SHA-256 of the leaf DER (the XFCC `Hash=` value).
    pub leaf_sha256: String,
}

/// Only meaningful after a successful handshake through [`SvidClientVerifier`].
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<PeerIdentity> {
    leaf_identity(conn.peer_certificates()?)
}

/// The verified identity of the server of an established outbound
/// connection; only meaningful after a handshake through
/// [`SvidServerVerifier`].
pub fn server_identity(conn: &rustls::ClientConnection) -> Option<PeerIdentity> {
    leaf_identity(conn.peer_certificates()?)
}

fn leaf_identity(chain: &[CertificateDer<'_>]) -> Option<PeerIdentity> {
    let leaf = chain.first()?;
    Some(PeerIdentity {
        spiffe_id: verifier::leaf_spiffe_id(leaf)?,
        leaf_sha256: hex::encode(Sha256::digest(leaf.as_ref())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{DevCa, Issued, LeafSpec};
    use rustls::pki_types::ServerName;
    use std::net::{IpAddr, Ipv4Addr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const TD: &str = "pay.example";

    struct Pki {
        ca: DevCa,
        bundles: Arc<TrustBundles>,
        server: Issued,
    }

    fn pki() -> Pki {
        let ca = DevCa::new(TD).unwrap();
        let bundles = Arc::new(TrustBundles::from_pem(TD, ca.cert_pem().as_bytes()).unwrap());
        let mut spec = LeafSpec::svid("spiffe://pay.example/ns/pay/sa/payments");
        spec.dns = vec!["localhost".into()];
        spec.ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let server = ca.issue(&spec).unwrap();
        Pki {
            ca,
            bundles,
            server,
        }
    }

    #[test]
    fn labels() {
        use HandshakeFailure as F;
        let all = [
            (F::NoClientCert, "no_client_cert"),
            (F::UntrustedChain, "untrusted_chain"),
            (F::BadSvid, "bad_svid"),
            (F::WrongTrustDomain, "wrong_trust_domain"),
            (F::Expired, "expired"),
            (F::Protocol, "protocol_error"),
        ];
        for (f, label) in all {
            assert_eq!(f.label(), label);
        }
    }

    #[test]
    fn bundles_from_pem() {
        let ca = DevCa::new(TD).unwrap();
        let b = TrustBundles::from_pem(TD, ca.cert_pem().as_bytes()).unwrap();
        assert_eq!(b.domains().collect::<Vec<_>>(), vec![TD]);
        assert_eq!(b.get(TD).unwrap(), &[ca.cert_der()]);
        assert!(b.get("other").is_none());

        assert!(matches!(
            TrustBundles::from_pem(TD, b"no certs here"),
            Err(Error::EmptyBundle(_))
        ));
        assert!(matches!(
            TrustBundles::from_pem("Pay.example", ca.cert_pem().as_bytes()),
            Err(Error::InvalidTrustDomain { .. })
        ));
    }

    #[test]
    fn keys_match_detects_mismatch() {
        let p = pki();
        let other =
            p.ca.issue(&LeafSpec::svid("spiffe://pay.example/x"))
                .unwrap();
        keys_match(&p.server.chain(), &p.server.key_der()).unwrap();
        let err = keys_match(&p.server.chain(), &other.key_der()).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch), "{err:?}");
        assert!(err.to_string().contains("does not match"));
        assert!(matches!(
            server_config(p.server.chain(), other.key_der(), p.bundles.clone()),
            Err(Error::KeyMismatch)
        ));
        assert!(matches!(
            keys_match(&[], &p.server.key_der()),
            Err(Error::EmptyChain)
        ));
    }

    #[test]
    fn server_config_offers_h2_then_http11() {
        let p = pki();
        let cfg = server_config(p.server.chain(), p.server.key_der(), p.bundles).unwrap();
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn server_config_keeps_no_session_and_sends_no_ticket() {
        let p = pki();
        let cfg = server_config(p.server.chain(), p.server.key_der(), p.bundles).unwrap();
        assert_eq!(cfg.send_tls13_tickets, 0);
        assert!(!cfg.session_storage.can_cache());
        assert!(!cfg.ticketer.enabled());
    }

    /// Accepts one connection; returns the server-side outcome.
    async fn serve_once(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Option<PeerIdentity>> {
        let (tcp, _) = listener.accept().await?;
        let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        let identity = peer_identity(tls.get_ref().1);
        tls.write_all(b"ok").await?;
        tls.shutdown().await?;
        Ok(identity)
    }

    /// Runs one handshake; returns (server outcome, whether the client read "ok").
    async fn handshake(
        p: &Pki,
        client: Arc<rustls::ClientConfig>,
    ) -> (std::io::Result<Option<PeerIdentity>>, bool) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config =
            server_config(p.server.chain(), p.server.key_der(), p.bundles.clone()).unwrap();
        let server = tokio::spawn(serve_once(listener, config));

        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client_ok = match tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
        {
            Ok(mut tls) => {
                let mut buf = Vec::new();
                tls.read_to_end(&mut buf).await.is_ok() && buf == b"ok"
            }
            Err(_) => false,
        };
        (server.await.unwrap(), client_ok)
    }

    fn client_without_cert(bundles: &TrustBundles) -> Arc<rustls::ClientConfig> {
        Arc::new(client_builder(bundles).unwrap().with_no_client_auth())
    }

    #[tokio::test]
    async fn good_client_completes_handshake() {
        let p = pki();
        let id = "spiffe://pay.example/ns/shop/sa/checkout";
        let client = p.ca.issue(&LeafSpec::svid(id)).unwrap();
        let cfg =
            client_config(client.chain(), client.key_der(), &p.bundles, &[b"http/1.1"]).unwrap();
        let (server, client_ok) = handshake(&p, cfg).await;
        let peer = server.unwrap().expect("peer identity");
        assert!(client_ok);
        assert_eq!(peer.spiffe_id.as_str(), id);
        assert_eq!(
            peer.leaf_sha256,
            hex::encode(Sha256::digest(client.cert_der.as_ref()))
        );
        assert_eq!(peer.leaf_sha256.len(), 64);
    }

    #[tokio::test]
    async fn good_client_over_tls12() {
        let p = pki();
        let client =
            p.ca.issue(&LeafSpec::svid("spiffe://pay.example/a"))
                .unwrap();
        let mut roots = RootCertStore::empty();
        roots.extend(p.bundles.all_anchors().cloned());
        let cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(client.chain(), client.key_der())
            .unwrap();
        let (server, client_ok) = handshake(&p, Arc::new(cfg)).await;
        assert_eq!(
            server.unwrap().unwrap().spiffe_id.as_str(),
            "spiffe://pay.example/a"
        );
        assert!(client_ok);
    }

    #[tokio::test]
    async fn client_without_cert_is_no_client_cert() {
        let p = pki();
        let (server, client_ok) = handshake(&p, client_without_cert(&p.bundles)).await;
        assert!(!client_ok);
        let err = server.unwrap_err();
        let (failure, msg) = classify_handshake_error(&err);
        assert_eq!(failure, HandshakeFailure::NoClientCert, "{msg}");
    }

    #[tokio::test]
    async fn untrusted_client_chain_is_refused() {
        let p = pki();
        let rogue = DevCa::new(TD).unwrap();
        let intruder = rogue
            .issue(&LeafSpec::svid("spiffe://pay.example/ns/shop/sa/checkout"))
            .unwrap();
        let cfg = client_config(intruder.chain(), intruder.key_der(), &p.bundles, &[]).unwrap();
        let (server, client_ok) = handshake(&p, cfg).await;
        assert!(!client_ok);
        let err = server.unwrap_err();
        let (failure, msg) = classify_handshake_error(&err);
        assert_eq!(failure, HandshakeFailure::UntrustedChain, "{msg}");
        assert!(msg.contains("does not verify"), "{msg}");
    }

    #[tokio::test]
    async fn bad_svid_is_classified_through_rustls() {
        let p = pki();
        let mut spec = LeafSpec::svid("spiffe://pay.example/ns/shop/sa/checkout");
        spec.uris
            .push("spiffe://pay.example/ns/pay/sa/admin".into());
        let client = p.ca.issue(&spec).unwrap();
        let cfg = client_config(client.chain(), client.key_der(), &p.bundles, &[]).unwrap();
        let (server, _) = handshake(&p, cfg).await;
        let (failure, msg) = classify_handshake_error(&server.unwrap_err());
        assert_eq!(failure, HandshakeFailure::BadSvid, "{msg}");
        assert!(msg.contains("2 URI SANs"), "{msg}");
    }

    /// Originates one connection to a server presenting `server`; returns
    /// the server identity, or how the client refused it.
    async fn originate(
        p: &Pki,
        server: &Issued,
    ) -> Result<PeerIdentity, (HandshakeFailure, String)> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(server.chain(), server.key_der(), p.bundles.clone()).unwrap();
        tokio::spawn(serve_once(listener, config));
        let own =
            p.ca.issue(&LeafSpec::svid("spiffe://pay.example/ns/shop/sa/checkout"))
                .unwrap();
        let client = origination_config(own.chain(), own.key_der(), p.bundles.clone()).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        // Deliberately a name the certificate does not carry: SVIDs are
        // verified by SPIFFE ID, never by DNS name.
        let name = ServerName::try_from("not-in-the-cert.example").unwrap();
        match tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
        {
            Ok(tls) => Ok(server_identity(tls.get_ref().1).unwrap()),
            Err(e) => Err(classify_handshake_error(&e)),
        }
    }

    #[tokio::test]
    async fn origination_verifies_the_server_svid_by_id_for_server_auth() {
        let p = pki();
        let ok = originate(&p, &p.server).await.unwrap();
        assert_eq!(
            ok.spiffe_id.as_str(),
            "spiffe://pay.example/ns/pay/sa/payments"
        );

        let mut client_only = LeafSpec::svid("spiffe://pay.example/ns/pay/sa/payments");
        client_only.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let server = p.ca.issue(&client_only).unwrap();
        let (failure, msg) = originate(&p, &server).await.unwrap_err();
        assert_eq!(failure, HandshakeFailure::BadSvid, "{msg}");
        assert!(msg.contains("serverAuth"), "{msg}");

        let mut two_ids = LeafSpec::svid("spiffe://pay.example/ns/pay/sa/payments");
        two_ids
            .uris
            .push("spiffe://pay.example/ns/ledger/sa/ledger".into());
        let server = p.ca.issue(&two_ids).unwrap();
        let (failure, msg) = originate(&p, &server).await.unwrap_err();
        assert_eq!(failure, HandshakeFailure::BadSvid, "{msg}");
    }

    #[test]
    fn origination_offers_h2_and_never_resumes() {
        let p = pki();
        let cfg = origination_config(p.server.chain(), p.server.key_der(), p.bundles).unwrap();
        assert_eq!(
            cfg.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // rustls keeps these fields private; its Debug output shows them.
        let resumption = format!("{:?}", cfg.resumption);
        assert!(
            resumption.contains("NoClientSessionStorage") && resumption.contains("Disabled"),
            "{resumption}"
        );
    }

    #[test]
    fn classify_non_tls_io_error_is_protocol() {
        let err = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        let (failure, msg) = classify_handshake_error(&err);
        assert_eq!(failure, HandshakeFailure::Protocol);
        assert!(msg.contains("eof"));
    }
}
