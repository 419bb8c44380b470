//! Development certificates: a throwaway CA and X.509-SVIDs for local runs,
//! the demo and tests. Never used to verify anything in production.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// The dev workloads, as (name, SPIFFE ID path). The shipped policy names them.
pub const DEV_WORKLOADS: &[(&str, &str)] = &[
    ("payments", "/ns/pay/sa/payments"),
    ("checkout", "/ns/shop/sa/checkout"),
    ("refunds", "/ns/support/sa/refunds"),
    ("reporting", "/ns/finance/sa/reporting"),
    ("prober", "/ns/monitoring/sa/prober"),
    ("frontend", "/ns/shop/sa/frontend"),
];

/// The workload whose SVID the sidecar itself serves; it also gets server-name
/// SANs so that ordinary HTTPS clients (curl) can check the server name.
const SERVER_WORKLOAD: &str = "payments";

/// Impersonates a trusted workload with a chain from a CA outside the bundle.
const INTRUDER: (&str, &str) = ("intruder", "/ns/shop/sa/checkout");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A self-signed development CA for one trust domain.
pub struct DevCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signing key stays out of debug output.
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    pub fn new(trust_domain: &str) -> Result<DevCa, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Portcullis dev");
        dn.push(
            DnType::CommonName,
            format!("Portcullis dev CA {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // SPIFFE signing CAs carry the trust domain's own ID as their URI SAN.
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = OffsetDateTime::now_utc();
        // Backdated a little so a peer with a slightly slow clock still accepts it.
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Issues whatever `spec` describes, good or bad: tests rely on this to
    /// build certificates that the verifier must refuse.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = self.sign(spec, &key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// Certifies a public key we hold no private key for, so tests can build
    /// leaves with keys rcgen cannot generate (such as weak RSA keys).
    pub fn sign_public_key(
        &self,
        spec: &LeafSpec,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, Error> {
        Ok(self.sign(spec, public_key)?.der().clone())
    }

    fn sign(
        &self,
        spec: &LeafSpec,
        public_key: &impl PublicKeyData,
    ) -> Result<rcgen::Certificate, Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Portcullis dev");
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for uri in &spec.uris {
            sans.push(SanType::URI(uri.clone().try_into()?));
        }
        for dns in &spec.dns {
            sans.push(SanType::DnsName(dns.clone().try_into()?));
        }
        sans.extend(spec.ips.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.extended_key_usages.clone();
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(public_key, &self.issuer)?)
    }
}

/// What to put in a leaf certificate. Pub fields so tests can describe bad ones.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
}

impl LeafSpec {
    /// A well-formed X.509-SVID for `spiffe_id` (not validated here on purpose).
    pub fn svid(spiffe_id: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            uris: vec![spiffe_id.to_owned()],
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(7),
            is_ca: false,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            extended_key_usages: vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
        }
    }
}

/// An issued leaf and its private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// A fresh owned copy of the key: rustls consumes keys by value and the
    /// key types deliberately do not implement `Clone`.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    pub fn pkcs8_key_der(&self) -> PrivatePkcs8KeyDer<'static> {
        self.key.clone_key()
    }

    /// The SVID chain, leaf first. Our dev CA is the trust anchor, so the
    /// chain is just the leaf.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone()]
    }
}

