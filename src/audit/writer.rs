//! The writer thread: seals events into lines, writes them in batches,
//! rotates the file by size, syncs it as `audit.fsync` says, and handles
//! write errors as `audit.on_full` says.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::chain::Prepared;
use super::{Chain, Error, Event, Kind, Msg, Options, State, GENESIS};
use crate::config::{Fsync, OnFull};
use crate::metrics::Metrics;

/// Events taken from the queue per write: one syscall for a burst, small
/// enough that a failed batch under `fail_open` loses little.
const MAX_BATCH: usize = 256;
/// How far back from the end of an existing trail to look for its last line.
const TAIL: u64 = 1 << 20;
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How long a writer that just wrote a partial batch lets the queue fill
/// before it looks again. Each wake of this thread lands on a core the
/// request workers need: at 1 ms, audit on cost 10-12% more CPU per request
/// than audit off in the issue 7 bench; at 4 ms, within noise. The queue
/// (8192 by default) holds 4 ms of two million requests a second, and a
/// line still reaches the kernel well inside the 1 s `fsync` interval.
const GATHER: Duration = Duration::from_millis(4);

enum Wait {
    Msg(Msg),
    SyncDue,
    Closed,
}

pub(super) enum Output {
    Stdout(std::io::Stdout),
    File {
        file: File,
        path: PathBuf,
        /// A regular file: resumable and rotatable (not /dev/null, a FIFO,
        /// a character device).
        regular: bool,
        size: u64,
    },
}

impl Output {
    pub(super) fn open(options: &Options) -> Result<Output, Error> {
        if options.path == "-" {
            return Ok(Output::Stdout(std::io::stdout()));
        }
        let path = PathBuf::from(&options.path);
        let file = open_append(&path)?;
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Output::File {
            file,
            path,
            regular: meta.is_file(),
            size: meta.len(),
        })
    }

    /// Where the chain continues: after the last line of an existing trail,
    /// or from the start.
    pub(super) fn resume_point(&self) -> Result<(u64, String), Error> {
        let Output::File {
            path,
            regular: true,
            size,
            ..
        } = self
        else {
            return Ok((0, GENESIS.to_string()));
        };
        if *size == 0 {
            return Ok((0, GENESIS.to_string()));
        }
        let resume_err = |reason: String| Error::Resume {
            path: path.clone(),
            reason,
        };
        let mut f = File::open(path).map_err(|e| resume_err(format!("cannot read: {e}")))?;
        let start = size.saturating_sub(TAIL);
        f.seek(SeekFrom::Start(start))
            .map_err(|e| resume_err(format!("cannot read: {e}")))?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail)
            .map_err(|e| resume_err(format!("cannot read: {e}")))?;
        if tail.last() != Some(&b'\n') {
            return Err(resume_err(
                "the last line is incomplete (a write was cut short)".into(),
            ));
        }
        tail.pop();
        let last = tail
            .rsplit(|b| *b == b'\n')
            .next()
            .filter(|l| start == 0 || l.len() < tail.len())
            .ok_or_else(|| resume_err("no complete line in the last MiB".into()))?;
        let value: serde_json::Value = serde_json::from_slice(last)
            .map_err(|e| resume_err(format!("the last line is not JSON: {e}")))?;
        let seq = value.get("seq").and_then(|s| s.as_u64());
        let hash = value.get("hash").and_then(|h| h.as_str());
        match (seq, hash) {
            (Some(seq), Some(hash)) => Ok((seq, hash.to_owned())),
            _ => Err(resume_err("the last line has no seq or hash".into())),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Output::Stdout(_) => 0,
            Output::File { size, .. } => *size,
        }
    }

    fn rotatable(&self) -> bool {
        matches!(self, Output::File { regular: true, .. })
    }

    fn write_batch(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Output::File {
                file,
                regular,
                size,
                ..
            } => match file.write_all(bytes) {
                Ok(()) => {
                    *size += bytes.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    // A short write (ENOSPC half-way) leaves part of a line:
                    // cut the file back to the last whole line so the chain
                    // stays verifiable when writing resumes.
                    if *regular {
                        let _ = file.set_len(*size);
                    }
                    Err(e)
                }
            },
        }
    }

    /// Whether there was a file to sync (not stdout, a FIFO or a device)
    /// and the sync succeeded.
    fn sync(&mut self) -> bool {
        if let Output::File {
            file,
            regular: true,
            ..
        } = self
        {
            match file.sync_data() {
                Ok(()) => return true,
                Err(e) => tracing::error!(error = %e, "audit fsync failed"),
            }
        }
        false
    }

    /// `path` -> `path.1` -> ... -> `path.keep`, then a fresh `path`.
    fn rotate(&mut self, keep: usize) -> std::io::Result<PathBuf> {
        let Output::File {
            file, path, size, ..
        } = self
        else {
            return Err(std::io::Error::other("stdout is not rotated"));
        };
        let _ = file.sync_data();
        let numbered = |k: usize| {
            let mut p = path.clone().into_os_string();
            p.push(format!(".{k}"));
            PathBuf::from(p)
        };
        ignore_missing(std::fs::remove_file(numbered(keep)))?;
        for k in (1..keep).rev() {
            ignore_missing(std::fs::rename(numbered(k), numbered(k + 1)))?;
        }
        std::fs::rename(&*path, numbered(1))?;
        *file = open_append(path).map_err(|e| match e {
            Error::Open { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })?;
        *size = 0;
        Ok(numbered(1))
    }
}

