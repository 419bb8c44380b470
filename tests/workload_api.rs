//! The SPIFFE Workload API source against a fake agent on a Unix socket: it
//! speaks gRPC over HTTP/2 like SPIRE, refuses calls without the
//! `workload.spiffe.io: true` metadata, and streams X.509 contexts.

mod common;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::app::{self, Running};
use portcullis::certs::{DevCa, Issued, LeafSpec};
use tokio::sync::watch;

// === the fake agent ===

/// One `X509SVIDResponse`, or the refusal the agent gives instead.
#[derive(Clone)]
enum Answer {
    Svid(Bytes),
    PermissionDenied,
}

struct FakeAgent {
    answer: watch::Sender<Answer>,
    task: tokio::task::JoinHandle<()>,
    /// Calls that carried the security header, and those that did not.
    with_header: Arc<AtomicUsize>,
    without_header: Arc<AtomicUsize>,
}

impl FakeAgent {
    fn start(socket: &Path, first: Answer) -> FakeAgent {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let (answer, rx) = watch::channel(first);
        let with_header = Arc::new(AtomicUsize::new(0));
        let without_header = Arc::new(AtomicUsize::new(0));
        let (with, without) = (with_header.clone(), without_header.clone());
        let task = tokio::spawn(async move {
            // Dropping the set when this task is aborted ends every
            // connection: that is what an agent restart looks like.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (rx, with, without) = (rx.clone(), with.clone(), without.clone());
                let service = hyper::service::service_fn(move |req| {
                    let (rx, with, without) = (rx.clone(), with.clone(), without.clone());
                    async move { Ok::<_, Infallible>(answer_call(req, rx, &with, &without)) }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeAgent {
            answer,
            task,
            with_header,
            without_header,
        }
    }

    fn send(&self, answer: Answer) {
        self.answer.send_replace(answer);
    }

    fn stop(self) {
        self.task.abort();
    }
}

fn answer_call(
    req: http::Request<hyper::body::Incoming>,
    mut rx: watch::Receiver<Answer>,
    with: &AtomicUsize,
    without: &AtomicUsize,
) -> http::Response<BoxBody<Bytes, Infallible>> {
    if req
        .headers()
        .get("workload.spiffe.io")
        .map(|v| v.as_bytes())
        != Some(b"true")
    {
        without.fetch_add(1, Ordering::AcqRel);
        return grpc_error(3, "security header missing from request");
    }
    with.fetch_add(1, Ordering::AcqRel);
    if req.uri().path() != "/SpiffeWorkloadAPI/FetchX509SVID" {
        return grpc_error(12, "not implemented by the fake agent");
    }
    if matches!(*rx.borrow_and_update(), Answer::PermissionDenied) {
        return grpc_error(7, "no identity for this caller");
    }
    // The current answer first, then every change, for as long as the
    // connection lives.
    let updates = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let answer = rx.borrow_and_update().clone();
        match answer {
            Answer::Svid(msg) => Some((Ok(Frame::data(grpc_frame(&msg))), (rx, false))),
            Answer::PermissionDenied => None,
        }
    });
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(updates).boxed())
        .unwrap()
}

/// A trailers-only gRPC error response.
fn grpc_error(code: u32, message: &str) -> http::Response<BoxBody<Bytes, Infallible>> {
    http::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message)
        .body(Empty::new().boxed())
        .unwrap()
}

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend((msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out.into()
}

// Protobuf wire format, just what workload.proto's X509SVIDResponse needs.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint((number << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// X509SVIDResponse { svids: [X509SVID { spiffe_id, x509_svid, x509_svid_key,
/// bundle }], federated_bundles }
fn x509_svid_response(svid: &Issued, ca: &DevCa, federated: &[(&str, &DevCa)]) -> Answer {
    let mut one = Vec::new();
    field(1, SIDECAR.as_bytes(), &mut one);
    field(2, svid.cert_der.as_ref(), &mut one);
    field(3, svid.pkcs8_key_der().secret_pkcs8_der(), &mut one);
    field(4, ca.cert_der().as_ref(), &mut one);
    let mut msg = Vec::new();
    field(1, &one, &mut msg);
    for (td, ca) in federated {
        let mut entry = Vec::new();
        field(1, format!("spiffe://{td}").as_bytes(), &mut entry);
        field(2, ca.cert_der().as_ref(), &mut entry);
        field(3, &entry, &mut msg);
    }
    Answer::Svid(msg.into())
}

// === helpers ===

fn sidecar_svid(ca: &DevCa) -> Issued {
    let mut spec = LeafSpec::svid(SIDECAR);
    spec.dns.push("localhost".into());
    spec.ips.push([127, 0, 0, 1].into());
    ca.issue(&spec).unwrap()
}

fn socket(pki: &Pki) -> PathBuf {
    pki.dir.path().join("agent.sock")
}

async fn start_with_agent(pki: &Pki, upstream: std::net::SocketAddr) -> Running {
    let mut config = pki.config(&shipped_policy(), upstream);
    config.identity.workload_api = Some(format!("unix://{}", socket(pki).display()));
    app::start(config).await.unwrap()
}

async fn wait_served(running: &Running, pki: &Pki, svid: &Issued) {
    let addr = running.inbound_addr;
    let client = pki.client(CHECKOUT);
    let want = svid.cert_der.as_ref().to_vec();
    eventually_async(
        Duration::from_secs(15),
        "the agent's new SVID to be served",
        || {
            let (client, want) = (client.clone(), want.clone());
            async move { served_cert(addr, client).await == want }
        },
    )
    .await;
}

// === tests ===

#[tokio::test]
async fn streams_rotations_and_survives_an_agent_restart() {
    let pki = Pki::new();
    let service = portcullis::demo::DemoService::start().await.unwrap();
    let first = sidecar_svid(&pki.ca);
    let agent = FakeAgent::start(&socket(&pki), x509_svid_response(&first, &pki.ca, &[]));
    let running = start_with_agent(&pki, service.addr).await;
    assert_eq!(
        served_cert(running.inbound_addr, pki.client(CHECKOUT)).await,
        first.cert_der.as_ref()
    );

    // Two rotations on the one open stream.
    let second = sidecar_svid(&pki.ca);
    agent.send(x509_svid_response(&second, &pki.ca, &[]));
    wait_served(&running, &pki, &second).await;
    let third = sidecar_svid(&pki.ca);
    agent.send(x509_svid_response(&third, &pki.ca, &[]));
    wait_served(&running, &pki, &third).await;
    assert!(agent.with_header.load(Ordering::Acquire) >= 2);
    assert_eq!(agent.without_header.load(Ordering::Acquire), 0);

    // The agent goes away: the last SVID keeps serving, still ready.
    agent.stop();
    let reply = portcullis::demo::call(
        running.inbound_addr,
        pki.client(CHECKOUT),
        "GET",
        "/v1/payments/p1",
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        served_cert(running.inbound_addr, pki.client(CHECKOUT)).await,
        third.cert_der.as_ref()
    );
    assert_eq!(admin_get(running.admin_addr, "/readyz").await.0, 200);

    // It comes back with a new SVID; the sidecar reconnects on its own.
    let fourth = sidecar_svid(&pki.ca);
    let agent = FakeAgent::start(&socket(&pki), x509_svid_response(&fourth, &pki.ca, &[]));
    wait_served(&running, &pki, &fourth).await;
    assert_eq!(agent.without_header.load(Ordering::Acquire), 0);
    assert_eq!(
        running
            .metrics
            .identity_reloads
            .with_label_values(&["ok"])
            .get(),
        3
    );
    agent.stop();
    running.shutdown().await;
}

#[tokio::test]
async fn federated_bundles_from_the_agent_are_used_per_domain() {
    let pki = Pki::new();
    let service = portcullis::demo::DemoService::start().await.unwrap();
    let partner = DevCa::new("partner.example").unwrap();
    let svid = sidecar_svid(&pki.ca);
    let agent = FakeAgent::start(
        &socket(&pki),
        x509_svid_response(&svid, &pki.ca, &[("partner.example", &partner)]),
    );
    let running = start_with_agent(&pki, service.addr).await;
    let snapshot = running.identity.load();
    assert_eq!(
        snapshot.bundles.domains().collect::<Vec<_>>(),
        vec!["partner.example", TD]
    );
    let alpn: &[&[u8]] = &[b"http/1.1"];
    let (gateway, _) = pki.client_from(
        &partner,
        &LeafSpec::svid("spiffe://partner.example/ns/acq/sa/gateway"),
        alpn,
    );
    // The handshake succeeds; the shipped policy then denies the stranger.
    let reply = portcullis::demo::call(
        running.inbound_addr,
        gateway,
        "GET",
        "/v1/payments/p1",
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 403);
    let (forged, _) = pki.client_from(&partner, &LeafSpec::svid(CHECKOUT), alpn);
    assert!(portcullis::demo::call(
        running.inbound_addr,
        forged,
        "GET",
        "/v1/payments/p1",
        &[],
        ""
    )
    .await
    .is_err());
    agent.stop();
    running.shutdown().await;
}

#[tokio::test]
async fn permission_denied_turns_readiness_off_until_an_identity_returns() {
    let pki = Pki::new();
    let service = portcullis::demo::DemoService::start().await.unwrap();
    let first = sidecar_svid(&pki.ca);
    let agent = FakeAgent::start(&socket(&pki), x509_svid_response(&first, &pki.ca, &[]));
    let running = start_with_agent(&pki, service.addr).await;
    let admin = running.admin_addr;
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);

    // The workload's registration is deleted: the agent ends the stream and
    // refuses the reconnect.
    agent.send(Answer::PermissionDenied);
    eventually_async(
        Duration::from_secs(15),
        "not ready after PermissionDenied",
        || async move { admin_get(admin, "/readyz").await.0 == 503 },
    )
    .await;
    let (_, body) = admin_get(admin, "/readyz").await;
    assert!(body.contains("permission denied"), "{body}");
    agent.stop();

    let second = sidecar_svid(&pki.ca);
    let agent = FakeAgent::start(&socket(&pki), x509_svid_response(&second, &pki.ca, &[]));
    wait_served(&running, &pki, &second).await;
    eventually_async(Duration::from_secs(15), "ready again", || async move {
        admin_get(admin, "/readyz").await.0 == 200
    })
    .await;
    agent.stop();
    running.shutdown().await;
}

#[tokio::test]
async fn startup_refuses_when_the_agent_denies_an_identity() {
    let pki = Pki::new();
    let agent = FakeAgent::start(&socket(&pki), Answer::PermissionDenied);
    let mut config = pki.config(&shipped_policy(), "127.0.0.1:9".parse().unwrap());
    config.identity.workload_api = Some(format!("unix://{}", socket(&pki).display()));
    let err = app::start(config).await.err().unwrap().to_string();
    assert!(
        err.contains("identity.workload_api") && err.contains("permission denied"),
        "{err}"
    );
    agent.stop();
}
