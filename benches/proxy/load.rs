//! The load generator: HTTP/1.1 over mTLS (the checkout SVID, the dev
//! bundle) or plain TCP for the direct path, in three modes.
//!
//! Latencies are recorded in microseconds in an HDR histogram.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One keep-alive connection, and whether its requests carry a trace id.
pub struct Sender {
    inner: SendRequest<Empty<Bytes>>,
    traced: bool,
}

/// A path the shipped policy allows for checkout, so every target does
/// the whole job: verify, decide, forward.
const PATH: &str = "/v1/payments/pay_1001";

/// Results after this long past the end of an open-loop run are given up
/// on and counted as errors: a target that cannot keep up would otherwise
/// keep the run going for as long as its backlog.
const OPEN_LOOP_GRACE: Duration = Duration::from_secs(5);

const IDLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one measurement window produced.
pub struct Sample {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl Sample {
    pub fn empty() -> Sample {
        Sample {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        }
    }

    fn record(&mut self, latency: Duration) {
        self.requests += 1;
        // Saturates at the upper bound rather than dropping the outlier.
        self.latency_us
            .saturating_record(latency.as_micros() as u64);
    }

    pub fn merge(&mut self, other: Sample) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency_us
            .add(&other.latency_us)
            .expect("same histogram bounds");
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How to reach one target.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    traced: bool,
}

/// Trace ids handed out so far: each request's is new, as a service
/// instrumented with OpenTelemetry sends them.
static TRACES: AtomicU64 = AtomicU64::new(0);

impl Client {
    pub fn new(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> Client {
        Client {
            addr,
            tls,
            traced: false,
        }
    }

    /// Every request with a `traceparent` of its own.
    pub fn traced(mut self, on: bool) -> Client {
        self.traced = on;
        self
    }

    async fn connect(&self) -> Result<Sender, Error> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = match &self.tls {
            None => {
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                (s, tokio::spawn(c))
            }
            Some(tls) => {
                let name = ServerName::try_from("localhost")?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await?;
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                (s, tokio::spawn(c))
            }
        };
        // The connection task ends by itself once the sender is dropped.
        drop(conn);
        Ok(Sender {
            inner: sender,
            traced: self.traced,
        })
    }

    async fn request(sender: &mut Sender) -> Result<(), Error> {
        let status = Self::send(sender).await?;
        if status != http::StatusCode::OK {
            return Err(format!("status {status}").into());
        }
        Ok(())
    }

    /// The status of one request for the bench's path on a fresh
    /// connection.
    pub async fn status(&self) -> Result<http::StatusCode, Error> {
        Self::send(&mut self.connect().await?).await
    }

    async fn send(sender: &mut Sender) -> Result<http::StatusCode, Error> {
        let mut req = http::Request::get(PATH).header(http::header::HOST, "localhost");
        if sender.traced {
            // Random-looking hex, as real trace and span ids are: a counter
            // would put long runs of zeros in them.
            let n = TRACES.fetch_add(1, Ordering::Relaxed);
            let (trace, span) = (mix(n), mix(!n));
            req = req.header(
                "traceparent",
                format!("00-4bf92f3577b34da6{trace:016x}-{span:016x}-01"),
            );
        }
        let req = req.body(Empty::new())?;
        sender.inner.ready().await?;
        let resp = sender.inner.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok(status)
    }