/// Where one dev workload's files were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevWorkload {
    pub name: String,
    pub spiffe_id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files written by [`write_dev_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevSet {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub bundle: PathBuf,
    /// In the order of [`DEV_WORKLOADS`].
    pub workloads: Vec<DevWorkload>,
    /// Signed by a CA that is not in `bundle`.
    pub intruder: DevWorkload,
}

impl DevSet {
    pub fn workload(&self, name: &str) -> Option<&DevWorkload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// Every SVID written, the intruder included, as (name, cert, key).
    pub fn svids(&self) -> impl Iterator<Item = (&str, &Path, &Path)> + '_ {
        self.workloads
            .iter()
            .chain(std::iter::once(&self.intruder))
            .map(|w| (w.name.as_str(), w.cert.as_path(), w.key.as_path()))
    }

    /// The certificate and key files of `name` (the intruder included).
    pub fn svid(&self, name: &str) -> Option<(&Path, &Path)> {
        self.svids()
            .find(|(n, _, _)| *n == name)
            .map(|(_, cert, key)| (cert, key))
    }
}

/// Writes `bundle.pem` and `<name>-svid.pem` / `<name>-svid.key` for every dev
/// workload plus the intruder into `out`.
pub fn write_dev_set(out: &Path, trust_domain: &str) -> Result<DevSet, Error> {
    fs::create_dir_all(out).map_err(|source| Error::CreateDir {
        path: out.to_owned(),
        source,
    })?;
    let ca = DevCa::new(trust_domain)?;
    let bundle = out.join("bundle.pem");
    write_file(&bundle, ca.cert_pem().as_bytes(), false)?;

    let mut workloads = Vec::with_capacity(DEV_WORKLOADS.len());
    for (name, path) in DEV_WORKLOADS {
        let spiffe_id = format!("spiffe://{trust_domain}{path}");
        let mut spec = LeafSpec::svid(&spiffe_id);
        if *name == SERVER_WORKLOAD {
            spec.dns.push("localhost".to_owned());
            spec.ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        workloads.push(write_workload(out, &ca, name, spiffe_id, &spec)?);
    }

    let rogue_ca = DevCa::new(trust_domain)?;
    let spiffe_id = format!("spiffe://{trust_domain}{}", INTRUDER.1);
    let spec = LeafSpec::svid(&spiffe_id);
    let intruder = write_workload(out, &rogue_ca, INTRUDER.0, spiffe_id, &spec)?;

    Ok(DevSet {
        dir: out.to_owned(),
        trust_domain: trust_domain.to_owned(),
        bundle,
        workloads,
        intruder,
    })
}

fn write_workload(
    out: &Path,
    ca: &DevCa,
    name: &str,
    spiffe_id: String,
    spec: &LeafSpec,
) -> Result<DevWorkload, Error> {
    let issued = ca.issue(spec)?;
    let cert = out.join(format!("{name}-svid.pem"));
    let key = out.join(format!("{name}-svid.key"));
    write_file(&cert, issued.cert_pem.as_bytes(), false)?;
    write_file(&key, issued.key_pem.as_bytes(), true)?;
    Ok(DevWorkload {
        name: name.to_owned(),
        spiffe_id,
        cert,
        key,
    })
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    // `mode` only applies when the file is created; an existing key file from
    // an earlier run may be wider, so tighten it before writing the key.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    fn uris(der: &[u8]) -> Vec<String> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn dev_ca_is_a_spiffe_ca() {
        let ca = DevCa::new("pay.example").unwrap();
        let der = ca.cert_der();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(uris(&der), vec!["spiffe://pay.example".to_owned()]);
    }

    #[test]
    fn svid_spec_produces_a_good_leaf() {
        let ca = DevCa::new("td").unwrap();
        let issued = ca.issue(&LeafSpec::svid("spiffe://td/a")).unwrap();
        let (_, cert) = X509Certificate::from_der(&issued.cert_der).unwrap();
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        assert_eq!(uris(&issued.cert_der), vec!["spiffe://td/a".to_owned()]);
        assert_eq!(
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
                .unwrap()
                .secret_der(),
            issued.key_der().secret_der()
        );
    }

    #[test]
    fn dev_set_writes_parseable_files() {
        let dir = tempfile::tempdir().unwrap();
        let set = write_dev_set(dir.path(), "pay.example").unwrap();

        let bundle = fs::read(&set.bundle).unwrap();
        let anchors: Vec<_> = CertificateDer::pem_slice_iter(&bundle)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(anchors.len(), 1);

        assert_eq!(set.workloads.len(), DEV_WORKLOADS.len());
        for ((name, path), w) in DEV_WORKLOADS.iter().zip(&set.workloads) {
            assert_eq!(&w.name, name);
            assert_eq!(w.spiffe_id, format!("spiffe://pay.example{path}"));
            assert_eq!(w.cert, dir.path().join(format!("{name}-svid.pem")));
            let pem = fs::read(&w.cert).unwrap();
            let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(chain.len(), 1);
            assert_eq!(uris(&chain[0]), vec![w.spiffe_id.clone()]);
            PrivateKeyDer::from_pem_file(&w.key).unwrap();
        }

        let payments = set.workload("payments").unwrap();
        let pem = fs::read(&payments.cert).unwrap();
        let leaf = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));

        assert_eq!(set.intruder.cert, dir.path().join("intruder-svid.pem"));
        assert_eq!(
            set.intruder.spiffe_id,
            "spiffe://pay.example/ns/shop/sa/checkout"
        );
        let anchor = webpki::anchor_from_trusted_cert(&anchors[0]).unwrap();
        let chains_to_bundle = |path: &Path| {
            let pem = fs::read(path).unwrap();
            let leaf = CertificateDer::from_pem_slice(&pem).unwrap();
            let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
            ee.verify_for_usage(
                rustls::crypto::aws_lc_rs::default_provider()
                    .signature_verification_algorithms
                    .all,
                std::slice::from_ref(&anchor),
                &[],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .is_ok()
        };
        assert!(chains_to_bundle(&set.workloads[1].cert));
        assert!(
            !chains_to_bundle(&set.intruder.cert),
            "the intruder must not chain to the bundle"
        );
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("payments-svid.key");
        // A leftover world-readable key from an earlier run must be tightened.
        fs::write(&key, b"old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();

        let set = write_dev_set(dir.path(), "td").unwrap();
        for w in set.workloads.iter().chain([&set.intruder]) {
            let mode = fs::metadata(&w.key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", w.key.display());
        }
    }
}
