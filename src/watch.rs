//! Watches files and directories for changes to what they *resolve to*.
//!
//! Kubernetes updates a mounted Secret or ConfigMap by writing a new
//! timestamped directory and swapping the `..data` symlink; the visible files
//! are symlinks through `..data`. inotify on those files sees nothing (the
//! Envoy bug DESIGN.md warns about), and editors replace files by rename.
//! So instead of trusting events, this polls a fingerprint of the *contents*
//! reached by following every symlink, and reports a change only once it has
//! stayed the same for `settle`: a burst of writes, or a cert written before
//! its key, is reported once, after it has finished.
//!
//! The cost is one read of a few small files per interval, on a thread of
//! its own, never on the request path.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// What a reloader receives: the generation number goes up by one for every
/// settled change.
pub type Changes = watch::Receiver<u64>;

/// Starts watching `paths` (files, or directories whose top-level files are
/// watched). The thread ends once every receiver has been dropped.
pub fn spawn(
    paths: Vec<PathBuf>,
    interval: Duration,
    settle: Duration,
) -> std::io::Result<Changes> {
    let (tx, rx) = watch::channel(0u64);
    // Taken before returning, not on the thread: a change made right after
    // `spawn` returns must count as a change, however late the thread runs.
    let mut published = fingerprint(&paths);
    std::thread::Builder::new()
        .name("portcullis-watch".into())
        .spawn(move || {
            let mut pending: Option<([u8; 32], Instant)> = None;
            while !tx.is_closed() {
                std::thread::sleep(interval);
                let now = fingerprint(&paths);
                if now == published {
                    pending = None;
                    continue;
                }
                match pending {
                    Some((fp, since)) if fp == now => {
                        if since.elapsed() >= settle {
                            published = now;
                            pending = None;
                            tx.send_modify(|generation| *generation += 1);
                        }
                    }
                    _ => pending = Some((now, Instant::now())),
                }
            }
        })?;
    Ok(rx)
}

/// A digest of everything `paths` resolve to: names and contents of the
/// regular files (symlinks followed), and any error reading them, so that a
/// file appearing, vanishing or becoming unreadable is a change too.
pub fn fingerprint(paths: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    for path in paths {
        h.update(path.as_os_str().as_encoded_bytes());
        h.update([0]);
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => hash_dir(&mut h, path),
            Ok(_) => hash_file(&mut h, path),
            Err(e) => h.update(format!("error:{:?}", e.kind()).as_bytes()),
        }
    }
    h.finalize().into()
}

fn hash_dir(h: &mut Sha256, dir: &Path) {
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            // `..data` and the timestamped directories behind it are reached
            // through the visible symlinks; hidden entries (editor swap
            // files included) are not part of the set.
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
            })
            .collect(),
        Err(e) => {
            h.update(format!("error:{:?}", e.kind()).as_bytes());
            return;
        }
    };
    names.sort();
    for p in names {
        if std::fs::metadata(&p).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        h.update(p.as_os_str().as_encoded_bytes());
        h.update([0]);
        hash_file(h, &p);
    }
}

fn hash_file(h: &mut Sha256, path: &Path) {
    match std::fs::read(path) {
        Ok(bytes) => {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
        Err(e) => h.update(format!("error:{:?}", e.kind()).as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Lays out a directory the way the kubelet does for a ConfigMap.
    fn configmap(root: &Path, generation: &str, files: &[(&str, &str)]) {
        let data = root.join(format!("..{generation}"));
        std::fs::create_dir_all(&data).unwrap();
        for (name, text) in files {
            std::fs::write(data.join(name), text).unwrap();
            let visible = root.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(Path::new("..data").join(name), &visible).unwrap();
            }
        }
        let tmp = root.join("..data_tmp");
        symlink(format!("..{generation}"), &tmp).unwrap();
        // The atomic swap: rename over the old ..data link.
        std::fs::rename(&tmp, root.join("..data")).unwrap();
    }

    #[test]
    fn fingerprint_sees_a_configmap_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        configmap(dir.path(), "2026_11_25_1", &[("authz.rego", "package a")]);
        let paths = vec![dir.path().to_owned()];
        let before = fingerprint(&paths);
        assert_eq!(before, fingerprint(&paths));
        configmap(dir.path(), "2026_11_25_2", &[("authz.rego", "package b")]);
        assert_ne!(before, fingerprint(&paths));
    }

    #[test]
    fn fingerprint_sees_files_appear_vanish_and_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svid.pem");
        let paths = vec![file.clone(), dir.path().join("other.pem")];
        let missing = fingerprint(&paths);
        std::fs::write(&file, "a").unwrap();
        let one = fingerprint(&paths);
        assert_ne!(missing, one);
        std::fs::write(&file, "b").unwrap();
        assert_ne!(one, fingerprint(&paths));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(missing, fingerprint(&paths));
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_reported_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.rego");
        std::fs::write(&file, "0").unwrap();
        let mut changes = spawn(
            vec![dir.path().to_owned()],
            Duration::from_millis(10),
            Duration::from_millis(50),
        )
        .unwrap();
        for i in 1..5 {
            std::fs::write(&file, i.to_string()).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*changes.borrow_and_update(), 1);
    }
}
