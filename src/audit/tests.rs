use super::*;

fn trail(n: usize) -> String {
    let mut chain = Chain::new(GENESIS.into());
    (0..n)
        .map(|k| chain.seal(Event::with_detail(Kind::Startup, format!("event {k}"))))
        .collect()
}

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(&prometheus::Registry::new()).unwrap())
}

fn broken_at(text: &str) -> (usize, String) {
    verify(text).unwrap_err()
}

#[test]
fn chain_verifies_and_names_each_kind_of_tampering() {
    let text = trail(5);
    assert_eq!(verify(&text), Ok(5));
    let lines: Vec<&str> = text.lines().collect();

    let (n, why) = broken_at(&text.replace("event 2", "event 9"));
    assert_eq!(n, 3);
    assert!(why.starts_with("edited"), "{why}");

    let (n, why) = broken_at(&[lines[0], lines[1], lines[3], lines[4]].join("\n"));
    assert_eq!(n, 3);
    assert!(why.starts_with("removed"), "{why}");

    let (n, why) = broken_at(&[lines[0], lines[2], lines[1], lines[3]].join("\n"));
    assert_eq!(n, 2);
    assert!(why.starts_with("reordered"), "{why}");

    // A copy of an earlier line slipped in.
    let (n, why) = broken_at(&[lines[0], lines[1], lines[2], lines[1], lines[3]].join("\n"));
    assert_eq!(n, 4);
    assert!(why.starts_with("inserted"), "{why}");

    // A forged line with a correct hash, seq and prev (possible without an
    // HMAC key): the line after it no longer links.
    let mut forger = Chain::resume(2, hash_of(lines[1]), Hasher::Sha256);
    let forged = forger.seal(Event::with_detail(Kind::Startup, "forged"));
    let (n, why) =
        broken_at(&[lines[0], lines[1], forged.trim_end(), lines[2], lines[3]].join("\n"));
    assert_eq!(n, 3, "{why}");
    assert!(why.starts_with("inserted"), "{why}");

    let (n, why) = broken_at("{not json");
    assert_eq!(n, 1);
    assert!(why.starts_with("bad JSON"), "{why}");

    // Lines removed from the head.
    let (n, why) = broken_at(&lines[1..].join("\n"));
    assert_eq!(n, 1);
    assert!(why.starts_with("removed"), "{why}");
}

fn hash_of(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["hash"].as_str().unwrap().to_owned()
}

#[test]
fn hmac_chain_needs_the_key_and_a_recomputed_chain_fails() {
    let key = Hasher::Hmac(b"0123456789abcdef0123".to_vec());
    let mut chain = Chain::resume(0, GENESIS.into(), key.clone());
    let text: String = (0..3)
        .map(|k| chain.seal(Event::with_detail(Kind::Startup, format!("e{k}"))))
        .collect();
    assert_eq!(verify_text(&text, &key).unwrap().events, 3);
    assert!(verify(&text).is_err(), "verified without the key");

    // The attacker edits a line and recomputes every hash without the key.
    let edited = text.replace("e1", "e7");
    let mut plain = Chain::new(GENESIS.into());
    let recomputed: String = edited
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let detail = v["detail"].as_str().unwrap().to_owned();
            plain.seal(Event::with_detail(Kind::Startup, detail))
        })
        .collect();
    assert!(verify(&recomputed).is_ok(), "self-consistent without a key");
    let err = verify_text(&recomputed, &key).unwrap_err();
    assert_eq!(err.line, 1);
    assert!(err.why.contains("HMAC"), "{}", err.why);
    let wrong = Hasher::Hmac(b"another key, 16+ bytes".to_vec());
    assert!(verify_text(&text, &wrong).is_err());
}

#[tokio::test]
async fn writer_writes_chained_lines_and_reserved_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let metrics = metrics();
    let (sink, writer) = start(path.to_str().unwrap(), 8, metrics.clone()).unwrap();
    sink.record(Event::new(Kind::Startup));
    // Counted from the arrival the caller passes, not from the reservation.
    let arrived = Instant::now() - Duration::from_millis(50);
    let mut record = sink.reserve(Event::new(Kind::Request), arrived).unwrap();
    record.event.request_id = Some("r1".into());
    let elapsed = record.finish(200);
    assert!(elapsed >= Duration::from_millis(50), "{elapsed:?}");
    // Dropped without finish: still written, as an abandoned request.
    drop(
        sink.reserve(Event::new(Kind::Request), Instant::now())
            .unwrap(),
    );
    writer.finish().await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(verify(&text), Ok(3));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["request_id"], "r1");
    assert_eq!(lines[1]["response"]["status"], 200);
    // The metrics get the duration the trail records.
    assert_eq!(lines[1]["duration_us"], elapsed.as_micros() as u64);
    assert_eq!(lines[2]["response"]["status"], 499);
    assert_eq!(metrics.audit_written.get(), 3);
}

