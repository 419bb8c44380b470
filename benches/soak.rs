//! Soak: does the sidecar hold its memory and file descriptors flat under
//! a long run of churning mTLS connections?
//!
//! The real sidecar (dev certificates, shipped policy, the demo upstream
//! without its request log, audit
//! trail serialised and hashed but written to /dev/null so the disk does not
//! fill) runs in this process. Clients, half HTTP/1.1 and half HTTP/2, each
//! open a fresh mTLS connection for every `PER_CONNECTION` requests. RSS
//! (`VmRSS`) and open descriptors (`/proc/self/fd`) are read at rest, with
//! every client connection closed and the sidecar's open-connection gauge
//! back at zero: cold, after a warm-up (allocator arenas, pools and caches
//! reach their working size there), midway, and at the end. The numbers
//! cover the whole process, clients and upstream included, so they bound
//! the sidecar's own.
//!
//! `cargo bench --bench soak` sends 1,000,000 requests (`-- --requests N` to
//! change that); `cargo test --all-targets` runs a 20,000-request smoke
//! check. Either way it fails if descriptors grow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::app::Running;
use rustls::pki_types::ServerName;

const CLIENTS: usize = 8;
const PER_CONNECTION: usize = 100;
/// Descriptors that may come and go between checkpoints for reasons of
/// their own (the runtime's blocking pool, a lazily opened file).
const FD_NOISE: i64 = 4;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    let full = args.iter().any(|a| a == "--bench");
    let requests = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse::<usize>().expect("--requests takes a number"))
        .unwrap_or(if full { 1_000_000 } else { 20_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(soak(requests));
}

/// One reading of the process at rest.
#[derive(Clone, Copy)]
struct Checkpoint {
    requests: usize,
    rss_kib: i64,
    fds: i64,
}

async fn soak(requests: usize) {
    let sandbox = portcullis::demo::Sandbox::unrecorded()
        .await
        .expect("sandbox");
    let mut config = sandbox.config(std::path::Path::new("/dev/null"));
    // The soak measures leaks, not the policy timeout under a loaded box.
    config.policy.eval_timeout_ms = 10_000;
    let workers = config.inbound.worker_threads() as i64;
    let running = portcullis::app::start(config).await.expect("sidecar");
    let h1 =
        portcullis::demo::client_for(&sandbox.set, "checkout", &[b"http/1.1"]).expect("client");
    let h2 = portcullis::demo::client_for(&sandbox.set, "checkout", &[b"h2"]).expect("client");

    let mut points = vec![at_rest(&running, 0).await];
    let warm_up = (requests / 20).max(CLIENTS * PER_CONNECTION);
    let phases = [warm_up, requests / 2, requests];
    let started = Instant::now();
    let mut sent = 0;
    for target in phases {
        let n = target.saturating_sub(sent);
        let per_client = n / CLIENTS;
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let tls = if i % 2 == 0 { h1.clone() } else { h2.clone() };
                tokio::spawn(client(running.inbound_addr, tls, per_client))
            })
            .collect();
        for t in tasks {
            t.await.expect("client");
        }
        sent += per_client * CLIENTS;
        points.push(at_rest(&running, sent).await);
    }
    let elapsed = started.elapsed();

    println!(
        "soak: {sent} requests, {CLIENTS} clients (HTTP/1.1 and HTTP/2), a new mTLS connection every {PER_CONNECTION}, in {:.1} s ({:.0} requests/s)",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  {:<10} {:>10} {:>12} {:>6}",
        "at", "requests", "VmRSS KiB", "fds"
    );
    for (name, p) in ["cold", "warmed up", "midway", "end"].iter().zip(&points) {
        println!(
            "  {name:<10} {:>10} {:>12} {:>6}",
            p.requests, p.rss_kib, p.fds
        );
    }
    let (warm, end) = (points[1], points[3]);
    println!(
        "  growth after warm-up: RSS {:+} KiB ({:+.1}%), fds {:+}",
        end.rss_kib - warm.rss_kib,
        100.0 * (end.rss_kib - warm.rss_kib) as f64 / warm.rss_kib as f64,
        end.fds - warm.fds
    );
    let m = &running.metrics;
    let ok = m.requests.count("allow", "2xx");
    assert_eq!(
        ok as usize, sent,
        "every request must be allowed and served"
    );
    // Each inbound worker has its own upstream pool, which grows to the
    // most requests that worker has had in flight at once: at most CLIENTS,
    // reached only once the clients' reconnections have spread over the
    // workers, which may be after the warm-up. Each pooled connection is
    // two descriptors here (the demo upstream runs in this process). A leak
    // grows without that bound: by hundreds over the 1,000,000-request run.
    let pools = 2 * CLIENTS as i64 * (workers - 1);
    assert!(
        (end.fds - warm.fds).abs() <= FD_NOISE + pools,
        "descriptors grew from {} to {} (allowed: {FD_NOISE} + {pools} for {workers} workers' upstream pools)",
        warm.fds,
        end.fds
    );
    running.shutdown().await;
}

/// Waits until the sidecar holds no connections, then reads the process.
async fn at_rest(running: &Running, requests: usize) -> Checkpoint {
    let deadline = Instant::now() + Duration::from_secs(10);
    while running.metrics.open_connections.get() != 0 {
        assert!(Instant::now() < deadline, "connections never closed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Checkpoint {
        requests,
        rss_kib: rss_kib(),
        fds: std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as i64)
            .unwrap_or(-1),
    }
}

fn rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(-1)
}

/// `n` requests, a fresh connection every `PER_CONNECTION`.
async fn client(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, n: usize) {
    let mut left = n;
    while left > 0 {
        let batch = left.min(PER_CONNECTION);
        connection(addr, tls.clone(), batch).await;
        left -= batch;
    }
}

async fn connection(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, n: usize) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let request = || {
        let builder = http::Request::get(if h2 {
            "https://localhost/v1/payments/p1"
        } else {
            "/v1/payments/p1"
        });
        let builder = if h2 {
            builder
        } else {
            builder.header("host", "localhost")
        };
        builder.body(Empty::<Bytes>::new()).expect("request")
    };
    let check = |resp: http::Response<hyper::body::Incoming>| async move {
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body");
    };
    if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2");
        let conn = tokio::spawn(conn);
        for _ in 0..n {
            check(sender.send_request(request()).await.expect("response")).await;
        }
        // Closing the sender ends the connection; wait for it so the
        // checkpoint sees it gone.
        drop(sender);
        let _ = conn.await;
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("http/1.1");
        let conn = tokio::spawn(conn);
        for _ in 0..n {
            sender.ready().await.expect("ready");
            check(sender.send_request(request()).await.expect("response")).await;
        }
        drop(sender);
        let _ = conn.await;
    }
}
