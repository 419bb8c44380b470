//! Upstream circuit breaker: after `threshold` consecutive transport
//! failures (refused connection, timeout) requests are answered 503 at once
//! instead of each waiting on a dead service; after `cooldown` one request
//! is let through as a probe, and its outcome closes or re-opens the
//! circuit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntGauge;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else is refused until it reports.
    HalfOpen,
}

pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
    gauge: IntGauge,
}

/// Permission to send one request. Report its outcome with
/// [`Admission::record`]; dropping it unreported (the caller went away)
/// counts as neither success nor failure, and a half-open probe is retried
/// by the next request.
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration, gauge: IntGauge) -> Breaker {
        gauge.set(0);
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
            gauge,
        }
    }

    /// `None` while the circuit is open: answer 503 without trying.
    pub fn admit(&self) -> Option<Admission<'_>> {
        let mut state = self.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if Instant::now() >= until => {
                self.set(&mut state, State::HalfOpen);
                true
            }
            State::Open { .. } | State::HalfOpen => return None,
        };
        Some(Admission {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state invalid
        // (every write is a whole value), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, state: &mut State, new: State) {
        *state = new;
        self.gauge.set(match new {
            State::Closed { .. } => 0,
            State::Open { .. } => 1,
            State::HalfOpen => 2,
        });
    }

    #[cfg(test)]
    fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }
}

impl Admission<'_> {
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        let b = self.breaker;
        let mut state = b.lock();
        let next = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < b.threshold => State::Closed {
                failures: failures + 1,
            },
            (_, false) => {
                if !matches!(*state, State::Open { .. }) {
                    tracing::warn!(cooldown = ?b.cooldown, "upstream circuit opened");
                }
                State::Open {
                    until: Instant::now() + b.cooldown,
                }
            }
        };
        if matches!(*state, State::HalfOpen) && success {
            tracing::info!("upstream circuit closed: probe succeeded");
        }
        b.set(&mut state, next);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.lock();
            if matches!(*state, State::HalfOpen) {
                // Let the next request probe at once.
                let now = Instant::now();
                self.breaker.set(&mut state, State::Open { until: now });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cooldown: Duration) -> Breaker {
        Breaker::new(3, cooldown, IntGauge::new("g", "g").unwrap())
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_a_good_probe() {
        let b = breaker(Duration::ZERO);
        b.admit().unwrap().record(false);
        b.admit().unwrap().record(true); // a success resets the count
        for _ in 0..3 {
            b.admit().unwrap().record(false);
        }
        assert!(b.is_open());
        assert_eq!(b.gauge.get(), 1);
        // Cooldown zero: the next request is the probe; a second concurrent
        // one is refused while it is out.
        let probe = b.admit().unwrap();
        assert_eq!(b.gauge.get(), 2);
        assert!(b.admit().is_none());
        probe.record(true);
        assert!(!b.is_open());
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn open_circuit_refuses_until_cooldown_and_a_failed_probe_reopens() {
        let b = breaker(Duration::from_secs(60));
        for _ in 0..3 {
            b.admit().unwrap().record(false);
        }
        assert!(b.admit().is_none());
        *b.state.lock().unwrap() = State::Open {
            until: Instant::now(),
        };
        b.admit().unwrap().record(false);
        assert!(
            b.admit().is_none(),
            "a failed probe re-opens for a full cooldown"
        );
    }

    #[test]
    fn an_abandoned_probe_does_not_wedge_the_circuit() {
        let b = breaker(Duration::ZERO);
        for _ in 0..3 {
            b.admit().unwrap().record(false);
        }
        drop(b.admit().unwrap());
        b.admit().unwrap().record(true);
        assert!(!b.is_open());
    }
}
