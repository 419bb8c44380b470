//! The upstream connections of one inbound worker: HTTP/1.1 keep-alive
//! connections to the local service, each carrying one exchange at a time
//! (`exchange.rs`).
//!
//! A connection goes back to the pool when its exchange ended cleanly
//! (both bodies read or written to where their framing said, nothing left
//! over); one whose response body was abandoned is closed instead, since
//! the rest of that body would still be on the wire. The most recently used
//! connection is taken first, so a burst's extra connections go idle and
//! age out after [`IDLE_TIMEOUT`]. Ageing is checked whenever a connection
//! is taken rather than by a timer: on a quiet worker an old connection lasts
//! until the next request (or until the service closes it), and at most
//! [`MAX_IDLE`] are ever held.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use super::body::Replay;
use super::exchange::{self, Conn, Exchange, ExchangeError, Outgoing};

/// What a request to the service carries.
pub type RequestBody = Limited<Replay>;

/// An idle connection unused for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept per worker; more are closed when returned. A
/// burst above this opens connections that do not outlive it.
const MAX_IDLE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} took longer than {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    /// The request was sent (at least in part) and the exchange failed.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
}

impl SendError {
    /// No connection could be made: the service is down, not misbehaving.
    pub fn is_connect(&self) -> bool {
        !matches!(self, SendError::Exchange(_))
    }
}

pub struct Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Pool {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
        })
    }

    /// A pool for the same service holding no connections: each worker's
    /// connections must be driven by that worker's runtime.
    pub fn empty_twin(&self) -> Arc<Pool> {
        Pool::new(self.addr, self.connect_timeout)
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or
    /// a new one. A safe bodiless request whose pooled connection closed
    /// before any answer is sent once more on a fresh connection: that is
    /// how a service's idle-timeout close looks when it crosses a request.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let mut out = Outgoing::new(req)?;
        let mut reused = true;
        loop {
            // A resend goes on a new connection: an idle one could be as
            // stale as the last.
            let idle = if reused { self.take_idle() } else { None };
            let conn = match idle {
                Some(conn) => conn,
                None => {
                    reused = false;
                    self.connect().await?
                }
            };
            match exchange::send(conn, out).await {
                Ok(resp) => {
                    let pool = Arc::downgrade(self);
                    return Ok(resp.map(|exchange| PooledBody::service(exchange, pool)));
                }
                Err(failed) => match failed.retry {
                    Some(again) if reused => {
                        tracing::debug!(error = %failed.error, "pooled upstream connection closed under a request; sending it again");
                        out = again;
                        reused = false;
                    }
                    _ => return Err(failed.error.into()),
                },
            }
        }
    }

    /// The most recently used connection still fit to carry a request.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = lock(&self.idle);
        expire(&mut idle);
        while let Some(mut entry) = idle.pop_back() {
            if entry.conn.is_usable() {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put_back(&self, conn: Conn) {
        // Aged out when the pool is next taken from, which is at least as
        // often as it is given back to: one clock read less per request.
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let addr = self.addr;
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => return Err(SendError::Connect { addr, source }),
            Err(_) => {
                return Err(SendError::ConnectTimeout {
                    addr,
                    after: self.connect_timeout,
                })
            }
        };
        let _ = tcp.set_nodelay(true);
        Ok(Conn::new(tcp))
    }

    /// Idle connections now (for tests).
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// Drops the oldest idle connections past their time (the front of the
/// queue is the least recently used).
fn expire(idle: &mut VecDeque<Idle>) {
    while idle
        .front()
        .is_some_and(|entry| entry.since.elapsed() >= IDLE_TIMEOUT)
    {
        idle.pop_front();
    }
}

/// A poisoned lock only means a panic elsewhere between a push and a pop;
/// the queue itself is still a valid queue.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A response body: from the service, returning its connection to the
/// pool once the exchange has ended cleanly; or from hyper's client (the
/// outbound side), passed through.
pub struct PooledBody(Source);

enum Source {
    Service {
        /// Until the exchange ends, fails or is given back.
        exchange: Option<Box<Exchange>>,
        pool: Weak<Pool>,
    },
    Client(Incoming),
}

impl PooledBody {
    fn service(exchange: Box<Exchange>, pool: Weak<Pool>) -> PooledBody {
        let mut body = PooledBody(Source::Service {
            exchange: Some(exchange),
            pool,
        });
        // A response without a body is over already, and hyper may never
        // poll a body that says so.
        body.release_if_done();
        body
    }

    fn release_if_done(&mut self) {
        if let Source::Service { exchange, pool } = &mut self.0 {
            if exchange.as_deref().is_some_and(Exchange::is_done) {
                let conn = exchange.take().and_then(Exchange::into_reusable);
                if let (Some(conn), Some(pool)) = (conn, pool.upgrade()) {
                    pool.put_back(conn);
                }
            }
        }
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Source::Service { exchange, .. } => f
                .debug_struct("PooledBody")
                .field("exchange", exchange)
                .finish_non_exhaustive(),
            Source::Client(_) => f.debug_struct("PooledBody").finish_non_exhaustive(),
        }
    }
}

