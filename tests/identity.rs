//! Identity lifecycle on the real app: SVID and CA rotation from files while
//! traffic flows, the Kubernetes `..data` symlink swap, refused updates,
//! readiness before expiry, and federation.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::app::{self, Running};
use portcullis::certs::{DevCa, Issued, LeafSpec};
use portcullis::config::Config;
use portcullis::demo::DemoService;
use portcullis::tls::{self, TrustBundles};
use rustls::pki_types::ServerName;

const PARTNER_TD: &str = "partner.example";
const PARTNER_GATEWAY: &str = "spiffe://partner.example/ns/acq/sa/gateway";

/// The sidecar's own SVID spec: server names so test clients can verify it.
fn sidecar_spec() -> LeafSpec {
    let mut spec = LeafSpec::svid(SIDECAR);
    spec.dns.push("localhost".into());
    spec.ips.push([127, 0, 0, 1].into());
    spec
}

/// Replaces a file the way careful tools do: a complete new file renamed
/// over the old one, so no reader ever sees half of it.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn install_svid(pki: &Pki, issued: &Issued) {
    replace(&pki.key, &issued.key_pem);
    replace(&pki.cert, &issued.cert_pem);
}

async fn wait_for_served_cert(running: &Running, client: &Arc<rustls::ClientConfig>, der: &[u8]) {
    let addr = running.inbound_addr;
    eventually_async(Duration::from_secs(10), "the new SVID to be served", || {
        let client = client.clone();
        async move { served_cert(addr, client).await == der }
    })
    .await;
}

/// Reload refusals are logged; a failing test shows them.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("portcullis=info")
        .try_init();
}

fn fast_watch(c: &mut Config) {
    logs();
    c.identity.watch_interval_ms = 20;
}

/// One long-lived connection sending requests back to back.
enum KeepAlive {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl KeepAlive {
    async fn open(
        addr: std::net::SocketAddr,
        client: Arc<rustls::ClientConfig>,
    ) -> (KeepAlive, Vec<u8>) {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(client)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let served = tls.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec();
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let conn = if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            KeepAlive::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            KeepAlive::H1(sender)
        };
        (conn, served)
    }

