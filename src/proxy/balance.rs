//! Spreads inbound connections evenly over the workers.
//!
//! All workers wait on the one listening socket, and the kernel wakes every
//! one of them for a new connection. Whichever is running first accepts,
//! and keeps accepting while the others are still being scheduled: on two
//! cores a burst of 32 keep-alive connections was often split 32/0 or
//! 28/5, leaving one worker with all the requests and the other idle
//! (issue 7's bench, `perf` on `accept4`). So a worker takes its turn at
//! the socket only while it holds no more than one connection above the
//! least loaded worker; the least loaded one may always accept, so some
//! worker is always accepting. Only workers serving the socket count: one
//! that could not register it, or has stopped, must not hold the others
//! back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// How many more connections than the least loaded worker a worker may
/// hold and still accept.
const SLACK: usize = 1;

/// Live connections per worker.
#[derive(Debug)]
pub struct Balance {
    counts: Box<[AtomicUsize]>,
    /// Which workers are accepting from the socket (see [`Member`]).
    serving: Box<[AtomicBool]>,
    /// Signalled whenever a count changes, for workers waiting their turn.
    changed: Notify,
}

impl Balance {
    pub fn new(workers: usize) -> Arc<Balance> {
        Arc::new(Balance {
            counts: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            serving: (0..workers.max(1))
                .map(|_| AtomicBool::new(false))
                .collect(),
            changed: Notify::new(),
        })
    }

    /// Resolves once worker `me` may accept a connection.
    pub async fn turn(&self, me: usize) {
        loop {
            // Registered before the check, so a change between the check
            // and the wait is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.may_accept(me) {
                return;
            }
            changed.await;
        }
    }

    fn may_accept(&self, me: usize) -> bool {
        let Some(mine) = self.counts.get(me) else {
            return true;
        };
        let mine = mine.load(Ordering::Relaxed);
        let least = self
            .counts
            .iter()
            .zip(self.serving.iter())
            .filter(|(_, serving)| serving.load(Ordering::Relaxed))
            .map(|(c, _)| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(mine);
        mine <= least + SLACK
    }

    /// Worker `me` serves the socket until the returned guard is dropped
    /// (its serve loop ended, or its thread unwound).
    pub fn join(self: &Arc<Balance>, me: usize) -> Member {
        if let Some(s) = self.serving.get(me) {
            s.store(true, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
        Member {
            balance: self.clone(),
            me,
        }
    }

    /// Counts a connection for worker `me` until the seat is dropped.
    pub fn seat(self: &Arc<Balance>, me: usize) -> Seat {
        if let Some(c) = self.counts.get(me) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
        Seat {
            balance: self.clone(),
            me,
        }
    }

    #[cfg(test)]
    fn count(&self, me: usize) -> usize {
        self.counts[me].load(Ordering::Relaxed)
    }
}

/// A worker serving the socket.
#[derive(Debug)]
pub struct Member {
    balance: Arc<Balance>,
    me: usize,
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(s) = self.balance.serving.get(self.me) {
            s.store(false, Ordering::Relaxed);
        }
        self.balance.changed.notify_waiters();
    }
}

/// One live connection on one worker.
#[derive(Debug)]
pub struct Seat {
    balance: Arc<Balance>,
    me: usize,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(c) = self.balance.counts.get(self.me) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        self.balance.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future as _;
    use std::time::Duration;

    fn ready(balance: &Balance, me: usize) -> bool {
        let turn = balance.turn(me);
        tokio::pin!(turn);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        turn.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn a_worker_ahead_by_more_than_the_slack_waits_and_the_least_loaded_never_does() {
        let balance = Balance::new(2);
        let _members = [balance.join(0), balance.join(1)];
        let a1 = balance.seat(0);
        assert!(ready(&balance, 0), "1 against 0 is within the slack");
        let _a2 = balance.seat(0);
        assert!(!ready(&balance, 0), "2 against 0 must wait");
        assert!(ready(&balance, 1), "the least loaded worker always may");
        drop(a1);
        assert!(ready(&balance, 0), "back to 1 against 0");
        assert_eq!(balance.count(0), 1);
    }

    #[test]
    fn one_worker_always_accepts() {
        let balance = Balance::new(1);
        let _member = balance.join(0);
        let _seats: Vec<_> = (0..100).map(|_| balance.seat(0)).collect();
        assert!(ready(&balance, 0));
    }

    #[test]
    fn a_worker_not_serving_the_socket_holds_no_one_back() {
        let balance = Balance::new(3);
        // Worker 2 never registered the socket.
        let _members = [balance.join(0), balance.join(1)];
        let _seats: Vec<_> = (0..5)
            .flat_map(|_| [balance.seat(0), balance.seat(1)])
            .collect();
        assert!(ready(&balance, 0), "5 against 5 among the serving workers");
        let one = balance.join(2);
        assert!(!ready(&balance, 0), "worker 2 serves now and holds nothing");
        drop(one);
        assert!(ready(&balance, 0), "worker 2 stopped serving");
    }

    /// Worker 0 holding two connections, worker 1 none.
    struct Scene {
        balance: Arc<Balance>,
        one: Option<Member>,
        first: Option<Seat>,
        more: Vec<Seat>,
    }

    /// Worker 0 waits its turn until `change` is made to the scene, then
    /// must be woken. Everything the change leaves in place stays alive
    /// while the test waits.
    async fn woken_by(change: impl FnOnce(&mut Scene)) {
        let balance = Balance::new(2);
        let _zero = balance.join(0);
        let mut scene = Scene {
            one: Some(balance.join(1)),
            first: Some(balance.seat(0)),
            more: vec![balance.seat(0)],
            balance,
        };
        let waiting = tokio::spawn({
            let balance = scene.balance.clone();
            async move { balance.turn(0).await }
        });
        // One poll of the waiting task: it must not be through yet.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        change(&mut scene);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("worker 0 was woken")
            .expect("the turn task ran to the end");
        drop(scene);
    }

    #[tokio::test]
    async fn a_waiting_worker_is_woken_when_another_catches_up() {
        woken_by(|scene| {
            let seat = scene.balance.seat(1);
            scene.more.push(seat);
        })
        .await;
    }

    #[tokio::test]
    async fn a_waiting_worker_is_woken_when_its_own_connection_ends() {
        woken_by(|scene| scene.first = None).await;
    }

    #[tokio::test]
    async fn a_waiting_worker_is_woken_when_another_stops_serving() {
        woken_by(|scene| scene.one = None).await;
    }
}