#[tokio::test]
async fn chain_continues_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    for round in 0..3 {
        let (sink, writer) = start(path.to_str().unwrap(), 8, metrics()).unwrap();
        sink.record(Event::with_detail(Kind::Startup, format!("round {round}")));
        sink.record(Event::shutdown("bye"));
        writer.finish().await;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(verify(&text), Ok(6));

    // A cut-short last line is refused rather than silently forked.
    std::fs::write(&path, &text[..text.len() - 5]).unwrap();
    let err = start(path.to_str().unwrap(), 8, metrics()).err().unwrap();
    assert!(err.to_string().contains("incomplete"), "{err}");
}

#[tokio::test]
async fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut options = Options::new(path.to_str().unwrap(), 1024);
    options.max_bytes = 2_000;
    options.keep_files = 100;
    let (sink, writer) = start_with(options, metrics()).unwrap();
    for k in 0..200 {
        sink.record(Event::with_detail(Kind::Request, format!("request {k}")));
    }
    writer.finish().await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() > 5, "{files:?}");
    files.sort();
    let v = verify_files(&files, &Hasher::Sha256).unwrap();
    assert_eq!(v.events, 200 + files.len() as u64 - 1);
    assert!(v.gaps.is_empty());
    let current = std::fs::read_to_string(&path).unwrap();
    assert!(current.starts_with("{\"ts\""));
    assert!(current
        .lines()
        .next()
        .unwrap()
        .contains("\"kind\":\"rotated\""));

    // Each rotated file alone verifies as a continuation; a missing middle
    // file breaks the chain at the next one.
    let newest = path.with_extension("log.1");
    assert!(verify_files(&[newest, path.clone()], &Hasher::Sha256).is_ok());
    let mut gapped = files.clone();
    gapped.retain(|p| !p.to_string_lossy().ends_with(".log.2"));
    let err = verify_files(&gapped, &Hasher::Sha256).unwrap_err();
    assert!(err.to_string().contains("audit.log.1:1"), "{err}");
}

#[tokio::test]
async fn keep_files_bounds_the_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut options = Options::new(path.to_str().unwrap(), 1024);
    options.max_bytes = 1_000;
    options.keep_files = 2;
    let (sink, writer) = start_with(options, metrics()).unwrap();
    for k in 0..100 {
        sink.record(Event::with_detail(Kind::Startup, format!("event {k}")));
    }
    writer.finish().await;
    let n = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn full_queue_refuses_reservations_when_fail_closed() {
    let metrics = metrics();
    let (sink, _rx) = test_sink(OnFull::FailClosed, metrics.clone());
    let held = sink.reserve(Event::new(Kind::Request), Instant::now());
    assert!(held.is_some());
    assert!(sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .is_none());
    sink.record(Event::new(Kind::Startup));
    assert_eq!(metrics.audit_dropped.get(), 1);
    drop(held);
}

#[tokio::test]
async fn full_queue_serves_and_counts_when_fail_open() {
    let metrics = metrics();
    let (sink, _rx) = test_sink(OnFull::FailOpen, metrics.clone());
    let held = sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .unwrap();
    let extra = sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .unwrap();
    extra.finish(200);
    assert_eq!(metrics.audit_dropped.get(), 1);
    assert_eq!(sink.state.lost.load(Ordering::Relaxed), 1);
    drop(held);
}

fn test_sink(on_full: OnFull, metrics: Arc<Metrics>) -> (AuditSink, mpsc::Receiver<Msg>) {
    let (tx, rx) = mpsc::channel(1);
    let sink = AuditSink {
        tx,
        metrics,
        state: Arc::new(State {
            on_full,
            failing: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }),
        headers: Arc::new(HeaderPolicy::default()),
    };
    (sink, rx)
}

/// /dev/full accepts the open and fails every write with ENOSPC.
#[tokio::test]
async fn write_errors_fail_closed_until_shutdown() {
    let metrics = metrics();
    let mut options = Options::new("/dev/full", 8);
    options.retry_interval = Duration::from_millis(10);
    let (sink, writer) = start_with(options, metrics.clone()).unwrap();
    sink.record(Event::new(Kind::Startup));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sink.is_failing() {
        assert!(
            Instant::now() < deadline,
            "writer never reported the failure"
        );
        tokio::task::yield_now().await;
    }
    assert!(sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .is_none());
    writer.finish().await;
    assert_eq!(metrics.audit_written.get(), 0);
    assert_eq!(metrics.audit_dropped.get(), 1);
}