    async fn get(&mut self, port: u16) -> Result<u16, String> {
        let path = "/v1/payments/p1";
        let resp = match self {
            KeepAlive::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                let req = http::Request::get(path)
                    .header("host", format!("localhost:{port}"))
                    .body(Empty::new())
                    .unwrap();
                s.send_request(req).await
            }
            KeepAlive::H2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                let req = http::Request::get(format!("https://localhost:{port}{path}"))
                    .body(Empty::new())
                    .unwrap();
                s.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn svid_rotates_under_load_without_a_failed_request() {
    let mut h = Harness::start_with(&shipped_policy(), fast_watch).await;
    let addr = h.running().inbound_addr;
    let port = addr.port();
    let old_der = std::fs::read_to_string(&h.pki.cert).unwrap();
    let old_der = rustls_pemfile::certs(&mut old_der.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec();

    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let (client, _) = h.pki.client_with(&LeafSpec::svid(CHECKOUT), &[alpn]);
        let (mut conn, served) = KeepAlive::open(addr, client).await;
        assert_eq!(served, old_der);
        let tally = Arc::new(Tally::default());
        let (stop, t) = (stop.clone(), tally.clone());
        let task = tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                match conn.get(port).await {
                    Ok(200) => t.ok.fetch_add(1, Ordering::AcqRel),
                    Ok(s) => panic!("keep-alive request got {s}"),
                    Err(e) => {
                        eprintln!("keep-alive request failed: {e}");
                        t.failed.fetch_add(1, Ordering::AcqRel)
                    }
                };
            }
        });
        loads.push((alpn, tally, task));
    }
    // New connections throughout, so handshakes race the swap too.
    let fresh = Arc::new(Tally::default());
    let fresh_task = {
        let (stop, t) = (stop.clone(), fresh.clone());
        let client = h.pki.client(CHECKOUT);
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let r =
                    portcullis::demo::call(addr, client.clone(), "GET", "/v1/payments/p1", &[], "")
                        .await;
                match r {
                    Ok(reply) if reply.status == 200 => t.ok.fetch_add(1, Ordering::AcqRel),
                    other => {
                        eprintln!("fresh request failed: {:?}", other.map(|r| r.status));
                        t.failed.fetch_add(1, Ordering::AcqRel)
                    }
                };
            }
        })
    };
    let before: Vec<usize> = loads
        .iter()
        .map(|(_, t, _)| t.ok.load(Ordering::Acquire))
        .collect();

    let new = h.pki.ca.issue(&sidecar_spec()).unwrap();
    install_svid(&h.pki, &new);
    let probe = h.pki.client(CHECKOUT);
    wait_for_served_cert(h.running(), &probe, new.cert_der.as_ref()).await;

    // The long-lived connections go on serving after the swap.
    for (i, (alpn, tally, _)) in loads.iter().enumerate() {
        let alpn = String::from_utf8_lossy(alpn).into_owned();
        let tally = tally.clone();
        let floor = before[i] + 20;
        eventually(
            &format!("{alpn} keep-alive requests after the rotation"),
            || tally.ok.load(Ordering::Acquire) >= floor,
        )
        .await;
    }
    stop.store(true, Ordering::Release);
    for (alpn, tally, task) in loads {
        task.await.unwrap();
        assert_eq!(
            tally.failed.load(Ordering::Acquire),
            0,
            "{} keep-alive requests failed",
            String::from_utf8_lossy(alpn)
        );
    }
    fresh_task.await.unwrap();
    assert_eq!(
        fresh.failed.load(Ordering::Acquire),
        0,
        "fresh requests failed"
    );
    assert!(fresh.ok.load(Ordering::Acquire) > 0);

    let metrics = &h.running().metrics;
    assert!(metrics.identity_reloads.with_label_values(&["ok"]).get() >= 1);
    let expiry = h.running().identity.load().expiry_unix();
    assert_eq!(metrics.svid_expiry.get(), expiry);

    let leaf_hash = h.running().identity.load().leaf.clone();
    let events = h.stop().await;
    // Every identity event matches the published schema, and the rotation
    // names the new certificate by its hash.
    let validator = schema();
    for e in events
        .iter()
        .filter(|e| e["kind"] == "svid_rotated" || e["kind"] == "bundle_updated")
    {
        let errors: Vec<String> = validator.iter_errors(e).map(|x| x.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}: {e}");
    }
    let rotated_event = events.iter().find(|e| e["kind"] == "svid_rotated").unwrap();
    assert_eq!(rotated_event["svid"]["spiffe_id"], SIDECAR);
    {
        use sha2::Digest;
        assert_eq!(
            rotated_event["svid"]["sha256"],
            hex::encode(sha2::Sha256::digest(leaf_hash.as_ref()))
        );
    }
    let rotated: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "svid_rotated")
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert!(
        rotated[0].contains(&format!("spiffe_id={SIDECAR}")),
        "{}",
        rotated[0]
    );
    assert!(
        rotated[0].contains("trust_domain=pay.example"),
        "{}",
        rotated[0]
    );
    assert!(rotated[0].contains("not_after="), "{}", rotated[0]);
}

