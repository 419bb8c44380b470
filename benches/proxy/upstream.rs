//! The fast upstream every target forwards to: a minimal hyper server that
//! answers every request with the same small JSON body.
//!
//! It runs as a child process (this bench binary re-executed with
//! `--upstream`), so its CPU time is never counted as the proxy's, and the
//! load generator's runtime does not share threads with it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::targets::{bind_announced, spawn_announcing, Stopper};

pub const FLAG: &str = "--upstream";

const BODY: &[u8] = br#"{"service":"payments","id":"pay_1001","status":"ok","amount":4200}"#;

/// The child's side: bind, say where on stdout, serve until killed.
pub fn serve() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("upstream runtime");
    rt.block_on(async {
        let listener = bind_announced().await;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: hyper::Request<Incoming>| async {
                    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(BODY)));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}

/// The parent's side: start the child and read its address.
pub fn spawn() -> (Stopper, SocketAddr) {
    let mut command = Command::new(std::env::current_exe().expect("own executable"));
    command.arg(FLAG);
    let (child, addr) = spawn_announcing(command, "upstream");
    (Stopper(child), addr)
}
