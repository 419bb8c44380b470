//! The file source: the SVID chain, key, bundle and federation bundles on
//! disk, reloaded when what they resolve to changes.
//!
//! `watch` reports a change only once the files have stopped changing, and
//! follows the Kubernetes `..data` symlink swap. Every change is loaded and
//! validated as a whole with [`super::load_files`]; a set that does not
//! validate (a cert whose key has not been written yet, a truncated PEM, a
//! chain the bundle does not vouch for) is counted and logged and the last
//! good snapshot stays until the next change.

use std::path::PathBuf;
use std::time::Duration;

use super::rotation::Publisher;
use super::{load_files, Error, IdentitySnapshot};
use crate::config;
use crate::drain;
use crate::watch;

const SOURCE: &str = "files";

/// Every file the identity is built from.
pub fn watched_paths(cfg: &config::Identity) -> Vec<PathBuf> {
    let mut paths = vec![cfg.cert.clone(), cfg.key.clone(), cfg.bundle.clone()];
    paths.extend(cfg.federation.values().cloned());
    paths
}

/// Starts watching; the returned future reloads on every settled change
/// until draining starts.
pub fn spawn(
    cfg: config::Identity,
    publisher: Publisher,
    drain: drain::Watch,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let interval = Duration::from_millis(cfg.watch_interval_ms.max(1));
    let changes = watch::spawn(watched_paths(&cfg), interval, interval).map_err(Error::Watch)?;
    Ok(tokio::spawn(reload_on_change(
        cfg, publisher, changes, drain,
    )))
}

async fn reload_on_change(
    cfg: config::Identity,
    publisher: Publisher,
    mut changes: watch::Changes,
    drain: drain::Watch,
) {
    // The files may have changed between the startup load and the watcher
    // taking its baseline; catch up once, publishing only a real change.
    if let Ok(Ok(snapshot)) = load(&cfg).await {
        let current = publisher.current();
        if snapshot.serial != current.serial || snapshot.bundle_info != current.bundle_info {
            publisher.publish(snapshot, SOURCE);
        }
    }
    loop {
        tokio::select! {
            _ = drain.signaled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        match load(&cfg).await {
            Ok(Ok(snapshot)) => publisher.publish(snapshot, SOURCE),
            Ok(Err(e)) => publisher.reject(SOURCE, &e),
            Err(e) => publisher.reject(SOURCE, &e),
        }
    }
}

/// Reading and verifying is blocking work; it stays off the runtime threads
/// that serve requests.
async fn load(
    cfg: &config::Identity,
) -> Result<Result<IdentitySnapshot, Error>, tokio::task::JoinError> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || load_files(&cfg)).await
}