#[tokio::test]
async fn write_errors_fail_open_record_a_gap_when_writing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let metrics = metrics();
    let mut options = Options::new(path.to_str().unwrap(), 8);
    options.on_full = OnFull::FailOpen;
    let (sink, writer) = start_with(options, metrics.clone()).unwrap();
    // Dropped events (as a full queue would drop them) are reported in a
    // gap event before the next line.
    sink.dropped();
    sink.dropped();
    sink.refused();
    sink.record(Event::new(Kind::Startup));
    writer.finish().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let v = verify_text(&text, &Hasher::Sha256).unwrap();
    assert_eq!(v.events, 2);
    assert_eq!(v.gaps.len(), 1);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "gap");
    assert_eq!(first["lost"], 2);
    assert_eq!(first["refused"], 1);
}

/// A FIFO whose reader goes away makes every write fail with EPIPE; when a
/// reader comes back, writes succeed again. That is a writer that fails and
/// recovers, on demand.
struct Fifo {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fifo {
    fn new() -> Fifo {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.fifo");
        let ok = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(ok.success());
        Fifo { path, _dir: dir }
    }

    /// Opens the read end on a thread (the open blocks until a writer
    /// exists) and forwards every line read, until `stop` is set.
    fn reader(&self) -> Reader {
        use std::io::BufRead;
        let (tx, lines) = std::sync::mpsc::channel();
        let (opened_tx, opened) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let path = self.path.clone();
        let stop_reading = stop.clone();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(path).unwrap();
            let _ = opened_tx.send(());
            for line in std::io::BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                let last = stop_reading.load(Ordering::Acquire);
                if tx.send(line).is_err() || last {
                    break;
                }
            }
        });
        Reader {
            lines,
            opened,
            stop,
            thread,
        }
    }
}

