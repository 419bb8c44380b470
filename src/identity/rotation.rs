//! Publishing identity snapshots: the one place a new SVID or bundle goes
//! live, whichever source produced it, so that metrics, audit and logs
//! describe every rotation the same way.
//!
//! Sources validate before they publish (`identity::build`); what reaches
//! [`Publisher::publish`] is already a complete, checked snapshot, and the
//! swap is a single `ArcSwap::store`. Connections keep the snapshot their
//! handshake loaded.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::{unix_secs, IdentitySnapshot};
use crate::audit::{self, AuditSink, Event, Kind};
use crate::drain;
use crate::metrics::Metrics;

/// Swaps in new snapshots and reports what changed.
#[derive(Clone)]
pub struct Publisher {
    current: Arc<ArcSwap<IdentitySnapshot>>,
    metrics: Arc<Metrics>,
    audit: AuditSink,
}

impl Publisher {
    /// Sets the gauges for the snapshot already in `current`.
    pub fn new(
        current: Arc<ArcSwap<IdentitySnapshot>>,
        metrics: Arc<Metrics>,
        audit: AuditSink,
    ) -> Publisher {
        let p = Publisher {
            current,
            metrics,
            audit,
        };
        p.set_gauges(&p.current.load());
        p
    }

    pub fn current(&self) -> Arc<IdentitySnapshot> {
        self.current.load_full()
    }

    /// Makes `next` the identity of every handshake from now on.
    pub fn publish(&self, next: IdentitySnapshot, source: &str) {
        let next = Arc::new(next);
        let prev = self.current.swap(next.clone());
        self.metrics
            .identity_reloads
            .with_label_values(&["ok"])
            .inc();
        self.set_gauges(&next);
        for detail in changes(&prev, &next) {
            tracing::info!(source, "{}", detail.text);
            let event = match detail.kind {
                Kind::SvidRotated => Event::svid_rotated(
                    next.spiffe_id.as_str(),
                    next.not_after,
                    next.leaf.as_ref(),
                    detail.text,
                ),
                kind => Event::with_detail(kind, detail.text),
            };
            self.audit.record(event);
        }
    }

    /// An update that did not validate: the last good snapshot stays.
    pub fn reject(&self, source: &str, error: &dyn std::fmt::Display) {
        self.metrics
            .identity_reloads
            .with_label_values(&["error"])
            .inc();
        let current = self.current.load();
        tracing::warn!(
            source,
            error = %error,
            keeping = %current.spiffe_id,
            serial = %current.serial,
            "identity update refused; keeping the last good SVID and bundles"
        );
    }

    fn set_gauges(&self, s: &IdentitySnapshot) {
        self.metrics.svid_expiry.set(s.expiry_unix());
        // Domains dropped from the config must not linger as stale series.
        self.metrics.bundle_expiry.reset();
        for (td, info) in &s.bundle_info {
            self.metrics
                .bundle_expiry
                .with_label_values(&[td.as_str()])
                .set(unix_secs(info.not_after));
        }
    }
}

struct Change {
    kind: Kind,
    text: String,
}

/// The audit records for going from `prev` to `next`: one `svid_rotated` if
/// the own leaf changed, one `bundle_updated` per trust domain whose anchors
/// changed, appeared or went away.
fn changes(prev: &IdentitySnapshot, next: &IdentitySnapshot) -> Vec<Change> {
    let mut out = Vec::new();
    if prev.serial != next.serial || prev.spiffe_id != next.spiffe_id {
        out.push(Change {
            kind: Kind::SvidRotated,
            text: format!(
                "svid rotated: spiffe_id={} trust_domain={} serial={} not_after={} \
                 previous_serial={} previous_not_after={}",
                next.spiffe_id,
                next.trust_domain(),
                next.serial,
                audit::timestamp(next.not_after),
                prev.serial,
                audit::timestamp(prev.not_after),
            ),
        });
    }
    for (td, info) in &next.bundle_info {
        if prev.bundle_info.get(td) == Some(info) {
            continue;
        }
        out.push(Change {
            kind: Kind::BundleUpdated,
            text: format!(
                "bundle updated: trust_domain={td} serials={} not_after={} previous_serials={}",
                info.serials.join(","),
                audit::timestamp(info.not_after),
                prev.bundle_info
                    .get(td)
                    .map(|p| p.serials.join(","))
                    .unwrap_or_else(|| "none".into()),
            ),
        });
    }
    for (td, info) in &prev.bundle_info {
        if !next.bundle_info.contains_key(td) {
            out.push(Change {
                kind: Kind::BundleUpdated,
                text: format!(
                    "bundle removed: trust_domain={td} previous_serials={}",
                    info.serials.join(",")
                ),
            });
        }
    }
    out
}