#[tokio::test]
async fn ca_rotation_old_plus_new_then_new_only() {
    let mut h = Harness::start_with(&shipped_policy(), fast_watch).await;
    let old_ca = &h.pki.ca;
    let new_ca = DevCa::new(TD).unwrap();
    // Clients trust both CAs for the server throughout, as a rolled-out
    // bundle would have them.
    let mut both = TrustBundles::new();
    both.insert(TD, vec![old_ca.cert_der(), new_ca.cert_der()])
        .unwrap();
    let client_of = |ca: &DevCa| {
        let issued = ca.issue(&LeafSpec::svid(CHECKOUT)).unwrap();
        tls::client_config(issued.chain(), issued.key_der(), &both, &[b"http/1.1"]).unwrap()
    };
    let old_client = client_of(old_ca);
    let new_client = client_of(&new_ca);
    let call =
        |client: &Arc<rustls::ClientConfig>| h.call(client.clone(), "GET", "/v1/payments/p1", &[]);

    assert!(call(&new_client).await.is_err(), "new CA trusted too early");
    assert_eq!(call(&old_client).await.unwrap().status, 200);

    // Step 1: the bundle carries both anchors.
    replace(
        &h.pki.bundle,
        &format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem()),
    );
    let identity = h.running().identity.clone();
    eventually("bundle with two anchors", || {
        identity.load().bundle_info[TD].serials.len() == 2
    })
    .await;
    assert_eq!(call(&old_client).await.unwrap().status, 200);
    assert_eq!(call(&new_client).await.unwrap().status, 200);

    // Step 2: the sidecar moves to the new CA and the old anchor goes.
    let new_svid = new_ca.issue(&sidecar_spec()).unwrap();
    install_svid(&h.pki, &new_svid);
    replace(&h.pki.bundle, new_ca.cert_pem());
    wait_for_served_cert(h.running(), &new_client, new_svid.cert_der.as_ref()).await;
    eventually("bundle with the new anchor only", || {
        identity.load().bundle_info[TD].serials.len() == 1
    })
    .await;
    assert_eq!(call(&new_client).await.unwrap().status, 200);
    assert!(call(&old_client).await.is_err(), "old CA still trusted");
    let metrics = h.running().metrics.clone();
    eventually("refusal counted", || {
        metrics
            .tls_handshakes
            .with_label_values(&["untrusted_chain"])
            .get()
            >= 2
    })
    .await;

    let events = h.stop().await;
    let bundle_updates: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "bundle_updated")
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert!(bundle_updates.len() >= 2, "{bundle_updates:?}");
    assert!(bundle_updates
        .iter()
        .all(|d| d.contains("trust_domain=pay.example") && d.contains("serials=")));
    assert!(events.iter().any(|e| e["kind"] == "svid_rotated"));
}