    async fn connections(&self, n: usize) -> Vec<Sender> {
        join_all((0..n).map(|_| self.connect()))
            .await
            .into_iter()
            .map(|c| c.expect("open a keep-alive connection"))
            .collect()
    }
}

/// splitmix64's finalizer: distinct inputs, well-spread outputs.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// (a) Closed loop: `connections` keep-alive connections, each sending its
/// next request as soon as the previous answer arrived.
pub async fn closed_loop(client: &Client, connections: usize, duration: Duration) -> Sample {
    let senders = client.connections(connections).await;
    let started = Instant::now();
    let end = started + duration;
    let tasks = senders.into_iter().map(|mut sender| {
        tokio::spawn(async move {
            let mut sample = Sample::empty();
            while Instant::now() < end {
                let sent = Instant::now();
                match Client::request(&mut sender).await {
                    Ok(()) => sample.record(sent.elapsed()),
                    Err(_) => {
                        // A broken connection stays broken: stop this one
                        // rather than spin on errors.
                        sample.errors += 1;
                        break;
                    }
                }
            }
            sample
        })
    });
    collect(join_all(tasks).await, started)
}

/// (b) Open loop at `rate` requests/s spread over `connections` keep-alive
/// connections (round robin, as wrk2 does). Latency counts from when a
/// request was scheduled, not from when it was sent, so a stalled target
/// is charged for the requests queued behind the stall (coordinated
/// omission corrected).
///
/// The schedule is kept by an OS thread with `thread::sleep`, which is
/// precise to ~0.1 ms; tokio's timer has 1 ms ticks, which would add up to
/// 1 ms of the generator's own lateness to every measured latency.
pub async fn open_loop(
    client: &Client,
    connections: usize,
    rate: f64,
    duration: Duration,
) -> Sample {
    let senders = client.connections(connections).await;
    let started = Instant::now();
    let give_up = started + duration + OPEN_LOOP_GRACE;
    let (queues, tasks): (Vec<_>, Vec<_>) = senders
        .into_iter()
        .map(|mut sender| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
            let task = tokio::spawn(async move {
                let mut sample = Sample::empty();
                let mut broken = false;
                while let Some(scheduled) = rx.recv().await {
                    if broken || Instant::now() > give_up {
                        sample.errors += 1;
                        continue;
                    }
                    match Client::request(&mut sender).await {
                        Ok(()) => sample.record(scheduled.elapsed()),
                        Err(_) => {
                            sample.errors += 1;
                            broken = true;
                        }
                    }
                }
                sample
            });
            (tx, task)
        })
        .unzip();
    let total = (rate * duration.as_secs_f64()) as u64;
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let at = started + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            // A closed queue means its worker is gone: nothing to count.
            let _ = queues[i as usize % queues.len()].send(at);
        }
    });
    let results = join_all(tasks).await;
    pacer.join().expect("pacer thread");
    collect(results, started)
}

/// (c) New connections: `workers` loops each opening a connection, making
/// one request on it and closing it. `client` must have TLS session
/// resumption off, so every connection is a full handshake.
pub async fn new_connections(client: &Client, workers: usize, duration: Duration) -> Sample {
    let started = Instant::now();
    let end = started + duration;
    let tasks = (0..workers).map(|_| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut sample = Sample::empty();
            while Instant::now() < end {
                let opened = Instant::now();
                let result = match client.connect().await {
                    Ok(mut sender) => Client::request(&mut sender).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => sample.record(opened.elapsed()),
                    Err(_) => sample.errors += 1,
                }
            }
            sample
        })
    });
    collect(join_all(tasks).await, started)
}

/// Opens `n` keep-alive connections, `parallel` at a time, each making
/// one request so the target has set up its per-connection HTTP state,
/// and hands them back still open, with the count of those that failed.
pub async fn idle_connections(client: &Client, n: usize, parallel: usize) -> (Vec<Sender>, u64) {
    let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
    let opened = join_all((0..n).map(|_| {
        let permits = permits.clone();
        async move {
            let _permit = permits.acquire().await.expect("semaphore open");
            // A target at its connection limit leaves new ones hanging in
            // the accept queue: give up on those instead of waiting.
            tokio::time::timeout(IDLE_CONNECT_TIMEOUT, async {
                let mut sender = client.connect().await?;
                Client::request(&mut sender).await?;
                Ok::<_, Error>(sender)
            })
            .await
        }
    }))
    .await;
    let failed = opened.iter().filter(|o| !matches!(o, Ok(Ok(_)))).count() as u64;
    let held = opened.into_iter().filter_map(|o| o.ok()?.ok()).collect();
    (held, failed)
}

fn collect(results: Vec<Result<Sample, tokio::task::JoinError>>, started: Instant) -> Sample {
    let mut total = Sample::empty();
    total.elapsed = started.elapsed();
    for sample in results {
        total.merge(sample.expect("load task"));
    }
    total
}

/// The same client identity with session resumption off: rustls would
/// otherwise resume with a ticket or session id and skip the expensive
/// part of the handshake.
pub fn without_resumption(tls: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut tls = tls.clone();
    tls.resumption = rustls::client::Resumption::disabled();
    Arc::new(tls)
}
