//! The upstream connections of one inbound worker: HTTP/1.1 keep-alive
//! connections to the local service, each carrying one request at a time.
//!
//! A connection goes back to the pool when its response body has been read
//! to the end; one whose body was abandoned is closed instead, since the
//! rest of that body would still be on the wire. The most recently used
//! connection is taken first, so a burst's extra connections go idle and
//! age out after [`IDLE_TIMEOUT`]. Ageing is checked whenever a connection
//! is taken rather than by a timer: on a quiet worker an old connection lasts
//! until the next request (or until the service closes it), and at most
//! [`MAX_IDLE`] are ever held.
//!
//! This replaces hyper-util's general-purpose client on the data path: per
//! request it hashed a pool key, took its pool lock twice, inserted request
//! extensions and spawned a task to wait for the connection to be ready
//! again, for a pool that only ever holds one address.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::Replay;

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
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The request was sent (at least in part) and the exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl SendError {
    /// No connection could be made: the service is down, not misbehaving.
    pub fn is_connect(&self) -> bool {
        !matches!(self, SendError::Http(_))
    }
}

pub struct Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    sender: SendRequest<RequestBody>,
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
    /// a new one. A request an idle connection turns out unable to carry
    /// (the service closed it meanwhile) is retried on another: it was
    /// never written, so retrying cannot repeat it.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(SendError::Http(e));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let pool = Arc::downgrade(self);
                    return Ok(resp.map(|body| PooledBody::new(body, pool, sender)));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// The most recently used connection that can take a request now.
    /// One that cannot yet (its previous request body is still being sent
    /// after an early response) stays pooled: waiting on it would hold this
    /// request behind someone else's upload.
    fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = lock(&self.idle);
        expire(&mut idle);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].sender.is_closed() {
                idle.remove(i);
            } else if idle[i].sender.is_ready() {
                return idle.remove(i).map(|entry| entry.sender);
            }
        }
        None
    }

    fn put_back(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        // Aged out when the pool is next taken from, which is at least as
        // often as it is given back to: one clock read less per request.
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, SendError> {
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
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| SendError::Handshake { addr, source })?;
        // Driven on this worker: the pool belongs to it. The task ends when
        // the service closes the connection or the last sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
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

/// A response body from the service that returns its connection to the
/// pool once read to the end.
pub struct PooledBody {
    inner: Incoming,
    /// Until the body ends or is dropped.
    conn: Option<(Weak<Pool>, SendRequest<RequestBody>)>,
    ended: bool,
}

impl PooledBody {
    fn new(inner: Incoming, pool: Weak<Pool>, sender: SendRequest<RequestBody>) -> PooledBody {
        PooledBody {
            inner,
            conn: Some((pool, sender)),
            ended: false,
        }
    }

    fn release(&mut self) {
        if let Some((pool, sender)) = self.conn.take() {
            if let Some(pool) = pool.upgrade() {
                pool.put_back(sender);
            }
        }
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("pooled", &self.conn.is_some())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl From<Incoming> for PooledBody {
    /// A body that has no pooled connection to return.
    fn from(inner: Incoming) -> PooledBody {
        PooledBody {
            inner,
            conn: None,
            ended: false,
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) => {
                // The connection is broken; it must not be reused.
                self.conn = None;
            }
            _ => {}
        }
        if self.ended || self.inner.is_end_stream() {
            self.ended = true;
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing left (no body at all, or read to the end) has
        // left the connection ready for the next request. Anything else is
        // closed with the sender: the rest of the body is still on the wire.
        if self.ended || self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
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

    #[tokio::test]
    async fn a_connection_still_busy_is_not_handed_out_and_stays_pooled() {
        // Accepts and never answers: a request sent on it stays in flight.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let pool = Pool::new(addr, Duration::from_secs(1));
        let mut busy = pool.connect().await.unwrap();
        busy.ready().await.unwrap();
        let in_flight = tokio::spawn(busy.try_send_request(get()));
        tokio::task::yield_now().await;
        assert!(!busy.is_ready());
        pool.put_back(busy);
        assert_eq!(pool.idle_len(), 1);
        assert!(pool.take_idle().is_none());
        assert_eq!(pool.idle_len(), 1);
        in_flight.abort();
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
