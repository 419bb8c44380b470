//! The audit trail: one JSON object per line, hash-chained (PCI DSS 10).
//!
//! Requests never touch the disk. Each request reserves a slot in a bounded
//! queue *before* it is forwarded, fills in a [`RequestRecord`], and the
//! record is sent when it completes or when it is dropped half-way (client
//! gone), so no decision goes unaudited. A writer thread owns the file: it
//! numbers the events, chains their hashes (`chain`), rotates the file by
//! size and resumes the chain after a restart (`writer`).
//!
//! When the writer cannot keep up or cannot write, `audit.on_full` decides:
//! `fail_closed` refuses new requests with 503 until it recovers, and loses
//! nothing it accepted; `fail_open` serves them, counts every event it
//! drops, and writes a `gap` event with the count once writing resumes.

mod chain;
mod json;
mod redact;
mod verify;
mod writer;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

pub use self::chain::{Chain, Hasher, GENESIS};
pub(crate) use self::redact::header_text;
pub use self::redact::{redact_pans, HeaderPolicy, SECRET_HEADERS, WITHHELD};
pub use self::verify::{
    verify, verify_files, verify_text, Broken, Gap, Verified, VerifyFilesError,
};
use crate::config::{self, Fsync, OnFull};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("audit.path {path}: cannot open for appending: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit.path {path}: cannot continue the hash chain: {reason}; move the file aside (and verify it) to start a new trail")]
    Resume { path: PathBuf, reason: String },
    #[error("audit.hmac_key_file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("audit writer thread could not start: {0}")]
    Spawn(std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Request,
    HandshakeRejected,
    PolicyLoaded,
    PolicyRejected,
    SvidRotated,
    BundleUpdated,
    Startup,
    Shutdown,
    /// Events that could not be recorded, and how many.
    Gap,
    /// The first event of a file after size-based rotation.
    Rotated,
    /// An outbound connection refused because the server did not prove
    /// the identity its route requires.
    EgressRefused,
}

impl Kind {
    #[cfg(test)]
    pub(crate) const ALL: [Kind; 11] = [
        Kind::Request,
        Kind::HandshakeRejected,
        Kind::PolicyLoaded,
        Kind::PolicyRejected,
        Kind::SvidRotated,
        Kind::BundleUpdated,
        Kind::Startup,
        Kind::Shutdown,
        Kind::Gap,
        Kind::Rotated,
        Kind::EgressRefused,
    ];

    /// The name the audit line gives it (serde's snake_case).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::HandshakeRejected => "handshake_rejected",
            Kind::PolicyLoaded => "policy_loaded",
            Kind::PolicyRejected => "policy_rejected",
            Kind::SvidRotated => "svid_rotated",
            Kind::BundleUpdated => "bundle_updated",
            Kind::Startup => "startup",
            Kind::Shutdown => "shutdown",
            Kind::Gap => "gap",
            Kind::Rotated => "rotated",
            Kind::EgressRefused => "egress_refused",
        }
    }
}

