//! Graceful shutdown: one trigger, many watchers.
//!
//! The accept loops and every connection hold a [`Watch`]. On SIGTERM the app
//! pulls the [`Trigger`]: listeners stop accepting, connections finish the
//! request in hand and close, and the app waits until the last `Watch` is
//! dropped or the drain deadline passes.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub fn channel() -> (Trigger, Watch) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel(1);
    (
        Trigger {
            signal: signal_tx,
            done: done_rx,
        },
        Watch {
            signal: signal_rx,
            _done: done_tx,
        },
    )
}

pub struct Trigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// Held by every task that must finish before the process exits; dropping
/// the last one tells the trigger that draining is complete.
#[derive(Clone)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
}

impl Trigger {
    /// Starts draining and waits for every `Watch` to be dropped, or for
    /// `deadline`. Returns whether draining completed in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let _ = self.signal.send(true);
        // recv() yields None once every sender (each Watch) is gone.
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }
}

impl Watch {
    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger was dropped without draining: treat that
        // as the signal too, rather than waiting forever.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_watchers() {
        let (trigger, watch) = channel();
        let w2 = watch.clone();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            let _ = started_tx.send(());
            drop(w2);
        });
        drop(watch);
        assert!(trigger.drain(Duration::from_secs(5)).await);
        started_rx.await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_gives_up_at_deadline() {
        let (trigger, watch) = channel();
        assert!(!watch.is_draining());
        assert!(!trigger.drain(Duration::from_millis(20)).await);
        assert!(watch.is_draining());
    }
}
