//! Shared harness: a PKI made in the test, the demo payment service as a
//! recording upstream, and the real app on 127.0.0.1:0.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis::app::{self, Running};
use portcullis::certs::{DevCa, LeafSpec};
use portcullis::config::Config;
use portcullis::demo::{self, DemoService, Reply};
use portcullis::tls::{self, TrustBundles};

pub const TD: &str = "pay.example";
pub const SIDECAR: &str = "spiffe://pay.example/ns/pay/sa/payments";
pub const CHECKOUT: &str = "spiffe://pay.example/ns/shop/sa/checkout";
pub const FRONTEND: &str = "spiffe://pay.example/ns/shop/sa/frontend";
pub const REPORTING: &str = "spiffe://pay.example/ns/finance/sa/reporting";

pub fn shipped_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A trust domain made for one test: its CA, bundle file and the sidecar's
/// own SVID on disk.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub bundle: PathBuf,
    pub bundles: TrustBundles,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new(TD).unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, ca.cert_pem()).unwrap();
        let mut spec = LeafSpec::svid(SIDECAR);
        spec.dns.push("localhost".into());
        spec.ips.push([127, 0, 0, 1].into());
        let own = ca.issue(&spec).unwrap();
        let cert = dir.path().join("svid.pem");
        let key = dir.path().join("svid.key");
        std::fs::write(&cert, &own.cert_pem).unwrap();
        std::fs::write(&key, &own.key_pem).unwrap();
        let bundles = TrustBundles::from_pem(TD, ca.cert_pem().as_bytes()).unwrap();
        Pki {
            dir,
            ca,
            bundle,
            bundles,
            cert,
            key,
        }
    }

    /// A client presenting a certificate issued by this CA from `spec`.
    pub fn client_with(
        &self,
        spec: &LeafSpec,
        alpn: &[&[u8]],
    ) -> (Arc<rustls::ClientConfig>, String) {
        self.client_from(&self.ca, spec, alpn)
    }

    pub fn client_from(
        &self,
        ca: &DevCa,
        spec: &LeafSpec,
        alpn: &[&[u8]],
    ) -> (Arc<rustls::ClientConfig>, String) {
        use sha2::Digest;
        let issued = ca.issue(spec).unwrap();
        let hash = hex::encode(sha2::Sha256::digest(issued.cert_der.as_ref()));
        let config =
            tls::client_config(issued.chain(), issued.key_der(), &self.bundles, alpn).unwrap();
        (config, hash)
    }

    pub fn client(&self, spiffe_id: &str) -> Arc<rustls::ClientConfig> {
        self.client_with(&LeafSpec::svid(spiffe_id), &[b"http/1.1"])
            .0
    }

    pub fn anonymous(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert_der()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    pub fn config(&self, policy_dir: &Path, upstream: std::net::SocketAddr) -> Config {
        let mut c = Config::default();
        c.inbound.listen = "127.0.0.1:0".parse().unwrap();
        c.admin.listen = "127.0.0.1:0".parse().unwrap();
        c.inbound.upstream = format!("http://{upstream}");
        c.inbound.drain_timeout_ms = 5_000;
        c.identity.trust_domain = TD.into();
        c.identity.cert = self.cert.clone();
        c.identity.key = self.key.clone();
        c.identity.bundle = self.bundle.clone();
        c.policy.dir = policy_dir.to_owned();
        c.audit.path = self.dir.path().join("audit.log").display().to_string();
        c
    }
}

pub struct Harness {
    pub pki: Pki,
    pub service: DemoService,
    pub running: Option<Running>,
    pub audit_path: PathBuf,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(&shipped_policy(), |_| {}).await
    }

    pub async fn start_with(policy_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Harness {
        let pki = Pki::new();
        let service = DemoService::start().await.unwrap();
        let mut config = pki.config(policy_dir, service.addr);
        tweak(&mut config);
        let audit_path = PathBuf::from(&config.audit.path);
        let running = app::start(config).await.unwrap();
        Harness {
            pki,
            service,
            running: Some(running),
            audit_path,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn call(
        &self,
        client: Arc<rustls::ClientConfig>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, demo::Error> {
        demo::call(
            self.running().inbound_addr,
            client,
            method,
            path,
            headers,
            "",
        )
        .await
    }

    /// A real scrape of the admin listener.
    pub async fn scrape(&self) -> String {
        admin_get(self.running().admin_addr, "/metrics").await.1
    }

    /// Stops the sidecar, checks the audit chain and returns the events.
    pub async fn stop(&mut self) -> Vec<serde_json::Value> {
        let drained = self.running.take().unwrap().shutdown().await;
        assert!(drained, "sidecar did not drain");
        let text = std::fs::read_to_string(&self.audit_path).unwrap();
        let n = portcullis::audit::verify(&text).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(n as usize, events.len());
        events
    }
}

pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of one sample in a Prometheus text exposition, 0 if absent.
pub fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Polls `check` until it holds, failing after five seconds. For effects
/// the server records after the client has already seen the outcome (a
/// refused handshake is counted once the server side finishes).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `portcullis_request_limits_exceeded_total{limit}` is `n`.
pub async fn limit_count_reaches(running: &Running, limit: &str, n: u64) {
    let counter = running.metrics.limits_exceeded.with_label_values(&[limit]);
    eventually(&format!("{limit} counted {n} times"), || counter.get() == n).await;
}

pub fn requests(events: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    events.iter().filter(|e| e["kind"] == "request").collect()
}

/// Lays out (or updates) a directory the way the kubelet does for a
/// mounted Secret or ConfigMap: files in a fresh `..<generation>` directory,
/// visible names as symlinks through `..data`, and the switch as one atomic
/// rename of `..data`.
pub fn kubelet_swap(root: &Path, generation: &str, files: &[(&str, &str)]) {
    use std::os::unix::fs::symlink;
    let data = root.join(format!("..{generation}"));
    std::fs::create_dir_all(&data).unwrap();
    for (name, text) in files {
        std::fs::write(data.join(name), text).unwrap();
        let visible = root.join(name);
        if std::fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new("..data").join(name), &visible).unwrap();
        }
    }
    let tmp = root.join("..data_tmp");
    symlink(format!("..{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, root.join("..data")).unwrap();
}

/// A fresh mTLS connection to `addr`, for tests that write raw bytes.
pub async fn connect_tls(
    addr: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(client)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// The certificate a brand-new connection to `addr` is served.
pub async fn served_cert(addr: std::net::SocketAddr, client: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

/// [`eventually`] for checks that must await (a request, a scrape).
pub async fn eventually_async<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The published audit event schema, which every emitted line must match.
pub fn schema() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/audit-event.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}