/// Set on events about traffic the sidecar originates (`[outbound]`);
/// absent, an event is about inbound traffic, as it always was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub ts: String,
    /// Assigned by the writer, so the order in the file is the order of
    /// `seq`. Never 0 in a written line: 0 means not assigned yet.
    #[serde(skip_serializing_if = "is_zero")]
    pub seq: u64,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Outbound: the route the request or connection went to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// `startup`: the binary's version and the sha256 of the effective config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<String>,
    /// `startup` and `policy_loaded`: the revision now in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_revision: Option<String>,
    /// `startup` and `svid_rotated`: the sidecar's own certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svid: Option<Svid>,
    /// `gap`: events lost (fail_open) and requests refused unrecorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
    /// Why, for events that are not request decisions (the handshake
    /// failure, the policy revision loaded...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Set by the writer: the `hash` of the previous line (empty until then).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prev: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Source {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    pub address: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Destination {
    /// The route's host (lowercase, without port).
    pub host: String,
    /// The route's `address`.
    pub address: String,
    /// The server's SPIFFE ID: verified for a request, as presented for a
    /// refusal (absent when none could be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Who the route requires: an ID, `an ID under <prefix>`, or `an ID in
    /// trust domain <td>`.
    pub expected: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Request {
    pub method: String,
    /// Card numbers are masked before the path is stored here.
    pub path: String,
    /// Credential headers withheld, card numbers masked
    /// ([`HeaderPolicy::redact`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
    pub policy_revision: String,
    /// `policy.mode = "dry_run"`: the request was forwarded whatever
    /// `allowed` says.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The decision came from the policy decision cache, not from an
    /// evaluation of this request.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Response {
    pub status: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct Svid {
    pub spiffe_id: String,
    pub not_after: String,
    /// sha256 of the leaf certificate, as in `x-forwarded-client-cert`.
    pub sha256: String,
}

impl Event {
    pub fn new(kind: Kind) -> Event {
        Event::at(kind, SystemTime::now())
    }

    /// An event stamped with a time the caller already read (a request's
    /// arrival, also shown to the policy), saving a second clock read.
    pub fn at(kind: Kind, time: SystemTime) -> Event {
        Event {
            ts: timestamp(time),
            kind,
            ..Event::blank()
        }
    }

    /// Nothing set, not even the time: what a record leaves behind once
    /// its event is sent. Allocates nothing.
    fn blank() -> Event {
        Event {
            ts: String::new(),
            seq: 0,
            kind: Kind::Request,
            request_id: None,
            direction: None,
            source: None,
            destination: None,
            request: None,
            decision: None,
            response: None,
            duration_us: None,
            version: None,
            config_revision: None,
            policy_revision: None,
            svid: None,
            lost: None,
            refused: None,
            detail: None,
            prev: String::new(),
        }
    }

    pub fn with_detail(kind: Kind, detail: impl Into<String>) -> Event {
        Event {
            detail: Some(detail.into()),
            ..Event::new(kind)
        }
    }

    /// `config_revision` is [`config_revision`] of the effective config.
    pub fn startup(
        config_revision: String,
        svid: Option<Svid>,
        detail: impl Into<String>,
    ) -> Event {
        Event {
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            config_revision: Some(config_revision),
            svid,
            ..Event::with_detail(Kind::Startup, detail)
        }
    }

    pub fn policy_loaded(revision: &str, detail: impl Into<String>) -> Event {
        Event {
            policy_revision: Some(revision.to_owned()),
            ..Event::with_detail(Kind::PolicyLoaded, detail)
        }
    }

    /// For the identity source, when it installs a new SVID.
    pub fn svid_rotated(
        spiffe_id: &str,
        not_after: SystemTime,
        leaf_der: &[u8],
        detail: impl Into<String>,
    ) -> Event {
        Event {
            svid: Some(Svid::new(spiffe_id, not_after, leaf_der)),
            ..Event::with_detail(Kind::SvidRotated, detail)
        }
    }

    /// `presented` is the SPIFFE ID in the refused client certificate, when
    /// one could be read: who tried, even though they were not let in.
    pub fn handshake_rejected(
        peer: SocketAddr,
        presented: Option<String>,
        reason: &str,
        message: &str,
    ) -> Event {
        Event {
            source: Some(Source {
                spiffe_id: presented,
                address: peer.to_string(),
            }),
            ..Event::with_detail(
                Kind::HandshakeRejected,
                redact_pans(&format!("{reason}: {message}")),
            )
        }
    }

    /// An outbound connection refused: `reason` is the metric label
    /// (`wrong_server_id`, `untrusted_chain`, ...).
    pub fn egress_refused(destination: Destination, reason: &str, message: &str) -> Event {
        Event {
            direction: Some(Direction::Outbound),
            destination: Some(destination),
            ..Event::with_detail(
                Kind::EgressRefused,
                redact_pans(&format!("{reason}: {message}")),
            )
        }
    }

    pub fn shutdown(detail: impl Into<String>) -> Event {
        Event::with_detail(Kind::Shutdown, detail)
    }
}

impl Svid {
    pub fn new(spiffe_id: &str, not_after: SystemTime, leaf_der: &[u8]) -> Svid {
        use sha2::Digest;
        Svid {
            spiffe_id: spiffe_id.to_owned(),
            not_after: timestamp(not_after),
            sha256: hex::encode(sha2::Sha256::digest(leaf_der)),
        }
    }
}

/// The `config_revision` of a startup event: sha256 of the effective
/// configuration as `/config` shows it, so an assessor can tell which
/// settings were in force.
pub fn config_revision(config: &config::Config) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        config.redacted().to_string().as_bytes(),
    ))
}

