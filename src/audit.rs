//! The audit trail: one JSON object per line, hash-chained.
//!
//! Requests never touch the disk. Each request reserves a slot in a bounded
//! queue *before* it is forwarded (no slot: 503, nothing forwarded), fills in
//! a [`RequestRecord`], and the record is sent when it completes or when it
//! is dropped half-way (client gone), so no decision goes unaudited. A writer
//! thread owns the file: it numbers the events, chains their hashes and
//! flushes whenever the queue runs dry.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("audit.path {path}: cannot open for appending: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit writer thread could not start: {0}")]
    Spawn(std::io::Error),
}

/// The `prev` of the first event in a new trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Request,
    HandshakeRejected,
    PolicyLoaded,
    PolicyRejected,
    SvidRotated,
    Startup,
    Shutdown,
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub ts: String,
    /// Assigned by the writer, so the order in the file is the order of `seq`.
    pub seq: u64,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// Why, for events that are not request decisions (the handshake
    /// failure, the policy revision loaded...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Set by the writer: the `hash` of the previous line.
    pub prev: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Source {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    pub address: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Request {
    pub method: String,
    /// Card numbers are masked before the path is stored here.
    pub path: String,
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
}

#[derive(Clone, Debug, Serialize)]
pub struct Response {
    pub status: u16,
}

impl Event {
    pub fn new(kind: Kind) -> Event {
        Event {
            ts: timestamp(SystemTime::now()),
            seq: 0,
            kind,
            request_id: None,
            source: None,
            request: None,
            decision: None,
            response: None,
            duration_us: None,
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
}

/// RFC 3339 UTC with milliseconds, the form OPA and log pipelines expect.
pub fn timestamp(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&format)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

enum Msg {
    Event(Box<Event>),
    Finish,
}

/// The cloneable handle components use to record events.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    metrics: Arc<Metrics>,
}

/// Owns the writer thread; `finish` flushes everything queued and stops it.
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts the writer. `path` is a file to append to, or `-` for stdout.
pub fn start(
    path: &str,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> Result<(AuditSink, Writer), Error> {
    let out: Box<dyn Write + Send> = if path == "-" {
        Box::new(std::io::stdout())
    } else {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?;
        Box::new(file)
    };
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let writer_metrics = metrics.clone();
    // A thread of its own: the trail is written with blocking I/O and must
    // never stall a runtime worker that serves requests.
    let thread = std::thread::Builder::new()
        .name("portcullis-audit".into())
        .spawn(move || write_loop(rx, out, writer_metrics))
        .map_err(Error::Spawn)?;
    Ok((
        AuditSink {
            tx: tx.clone(),
            metrics,
        },
        Writer { tx, thread },
    ))
}

impl AuditSink {
    /// Records an event that is not tied to a request slot (handshake
    /// rejections, lifecycle events). A full queue drops it, counted and
    /// logged, never silently.
    pub fn record(&self, event: Event) {
        if let Err(e) = self.tx.try_send(Msg::Event(Box::new(event))) {
            self.metrics.audit_dropped.inc();
            let kind = match &e {
                mpsc::error::TrySendError::Full(Msg::Event(ev))
                | mpsc::error::TrySendError::Closed(Msg::Event(ev)) => Some(ev.kind),
                _ => None,
            };
            tracing::error!(?kind, "audit queue unavailable, event dropped");
        }
    }

    /// Reserves the queue slot for one request's record. `None` when the
    /// writer is behind: the caller must refuse the request.
    pub fn reserve(&self, event: Event) -> Option<RequestRecord> {
        let permit = self.tx.clone().try_reserve_owned().ok()?;
        Some(RequestRecord {
            permit: Some(permit),
            event,
            started: Instant::now(),
        })
    }
}

/// A request's audit record with its guaranteed slot. Sent by
/// [`RequestRecord::finish`], or on drop if the request was abandoned.
pub struct RequestRecord {
    permit: Option<mpsc::OwnedPermit<Msg>>,
    pub event: Event,
    started: Instant,
}

impl RequestRecord {
    pub fn finish(mut self, status: u16) {
        self.send(status);
    }

    fn send(&mut self, status: u16) {
        if let Some(permit) = self.permit.take() {
            let mut event = self.event.clone();
            event.response = Some(Response { status });
            event.duration_us = Some(self.started.elapsed().as_micros() as u64);
            permit.send(Msg::Event(Box::new(event)));
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        // The client went away before a response was produced; 499 is the
        // status proxies conventionally log for that.
        if self.permit.is_some() {
            self.event
                .detail
                .get_or_insert_with(|| "client closed the request before a response".into());
            self.send(499);
        }
    }
}

impl Writer {
    /// Writes everything queued before this call, flushes and stops the
    /// thread. Events recorded later are counted as dropped.
    pub async fn finish(self) {
        if self.tx.send(Msg::Finish).await.is_ok() {
            let thread = self.thread;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn write_loop(mut rx: mpsc::Receiver<Msg>, out: Box<dyn Write + Send>, metrics: Arc<Metrics>) {
    let mut out = std::io::BufWriter::new(out);
    let mut chain = Chain::new(GENESIS.to_string());
    while let Some(msg) = rx.blocking_recv() {
        let finish = matches!(msg, Msg::Finish);
        if let Msg::Event(event) = msg {
            let line = chain.seal(*event);
            match out.write_all(line.as_bytes()) {
                Ok(()) => metrics.audit_written.inc(),
                Err(e) => {
                    metrics.audit_dropped.inc();
                    tracing::error!(error = %e, "audit write failed, event dropped");
                }
            }
        }
        if finish || rx.is_empty() {
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "audit flush failed");
            }
        }
        if finish {
            rx.close();
            break;
        }
    }
    let _ = out.flush();
}

/// Numbers events and links each to the hash of the one before it.
pub struct Chain {
    seq: u64,
    prev: String,
}

impl Chain {
    pub fn new(prev: String) -> Chain {
        Chain { seq: 0, prev }
    }

    /// Returns the finished line, newline included. `hash` is the sha256 of
    /// the line as written up to (not including) `,"hash":...`, with the
    /// closing brace: so it covers `prev`, and a verifier needs no JSON
    /// canonicalisation to recompute it.
    pub fn seal(&mut self, mut event: Event) -> String {
        self.seq += 1;
        event.seq = self.seq;
        event.prev = std::mem::take(&mut self.prev);
        let mut body = serde_json::to_string(&event).unwrap_or_else(|e| {
            // Serialising plain strings and numbers cannot fail; if it ever
            // did, the line still records that an event existed.
            format!(
                r#"{{"seq":{},"kind":"serialization_error","detail":{:?},"prev":{:?}}}"#,
                event.seq,
                e.to_string(),
                event.prev
            )
        });
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        body.pop();
        body.push_str(&format!(",\"hash\":\"{hash}\"}}\n"));
        self.prev = hash;
        body
    }
}

/// Checks one trail: sequence numbers, links and hashes. Returns the number
/// of events verified, or the first broken line (1-based) and why.
pub fn verify(text: &str) -> Result<u64, (usize, String)> {
    let mut prev = GENESIS.to_string();
    let mut count = 0u64;
    let mut expected_seq = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| (n, format!("not valid JSON: {e}")))?;
        let hash = value
            .get("hash")
            .and_then(|h| h.as_str())
            .ok_or((n, "no hash field".to_string()))?;
        let suffix = format!(",\"hash\":\"{hash}\"}}");
        let body = line
            .strip_suffix(&suffix)
            .ok_or((n, "hash is not the last field".to_string()))?;
        let recomputed = hex::encode(Sha256::digest(format!("{body}}}").as_bytes()));
        if recomputed != hash {
            return Err((
                n,
                "hash does not match the line: the line was edited".into(),
            ));
        }
        let line_prev = value.get("prev").and_then(|p| p.as_str()).unwrap_or("");
        if line_prev != prev {
            return Err((
                n,
                "prev does not match the previous line's hash: a line was removed, inserted or reordered".into(),
            ));
        }
        let seq = value.get("seq").and_then(|s| s.as_u64()).unwrap_or(0);
        if let Some(expected) = expected_seq {
            if seq != expected {
                return Err((n, format!("seq {seq} where {expected} was expected")));
            }
        }
        expected_seq = Some(seq + 1);
        prev = hash.to_string();
        count += 1;
    }
    Ok(count)
}

/// Masks payment card numbers (13-19 digits, optionally separated by single
/// spaces or dashes, passing the Luhn check), keeping the first 6 and last 4
/// digits as PCI DSS 3.3 allows.
pub fn redact_pans(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() || (i > 0 && bytes[i - 1].is_ascii_digit()) {
            i += 1;
            continue;
        }
        // Longest run of digits with single separators starting at i.
        let mut digits = Vec::new();
        let mut end = i;
        let mut j = i;
        while j < bytes.len() && digits.len() < 19 {
            if bytes[j].is_ascii_digit() {
                digits.push(bytes[j] - b'0');
                j += 1;
                end = j;
            } else if (bytes[j] == b' ' || bytes[j] == b'-')
                && j + 1 < bytes.len()
                && bytes[j + 1].is_ascii_digit()
            {
                j += 1;
            } else {
                break;
            }
        }
        let followed_by_digit = end < bytes.len() && bytes[end].is_ascii_digit();
        if (13..=19).contains(&digits.len()) && !followed_by_digit && luhn(&digits) {
            let s = out.get_or_insert_with(String::new);
            s.push_str(&text[copied..i]);
            let masked: String = digits
                .iter()
                .enumerate()
                .map(|(k, d)| {
                    if k < 6 || k >= digits.len() - 4 {
                        char::from(b'0' + d)
                    } else {
                        '*'
                    }
                })
                .collect();
            s.push_str(&masked);
            copied = end;
            i = end;
        } else {
            i = end.max(i + 1);
        }
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut s) => {
            s.push_str(&text[copied..]);
            Cow::Owned(s)
        }
    }
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &d)| {
            let d = u32::from(d);
            if k % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(n: usize) -> String {
        let mut chain = Chain::new(GENESIS.into());
        (0..n)
            .map(|k| chain.seal(Event::with_detail(Kind::Startup, format!("event {k}"))))
            .collect()
    }

    #[test]
    fn chain_verifies_and_detects_tampering() {
        let text = trail(4);
        assert_eq!(verify(&text), Ok(4));
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replace("event 2", "event 9");
        assert_eq!(verify(&edited).unwrap_err().0, 3);

        let removed = [lines[0], lines[1], lines[3]].join("\n");
        assert_eq!(verify(&removed).unwrap_err().0, 3);

        let swapped = [lines[0], lines[2], lines[1], lines[3]].join("\n");
        assert_eq!(verify(&swapped).unwrap_err().0, 2);

        assert_eq!(verify("{not json").unwrap_err().0, 1);
    }

    #[test]
    fn pans_are_masked() {
        assert_eq!(
            redact_pans("/v1/cards/4111111111111111/charge"),
            "/v1/cards/411111******1111/charge"
        );
        assert_eq!(redact_pans("4111-1111-1111-1111"), "411111******1111");
        assert_eq!(
            redact_pans("pan=5500 0000 0000 0004&x=1"),
            "pan=550000******0004&x=1"
        );
        // Not Luhn-valid, or too short / too long: an order id, left alone.
        assert_eq!(
            redact_pans("/v1/orders/4111111111111112"),
            "/v1/orders/4111111111111112"
        );
        assert_eq!(
            redact_pans("/v1/payments/123456789012"),
            "/v1/payments/123456789012"
        );
        assert_eq!(
            redact_pans("41111111111111111111111"),
            "41111111111111111111111"
        );
    }

    #[tokio::test]
    async fn writer_writes_chained_lines_and_reserved_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let metrics = Arc::new(Metrics::new(&prometheus::Registry::new()).unwrap());
        let (sink, writer) = start(path.to_str().unwrap(), 8, metrics.clone()).unwrap();
        sink.record(Event::new(Kind::Startup));
        let mut record = sink.reserve(Event::new(Kind::Request)).unwrap();
        record.event.request_id = Some("r1".into());
        record.finish(200);
        // Dropped without finish: still written, as an abandoned request.
        drop(sink.reserve(Event::new(Kind::Request)).unwrap());
        writer.finish().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(verify(&text), Ok(3));
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[1]["request_id"], "r1");
        assert_eq!(lines[1]["response"]["status"], 200);
        assert_eq!(lines[2]["response"]["status"], 499);
        assert_eq!(metrics.audit_written.get(), 3);
    }

    #[tokio::test]
    async fn full_queue_refuses_reservations() {
        let metrics = Arc::new(Metrics::new(&prometheus::Registry::new()).unwrap());
        let (tx, _rx) = mpsc::channel(1);
        let sink = AuditSink {
            tx,
            metrics: metrics.clone(),
        };
        let held = sink.reserve(Event::new(Kind::Request));
        assert!(held.is_some());
        assert!(sink.reserve(Event::new(Kind::Request)).is_none());
        sink.record(Event::new(Kind::Startup));
        assert_eq!(metrics.audit_dropped.get(), 1);
        drop(held);
    }
}