/// Puts the calling thread (the writer) under `SCHED_BATCH`: the same
/// share of the CPU as before, but its wake-ups no longer preempt whatever
/// runs on that core. Otherwise each gathered batch woke straight onto a
/// core a request worker was using, and that worker's requests waited out
/// the page-cache copy of a few hundred lines: part of the open loop's tail
/// with audit on (issue 7's bench). Unprivileged: only real-time policies
/// and raised priorities need `CAP_SYS_NICE`. Where it is refused (a
/// seccomp profile), the writer runs as before.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn no_wakeup_preemption() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` only reads `param`, which lives on this
    // stack for the whole call and is a valid `sched_param` (0 is the one
    // priority SCHED_BATCH takes); pid 0 names the calling thread, so no
    // other thread's state is touched, and no pointer outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn no_wakeup_preemption() -> std::io::Result<()> {
    Ok(())
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn open_append(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.into(),
            source,
        })
}

pub(super) struct Loop {
    rx: mpsc::Receiver<Msg>,
    out: Output,
    chain: Chain,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    fsync: Fsync,
    max_bytes: u64,
    keep_files: usize,
    retry_interval: Duration,
    last_sync: Instant,
    /// Lines were written since the last sync.
    unsynced: bool,
    /// Lines sealed but not yet written, and how many are events that
    /// count as written (gap and rotation markers included).
    buf: Vec<u8>,
    buffered: u64,
    /// The chain as of the last line written, to seal again after a
    /// failed batch is given up.
    committed: Chain,
    /// Lost by this writer (failed batches under `fail_open`), not yet
    /// reported in a `gap` event.
    lost: u64,
    /// The gap counts in `buf`, restored if the batch is given up.
    gap_in_buf: (u64, u64),
    /// Gap and rotation lines in `buf`: not events of their own when a
    /// failed batch is counted.
    markers: u64,
}

impl Loop {
    pub(super) fn new(
        rx: mpsc::Receiver<Msg>,
        out: Output,
        chain: Chain,
        state: Arc<State>,
        metrics: Arc<Metrics>,
        options: &Options,
    ) -> Loop {
        Loop {
            rx,
            out,
            committed: chain.clone(),
            chain,
            state,
            metrics,
            fsync: options.fsync,
            max_bytes: options.max_bytes,
            keep_files: options.keep_files.max(1),
            retry_interval: options.retry_interval,
            last_sync: Instant::now(),
            unsynced: false,
            buf: Vec::with_capacity(64 * 1024),
            buffered: 0,
            lost: 0,
            gap_in_buf: (0, 0),
            markers: 0,
        }
    }

