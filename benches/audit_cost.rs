//! What does the audit trail cost?
//!
//! Auditing cannot be turned off, so "audit off" is approximated by
//! writing the trail to /dev/null: the request still reserves its slot and
//! the writer still serialises and hashes every event, only the file I/O
//! is gone. Two measurements, in the same run, alternating A/B so drift
//! hits both sides alike:
//!
//! 1. the writer alone: events/s through `reserve`/`finish` from 4 tasks,
//!    to a file, to /dev/null, with HMAC, with `fsync = "always"`;
//! 2. the whole sidecar: requests/s through mTLS + policy + upstream from
//!    8 keep-alive clients, trail on a file vs on /dev/null.
//!
//! `cargo bench --bench audit_cost` (add `-- --quick` for a short run; a
//! quick run is what `cargo test --all-targets` does).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis::audit::{self, Event, Hasher, Kind};
use portcullis::config::Fsync;
use portcullis::metrics::Metrics;
use rustls::pki_types::ServerName;

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        writer_only(quick).await;
        end_to_end(quick).await;
    });
}

fn request_event(k: usize) -> Event {
    let mut e = Event::new(Kind::Request);
    e.request_id = Some(format!("7b0e6a52-1f6c-4d55-9d0b-{k:012}"));
    e.source = Some(audit::Source {
        spiffe_id: Some("spiffe://pay.example/ns/shop/sa/checkout".into()),
        address: "127.0.0.1:51522".into(),
    });
    e.request = Some(audit::Request {
        method: "POST".into(),
        path: "/v1/payments?order=1234".into(),
        headers: Some(
            [
                ("content-type", "application/json"),
                ("idempotency-key", "k-1"),
                ("host", "payments"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect(),
        ),
    });
    e.decision = Some(audit::Decision {
        allowed: true,
        reason: "checkout may create payments".into(),
        policy_revision: "a".repeat(64),
        dry_run: false,
        cached: false,
    });
    e
}

async fn writer_run(path: &str, hasher: Hasher, fsync: Fsync, events: usize) -> f64 {
    let metrics = Arc::new(Metrics::new(&prometheus::Registry::new()).expect("metrics"));
    let mut options = audit::Options::new(path, 8192);
    options.hasher = hasher;
    options.fsync = fsync;
    let (sink, writer) = audit::start_with(options, metrics.clone()).expect("writer");
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let sink = sink.clone();
            tokio::spawn(async move {
                for k in 0..events / 4 {
                    loop {
                        if let Some(r) = sink.reserve(request_event(t * events + k), Instant::now())
                        {
                            r.finish(200);
                            break;
                        }
                        // The queue is full: let the writer catch up.
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    writer.finish().await;
    assert_eq!(metrics.audit_written.get() as usize, events / 4 * 4);
    events as f64 / started.elapsed().as_secs_f64()
}

async fn writer_only(quick: bool) {
    let (runs, events) = if quick { (1, 5_000) } else { (5, 200_000) };
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("audit.log");
    let file = file.to_str().expect("utf-8 path");
    let key = Hasher::Hmac(b"a benchmark key of 32 bytes.....".to_vec());
    let variants: [(&str, &str, Hasher, Fsync); 4] = [
        ("file", file, Hasher::Sha256, Fsync::Never),
        ("/dev/null", "/dev/null", Hasher::Sha256, Fsync::Never),
        ("file + hmac", file, key, Fsync::Never),
        ("file + fsync always", file, Hasher::Sha256, Fsync::Always),
    ];
    let mut best = vec![0f64; variants.len()];
    for _ in 0..runs {
        for (i, (_, path, hasher, fsync)) in variants.iter().enumerate() {
            let _ = std::fs::remove_file(file);
            let rate = writer_run(path, hasher.clone(), *fsync, events).await;
            best[i] = best[i].max(rate);
        }
    }
    println!("audit writer alone, {events} events x {runs} runs (best):");
    for ((name, ..), rate) in variants.iter().zip(&best) {
        println!("  {name:<22} {rate:>10.0} events/s");
    }
    println!(
        "  file / /dev/null       {:>10.2}",
        best[0] / best[1].max(1.0)
    );
}

async fn end_to_end(quick: bool) {
    let (runs, per_client) = if quick { (1, 100) } else { (5, 2_000) };
    let clients = 8;
    let sandbox = portcullis::demo::Sandbox::new().await.expect("sandbox");
    let dir = &sandbox.dir;
    let client =
        portcullis::demo::client_for(&sandbox.set, "checkout", &[b"http/1.1"]).expect("client");
    let mut rates = [0f64; 2];
    for run in 0..runs {
        for (i, target) in ["file", "/dev/null"].iter().enumerate() {
            let audit_path = if *target == "file" {
                dir.path().join(format!("audit-{run}.log"))
            } else {
                Path::new("/dev/null").to_owned()
            };
            let mut config = sandbox.config(&audit_path);
            config.policy.eval_timeout_ms = 10_000;
            let running = portcullis::app::start(config).await.expect("sidecar");
            let addr = running.inbound_addr;
            let started = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|_| tokio::spawn(keep_alive(addr, client.clone(), per_client)))
                .collect();
            for t in tasks {
                t.await.expect("client");
            }
            let rate = (clients * per_client) as f64 / started.elapsed().as_secs_f64();
            rates[i] = rates[i].max(rate);
            running.shutdown().await;
        }
    }
    println!(
        "whole sidecar, {clients} keep-alive clients x {per_client} requests x {runs} runs (best):"
    );
    println!("  trail on a file        {:>10.0} requests/s", rates[0]);
    println!("  trail on /dev/null     {:>10.0} requests/s", rates[1]);
    println!(
        "  file / /dev/null       {:>10.2}",
        rates[0] / rates[1].max(1.0)
    );
}

async fn keep_alive(addr: std::net::SocketAddr, tls: Arc<rustls::ClientConfig>, n: usize) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1");
    tokio::spawn(conn);
    for _ in 0..n {
        let req = http::Request::get("/v1/payments/p1")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .expect("request");
        sender.ready().await.expect("ready");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body");
    }
}