#[tokio::test]
async fn kubernetes_data_symlink_swap_is_seen() {
    let pki = Pki::new();
    let service = DemoService::start().await.unwrap();
    let mount = pki.dir.path().join("svid-mount");
    let first = pki.ca.issue(&sidecar_spec()).unwrap();
    let write = |generation: &str, svid: &Issued| {
        let files = [
            ("tls.crt", svid.cert_pem.as_str()),
            ("tls.key", svid.key_pem.as_str()),
            ("ca.crt", pki.ca.cert_pem()),
        ];
        kubelet_swap(&mount, generation, &files);
    };
    write("2026_11_25_23_00_00.1", &first);
    let mut config = pki.config(&shipped_policy(), service.addr);
    fast_watch(&mut config);
    config.identity.cert = mount.join("tls.crt");
    config.identity.key = mount.join("tls.key");
    config.identity.bundle = mount.join("ca.crt");
    let running = app::start(config).await.unwrap();
    let client = pki.client(CHECKOUT);
    assert_eq!(
        served_cert(running.inbound_addr, client.clone()).await,
        first.cert_der.as_ref()
    );

    let second = pki.ca.issue(&sidecar_spec()).unwrap();
    write("2026_11_25_23_30_00.2", &second);
    wait_for_served_cert(&running, &client, second.cert_der.as_ref()).await;
    let reply = portcullis::demo::call(
        running.inbound_addr,
        client,
        "GET",
        "/v1/payments/p1",
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    running.shutdown().await;
}

#[tokio::test]
async fn corrupt_and_partial_updates_are_kept_out() {
    let h = Harness::start_with(&shipped_policy(), fast_watch).await;
    let metrics = h.running().metrics.clone();
    let identity = h.running().identity.clone();
    let original = identity.load().serial.clone();
    let errors = || metrics.identity_reloads.with_label_values(&["error"]).get();
    let client = h.pki.client(CHECKOUT);

    // A truncated certificate.
    let good_cert = std::fs::read_to_string(&h.pki.cert).unwrap();
    replace(&h.pki.cert, &good_cert[..good_cert.len() / 2]);
    eventually("corrupt cert refused", || errors() >= 1).await;
    assert_eq!(identity.load().serial, original);
    let reply = h
        .call(client.clone(), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(admin_get(h.running().admin_addr, "/readyz").await.0, 200);

    // A new cert whose key has not been written yet: never half-applied.
    let next = h.pki.ca.issue(&sidecar_spec()).unwrap();
    let before = errors();
    replace(&h.pki.cert, &next.cert_pem);
    eventually("cert without its key refused", || errors() > before).await;
    assert_eq!(identity.load().serial, original);
    assert_eq!(
        h.call(client.clone(), "GET", "/v1/payments/p1", &[])
            .await
            .unwrap()
            .status,
        200
    );

    // A bundle that no longer vouches for the SVID.
    let stranger = DevCa::new(TD).unwrap();
    let good_bundle = std::fs::read_to_string(&h.pki.bundle).unwrap();
    let before = errors();
    replace(&h.pki.bundle, stranger.cert_pem());
    eventually("unrelated bundle refused", || errors() > before).await;
    assert_eq!(identity.load().serial, original);
    replace(&h.pki.bundle, &good_bundle);

    // The key arrives: the pair is applied.
    replace(&h.pki.key, &next.key_pem);
    wait_for_served_cert(h.running(), &client, next.cert_der.as_ref()).await;
    assert_ne!(identity.load().serial, original);
    let scrape = h.scrape().await;
    assert!(
        sample(
            &scrape,
            r#"portcullis_identity_reloads_total{result="error"}"#
        ) >= 3.0
    );
}

#[tokio::test]
async fn readiness_turns_false_within_min_remaining_and_recovers() {
    let h = Harness::start_with(&shipped_policy(), fast_watch).await;
    let admin = h.running().admin_addr;
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
    let scrape = h.scrape().await;
    assert!(
        sample(
            &scrape,
            r#"portcullis_bundle_expiry_timestamp_seconds{trust_domain="pay.example"}"#
        ) > 1.7e9,
        "{scrape}"
    );

    // Still valid, but with less left than identity.min_remaining (5m).
    let now = time::OffsetDateTime::now_utc();
    let mut spec = sidecar_spec();
    spec.not_before = now - time::Duration::minutes(55);
    spec.not_after = now + time::Duration::minutes(2);
    let short = h.pki.ca.issue(&spec).unwrap();
    install_svid(&h.pki, &short);
    let client = h.pki.client(CHECKOUT);
    wait_for_served_cert(h.running(), &client, short.cert_der.as_ref()).await;
    let (status, body) = admin_get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("identity.min_remaining"), "{body}");
    assert_eq!(
        h.running().metrics.svid_expiry.get(),
        now.unix_timestamp() + 120
    );

    let renewed = h.pki.ca.issue(&sidecar_spec()).unwrap();
    install_svid(&h.pki, &renewed);
    wait_for_served_cert(h.running(), &client, renewed.cert_der.as_ref()).await;
    assert_eq!(admin_get(admin, "/readyz").await, (200, "ready\n".into()));
}

#[tokio::test]
async fn readiness_flips_as_a_short_lived_svid_runs_out() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let mut spec = sidecar_spec();
    spec.not_before = now - time::Duration::minutes(1);
    spec.not_after = now + time::Duration::seconds(4);
    let short = pki.ca.issue(&spec).unwrap();
    std::fs::write(&pki.cert, &short.cert_pem).unwrap();
    std::fs::write(&pki.key, &short.key_pem).unwrap();
    let mut config = pki.config(&shipped_policy(), "127.0.0.1:9".parse().unwrap());
    config.identity.min_remaining = Duration::from_secs(2);
    let running = app::start(config).await.unwrap();
    assert_eq!(admin_get(running.admin_addr, "/readyz").await.0, 200);
    let admin = running.admin_addr;
    eventually_async(
        Duration::from_secs(10),
        "readiness to turn false",
        || async move { admin_get(admin, "/readyz").await.0 == 503 },
    )
    .await;
    running.shutdown().await;
}

#[tokio::test]
async fn startup_refuses_an_expired_svid_saying_so() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let mut spec = sidecar_spec();
    spec.not_before = now - time::Duration::days(2);
    spec.not_after = now - time::Duration::days(1);
    let expired = pki.ca.issue(&spec).unwrap();
    std::fs::write(&pki.cert, &expired.cert_pem).unwrap();
    std::fs::write(&pki.key, &expired.key_pem).unwrap();
    let config = pki.config(&shipped_policy(), "127.0.0.1:9".parse().unwrap());
    let err = app::start(config).await.err().unwrap().to_string();
    assert!(
        err.contains("expired") && err.contains("identity.cert"),
        "{err}"
    );
}

fn partner_policy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("federation.rego"),
        r#"package portcullis.authz