    pub(super) fn run(mut self) {
        if let Err(e) = no_wakeup_preemption() {
            tracing::debug!(error = %e, "audit writer keeps the default scheduling policy");
        }
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Only for the timed wait on an empty queue; the writer's own I/O
        // stays blocking on this thread.
        let timer = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => Some(rt),
            Err(e) => {
                tracing::error!(error = %e, "audit writer has no timer: an idle trail is synced only when the next event arrives");
                None
            }
        };
        loop {
            self.take(&mut batch);
            if batch.is_empty() {
                match self.wait(timer.as_ref()) {
                    Wait::Msg(m) => {
                        batch.push(m);
                        self.take(&mut batch);
                    }
                    Wait::SyncDue => {
                        self.sync_now();
                        continue;
                    }
                    Wait::Closed => break,
                }
            }
            let full = batch.len() == MAX_BATCH;
            let mut finish = false;
            for msg in batch.drain(..) {
                match msg {
                    Msg::Event(e) => self.push(e),
                    Msg::Finish => finish = true,
                }
            }
            self.commit();
            if finish {
                // Whatever was queued before the close is still written.
                self.rx.close();
                while let Ok(Msg::Event(e)) = self.rx.try_recv() {
                    self.push(e);
                }
                self.commit();
                break;
            }
            if !full {
                // Group commit: let the next events gather for a moment
                // instead of being woken for each. A writer parked on an
                // empty queue makes every sender pay a futex wake and a
                // context switch; one that polls after a short pause makes
                // them pay an atomic store. Requests never wait for this:
                // their slot was reserved before forwarding.
                std::thread::sleep(GATHER);
            }
        }
        if self.fsync != Fsync::Never {
            self.sync_now();
        }
    }

    /// Moves what is queued into `batch`, up to [`MAX_BATCH`].
    fn take(&mut self, batch: &mut Vec<Msg>) {
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
    }

    /// Blocks until the next message; with `fsync = "interval"` and lines
    /// written since the last sync, at most until that sync is due.
    fn wait(&mut self, timer: Option<&tokio::runtime::Runtime>) -> Wait {
        let due = (self.fsync == Fsync::Interval && self.unsynced)
            .then(|| SYNC_INTERVAL.saturating_sub(self.last_sync.elapsed()));
        let msg = match (due, timer) {
            (Some(left), Some(rt)) => {
                // The timeout is made inside the runtime: its timer
                // registers with the runtime it is created in.
                let rx = &mut self.rx;
                match rt.block_on(async move { tokio::time::timeout(left, rx.recv()).await }) {
                    Ok(m) => m,
                    Err(_) => return Wait::SyncDue,
                }
            }
            _ => self.rx.blocking_recv(),
        };
        msg.map_or(Wait::Closed, Wait::Msg)
    }

    fn push(&mut self, event: Prepared) {
        let lost = self.state.lost.swap(0, Ordering::Relaxed) + std::mem::take(&mut self.lost);
        let refused = self.state.refused.swap(0, Ordering::Relaxed);
        if lost + refused > 0 {
            let mut gap = Event::with_detail(
                Kind::Gap,
                format!(
                    "{lost} event(s) could not be recorded and {refused} request(s) were refused unrecorded since the previous line"
                ),
            );
            gap.lost = Some(lost);
            gap.refused = Some(refused);
            self.gap_in_buf.0 += lost;
            self.gap_in_buf.1 += refused;
            self.markers += 1;
            self.seal(Prepared::new(gap));
        }
        if self.max_bytes > 0
            && self.out.rotatable()
            && self.out.size() + self.buf.len() as u64 >= self.max_bytes
        {
            self.commit();
            self.rotate();
        }
        self.seal(event);
    }

    fn seal(&mut self, event: Prepared) {
        self.chain.seal_into(&event, &mut self.buf);
        self.buffered += 1;
    }

    fn rotate(&mut self) {
        if !self.buf.is_empty() {
            // The batch before the rotation could not be written; the old
            // file stays current until it can.
            return;
        }
        match self.out.rotate(self.keep_files) {
            Ok(previous) => {
                // The new file opens by naming where the chain came from;
                // its `prev` is the previous file's last hash.
                let detail = format!(
                    "rotated at {} bytes; continues {} (last seq {}, last hash {})",
                    self.max_bytes,
                    previous.display(),
                    self.chain.seq(),
                    self.chain.prev()
                );
                self.markers += 1;
                self.seal(Prepared::new(Event::with_detail(Kind::Rotated, detail)));
            }
            Err(e) => {
                tracing::error!(error = %e, "audit file rotation failed; still writing to the current file")
            }
        }
    }

    /// Writes the buffer. On failure, `fail_closed` retries the same bytes
    /// (nothing it accepted is lost; requests are refused meanwhile) until
    /// shutdown; `fail_open` gives the batch up and counts it for the next
    /// `gap` event.
    fn commit(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut logged = false;
        loop {
            match self.out.write_batch(&self.buf) {
                Ok(()) => {
                    if self.state.failing.swap(false, Ordering::AcqRel) {
                        tracing::warn!("audit trail writable again");
                    }
                    self.metrics.audit_written.inc_by(self.buffered);
                    self.buf.clear();
                    self.buffered = 0;
                    self.gap_in_buf = (0, 0);
                    self.markers = 0;
                    self.committed = self.chain.clone();
                    self.maybe_sync();
                    return;
                }
                Err(e) => {
                    if !self.state.failing.swap(true, Ordering::AcqRel) || !logged {
                        tracing::error!(error = %e, on_full = ?self.state.on_full, "audit write failed");
                        logged = true;
                    }
                    let stopping = self.state.stopping.load(Ordering::Acquire);
                    if self.state.on_full == OnFull::FailClosed && !stopping {
                        std::thread::sleep(self.retry_interval);
                        continue;
                    }
                    self.give_up();
                    return;
                }
            }
        }
    }

    fn give_up(&mut self) {
        let events = self.buffered.saturating_sub(self.markers);
        self.metrics.audit_dropped.inc_by(events);
        // The counts the lost gap line carried go back into the next one.
        self.lost += events + self.gap_in_buf.0;
        self.state
            .refused
            .fetch_add(self.gap_in_buf.1, Ordering::Relaxed);
        self.buf.clear();
        self.buffered = 0;
        self.gap_in_buf = (0, 0);
        self.markers = 0;
        self.chain = self.committed.clone();
    }

    fn sync_now(&mut self) {
        if self.out.sync() {
            self.metrics.audit_syncs.inc();
        }
        self.last_sync = Instant::now();
        self.unsynced = false;
    }

    fn maybe_sync(&mut self) {
        let due = match self.fsync {
            Fsync::Never => false,
            Fsync::Always => true,
            // At most SYNC_INTERVAL of written lines unsynced, busy or
            // idle: `wait` syncs a writer whose queue ran dry once the
            // interval is up. Syncing whenever the queue ran dry instead
            // synced after nearly every batch under steady load (a tenth
            // of the sidecar's CPU in the issue 7 profile).
            Fsync::Interval => self.last_sync.elapsed() >= SYNC_INTERVAL,
        };
        if due {
            self.sync_now();
        } else {
            self.unsynced = true;
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The scheduling policy of the calling thread, from the kernel's own
    /// account of it (field 41 of `/proc/thread-self/stat`).
    fn policy_of_this_thread() -> Option<i32> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
        // The command name may hold spaces; fields are counted after it.
        let rest = stat.rsplit_once(") ")?.1;
        rest.split_whitespace().nth(41 - 3)?.parse().ok()
    }

    #[test]
    fn no_wakeup_preemption_moves_the_thread_to_sched_batch() {
        let policy = std::thread::spawn(|| {
            let before = policy_of_this_thread();
            super::no_wakeup_preemption().map(|()| (before, policy_of_this_thread()))
        })
        .join()
        .expect("the probe thread ran");
        match policy {
            Ok((before, after)) => {
                assert_eq!(before, Some(libc::SCHED_OTHER));
                assert_eq!(after, Some(libc::SCHED_BATCH));
            }
            // Only a sandbox that forbids the call may refuse it.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
}