/// How far into its lifetime a certificate is, for the log warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LifetimeStage {
    Fresh,
    /// Past half its lifetime: a healthy source should have renewed by now.
    Half,
    /// Past 90%: renewal is overdue.
    Late,
    Expired,
}

pub fn lifetime_stage(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
) -> LifetimeStage {
    if now >= not_after {
        return LifetimeStage::Expired;
    }
    let total = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    let used = now
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    if total <= 0.0 {
        return LifetimeStage::Late;
    }
    match used / total {
        f if f >= 0.9 => LifetimeStage::Late,
        f if f >= 0.5 => LifetimeStage::Half,
        _ => LifetimeStage::Fresh,
    }
}

/// Logs a warning each time the own SVID crosses 50% and 90% of its
/// lifetime, and when it expires, once per SVID. Ends when draining starts.
pub async fn warn_on_expiry(
    current: Arc<ArcSwap<IdentitySnapshot>>,
    every: Duration,
    drain: drain::Watch,
) {
    let mut warned: Option<(String, LifetimeStage)> = None;
    loop {
        let s = current.load_full();
        let stage = lifetime_stage(s.not_before, s.not_after, SystemTime::now());
        let already = match &warned {
            Some((serial, at)) if *serial == s.serial => *at >= stage,
            _ => stage == LifetimeStage::Fresh,
        };
        if !already {
            let not_after = audit::timestamp(s.not_after);
            match stage {
                LifetimeStage::Fresh => {}
                LifetimeStage::Half => tracing::warn!(
                    spiffe_id = %s.spiffe_id, serial = %s.serial, %not_after,
                    "own SVID is past 50% of its lifetime and has not been renewed"
                ),
                LifetimeStage::Late => tracing::warn!(
                    spiffe_id = %s.spiffe_id, serial = %s.serial, %not_after,
                    "own SVID is past 90% of its lifetime; renewal is overdue"
                ),
                LifetimeStage::Expired => tracing::error!(
                    spiffe_id = %s.spiffe_id, serial = %s.serial, %not_after,
                    "own SVID has expired; peers will refuse this sidecar"
                ),
            }
            warned = Some((s.serial.clone(), stage));
        }
        tokio::select! {
            _ = drain.signaled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_at_half_and_ninety_percent() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let na = nb + Duration::from_secs(100);
        let at = |s| nb + Duration::from_secs(s);
        assert_eq!(lifetime_stage(nb, na, at(0)), LifetimeStage::Fresh);
        assert_eq!(lifetime_stage(nb, na, at(49)), LifetimeStage::Fresh);
        assert_eq!(lifetime_stage(nb, na, at(50)), LifetimeStage::Half);
        assert_eq!(lifetime_stage(nb, na, at(89)), LifetimeStage::Half);
        assert_eq!(lifetime_stage(nb, na, at(90)), LifetimeStage::Late);
        assert_eq!(lifetime_stage(nb, na, at(100)), LifetimeStage::Expired);
        assert_eq!(
            lifetime_stage(nb, na, nb - Duration::from_secs(5)),
            LifetimeStage::Fresh
        );
    }
}