import rego.v1
default allow := false
allow if input.source.trust_domain == "partner.example"
"#,
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn federated_peer_is_verified_against_its_own_domain_only() {
    let partner = DevCa::new(PARTNER_TD).unwrap();
    let policy = partner_policy();
    let partner_bundle: Arc<std::sync::Mutex<Option<PathBuf>>> = Default::default();
    let slot = partner_bundle.clone();
    let partner_pem = partner.cert_pem().to_owned();
    let h = Harness::start_with(policy.path(), move |c| {
        fast_watch(c);
        let path = c.identity.cert.with_file_name("partner-bundle.pem");
        std::fs::write(&path, &partner_pem).unwrap();
        c.identity
            .federation
            .insert(PARTNER_TD.into(), path.clone());
        *slot.lock().unwrap() = Some(path);
    })
    .await;
    let partner_bundle = partner_bundle.lock().unwrap().clone().unwrap();
    let call = |client: Arc<rustls::ClientConfig>| h.call(client, "GET", "/v1/payments/p1", &[]);
    let alpn: &[&[u8]] = &[b"http/1.1"];

    // Accepted from the federated domain; the policy sees its trust domain.
    let (gateway, _) = h
        .pki
        .client_from(&partner, &LeafSpec::svid(PARTNER_GATEWAY), alpn);
    assert_eq!(call(gateway.clone()).await.unwrap().status, 200);
    assert_eq!(
        h.service.received()[0].headers["x-spiffe-id"],
        PARTNER_GATEWAY
    );
    // The own domain still verifies (and this policy denies it).
    assert_eq!(call(h.pki.client(CHECKOUT)).await.unwrap().status, 403);

    // Across domains: neither CA vouches for the other's IDs.
    let (forged_local, _) = h.pki.client_from(&partner, &LeafSpec::svid(CHECKOUT), alpn);
    assert!(call(forged_local).await.is_err());
    let (forged_partner, _) = h
        .pki
        .client_from(&h.pki.ca, &LeafSpec::svid(PARTNER_GATEWAY), alpn);
    assert!(call(forged_partner).await.is_err());
    let metrics = h.running().metrics.clone();
    eventually("cross-domain refusals", || {
        metrics
            .tls_handshakes
            .with_label_values(&["untrusted_chain"])
            .get()
            == 2
    })
    .await;
    // A domain with no bundle at all.
    let unknown = DevCa::new("unknown.example").unwrap();
    let (stranger, _) = h.pki.client_from(
        &unknown,
        &LeafSpec::svid("spiffe://unknown.example/ns/x/sa/y"),
        alpn,
    );
    assert!(call(stranger).await.is_err());
    eventually("unknown domain refusal", || {
        metrics
            .tls_handshakes
            .with_label_values(&["wrong_trust_domain"])
            .get()
            == 1
    })
    .await;
    let scrape = h.scrape().await;
    assert!(
        sample(
            &scrape,
            r#"portcullis_bundle_expiry_timestamp_seconds{trust_domain="partner.example"}"#
        ) > 1.7e9
    );

    // The federated bundle is watched too: the partner rotates its CA.
    let partner2 = DevCa::new(PARTNER_TD).unwrap();
    let identity = h.running().identity.clone();
    let old_serials = identity.load().bundle_info[PARTNER_TD].serials.clone();
    replace(&partner_bundle, partner2.cert_pem());
    eventually("partner bundle reloaded", || {
        identity.load().bundle_info[PARTNER_TD].serials != old_serials
    })
    .await;
    assert!(call(gateway).await.is_err(), "old partner CA still trusted");
    let (gateway2, _) = h
        .pki
        .client_from(&partner2, &LeafSpec::svid(PARTNER_GATEWAY), alpn);
    assert_eq!(call(gateway2).await.unwrap().status, 200);
}

#[tokio::test]
async fn federation_config_naming_the_own_domain_is_refused() {
    let pki = Pki::new();
    let mut config = pki.config(&shipped_policy(), "127.0.0.1:9".parse().unwrap());
    config
        .identity
        .federation
        .insert(TD.into(), pki.bundle.clone());
    let err = app::start(config).await.err().unwrap().to_string();
    assert!(
        err.contains("identity.federation") && err.contains("own trust domain"),
        "{err}"
    );
}
