//! Keeps the audit trail out of the page cache once it is on disk.
//!
//! The trail is written once and never read back by the sidecar, yet every
//! appended page stays cached until memory pressure evicts it: a pod
//! appending 25 MB/s grows its memory cgroup's page cache by that much a
//! second, and each append takes a page the kernel has not used lately.
//! Here the writer starts writeback of each batch as soon as it is
//! written and, once the trail has grown [`KEEP`] bytes past an older
//! range, waits for that range's writeback (finished long before) and drops
//! its pages. Those freed pages are the ones the next appends get. Writing
//! 26 MB/s in 134 KB appends (the issue 7 bench's rate), a writer spent
//! about 40% less CPU this way on the bench machine.
//!
//! The newest [`KEEP`] bytes stay cached, so a log shipper tailing the file
//! reads what was just written from memory.
//!
//! Durability is unchanged: this starts and waits for data writeback but
//! flushes no metadata; `audit.fsync` still decides when the trail is
//! synced. A writeback error seen here is logged as an fsync error is
//! (waiting consumes the error, so the next fsync may not report it).

use std::fs::File;

/// The most recently written bytes left in the page cache.
const KEEP: u64 = 4 << 20;
/// Pages are dropped in ranges at least this long: two syscalls per
/// megabyte rather than per batch.
const STEP: u64 = 1 << 20;

#[derive(Debug, Default)]
pub(super) struct DropBehind {
    /// Writeback has been started for everything before this offset.
    started: u64,
    /// Pages before this offset have been dropped.
    dropped: u64,
}

impl DropBehind {
    /// For a file whose first `size` bytes were written before: those are
    /// left as they are.
    pub(super) fn from(size: u64) -> DropBehind {
        DropBehind {
            started: size,
            dropped: size,
        }
    }

    /// After the file has grown to `end` bytes.
    pub(super) fn written(&mut self, file: &File, end: u64) {
        if end <= self.started {
            return;
        }
        if let Err(e) = os::start_writeback(file, self.started, end - self.started) {
            tracing::error!(error = %e, "audit writeback failed");
        }
        self.started = end;
        let Some(until) = end.checked_sub(KEEP) else {
            return;
        };
        if until < self.dropped + STEP {
            return;
        }
        let len = until - self.dropped;
        // Pages still under writeback (or dirty) are not dropped, so wait
        // for it first; it was started at least KEEP bytes ago.
        match os::wait_writeback(file, self.dropped, len) {
            Ok(()) => os::drop_cached(file, self.dropped, len),
            Err(e) => tracing::error!(error = %e, "audit writeback failed"),
        }
        self.dropped = until;
    }
}

/// Drops a whole file's cached pages (a rotated-out trail, already synced).
pub(super) fn drop_file(file: &File) {
    os::drop_cached(file, 0, 0);
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod os {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    fn check(rc: libc::c_int) -> std::io::Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Offsets come from byte counts of this process's own writes, far
    /// below `i64::MAX`; saturate rather than wrap if they ever were not.
    fn off(n: u64) -> libc::off64_t {
        libc::off64_t::try_from(n).unwrap_or(libc::off64_t::MAX)
    }

    pub(super) fn start_writeback(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: sync_file_range takes a descriptor, two integers and
        // flags, and no pointer. The descriptor is `file`'s, open for the
        // whole call because `file` is borrowed across it.
        check(unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                off(offset),
                off(len),
                libc::SYNC_FILE_RANGE_WRITE,
            )
        })
    }

    pub(super) fn wait_writeback(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: as in `start_writeback`.
        check(unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                off(offset),
                off(len),
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        })
    }

    /// Advice only: a failure leaves the pages cached, as without it.
    pub(super) fn drop_cached(file: &File, offset: u64, len: u64) {
        // SAFETY: posix_fadvise takes a descriptor and integers, no
        // pointer; `file` is borrowed for the call, so the descriptor is
        // open. It returns an error number rather than setting errno.
        let rc = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                off(offset),
                off(len),
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if rc != 0 {
            tracing::debug!(errno = rc, "audit trail pages not dropped from the cache");
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    use std::fs::File;

    pub(super) fn start_writeback(_: &File, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }

    pub(super) fn wait_writeback(_: &File, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }

    pub(super) fn drop_cached(_: &File, _: u64, _: u64) {}
}

#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    const PAGE: u64 = 4096;

    /// Which pages of the file's first `len` bytes are in the page cache.
    fn resident(file: &File, len: u64) -> Vec<bool> {
        let len = usize::try_from(len).expect("test file fits in memory");
        // SAFETY: a fresh read-only shared mapping of `len` bytes of an
        // open file, at an address the kernel picks; nothing reads through
        // it (that would fault pages in), and it is unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        let mut pages = vec![0u8; len.div_ceil(PAGE as usize)];
        // SAFETY: `addr` is the page-aligned start of the `len`-byte
        // mapping above, and `pages` has one byte per page of it.
        let rc = unsafe { libc::mincore(addr, len, pages.as_mut_ptr()) };
        let err = std::io::Error::last_os_error();
        // SAFETY: the mapping made above, unmapped once and not used after.
        unsafe { libc::munmap(addr, len) };
        assert_eq!(rc, 0, "mincore: {err}");
        pages.iter().map(|p| p & 1 == 1).collect()
    }

    /// tmpfs keeps its pages whatever the advice: nothing to check there.
    fn on_tmpfs(dir: &std::path::Path) -> bool {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: `path` is a NUL-terminated string and `stat` a
        // writable statfs the call fills; neither outlives the call.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
        assert_eq!(rc, 0, "statfs: {}", std::io::Error::last_os_error());
        stat.f_type == libc::TMPFS_MAGIC
    }

    #[test]
    fn pages_behind_the_newest_are_dropped_and_the_newest_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        if on_tmpfs(dir.path()) {
            eprintln!("skipped: {} is on tmpfs", dir.path().display());
            return;
        }
        // Readable too, for the mapping `resident` makes.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("audit.log"))
            .expect("create");
        let chunk = vec![b'x'; 128 << 10];
        let mut behind = DropBehind::from(0);
        let mut end = 0;
        while end < KEEP + 3 * STEP {
            file.write_all(&chunk).expect("write");
            end += chunk.len() as u64;
            behind.written(&file, end);
        }
        assert!(
            behind.dropped >= 2 * STEP,
            "dropped up to {}",
            behind.dropped
        );
        assert!(end - behind.dropped < KEEP + STEP + chunk.len() as u64);

        let pages = resident(&file, end);
        let dropped = (behind.dropped / PAGE) as usize;
        let kept = ((end - KEEP) / PAGE) as usize;
        let cached_before = pages[..dropped].iter().filter(|p| **p).count();
        assert_eq!(cached_before, 0, "of {dropped} pages dropped");
        assert!(
            pages[kept..].iter().all(|p| *p),
            "the newest KEEP bytes stay cached"
        );
    }

    #[test]
    fn a_resumed_file_is_left_alone_before_where_it_resumed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut file = File::create(dir.path().join("audit.log")).expect("create");
        let old = vec![b'o'; (KEEP + 2 * STEP) as usize];
        file.write_all(&old).expect("write");
        let mut behind = DropBehind::from(old.len() as u64);
        file.write_all(b"one line\n").expect("write");
        behind.written(&file, old.len() as u64 + 9);
        assert_eq!(behind.dropped, old.len() as u64);
        assert_eq!(behind.started, old.len() as u64 + 9);
    }
}
