//! The SPIFFE Workload API source: the agent (SPIRE) streams X.509 contexts
//! over a Unix socket with `FetchX509SVID`; every update is validated like a
//! file reload and published.
//!
//! While the agent is unreachable (restarting, upgrading) the last valid
//! snapshot keeps serving, and the connection is retried with backoff;
//! readiness still turns false before that SVID expires. An agent that
//! answers PermissionDenied has decided this workload must not have an
//! identity: the sidecar reports not ready until it is given one again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::workload_api::{WorkloadApiClient, WorkloadApiError, X509Context};

use super::rotation::Publisher;
use super::{build, Error, IdentitySnapshot};
use crate::config;
use crate::drain;
use crate::tls::TrustBundles;

const SOURCE: &str = "workload_api";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why the identity source cannot currently be trusted to renew; `/readyz`
/// reports it. `None` while the source is healthy.
#[derive(Default)]
pub struct SourceHealth(ArcSwapOption<String>);

impl SourceHealth {
    pub fn problem(&self) -> Option<Arc<String>> {
        self.0.load_full()
    }

    fn set(&self, problem: String) {
        self.0.store(Some(Arc::new(problem)));
    }

    fn clear(&self) {
        self.0.store(None);
    }
}

/// Waits for the first valid X.509 context, retrying with backoff until
/// `deadline` (the agent may start after the sidecar). PermissionDenied ends
/// the wait at once: retrying will not change the agent's mind quickly.
pub async fn fetch_initial(
    cfg: &config::Identity,
    addr: &str,
    deadline: Duration,
) -> Result<IdentitySnapshot, Error> {
    let give_up = tokio::time::Instant::now() + deadline;
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = async {
            let client = WorkloadApiClient::connect_to(addr).await?;
            client.fetch_x509_context().await
        };
        let last = match attempt.await {
            Ok(ctx) => return snapshot(cfg, addr, &ctx),
            Err(e @ WorkloadApiError::PermissionDenied(_)) => {
                return Err(workload_api_error(addr, &e));
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() + backoff > give_up {
            return Err(Error::WorkloadApi {
                addr: addr.to_owned(),
                message: format!("no X.509-SVID within {}s: {last}", deadline.as_secs()),
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Streams updates until draining starts.
pub fn spawn(
    cfg: config::Identity,
    addr: String,
    publisher: Publisher,
    health: Arc<SourceHealth>,
    drain: drain::Watch,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = drain.signaled() => {}
            _ = stream_forever(&cfg, &addr, &publisher, &health) => {}
        }
    })
}

async fn stream_forever(
    cfg: &config::Identity,
    addr: &str,
    publisher: &Publisher,
    health: &SourceHealth,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let ended = stream_once(cfg, addr, publisher, health, &mut backoff).await;
        match ended {
            Err(e @ WorkloadApiError::PermissionDenied(_)) => {
                let e = workload_api_error(addr, &e);
                tracing::error!(error = %e, "the SPIFFE agent refuses this workload an identity; not ready");
                health.set(e.to_string());
            }
            Err(e) => tracing::warn!(
                addr,
                error = %e,
                retry_in = ?backoff,
                "Workload API stream lost; serving the last valid SVID until it is back"
            ),
            Ok(()) => tracing::warn!(
                addr,
                retry_in = ?backoff,
                "Workload API stream ended; serving the last valid SVID until it is back"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn stream_once(
    cfg: &config::Identity,
    addr: &str,
    publisher: &Publisher,
    health: &SourceHealth,
    backoff: &mut Duration,
) -> Result<(), WorkloadApiError> {
    let client = WorkloadApiClient::connect_to(addr).await?;
    let mut updates = client.stream_x509_contexts().await?;
    while let Some(update) = updates.next().await {
        let ctx = update?;
        // A message from the agent proves it is back; reconnects after the
        // next loss start from the shortest wait again.
        *backoff = BACKOFF_MIN;
        match snapshot(cfg, addr, &ctx) {
            Ok(s) => {
                health.clear();
                // Every (re)connect starts with the current context; only a
                // real change is a rotation.
                let current = publisher.current();
                if s.serial != current.serial || s.bundle_info != current.bundle_info {
                    publisher.publish(s, SOURCE);
                }
            }
            Err(e) => publisher.reject(SOURCE, &e),
        }
    }
    Ok(())
}

/// Validates an X.509 context exactly as the file source validates files.
fn snapshot(
    cfg: &config::Identity,
    addr: &str,
    ctx: &X509Context,
) -> Result<IdentitySnapshot, Error> {
    let svid = ctx
        .svids()
        .iter()
        .find(|s| s.spiffe_id().trust_domain_name() == cfg.trust_domain)
        .or_else(|| ctx.default_svid())
        .ok_or_else(|| Error::WorkloadApi {
            addr: addr.to_owned(),
            message: "the agent sent no X.509-SVID".into(),
        })?;
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let mut bundles = TrustBundles::new();
    for (td, bundle) in ctx.bundle_set().iter() {
        let anchors: Vec<_> = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        // An empty federated bundle trusts no one: the same as no bundle.
        if !anchors.is_empty() {
            bundles.insert(td.as_str(), anchors)?;
        }
    }
    // Errors name the agent's address where the file source names files.
    let origin = config::Identity {
        cert: PathBuf::from(addr),
        key: PathBuf::from(addr),
        bundle: PathBuf::from(addr),
        ..cfg.clone()
    };
    build(chain, key, Arc::new(bundles), &origin)
}

fn workload_api_error(addr: &str, e: &WorkloadApiError) -> Error {
    Error::WorkloadApi {
        addr: addr.to_owned(),
        message: e.to_string(),
    }
}
