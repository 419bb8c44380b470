//! The floor: the least an mTLS proxy in front of the upstream can do. It
//! terminates mTLS with the same certificates (the client chain verified
//! against the bundle, as nginx and haproxy do) and copies bytes both ways
//! over one upstream TCP connection per client connection. No HTTP, no
//! policy, no audit, no identity headers.
//!
//! What it adds over `direct` is the price of the hop itself on this
//! machine: the TLS records, a second loopback connection and the wake-ups
//! of a process in between. A proxy that terminates TLS in user space and
//! opens a second connection cannot add less, so where this target misses
//! a latency goal, the goal is out of reach here for every such proxy.
//!
//! It runs as a child process (this bench binary re-executed with
//! `--relay`), like the upstream, so its CPU time is counted on its own.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::targets::{bind_announced, spawn_announcing, Certs, Target};

pub const FLAG: &str = "--relay";

/// The child's side: `--relay UPSTREAM CERT KEY BUNDLE WORKERS`. Binds,
/// says where on stdout, serves until killed.
pub fn serve(args: &[String]) {
    let [upstream, cert, key, bundle, workers] = args else {
        panic!("usage: {FLAG} UPSTREAM CERT KEY BUNDLE WORKERS");
    };
    let upstream: SocketAddr = upstream.parse().expect("upstream address");
    let workers: usize = workers.parse().expect("worker count");
    let acceptor = TlsAcceptor::from(server_config(
        Path::new(cert),
        Path::new(key),
        Path::new(bundle),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("relay runtime");
    rt.block_on(async {
        let listener = bind_announced().await;
        loop {
            // Out of descriptors in the idle mode: the client's connect
            // waits in the queue and gives up; the relay goes on.
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut service) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = service.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut service).await;
            });
        }
    });
}

fn server_config(cert: &Path, key: &Path, bundle: &Path) -> Arc<rustls::ServerConfig> {
    let chain = portcullis::identity::read_certs("relay cert", cert).expect("relay cert");
    let key = portcullis::identity::read_key("relay key", key).expect("relay key");
    let mut roots = rustls::RootCertStore::empty();
    for anchor in portcullis::identity::read_certs("bundle", bundle).expect("bundle") {
        roots.add(anchor).expect("trust anchor");
    }
    let provider = portcullis::tls::crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The parent's side: start the child and wait for its address.
pub fn start(certs: &Certs, upstream: SocketAddr, workers: usize) -> Option<Target> {
    let mut command = Command::new(std::env::current_exe().expect("own executable"));
    command
        .arg(FLAG)
        .arg(upstream.to_string())
        .arg(&certs.server_cert)
        .arg(&certs.server_key)
        .arg(&certs.set.bundle)
        .arg(workers.to_string());
    let (child, addr) = spawn_announcing(command, "relay");
    let mut target = Target::started("relay", child, addr, 1)?;
    // Two descriptors per client connection (its own and the upstream's):
    // the idle mode holds what the open-file limit leaves room for.
    target.max_connections = crate::open_file_limit()
        .and_then(|limit| usize::try_from(limit.saturating_sub(200) / 2).ok());
    Some(target)
}
