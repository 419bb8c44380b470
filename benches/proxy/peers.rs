//! The proxies a user would pick instead, each terminating mTLS with the
//! same dev certificates and forwarding to the same upstream, tuned the
//! way /work/shared/PEERS.md says a competent operator would: two workers
//! (the machine has two cores; `--workers` changes it for every proxy),
//! pooled keep-alive upstream connections, no access log (Portcullis' audit
//! trail is its own extra work, measured separately as audit on vs off).
//!
//! A peer that is not installed is skipped with a message; `scripts/bench.sh`
//! installs them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::targets::{find_exe, free_port, Certs, Target};

/// How each peer is started: its directory, the certificates, the
/// upstream, the worker count. `None` when it is not installed.
pub type Start = fn(&Path, &Certs, SocketAddr, usize) -> Option<Target>;

pub fn nginx(dir: &Path, certs: &Certs, upstream: SocketAddr, workers: usize) -> Option<Target> {
    let (exe, dir) = installed("nginx", dir)?;
    let port = free_port();
    // keepalive_requests: nginx closes a client connection after 1000
    // requests by default; Portcullis never does, and a closed-loop run
    // would otherwise measure reconnects.
    // reuseport: a listening socket per worker, so the kernel spreads the
    // connections over the workers. With one shared socket whichever worker
    // woke first took most of a burst of connects, and nginx's rate moved
    // between 42k and 62k requests/s from one round to the next.
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    upstream service {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        location / {{
            proxy_pass http://service;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        dir = dir.display(),
        cert = certs.server_cert.display(),
        key = certs.server_key.display(),
        bundle = certs.set.bundle.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let child = Command::new(exe)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    // A master and its workers.
    Target::started(
        "nginx",
        child,
        SocketAddr::from(([127, 0, 0, 1], port)),
        workers + 1,
    )
}

pub fn haproxy(dir: &Path, certs: &Certs, upstream: SocketAddr, workers: usize) -> Option<Target> {
    let (exe, dir) = installed("haproxy", dir)?;
    // haproxy wants the chain and its key in one file.
    let pem = dir.join("server.pem");
    let mut both = std::fs::read(&certs.server_cert).expect("server cert");
    both.extend(std::fs::read(&certs.server_key).expect("server key"));
    std::fs::write(&pem, both).expect("write server.pem");
    let port = free_port();
    // maxconn: haproxy wants twice as many file descriptors as connections
    // plus a few, and refuses to start above the process limit (9,900 at
    // a 20,000 limit, which still holds the idle mode's 9,000).
    let maxconn = crate::open_file_limit().map_or(9_900, |limit| limit.saturating_sub(200) / 2);
    let conf = format!(
        r#"global
    nbthread {workers}
    maxconn {maxconn}
    tune.ssl.cachesize 20000

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend mtls
    bind 127.0.0.1:{port} ssl crt {pem} ca-file {bundle} verify required alpn http/1.1
    default_backend service

backend service
    http-reuse always
    server up {upstream}
"#,
        pem = pem.display(),
        bundle = certs.set.bundle.display(),
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).expect("write haproxy.cfg");
    let child = Command::new(exe)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).expect("log"))
        .spawn()
        .expect("start haproxy");
    let mut target = Target::started(
        "haproxy",
        child,
        SocketAddr::from(([127, 0, 0, 1], port)),
        1,
    )?;
    // Past maxconn, connections wait in the accept queue until the idle
    // mode gives up on them.
    target.max_connections = usize::try_from(maxconn).ok();
    Some(target)
}

/// Envoy, the mesh sidecar, doing what Portcullis does short of policy and
/// audit: the caller's SVID checked by its SPIFFE validator against the
/// trust domain's bundle, an RBAC filter allowing the checkout workload to
/// `GET /v1/payments/...` (the shipped policy's rule for this request), the
/// verified identity forwarded in `x-forwarded-client-cert` with any the
/// caller sent removed (`SANITIZE_SET`), and pooled keep-alive connections to
/// the upstream. `--concurrency` gives it the same worker count, and it has
/// no access log. Envoy also adds its own `x-request-id` to each request.
pub fn envoy(dir: &Path, certs: &Certs, upstream: SocketAddr, workers: usize) -> Option<Target> {
    let (exe, dir) = installed("envoy", dir)?;
    let port = free_port();
    let conf = format!(
        r#"static_resources:
  listeners:
  - name: mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: ["http/1.1"]
            tls_certificates:
            - certificate_chain: {{ filename: "{cert}" }}
              private_key: {{ filename: "{key}" }}
            validation_context:
              custom_validator_config:
                name: envoy.tls.cert_validator.spiffe
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig
                  trust_domains:
                  - name: "{trust_domain}"
                    trust_bundle: {{ filename: "{bundle}" }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: HTTP1
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{ uri: true }}
          route_config:
            virtual_hosts:
            - name: service
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: service }}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  checkout-reads-payments:
                    permissions:
                    - and_rules:
                        rules:
                        - header: {{ name: ":method", string_match: {{ exact: GET }} }}
                        - url_path: {{ path: {{ prefix: /v1/payments/ }} }}
                    principals:
                    - authenticated:
                        principal_name: {{ exact: "spiffe://{trust_domain}/ns/shop/sa/checkout" }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: service
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: service
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{ socket_address: {{ address: {ip}, port_value: {upstream_port} }} }}
"#,
        cert = certs.server_cert.display(),
        key = certs.server_key.display(),
        bundle = certs.set.bundle.display(),
        trust_domain = certs.set.trust_domain,
        ip = upstream.ip(),
        upstream_port = upstream.port(),
    );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, conf).expect("write envoy.yaml");
    let child = Command::new(exe)
        .arg("-c")
        .arg(&path)
        .arg("--concurrency")
        .arg(workers.to_string())
        .arg("--disable-hot-restart")
        .arg("--log-level")
        .arg("warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("envoy.log")).expect("log"))
        .spawn()
        .expect("start envoy");
    Target::started("envoy", child, SocketAddr::from(([127, 0, 0, 1], port)), 1)
}

/// The peer's executable and a fresh directory for its files, or `None`
/// (said on stdout) when it is not installed.
fn installed(name: &str, dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let Some(exe) = find_exe(name) else {
        println!("{name}: not installed, skipped (scripts/bench.sh installs it)");
        return None;
    };
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).expect("peer dir");
    Some((exe, dir))
}