struct Reader {
    lines: std::sync::mpsc::Receiver<String>,
    opened: std::sync::mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Reader {
    /// Closes the read end once `sink`'s next line has been read, and
    /// returns when it is closed: from then on writes fail with EPIPE.
    fn close_after_next(self, sink: &AuditSink) {
        self.stop.store(true, Ordering::Release);
        sink.record(Event::with_detail(Kind::Startup, "the reader's last line"));
        self.thread.join().unwrap();
    }

    fn wait_open(&self) {
        self.opened
            .recv_timeout(Duration::from_secs(5))
            .expect("the reader opened the FIFO");
    }
}

fn next_line(rx: &std::sync::mpsc::Receiver<String>) -> serde_json::Value {
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a line from the FIFO");
    serde_json::from_str(&line).unwrap()
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    // Generous: it only bounds how long a failing run takes, and CI machines
    // run this suite beside a dozen others on two cores.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_writes_a_gap_when_a_broken_pipe_recovers() {
    let fifo = Fifo::new();
    let reader = fifo.reader();
    let metrics = metrics();
    let mut options = Options::new(fifo.path.to_str().unwrap(), 8);
    options.on_full = OnFull::FailOpen;
    let (sink, writer) = start_with(options, metrics.clone()).unwrap();
    sink.record(Event::with_detail(Kind::Startup, "first"));
    assert_eq!(next_line(&reader.lines)["detail"], "first");

    // The reader goes away: the next writes fail with EPIPE.
    reader.close_after_next(&sink);
    let before = metrics.audit_dropped.get();
    for k in 0..3 {
        sink.record(Event::with_detail(Kind::Startup, format!("lost {k}")));
        wait_until("the write to fail", || {
            metrics.audit_dropped.get() > before + k
        })
        .await;
    }
    assert!(sink.is_failing());
    // Under fail_open, requests are still served while the writer fails.
    assert!(sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .is_some());
    wait_until("the abandoned record to be counted", || {
        metrics.audit_dropped.get() == before + 4
    })
    .await;

    // A reader again: the next line is a gap naming what was lost.
    let reader = fifo.reader();
    reader.wait_open();
    sink.record(Event::with_detail(Kind::Startup, "after"));
    let gap = next_line(&reader.lines);
    assert_eq!(gap["kind"], "gap", "{gap}");
    assert_eq!(gap["lost"], 4);
    assert_eq!(next_line(&reader.lines)["detail"], "after");
    wait_until("the writer to recover", || !sink.is_failing()).await;
    writer.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_while_failing_and_loses_nothing_when_it_recovers() {
    let fifo = Fifo::new();
    let reader = fifo.reader();
    let metrics = metrics();
    let mut options = Options::new(fifo.path.to_str().unwrap(), 8);
    options.retry_interval = Duration::from_millis(5);
    let (sink, writer) = start_with(options, metrics.clone()).unwrap();
    sink.record(Event::with_detail(Kind::Startup, "first"));
    assert_eq!(next_line(&reader.lines)["detail"], "first");
    reader.close_after_next(&sink);

    let record = sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .unwrap();
    record.finish(200);
    wait_until("the writer to fail", || sink.is_failing()).await;
    assert!(sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .is_none());
    sink.refused();

    let reader = fifo.reader();
    let lines = &reader.lines;
    // The write it kept retrying lands: the accepted record is not lost.
    let retried = next_line(lines);
    assert_eq!(retried["kind"], "request", "{retried}");
    assert_eq!(retried["response"]["status"], 200);
    wait_until("the writer to recover", || !sink.is_failing()).await;
    assert!(sink
        .reserve(Event::new(Kind::Request), Instant::now())
        .is_some());
    sink.record(Event::with_detail(Kind::Startup, "after"));
    let gap = next_line(lines);
    assert_eq!(gap["kind"], "gap", "{gap}");
    assert_eq!(gap["refused"], 1);
    assert_eq!(gap["lost"], 0);
    writer.finish().await;
}

/// `fsync = "interval"`: a line written by an idle writer is synced without
/// waiting for the next event, and a busy writer syncs about once a
/// second, not after every batch (syncing whenever the queue ran dry made
/// it sync after nearly every batch: issue 7's profile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_fsync_syncs_an_idle_trail_and_at_most_once_a_second_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let metrics = metrics();
    let mut options = Options::new(path.to_str().unwrap(), 8192);
    options.fsync = Fsync::Interval;
    let (sink, writer) = start_with(options, metrics.clone()).unwrap();

    sink.record(Event::with_detail(Kind::Startup, "alone"));
    wait_until("the lone line to be written", || {
        metrics.audit_written.get() == 1
    })
    .await;
    wait_until("the idle writer to sync it", || {
        metrics.audit_syncs.get() >= 1
    })
    .await;

    let synced_before = metrics.audit_syncs.get();
    let started = Instant::now();
    let mut sent = 1;
    // Many small bursts with the queue running dry between them: the case
    // that synced per batch.
    while started.elapsed() < Duration::from_millis(1500) {
        for k in 0..20 {
            sink.record(Event::with_detail(Kind::Startup, format!("busy {k}")));
        }
        sent += 20;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    wait_until("every line to be written", || {
        metrics.audit_written.get() == sent
    })
    .await;
    let batches_synced = metrics.audit_syncs.get() - synced_before;
    // One per second of writing, plus one at each end of the window.
    let bound = elapsed.as_secs() + 2;
    assert!(
        batches_synced <= bound,
        "{batches_synced} syncs for {sent} events in {elapsed:?}; at most {bound} expected"
    );
    writer.finish().await;
    assert!(metrics.audit_syncs.get() > synced_before, "shutdown syncs");
    assert_eq!(verify(&std::fs::read_to_string(&path).unwrap()), Ok(sent));
}

/// The line as it was sealed before events were serialized by their
/// senders: the whole event, `seq` and `prev` set, hashed up to its brace.
fn sealed_whole(mut event: Event, seq: u64, prev: &str) -> String {
    event.seq = seq;
    event.prev = prev.to_owned();
    let mut body = serde_json::to_string(&event).unwrap();
    let hash = Hasher::Sha256.hash(body.as_bytes());
    body.pop();
    format!("{body},\"hash\":\"{hash}\"}}\n")
}

#[test]
fn lines_spliced_from_prepared_events_are_the_lines_serde_would_write() {
    let mut full = Event::new(Kind::Request);
    full.request_id = Some("r-1".into());
    full.source = Some(Source {
        spiffe_id: Some("spiffe://pay.example/ns/shop/sa/checkout".into()),
        address: "127.0.0.1:4000".into(),
    });
    full.request = Some(Request {
        method: "POST".into(),
        path: "/v1/payments?note=\"quoted\"\\n".into(),
        headers: Some([("x-a".to_owned(), "é\u{1}".to_owned())].into()),
    });
    full.decision = Some(Decision {
        allowed: true,
        reason: "allowed by data.authz.decision".into(),
        policy_revision: "abc".into(),
        dry_run: false,
        cached: true,
    });
    full.response = Some(Response { status: 200 });
    full.duration_us = Some(1234);
    // A time that needs escaping moves where `seq` goes.
    let mut odd_time = Event::with_detail(Kind::Gap, "x");
    odd_time.ts = "2026-11-29T00:00:00\"\\Z".into();
    let bare = Event::new(Kind::Shutdown);

    let mut chain = Chain::new(GENESIS.into());
    let mut prev = GENESIS.to_owned();
    for (seq, event) in [full, odd_time, bare].into_iter().enumerate() {
        let want = sealed_whole(event.clone(), seq as u64 + 1, &prev);
        let got = chain.seal(event);
        assert_eq!(got, want);
        prev = chain.prev().to_owned();
    }
    assert_eq!(verify(&trail(3)), Ok(3));
}
