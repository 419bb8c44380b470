//! The sidecar's identity: its own SVID and the trust bundles it accepts
//! callers from, published as one immutable [`IdentitySnapshot`].
//!
//! Handshakes load the current snapshot once and keep it, so a rotation
//! swaps the `ArcSwap` without touching connections in flight.

pub mod files;
pub mod rotation;
mod spiffe_id;
pub mod workload_api;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

pub use spiffe_id::{SpiffeId, SpiffeIdError};

use crate::config;
use crate::tls::{self, SvidUsage, TrustBundles};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{key} {path}: cannot read: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path}: {message}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("identity.key {key} does not match the certificate in identity.cert {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("identity.cert {path}: not a valid SVID for this sidecar: {message}")]
    Svid { path: PathBuf, message: String },
    #[error("identity.cert {path}: SVID {id} is in trust domain {actual}, but identity.trust_domain is {expected}")]
    TrustDomain {
        path: PathBuf,
        id: String,
        actual: String,
        expected: String,
    },
    #[error("identity: {0}")]
    Tls(#[from] tls::Error),
    #[error("identity: cannot start watching the certificate files: {0}")]
    Watch(std::io::Error),
    #[error("identity.workload_api {addr}: {message}")]
    WorkloadApi { addr: String, message: String },
}

/// Everything a handshake needs, built and validated together.
pub struct IdentitySnapshot {
    pub spiffe_id: SpiffeId,
    /// Hex serial number of the own leaf; a rotation changes it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub bundles: Arc<TrustBundles>,
    /// Per trust domain, what its anchors are and when the first one lapses.
    pub bundle_info: BTreeMap<String, BundleInfo>,
    pub server_config: Arc<rustls::ServerConfig>,
    /// Presents this SVID when originating mTLS (`[outbound]`).
    pub client_config: Arc<rustls::ClientConfig>,
    /// The own leaf certificate, for the audit trail's hash of it.
    pub leaf: CertificateDer<'static>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInfo {
    /// Hex serial numbers of the anchors, in file order.
    pub serials: Vec<String>,
    /// The earliest not-after among the anchors: past it, some callers can
    /// no longer be verified.
    pub not_after: SystemTime,
}

impl IdentitySnapshot {
    /// Still usable at `now`, with `margin` to spare: readiness turns false
    /// before the SVID actually expires.
    pub fn is_valid_at(&self, now: SystemTime, margin: Duration) -> bool {
        now + margin < self.not_after
    }

    pub fn expiry_unix(&self) -> i64 {
        unix_secs(self.not_after)
    }

    pub fn trust_domain(&self) -> &str {
        self.spiffe_id.trust_domain()
    }
}

pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Loads the SVID chain, its key and the bundle named in the config and
/// checks that they form a usable identity: the key matches the leaf, the
/// chain verifies to the bundle, the leaf obeys the X.509-SVID rules and
/// names the configured trust domain.
/// Bundles of `[identity.federation]` are loaded the same way, each under
/// the trust domain it is configured for.
pub fn load_files(cfg: &config::Identity) -> Result<IdentitySnapshot, Error> {
    let chain = read_certs("identity.cert", &cfg.cert)?;
    let key = read_key("identity.key", &cfg.key)?;
    let bundle_pem = read("identity.bundle", &cfg.bundle)?;
    let mut bundles =
        TrustBundles::from_pem(&cfg.trust_domain, &bundle_pem).map_err(|e| Error::Pem {
            key: "identity.bundle",
            path: cfg.bundle.clone(),
            message: e.to_string(),
        })?;
    for (trust_domain, path) in &cfg.federation {
        let key = "identity.federation";
        let pem_err = |message: String| Error::Pem {
            key,
            path: path.clone(),
            message,
        };
        if *trust_domain == cfg.trust_domain {
            return Err(pem_err(format!(
                "{trust_domain:?} is this sidecar's own trust domain; its anchors belong in identity.bundle"
            )));
        }
        let pem = read(key, path)?;
        bundles
            .insert_pem(trust_domain, &pem)
            .map_err(|e| pem_err(e.to_string()))?;
    }
    build(chain, key, Arc::new(bundles), cfg)
}

fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundles: Arc<TrustBundles>,
    cfg: &config::Identity,
) -> Result<IdentitySnapshot, Error> {
    tls::keys_match(&chain, &key).map_err(|_| Error::KeyMismatch {
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
    })?;
    let spiffe_id = tls::verify_svid(&chain, &bundles, UnixTime::now(), SvidUsage::Server)
        .map_err(|e| Error::Svid {
            path: cfg.cert.clone(),
            message: e.to_string(),
        })?;
    if spiffe_id.trust_domain() != cfg.trust_domain {
        return Err(Error::TrustDomain {
            path: cfg.cert.clone(),
            id: spiffe_id.to_string(),
            actual: spiffe_id.trust_domain().to_string(),
            expected: cfg.trust_domain.clone(),
        });
    }
    let leaf = chain
        .first()
        .and_then(|der| CertFacts::of(der))
        .ok_or_else(|| Error::Svid {
            path: cfg.cert.clone(),
            message: "cannot read the certificate's serial number and validity".into(),
        })?;
    let bundle_info = bundle_info(&bundles).map_err(|trust_domain| Error::Pem {
        key: "identity.bundle",
        path: cfg.bundle.clone(),
        message: format!("an anchor of {trust_domain:?} has an unreadable validity"),
    })?;
    let own_leaf = chain.first().cloned().ok_or_else(|| Error::Svid {
        path: cfg.cert.clone(),
        message: "no certificate".into(),
    })?;
    let client_config = tls::origination_config(chain.clone(), key.clone_key(), bundles.clone())?;
    let server_config = tls::server_config(chain, key, bundles.clone())?;
    Ok(IdentitySnapshot {
        spiffe_id,
        serial: leaf.serial,
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        bundles,
        bundle_info,
        server_config,
        client_config,
        leaf: own_leaf,
    })
}

/// What rotation bookkeeping needs to know about one certificate.
struct CertFacts {
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl CertFacts {
    fn of(der: &CertificateDer<'_>) -> Option<CertFacts> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let at = |t: x509_parser::time::ASN1Time| {
            let secs = u64::try_from(t.timestamp()).ok()?;
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        };
        Some(CertFacts {
            serial: hex::encode(cert.raw_serial()),
            not_before: at(cert.validity().not_before)?,
            not_after: at(cert.validity().not_after)?,
        })
    }
}

/// Errs with the trust domain whose anchor cannot be read.
fn bundle_info(bundles: &TrustBundles) -> Result<BTreeMap<String, BundleInfo>, String> {
    let mut out = BTreeMap::new();
    for td in bundles.domains() {
        let facts = bundles
            .get(td)
            .unwrap_or_default()
            .iter()
            .map(CertFacts::of)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| td.to_owned())?;
        let not_after = facts
            .iter()
            .map(|f| f.not_after)
            .min()
            .ok_or_else(|| td.to_owned())?;
        let serials = facts.into_iter().map(|f| f.serial).collect();
        out.insert(td.to_owned(), BundleInfo { serials, not_after });
    }
    Ok(out)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

pub fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(key, path)?;
    let pem_err = |message: String| Error::Pem {
        key,
        path: path.to_owned(),
        message,
    };
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("contains no CERTIFICATE block".into()));
    }
    Ok(certs)
}

pub fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read(key, path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| Error::Pem {
            key,
            path: path.to_owned(),
            message: format!("invalid PEM: {e}"),
        })?
        .ok_or_else(|| Error::Pem {
            key,
            path: path.to_owned(),
            message: "contains no PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1)".into(),
        })
}