impl From<Incoming> for PooledBody {
    /// A body from hyper's client, with no pooled connection to return.
    fn from(inner: Incoming) -> PooledBody {
        PooledBody(Source::Client(inner))
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.0 {
            Source::Client(inner) => {
                return Pin::new(inner)
                    .poll_frame(cx)
                    .map(|frame| frame.map(|f| f.map_err(Into::into)));
            }
            Source::Service { exchange: None, .. } => return Poll::Ready(None),
            Source::Service {
                exchange: Some(exchange),
                ..
            } => Pin::new(exchange).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                // The connection is broken; it must not be reused.
                if let Source::Service { exchange, .. } = &mut this.0 {
                    *exchange = None;
                }
            }
            // Given back as soon as the last byte is read, before the
            // caller's next request can want it.
            Poll::Ready(_) => this.release_if_done(),
            Poll::Pending => {}
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Source::Client(inner) => inner.is_end_stream(),
            Source::Service { exchange, .. } => exchange.as_deref().is_none_or(Exchange::is_done),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Source::Client(inner) => inner.size_hint(),
            Source::Service {
                exchange: Some(exchange),
                ..
            } => exchange.size_hint(),
            Source::Service { exchange: None, .. } => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A service that answers every request on a connection with `body`
    /// and counts the connections it accepted.
    async fn service(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(body.as_bytes()),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header("host", "service")
            .body(Limited::new(Replay::empty(), 1024))
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_reused_and_an_abandoned_one_is_not() {
        let (addr, accepted) = service("hello").await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        for _ in 0..3 {
            let body = pool.send(get()).await.unwrap().into_body();
            assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_len(), 1);

        // Head read, body dropped unread: that connection is not pooled.
        let resp = pool.send(get()).await.unwrap();
        assert_eq!(pool.idle_len(), 0);
        drop(resp);
        assert_eq!(pool.idle_len(), 0);
        let body = pool.send(get()).await.unwrap().into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_service_closed_while_idle_is_replaced_without_failing_the_request() {
        // Answers one request per connection, then closes it without
        // saying so (no `connection: close`).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = vec![0; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tcp.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(tcp);
            }
        });
        let pool = Pool::new(addr, Duration::from_secs(1));
        for _ in 0..3 {
            // The closed connection was pooled; the next request must
            // not fail on it.
            let body = pool.send(get()).await.unwrap().into_body();
            assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
        }
    }

    /// Answers the first request on each connection and closes the
    /// connection when the second arrives, unanswered: a service's idle
    /// timeout crossing a request.
    async fn closes_under_the_second_request() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let mut read = Vec::new();
                    for answer in [true, false] {
                        while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&buf[..n]),
                            }
                        }
                        read.clear();
                        if answer {
                            let _ = tcp
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn with_method(method: http::Method) -> Request<RequestBody> {
        let mut req = get();
        *req.method_mut() = method;
        req
    }

    #[tokio::test]
    async fn a_safe_request_is_sent_again_when_its_pooled_connection_closes_under_it_and_a_post_is_not(
    ) {
        let (addr, accepted) = closes_under_the_second_request().await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        let first = pool.send(get()).await.unwrap().into_body();
        assert_eq!(first.collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(pool.idle_len(), 1);
        // Sent on the pooled connection, which closes unanswered; sent
        // again on a new one.
        let again = pool.send(get()).await.unwrap().into_body();
        assert_eq!(again.collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);

        // The service may have acted on a POST before closing: never
        // repeated, the caller gets the error.
        assert_eq!(pool.idle_len(), 1);
        let e = pool
            .send(with_method(http::Method::POST))
            .await
            .unwrap_err();
        assert!(!e.is_connect(), "{e}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_service_is_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let pool = Pool::new(addr, Duration::from_secs(1));
        let e = pool.send(get()).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
