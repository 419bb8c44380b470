//! Wires the components together: loads identity and policy (refusing to
//! start without both), starts the audit writer, binds the listeners and
//! returns their bound addresses, so tests can run the whole sidecar on
//! `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::Registry;
use tokio::net::TcpListener;

use crate::admin;
use crate::audit::{self, Event};
use crate::config::{self, Config};
use crate::drain;
use crate::identity;
use crate::metrics::Metrics;
use crate::outbound::{self, Outbound};
use crate::policy::{self, reload, PolicySnapshot};
use crate::proxy::{self, Limits, Shared, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error("policy.dir: {0}")]
    Policy(#[from] policy::Error),
    #[error(transparent)]
    Audit(#[from] audit::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("inbound workers could not start: {0}")]
    Workers(std::io::Error),
    #[error("policy reloader could not start: {0}")]
    Watch(std::io::Error),
    #[error("{key} {addr}: cannot listen: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How often the own SVID's age is checked for the 50%/90% log warnings.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// A started sidecar.
pub struct Running {
    pub inbound_addr: SocketAddr,
    /// The `[outbound]` listener, when configured.
    pub outbound_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub identity: Arc<ArcSwap<identity::IdentitySnapshot>>,
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    /// The outcome of the latest policy (re)load, as `/policy` shows it.
    pub policy_reload: Arc<ArcSwap<reload::LastReload>>,
    audit: audit::AuditSink,
    audit_writer: audit::Writer,
    trigger: drain::Trigger,
    listening: Arc<AtomicBool>,
    drain_timeout: Duration,
}

/// Everything `config check` checks: the config, then the identity and the
/// policy it names, exactly as `start` would load them.
pub async fn check(config: &Config) -> Result<(identity::IdentitySnapshot, PolicySnapshot), Error> {
    config.validate()?;
    let identity = match &config.identity.workload_api {
        Some(addr) => {
            identity::workload_api::fetch_initial(&config.identity, addr, WORKLOAD_API_WAIT).await?
        }
        None => identity::load_files(&config.identity)?,
    };
    let policy = load_policy(config)?;
    Ok((identity, policy))
}

/// How long startup waits for the SPIFFE agent to hand out the first SVID.
const WORKLOAD_API_WAIT: Duration = Duration::from_secs(30);

fn load_policy(config: &Config) -> Result<PolicySnapshot, policy::Error> {
    PolicySnapshot::load_checked(
        &config.policy.dir,
        &config.policy.query,
        Duration::from_millis(config.policy.eval_timeout_ms),
        config.policy.require_tests_pass,
        config.policy.evaluator,
    )?
    .with_egress_query(config.policy.egress_query.as_deref())?
    .with_input_headers(config.policy.input_header_list().map(Arc::new))
    .map(|p| p.with_decision_cache(config.policy.decision_cache_capacity()))
}

pub async fn start(config: Config) -> Result<Running, Error> {
    let (identity, policy) = check(&config).await?;
    let upstream_addr = config.upstream()?;
    let config = Arc::new(config);

    let registry = Registry::new();
    let metrics = Arc::new(Metrics::new(&registry)?);
    metrics.policy_reloads.with_label_values(&["ok"]).inc();

    let (audit, audit_writer) =
        audit::start_with(audit::Options::from_config(&config.audit)?, metrics.clone())?;
    let own_leaf = identity::read_certs("identity.cert", &config.identity.cert)?;
    let svid = own_leaf.first().map(|leaf| {
        audit::Svid::new(
            identity.spiffe_id.as_str(),
            identity.not_after,
            leaf.as_ref(),
        )
    });
    audit.record(Event::startup(
        audit::config_revision(&config),
        svid,
        format!(
            "portcullis {} starting as {}",
            env!("CARGO_PKG_VERSION"),
            identity.spiffe_id
        ),
    ));
    audit.record(Event::policy_loaded(
        &policy.revision,
        format!(
            "revision {} from {} ({})",
            policy.revision,
            config.policy.dir.display(),
            policy.files.join(", ")
        ),
    ));
    tracing::info!(
        spiffe_id = %identity.spiffe_id,
        policy_revision = %policy.revision,
        policy_evaluator = policy.evaluator,
        evaluator_reason = %policy.evaluator_reason,
        decision_cache = policy.decision_cache().enabled(),
        decision_cache_reason = %policy.decision_cache().reason(),
        config = %config.redacted(),
        "identity and policy loaded"
    );

    let identity = Arc::new(ArcSwap::from_pointee(identity));
    let policy_reload = Arc::new(ArcSwap::from_pointee(reload::LastReload::initial(&policy)));
    let policy = Arc::new(ArcSwap::from_pointee(policy));
    let publisher =
        identity::rotation::Publisher::new(identity.clone(), metrics.clone(), audit.clone());

    let inbound = bind("inbound.listen", config.inbound.listen).await?;
    let admin_listener = bind("admin.listen", config.admin.listen).await?;
    let inbound_addr = local_addr("inbound.listen", &inbound, config.inbound.listen)?;
    let admin_addr = local_addr("admin.listen", &admin_listener, config.admin.listen)?;

    let outbound_listener = match &config.outbound {
        Some(o) => Some(bind("outbound.listen", o.listen).await?),
        None => None,
    };
    let outbound_addr = match (&outbound_listener, &config.outbound) {
        (Some(l), Some(o)) => Some(local_addr("outbound.listen", l, o.listen)?),
        _ => None,
    };

    let (trigger, watch) = drain::channel();
    let listening = Arc::new(AtomicBool::new(true));
    let shared = Shared {
        identity: identity.clone(),
        policy: policy.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        policy_mode: config.policy.mode,
        max_body_bytes: usize::try_from(config.policy.max_body_bytes).unwrap_or(usize::MAX),
        upstream: Upstream::new(
            upstream_addr,
            Duration::from_millis(config.inbound.upstream_connect_timeout_ms),
            Duration::from_millis(config.inbound.upstream_timeout_ms),
            proxy::BreakerSettings {
                failures: config.inbound.breaker_failures,
                cooldown: Duration::from_millis(config.inbound.breaker_cooldown_ms),
            },
            &metrics,
        ),
        rate_limiter: Arc::new(crate::ratelimit::RateLimiter::new(&config.rate_limit)),
        limits: Limits {
            max_connections: config.inbound.max_connections,
            handshake_timeout: Duration::from_millis(config.inbound.handshake_timeout_ms),
            header_read_timeout: Duration::from_millis(config.inbound.header_read_timeout_ms),
            max_header_list_bytes: config.inbound.max_header_list_bytes,
            max_request_body_bytes: config.inbound.max_request_body_bytes,
            idle_timeout: Duration::from_millis(config.inbound.idle_timeout_ms),
            h2_max_concurrent_streams: config.inbound.h2_max_concurrent_streams,
            h2_max_pending_accept_reset_streams: config.inbound.h2_max_pending_accept_reset_streams,
            h2_max_local_error_reset_streams: config.inbound.h2_max_local_error_reset_streams,
        },
    };
    let identity_health = Arc::new(identity::workload_api::SourceHealth::default());
    let admin_state = Arc::new(admin::State {
        registry: registry.clone(),
        config: config.clone(),
        identity: identity.clone(),
        identity_health: identity_health.clone(),
        policy: policy.clone(),
        policy_reload: policy_reload.clone(),
        listening: listening.clone(),
    });
    match &config.identity.workload_api {
        Some(addr) => {
            identity::workload_api::spawn(
                config.identity.clone(),
                addr.clone(),
                publisher,
                identity_health.clone(),
                watch.clone(),
            );
        }
        None => {
            identity::files::spawn(config.identity.clone(), publisher, watch.clone())?;
        }
    }
    tokio::spawn(identity::rotation::warn_on_expiry(
        identity.clone(),
        EXPIRY_CHECK_INTERVAL,
        watch.clone(),
    ));
    if config.policy.reload_interval_ms > 0 {
        reload::spawn(
            reload::Options {
                dir: config.policy.dir.clone(),
                query: config.policy.query.clone(),
                egress_query: config.policy.egress_query.clone(),
                eval_timeout: Duration::from_millis(config.policy.eval_timeout_ms),
                require_tests_pass: config.policy.require_tests_pass,
                evaluator: config.policy.evaluator,
                interval: Duration::from_millis(config.policy.reload_interval_ms),
            },
            reload::Targets {
                policy: policy.clone(),
                last: policy_reload.clone(),
                metrics: metrics.clone(),
                audit: audit.clone(),
            },
            watch.clone(),
        )
        .map_err(Error::Watch)?;
    }
    if let (Some(listener), Some(cfg)) = (outbound_listener, &config.outbound) {
        let outbound = Outbound::new(
            cfg,
            outbound::Deps {
                identity: identity.clone(),
                policy: policy.clone(),
                metrics: metrics.clone(),
                audit: audit.clone(),
                policy_mode: config.policy.mode,
            },
        )?;
        tokio::spawn(outbound::serve(listener, Arc::new(outbound), watch.clone()));
    }
    let drain_timeout = Duration::from_millis(config.inbound.drain_timeout_ms);
    let workers = config.inbound.worker_threads();
    proxy::workers::spawn(inbound, &shared, workers, watch.clone(), drain_timeout)
        .map_err(Error::Workers)?;
    tokio::spawn(admin::serve(admin_listener, admin_state, watch));
    tracing::info!(
        inbound = %inbound_addr,
        admin = %admin_addr,
        outbound = ?outbound_addr,
        workers,
        "portcullis ready inbound={inbound_addr} admin={admin_addr}"
    );

    Ok(Running {
        inbound_addr,
        outbound_addr,
        admin_addr,
        registry,
        metrics,
        identity,
        policy,
        policy_reload,
        audit,
        audit_writer,
        trigger,
        listening,
        drain_timeout,
    })
}

impl Running {
    /// The audit writer's last write failed; under `fail_closed` requests
    /// are being refused.
    pub fn audit_failing(&self) -> bool {
        self.audit.is_failing()
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// deadline, then records the shutdown and flushes the audit trail.
    /// Returns whether everything in flight finished in time.
    pub async fn shutdown(self) -> bool {
        self.listening.store(false, Ordering::Release);
        tracing::info!(deadline = ?self.drain_timeout, "draining");
        let drained = self.trigger.drain(self.drain_timeout).await;
        if !drained {
            tracing::warn!("drain deadline passed with requests still in flight");
        }
        self.audit.record(Event::shutdown(if drained {
            "drained cleanly"
        } else {
            "drain deadline passed with requests in flight"
        }));
        self.audit_writer.finish().await;
        drained
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { key, addr, source })
}

fn local_addr(key: &'static str, l: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, Error> {
    l.local_addr()
        .map_err(|source| Error::Bind { key, addr, source })
}