/// RFC 3339 UTC with milliseconds, the form OPA and log pipelines expect.
pub fn timestamp(t: SystemTime) -> String {
    crate::rfc3339::millis(t)
}

/// Reads an HMAC key file: the bytes as they are, less a trailing newline
/// (so `echo`/`openssl rand -hex` output works), at least 16 bytes.
pub fn read_key(path: &Path) -> Result<Vec<u8>, Error> {
    let key_err = |reason: String| Error::Key {
        path: path.to_owned(),
        reason,
    };
    let mut key = std::fs::read(path).map_err(|e| key_err(format!("cannot read: {e}")))?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.len() < 16 {
        return Err(key_err(format!(
            "holds {} bytes; an HMAC key needs at least 16",
            key.len()
        )));
    }
    Ok(key)
}

/// Everything the writer needs, from the `[audit]` section.
#[derive(Clone, Debug)]
pub struct Options {
    /// A file to append to, or `-` for stdout.
    pub path: String,
    pub capacity: usize,
    pub on_full: OnFull,
    pub fsync: Fsync,
    /// Rotate once the file reaches this size; 0 never rotates.
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` newest ... `path.N`).
    pub keep_files: usize,
    pub hasher: Hasher,
    pub redact_headers: Vec<String>,
    /// How often a `fail_closed` writer retries a write that failed.
    pub retry_interval: Duration,
}

impl Options {
    pub fn new(path: &str, capacity: usize) -> Options {
        Options {
            path: path.to_owned(),
            capacity,
            on_full: OnFull::FailClosed,
            fsync: Fsync::Never,
            max_bytes: 0,
            keep_files: 10,
            hasher: Hasher::Sha256,
            redact_headers: Vec::new(),
            retry_interval: Duration::from_millis(500),
        }
    }

    pub fn from_config(c: &config::Audit) -> Result<Options, Error> {
        let hasher = match &c.hmac_key_file {
            Some(p) => Hasher::Hmac(read_key(p)?),
            None => Hasher::Sha256,
        };
        Ok(Options {
            on_full: c.on_full,
            fsync: c.fsync,
            max_bytes: c.max_bytes,
            keep_files: c.keep_files,
            hasher,
            redact_headers: c.redact_headers.clone(),
            ..Options::new(&c.path, c.queue_capacity)
        })
    }
}

enum Msg {
    Event(chain::Prepared),
    Finish,
}

/// What the sinks and the writer share.
struct State {
    on_full: OnFull,
    /// The last write failed and has not succeeded since.
    failing: AtomicBool,
    /// Events dropped by sinks, not yet reported in a `gap` event.
    lost: AtomicU64,
    /// Requests refused because no record could be reserved, not yet
    /// reported in a `gap` event.
    refused: AtomicU64,
    /// Shutting down: a failing `fail_closed` writer stops retrying.
    stopping: AtomicBool,
}

/// The cloneable handle components use to record events.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    metrics: Arc<Metrics>,
    state: Arc<State>,
    headers: Arc<HeaderPolicy>,
}

/// Owns the writer thread; `finish` flushes everything queued and stops it.
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    state: Arc<State>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts the writer with default options. `path` is a file to append to,
/// or `-` for stdout.
pub fn start(
    path: &str,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> Result<(AuditSink, Writer), Error> {
    start_with(Options::new(path, capacity), metrics)
}

pub fn start_with(options: Options, metrics: Arc<Metrics>) -> Result<(AuditSink, Writer), Error> {
    let out = writer::Output::open(&options)?;
    let (seq, prev) = out.resume_point()?;
    let chain = Chain::resume(seq, prev, options.hasher.clone());
    let (tx, rx) = mpsc::channel(options.capacity.max(1));
    let state = Arc::new(State {
        on_full: options.on_full,
        failing: AtomicBool::new(false),
        lost: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
    });
    let headers = Arc::new(HeaderPolicy::new(&options.redact_headers));
    let w = writer::Loop::new(rx, out, chain, state.clone(), metrics.clone(), &options);
    // A thread of its own: the trail is written with blocking I/O and must
    // never stall a runtime worker that serves requests.
    let thread = std::thread::Builder::new()
        .name("portcullis-audit".into())
        .spawn(move || w.run())
        .map_err(Error::Spawn)?;
    Ok((
        AuditSink {
            tx: tx.clone(),
            metrics,
            state: state.clone(),
            headers,
        },
        Writer { tx, state, thread },
    ))
}

impl AuditSink {
    /// Records an event that is not tied to a request slot (handshake
    /// rejections, lifecycle events). A full queue drops it, counted, logged
    /// and reported in the next `gap` event, never silently.
    pub fn record(&self, event: Event) {
        if let Err(e) = self.tx.try_send(Msg::Event(chain::Prepared::new(event))) {
            let kind = match &e {
                mpsc::error::TrySendError::Full(Msg::Event(ev))
                | mpsc::error::TrySendError::Closed(Msg::Event(ev)) => Some(ev.kind),
                _ => None,
            };
            self.dropped();
            tracing::error!(?kind, "audit queue unavailable, event dropped");
        }
    }

    /// Reserves the queue slot for one request's record. `None` means the
    /// request must be refused: under `fail_closed`, when the queue is full
    /// or the writer is failing. Under `fail_open` there is always a record;
    /// if it finds no room when it is sent, it is counted as dropped.
    /// `started` is when the request arrived: the record's `duration_us`
    /// counts from it.
    pub fn reserve(&self, event: Event, started: Instant) -> Option<RequestRecord> {
        let open = self.state.on_full == OnFull::FailOpen;
        if !open && self.is_failing() {
            return None;
        }
        let slot = match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Slot::Reserved(permit),
            Err(_) if open => Slot::BestEffort(self.clone()),
            Err(_) => return None,
        };
        Some(RequestRecord {
            slot,
            event,
            started,
        })
    }

    /// Counts a request refused because [`reserve`](Self::reserve) found no
    /// room: it is reported in the next `gap` event.
    pub fn refused(&self) {
        self.metrics.audit_dropped.inc();
        self.state.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The writer's last write failed (disk full, permissions...).
    pub fn is_failing(&self) -> bool {
        self.state.failing.load(Ordering::Acquire)
    }

    /// Which header values may be written, here and in logs.
    pub fn header_policy(&self) -> &HeaderPolicy {
        &self.headers
    }

    fn dropped(&self) {
        self.metrics.audit_dropped.inc();
        self.state.lost.fetch_add(1, Ordering::Relaxed);
    }
}

enum Slot {
    Reserved(mpsc::OwnedPermit<Msg>),
    /// `fail_open` with a full queue: one more try when the record is sent.
    BestEffort(AuditSink),
    Sent,
}

/// A request's audit record with its guaranteed slot. Sent by
/// [`RequestRecord::finish`], or on drop if the request was abandoned.
pub struct RequestRecord {
    slot: Slot,
    pub event: Event,
    started: Instant,
}

impl RequestRecord {
    /// Sends the record; returns the time since the request arrived, as
    /// written in `duration_us`, for the caller's metrics.
    pub fn finish(mut self, status: u16) -> Duration {
        self.send(status)
    }

    fn send(&mut self, status: u16) -> Duration {
        let elapsed = self.started.elapsed();
        let slot = std::mem::replace(&mut self.slot, Slot::Sent);
        if matches!(slot, Slot::Sent) {
            return elapsed;
        }
        let mut event = std::mem::replace(&mut self.event, Event::blank());
        event.response = Some(Response { status });
        event.duration_us = Some(elapsed.as_micros() as u64);
        match slot {
            Slot::Reserved(permit) => {
                permit.send(Msg::Event(chain::Prepared::new(event)));
            }
            Slot::BestEffort(sink) => sink.record(event),
            Slot::Sent => {}
        }
        elapsed
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // The client went away before a response was produced; 499 is the
        // status proxies conventionally log for that.
        if !matches!(self.slot, Slot::Sent) {
            self.event
                .detail
                .get_or_insert_with(|| "client closed the request before a response".into());
            self.send(499);
        }
    }
}

impl Writer {
    /// Writes everything queued before this call, flushes and stops the
    /// thread. Events recorded later are counted as dropped. A `fail_closed`
    /// writer that cannot write gives up here, counting what it held.
    pub async fn finish(self) {
        self.state.stopping.store(true, Ordering::Release);
        if self.tx.send(Msg::Finish).await.is_ok() {
            let thread = self.thread;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

#[cfg(test)]
mod tests;
