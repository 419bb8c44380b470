//! Per-connection timers the proxy owns: the idle keep-alive timeout and the
//! HTTP/1.1 header-read timeout.
//!
//! hyper's own HTTP/1.1 header timer starts whenever the connection waits
//! for a head, idle keep-alive time included, so it cannot tell a slowloris
//! from a pooled client between requests, and HTTP/2 has no idle timer at
//! all. Here a connection is *idle* while no request is in flight and no
//! byte of a new HTTP/1.1 head has arrived; it is *reading a head* from the
//! first such byte until hyper hands the request to the service.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Which connection timer ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No request in flight for the idle timeout: closed gracefully.
    Idle,
    /// An HTTP/1.1 head started but did not finish in time: dropped.
    HeaderRead,
}

/// What the connection is doing, shared by the I/O wrapper, the service and
/// the timer task.
pub struct Activity {
    epoch: Instant,
    /// Requests handed to the service whose response body is not finished.
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` at which the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Milliseconds since `epoch` (plus one; 0 = none) at which the first
    /// byte of a pending HTTP/1.1 head arrived.
    head_started_ms: AtomicU64,
    /// Only HTTP/1.1 has heads between requests worth timing; HTTP/2 reads
    /// frames (PING, SETTINGS) at any time.
    times_heads: bool,
    changed: Notify,
}

impl Activity {
    pub fn new(times_heads: bool) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            times_heads,
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Bytes arrived from the peer.
    fn on_read(&self) {
        if self.times_heads
            && self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_started_ms
                .compare_exchange(
                    0,
                    self.now_ms().saturating_add(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            // The timer task may be sleeping towards a later idle deadline.
            self.changed.notify_one();
        }
    }

    /// hyper parsed a request head and called the service. The returned
    /// guard ends the request when dropped, which [`Tracked`] does once the
    /// response body is finished (or abandoned).
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Release);
        InFlight(self.clone())
    }

    /// Resolves when a timer runs out; pending for as long as the
    /// connection is within its limits.
    pub async fn expired(&self, idle: Duration, header_read: Duration) -> Expired {
        loop {
            let notified = self.changed.notified();
            let seen = self.snapshot();
            let (deadline, verdict) = match seen {
                (head, _, _) if head != 0 => {
                    (self.at(head - 1) + header_read, Some(Expired::HeaderRead))
                }
                (_, 0, since) => (self.at(since) + idle, Some(Expired::Idle)),
                // Busy: nothing can expire before the last request ends,
                // which notifies.
                _ => (Instant::now() + idle, None),
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = notified => continue,
            }
            // A request may have started or ended while the timer slept.
            if let Some(v) = verdict.filter(|_| self.snapshot() == seen) {
                return v;
            }
        }
    }

    fn snapshot(&self) -> (u64, usize, u64) {
        (
            self.head_started_ms.load(Ordering::Acquire),
            self.in_flight.load(Ordering::Acquire),
            self.idle_since_ms.load(Ordering::Acquire),
        )
    }
}

/// One request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.now_ms(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_one();
    }
}

/// A response body that keeps its request in flight until it is finished.
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's byte stream, reporting reads to its [`Activity`].
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_millis(300);
    const HEAD: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn idle_expires_only_without_requests_in_flight() {
        let a = Activity::new(true);
        let busy = a.request_started();
        let early = tokio::time::timeout(IDLE * 2, a.expired(IDLE, HEAD)).await;
        assert!(early.is_err(), "expired with a request in flight");
        drop(busy);
        let started = Instant::now();
        assert_eq!(a.expired(IDLE, HEAD).await, Expired::Idle);
        assert!(started.elapsed() >= IDLE);
    }

    #[tokio::test]
    async fn a_started_head_runs_the_shorter_header_timer() {
        let a = Activity::new(true);
        let timer = tokio::spawn({
            let a = a.clone();
            async move { a.expired(IDLE, HEAD).await }
        });
        // The timer task is asleep towards the idle deadline when the first
        // byte of a head arrives.
        tokio::time::sleep(HEAD).await;
        let started = Instant::now();
        a.on_read();
        assert_eq!(timer.await.unwrap(), Expired::HeaderRead);
        assert!(started.elapsed() < IDLE, "{:?}", started.elapsed());
        // HTTP/2 reads never start a head timer.
        let h2 = Activity::new(false);
        h2.on_read();
        assert_eq!(h2.expired(IDLE, HEAD).await, Expired::Idle);
    }
}
