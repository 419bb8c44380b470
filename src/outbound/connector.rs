//! Opens one mTLS connection to a route: resolve, TCP connect, handshake
//! with the current own SVID, then require the server's verified SPIFFE ID
//! to be one the route accepts. hyper-util's pool calls it only when no
//! idle connection to the route is left.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::route::RouteSpec;
use crate::audit::{self, AuditSink, Event};
use crate::identity::{IdentitySnapshot, SpiffeId};
use crate::metrics;
use crate::tls::{self, PeerIdentity};

/// Why no connection to a route could be made. The `label` of each is its
/// metric label value.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {address}: {source}")]
    Resolve { address: String, source: io::Error },
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("no mTLS connection to {address} within {after:?}")]
    Timeout { address: String, after: Duration },
    #[error("server at {address} refused as {reason}: {message}")]
    Handshake {
        address: String,
        reason: &'static str,
        message: String,
    },
    #[error("server at {address} is {presented}, but the route requires {expected}")]
    WrongServer {
        address: String,
        presented: SpiffeId,
        expected: String,
    },
}

impl ConnectError {
    /// The server could not prove the identity its route requires: the
    /// request is refused (502) rather than the route being unavailable.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ConnectError::Handshake { .. } | ConnectError::WrongServer { .. }
        )
    }

    /// `portcullis_outbound_upstream_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } => "resolve",
            // `timeout` is kept for requests the server did not answer.
            ConnectError::Connect { .. } | ConnectError::Timeout { .. } => "connect",
            ConnectError::Handshake { .. } | ConnectError::WrongServer { .. } => "refused",
        }
    }
}

/// Everything a connection to one route needs, passed in by the app.
pub struct Settings {
    pub route: RouteSpec,
    pub identity: Arc<ArcSwap<IdentitySnapshot>>,
    pub connect_timeout: Duration,
    pub metrics: metrics::Outbound,
    pub audit: AuditSink,
}

/// A hyper-util connector bound to one route.
#[derive(Clone)]
pub struct Connector {
    settings: Arc<Settings>,
}

/// The verified server of a connection; hyper-util copies it into the
/// extensions of every response received on that connection.
#[derive(Debug, Clone)]
pub struct ServerPeer(pub PeerIdentity);

impl Connector {
    pub fn new(settings: Settings) -> Connector {
        Connector {
            settings: Arc::new(settings),
        }
    }

    async fn connect(settings: Arc<Settings>) -> Result<Conn, ConnectError> {
        let s = &settings;
        let address = s.route.address.clone();
        // The snapshot is read per connection: a rotated SVID is presented
        // from the next new connection on, pooled ones keep theirs.
        let identity = s.identity.load_full();
        let attempt = async {
            let tcp = connect_tcp(&address).await?;
            let name = server_name(&s.route.host);
            TlsConnector::from(identity.client_config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    let (failure, message) = tls::classify_handshake_error(&e);
                    let reason = failure.label();
                    settings.refused(reason, tls::presented_spiffe_id(&e), &message);
                    ConnectError::Handshake {
                        address: address.clone(),
                        reason,
                        message,
                    }
                })
        };
        let stream = match tokio::time::timeout(s.connect_timeout, attempt).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                s.metrics.handshakes.with_label_values(&["timeout"]).inc();
                return Err(ConnectError::Timeout {
                    address,
                    after: s.connect_timeout,
                });
            }
        };
        let (_, conn) = stream.get_ref();
        // The verifier already admitted the chain, so an ID is always there;
        // checked anyway rather than assumed.
        let Some(server) = tls::server_identity(conn) else {
            let message = "no SPIFFE ID in the verified server certificate";
            s.refused("bad_svid", None, message);
            return Err(ConnectError::Handshake {
                address,
                reason: "bad_svid",
                message: message.into(),
            });
        };
        if !s.route.server.matches(&server.spiffe_id) {
            let expected = s.route.server.describe();
            let message = format!("presented {}, route requires {expected}", server.spiffe_id);
            s.refused(
                "wrong_server_id",
                Some(server.spiffe_id.to_string()),
                &message,
            );
            return Err(ConnectError::WrongServer {
                address,
                presented: server.spiffe_id,
                expected,
            });
        }
        s.metrics.handshakes.with_label_values(&["ok"]).inc();
        let h2 = conn.alpn_protocol() == Some(b"h2");
        tracing::debug!(route = %s.route.host, server = %server.spiffe_id, h2, "outbound connection established");
        Ok(Conn {
            io: TokioIo::new(stream),
            h2,
            server: ServerPeer(server),
        })
    }
}

impl Settings {
    /// Counts and audits a server that did not prove the route's identity.
    fn refused(&self, reason: &str, presented: Option<String>, message: &str) {
        self.metrics.handshakes.with_label_values(&[reason]).inc();
        let message = audit::redact_pans(message);
        tracing::warn!(
            route = %self.route.host,
            address = %self.route.address,
            presented = ?presented,
            reason,
            "outbound connection refused: {message}"
        );
        self.audit.record(Event::egress_refused(
            audit::Destination {
                host: self.route.host.clone(),
                address: self.route.address.clone(),
                spiffe_id: presented,
                expected: self.route.server.describe(),
            },
            reason,
            &message,
        ));
    }
}

/// Resolved on every new connection, so a DNS change is followed without a
/// restart; each resolved address is tried in turn.
async fn connect_tcp(address: &str) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|source| ConnectError::Resolve {
            address: address.to_owned(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = e,
        }
    }
    Err(ConnectError::Connect {
        address: address.to_owned(),
        source: last,
    })
}

/// SNI for the route's host. SPIFFE servers are verified by ID, not by this
/// name; it only helps a server that multiplexes by SNI.
fn server_name(host: &str) -> ServerName<'static> {
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::from(std::net::IpAddr::from([127, 0, 0, 1])))
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// The URI is ignored: a connector serves exactly one route.
    fn call(&mut self, _: http::Uri) -> Self::Future {
        Box::pin(Connector::connect(self.settings.clone()))
    }
}

// === impl Conn ===

/// An established, verified connection to a route's server.
pub struct Conn {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
    server: ServerPeer,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let connected = Connected::new().extra(self.server.clone());
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
