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

/// Where a deadline too far to represent is put.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

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
    idle_ms: u64,
    header_read_ms: u64,
    /// Milliseconds since `epoch` at which the timer task wakes next
    /// (`u64::MAX` while it is choosing). Lets a starting head wake the
    /// timer only when its deadline is earlier than that.
    wake_at_ms: AtomicU64,
    /// Wakes the timer for an earlier deadline.
    sooner: Notify,
}

impl Activity {
    pub fn new(times_heads: bool, idle: Duration, header_read: Duration) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(0),
            times_heads,
            idle_ms: millis(idle),
            header_read_ms: millis(header_read),
            wake_at_ms: AtomicU64::new(u64::MAX),
            sooner: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    fn at(&self, ms: u64) -> Instant {
        // A configured timeout of centuries means never.
        self.epoch
            .checked_add(Duration::from_millis(ms))
            .unwrap_or_else(|| self.epoch + FAR_FUTURE)
    }

    /// Bytes arrived from the peer.
    fn on_read(&self) {
        if !self.times_heads || self.in_flight.load(Ordering::Acquire) != 0 {
            return;
        }
        let now = self.now_ms();
        let started = self.head_started_ms.compare_exchange(
            0,
            now.saturating_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // Only a timer asleep towards a later deadline (the idle one) needs
        // waking; on a busy keep-alive connection it is already due sooner,
        // and waking it would poll the whole connection once more.
        let deadline = now.saturating_add(self.header_read_ms);
        if started.is_ok() && deadline < self.wake_at_ms.load(Ordering::SeqCst) {
            self.sooner.notify_one();
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
    ///
    /// The timer never needs waking when a deadline moves later, only when
    /// one comes sooner: it sleeps at most until the earliest deadline the
    /// connection could have, then looks again. A request that ends can only
    /// start the idle time, due no sooner than `idle` from now; a head that
    /// starts while the timer sleeps for a busy connection is due no sooner
    /// than `header_read` from now. So a busy connection's timer sleeps for
    /// the shorter of the two, and only a head starting on an idle
    /// connection wakes it (see `on_read`).
    pub async fn expired(&self) -> Expired {
        let busy_nap = if self.times_heads {
            self.idle_ms.min(self.header_read_ms)
        } else {
            self.idle_ms
        }
        .max(1);
        loop {
            let sooner = self.sooner.notified();
            tokio::pin!(sooner);
            // A head starting from here on wakes the timer; `notify_one`
            // keeps the wake-up for `sooner` if it comes before the await.
            self.wake_at_ms.store(u64::MAX, Ordering::SeqCst);
            let seen = self.snapshot();
            let now = self.now_ms();
            let (due, verdict) = match seen {
                (head, _, _) if head != 0 => (
                    (head - 1).saturating_add(self.header_read_ms),
                    Some(Expired::HeaderRead),
                ),
                (_, 0, since) => (since.saturating_add(self.idle_ms), Some(Expired::Idle)),
                _ => (now.saturating_add(busy_nap), None),
            };
            if let Some(v) = verdict.filter(|_| due <= now) {
                return v;
            }
            self.wake_at_ms.store(due, Ordering::SeqCst);
            tokio::select! {
                _ = tokio::time::sleep_until(self.at(due)) => {}
                _ = &mut sooner => {}
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
        // No wake-up for the timer: the idle deadline this starts is no
        // sooner than the one it is already asleep towards.
        a.idle_since_ms.store(a.now_ms(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
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
        let a = Activity::new(true, IDLE, HEAD);
        let busy = a.request_started();
        let early = tokio::time::timeout(IDLE * 2, a.expired()).await;
        assert!(early.is_err(), "expired with a request in flight");
        drop(busy);
        let started = Instant::now();
        assert_eq!(a.expired().await, Expired::Idle);
        assert!(started.elapsed() >= IDLE);
    }

    #[tokio::test]
    async fn a_started_head_runs_the_shorter_header_timer() {
        let a = Activity::new(true, IDLE, HEAD);
        let timer = tokio::spawn({
            let a = a.clone();
            async move { a.expired().await }
        });
        // The timer task is asleep towards the idle deadline when the first
        // byte of a head arrives.
        tokio::time::sleep(HEAD).await;
        let started = Instant::now();
        a.on_read();
        assert_eq!(timer.await.unwrap(), Expired::HeaderRead);
        assert!(started.elapsed() < IDLE, "{:?}", started.elapsed());
        // HTTP/2 reads never start a head timer.
        let h2 = Activity::new(false, IDLE, HEAD);
        h2.on_read();
        assert_eq!(h2.expired().await, Expired::Idle);
    }

    #[tokio::test]
    async fn a_head_started_while_the_timer_naps_for_a_busy_connection_is_timed() {
        let a = Activity::new(true, IDLE, HEAD);
        let busy = a.request_started();
        let timer = tokio::spawn({
            let a = a.clone();
            async move { a.expired().await }
        });
        // The request ends and the next head starts without waking the
        // timer; it must still look again before the head's deadline.
        tokio::time::sleep(HEAD / 5).await;
        drop(busy);
        let started = Instant::now();
        a.on_read();
        assert_eq!(timer.await.unwrap(), Expired::HeaderRead);
        let took = started.elapsed();
        assert!(took >= HEAD && took < IDLE, "{took:?}");
    }
}
