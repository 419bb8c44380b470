//! The inbound data path on worker threads, one single-threaded runtime
//! each, all accepting from the one listening socket.
//!
//! Why not the process's multi-threaded runtime: there a request hops
//! between threads (the accept, the TLS stream, the upstream pool's
//! connection task and work stealing each wake whichever worker is free),
//! and on a loaded two-core pod those wake-ups and context switches were
//! a large share of a request's CPU (docs/performance.md, "Second round":
//! 10-20% in issue 7's runs). Here a connection,
//! its requests and the upstream connections it uses stay on one thread
//! from accept to close, as in nginx's worker processes. Every worker
//! shares the identity and policy snapshots, the audit sink, the metrics,
//! the rate limiter, the connection limit and the upstream's circuit
//! breaker; only the upstream connection pool is per worker.
//!
//! The workers share one socket (a duplicated descriptor), not
//! `SO_REUSEPORT` sockets: with reuse-port any other process of the same
//! user could bind the port too and take a share of the pod's inbound
//! connections.

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::balance::Balance;
use super::{serve, Shared};
use crate::drain;

/// Starts `workers` threads serving `listener`. Once draining starts, each
/// stops accepting, lets its connections finish within `drain_timeout`,
/// then ends (connections still open then are closed).
pub fn spawn(
    listener: TcpListener,
    shared: &Shared,
    workers: usize,
    drain: drain::Watch,
    drain_timeout: Duration,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let listener = listener.into_std()?;
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    let workers = workers.max(1);
    let balance = Balance::new(workers);
    let mut handles = Vec::with_capacity(workers);
    for i in 0..workers {
        let socket = listener.try_clone()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared = Arc::new(shared.for_worker());
        let slots = slots.clone();
        let seats = (balance.clone(), i);
        let drain = drain.clone();
        let handle = std::thread::Builder::new()
            .name(format!("portcullis-worker-{i}"))
            .spawn(move || rt.block_on(run(socket, shared, slots, seats, drain, drain_timeout)))?;
        handles.push(handle);
    }
    Ok(handles)
}

async fn run(
    socket: StdListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    seats: (Arc<Balance>, usize),
    drain: drain::Watch,
    drain_timeout: Duration,
) {
    // Registered with this thread's runtime, which must be running.
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "inbound worker cannot use the listener; the other workers serve");
            return;
        }
    };
    // Counted in the balance only while this worker serves the socket.
    let _member = seats.0.join(seats.1);
    let deadline = {
        let drain = drain.clone();
        async move {
            drain.signaled().await;
            tokio::time::sleep(drain_timeout).await;
        }
    };
    tokio::select! {
        _ = serve(listener, shared, slots, seats, drain) => {}
        _ = deadline => tracing::warn!("drain deadline passed; closing this worker's remaining connections"),
    }
}
