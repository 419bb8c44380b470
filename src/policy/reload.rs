//! Hot reload of the policy directory.
//!
//! [`crate::watch`] reports a settled change of what `policy.dir` resolves
//! to (the Kubernetes `..data` swap and editors' rename-over included); the
//! new set is compiled, optionally tested, and only then published with one
//! `ArcSwap::store`. A request loads its snapshot once, so it is decided
//! wholly by the old set or wholly by the new one. A set that fails leaves
//! the last good one in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::{Error, PolicySnapshot};
use crate::audit::{AuditSink, Event, Kind};
use crate::drain;
use crate::metrics::Metrics;

/// What a reload needs to know; the same settings the first load used.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub query: String,
    pub egress_query: Option<String>,
    pub eval_timeout: Duration,
    pub require_tests_pass: bool,
    pub evaluator: super::EvaluatorMode,
    /// How often the directory is looked at; a change must also stay put
    /// for this long before it is loaded, so a burst of writes (or a
    /// `kubectl cp` of several files) is loaded once, complete.
    pub interval: Duration,
}

/// The outcome of the most recent load attempt, for `/policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReload {
    pub ok: bool,
    pub at: SystemTime,
    /// The revision in force after this attempt.
    pub revision: String,
    /// Why the attempt was refused (with file and line where regorus or a
    /// failing test gives one).
    pub error: Option<String>,
}

impl LastReload {
    pub fn initial(snapshot: &PolicySnapshot) -> LastReload {
        LastReload {
            ok: true,
            at: snapshot.loaded_at,
            revision: snapshot.revision.clone(),
            error: None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "result": if self.ok { "ok" } else { "error" },
            "at": crate::audit::timestamp(self.at),
            "revision": self.revision,
            "error": self.error,
        })
    }
}

/// The places a reload publishes to.
#[derive(Clone)]
pub struct Targets {
    pub policy: Arc<ArcSwap<PolicySnapshot>>,
    pub last: Arc<ArcSwap<LastReload>>,
    pub metrics: Arc<Metrics>,
    pub audit: AuditSink,
}

/// What one reload attempt did.
#[derive(Debug)]
pub enum Outcome {
    Swapped {
        revision: String,
    },
    /// The directory changed back to, or was touched without changing, the
    /// revision already in force.
    Unchanged,
    Rejected(Error),
}

/// Loads `opts.dir` now and publishes it if it is good. Blocking (file
/// reads, compilation, tests): call it off the async workers.
pub fn reload_now(opts: &Options, targets: &Targets) -> Outcome {
    let current = targets.policy.load_full();
    // The capacity is a startup setting; the cache itself starts empty.
    let cache_capacity = current.decision_cache().capacity();
    let loaded = PolicySnapshot::load_checked(
        &opts.dir,
        &opts.query,
        opts.eval_timeout,
        opts.require_tests_pass,
        opts.evaluator,
    )
    .and_then(|s| s.with_egress_query(opts.egress_query.as_deref()))
    // A startup setting too: a reload whose policy reads a header the list
    // leaves out is refused like any other bad policy.
    .and_then(|s| s.with_input_headers(current.input_header_list().cloned()))
    .map(|s| s.with_decision_cache(cache_capacity));
    match loaded {
        Ok(snapshot) if snapshot.revision == current.revision => Outcome::Unchanged,
        Ok(snapshot) => {
            let revision = snapshot.revision.clone();
            let evaluator = snapshot.evaluator;
            let evaluator_reason = snapshot.evaluator_reason.clone();
            let decision_cache = snapshot.decision_cache().enabled();
            let decision_cache_reason = snapshot.decision_cache().reason();
            let detail = format!(
                "revision {} from {} ({}), replacing {}",
                revision,
                opts.dir.display(),
                snapshot.files.join(", "),
                current.revision
            );
            targets.last.store(Arc::new(LastReload::initial(&snapshot)));
            targets.policy.store(Arc::new(snapshot));
            targets
                .metrics
                .policy_reloads
                .with_label_values(&["ok"])
                .inc();
            targets
                .audit
                .record(Event::with_detail(Kind::PolicyLoaded, detail));
            tracing::info!(
                policy_revision = %revision,
                policy_evaluator = evaluator,
                %evaluator_reason,
                decision_cache,
                %decision_cache_reason,
                "policy reloaded"
            );
            Outcome::Swapped { revision }
        }
        Err(e) => {
            let message = e.to_string();
            targets.last.store(Arc::new(LastReload {
                ok: false,
                at: SystemTime::now(),
                revision: current.revision.clone(),
                error: Some(message.clone()),
            }));
            targets
                .metrics
                .policy_reloads
                .with_label_values(&["error"])
                .inc();
            targets.audit.record(Event::with_detail(
                Kind::PolicyRejected,
                format!(
                    "{}: {message}; revision {} stays in force",
                    opts.dir.display(),
                    current.revision
                ),
            ));
            tracing::error!(
                dir = %opts.dir.display(),
                policy_revision = %current.revision,
                "policy reload rejected, keeping the last good policy: {message}"
            );
            Outcome::Rejected(e)
        }
    }
}

/// Watches `opts.dir` and reloads on every settled change until draining
/// starts. Returns once the watcher thread is running.
pub fn spawn(
    opts: Options,
    targets: Targets,
    drain: drain::Watch,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut changes = crate::watch::spawn(vec![opts.dir.clone()], opts.interval, opts.interval)?;
    Ok(tokio::spawn(async move {
        // The first pass covers a change made between the initial load and
        // the watcher's first look; usually it finds the same revision.
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = drain.signaled() => break,
                    changed = changes.changed() => if changed.is_err() { break },
                }
                changes.borrow_and_update();
            }
            first = false;
            let (opts, targets) = (opts.clone(), targets.clone());
            // Compiling and testing a large set takes milliseconds to
            // seconds: never on a worker that serves requests.
            let done = tokio::task::spawn_blocking(move || {
                reload_now(&opts, &targets);
            })
            .await;
            if let Err(e) = done {
                tracing::error!(error = %e, "policy reload task failed");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "package t\nimport rego.v1\ndefault allow := false\nallow if input.ok\n";
    const TEST: &str =
        "package t_test\nimport rego.v1\ntest_ok if data.t.allow with input as {\"ok\": true}\n";

    fn setup(dir: &std::path::Path) -> (Options, Targets, tempfile::TempDir) {
        let opts = Options {
            dir: dir.to_owned(),
            query: "data.t.allow".into(),
            egress_query: None,
            eval_timeout: Duration::from_secs(1),
            require_tests_pass: true,
            evaluator: super::super::EvaluatorMode::Auto,
            interval: Duration::from_millis(10),
        };
        let snapshot =
            PolicySnapshot::load_checked(dir, &opts.query, opts.eval_timeout, true, opts.evaluator)
                .unwrap();
        let metrics = Arc::new(Metrics::new(&prometheus::Registry::new()).unwrap());
        let audit_dir = tempfile::tempdir().unwrap();
        let path = audit_dir.path().join("audit.log");
        let (audit, _writer) =
            crate::audit::start(path.to_str().unwrap(), 16, metrics.clone()).unwrap();
        let targets = Targets {
            last: Arc::new(ArcSwap::from_pointee(LastReload::initial(&snapshot))),
            policy: Arc::new(ArcSwap::from_pointee(snapshot)),
            metrics,
            audit,
        };
        (opts, targets, audit_dir)
    }

    #[test]
    fn unchanged_swapped_and_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.rego"), GOOD).unwrap();
        std::fs::write(dir.path().join("t_test.rego"), TEST).unwrap();
        let (opts, targets, _audit) = setup(dir.path());
        let first = targets.policy.load().revision.clone();

        assert!(matches!(reload_now(&opts, &targets), Outcome::Unchanged));

        std::fs::write(dir.path().join("t.rego"), format!("{GOOD}# v2\n")).unwrap();
        let Outcome::Swapped { revision } = reload_now(&opts, &targets) else {
            panic!("not swapped")
        };
        assert_ne!(revision, first);
        assert_eq!(targets.policy.load().revision, revision);
        assert!(targets.last.load().ok);

        // Compiles, fails its test: refused, the swapped-in set stays.
        std::fs::write(
            dir.path().join("t.rego"),
            "package t\nimport rego.v1\nallow := false\n",
        )
        .unwrap();
        let Outcome::Rejected(Error::TestsFailed { failures, .. }) = reload_now(&opts, &targets)
        else {
            panic!("not rejected")
        };
        assert!(failures.contains("t_test.rego:3"), "{failures}");
        assert_eq!(targets.policy.load().revision, revision);
        let last = targets.last.load();
        assert!(!last.ok);
        assert_eq!(last.revision, revision);
        assert_eq!(last.to_json()["result"], "error");
        let errors = targets.metrics.policy_reloads.with_label_values(&["error"]);
        assert_eq!(errors.get(), 1);
    }

    #[test]
    fn a_reload_starts_an_empty_decision_cache_of_the_same_capacity() {
        use crate::policy::CacheUse;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.rego"), GOOD).unwrap();
        std::fs::write(dir.path().join("t_test.rego"), TEST).unwrap();
        let (opts, targets, _audit) = setup(dir.path());
        let sized = PolicySnapshot::clone(&targets.policy.load()).with_decision_cache(7);
        targets.policy.store(Arc::new(sized));
        let input = regorus::Value::from_json_str(r#"{"ok": true}"#).unwrap();
        let old = targets.policy.load_full();
        old.evaluate(input.clone()).unwrap();
        assert_eq!(old.evaluate(input.clone()).unwrap().cache, CacheUse::Hit);

        // The new policy denies what the old one allowed: a decision kept
        // across the reload would be the old policy's.
        std::fs::write(
            dir.path().join("t.rego"),
            "package t\nimport rego.v1\ndefault allow := false\nallow if input.ok == \"yes\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t_test.rego"),
            "package t_test\nimport rego.v1\ntest_ok if data.t.allow with input as {\"ok\": \"yes\"}\n",
        )
        .unwrap();
        assert!(matches!(
            reload_now(&opts, &targets),
            Outcome::Swapped { .. }
        ));
        let new = targets.policy.load_full();
        assert_eq!(new.decision_cache().capacity(), 7);
        assert_eq!(new.decision_cache().len(), 0);
        let d = new.evaluate(input).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.cache, CacheUse::Miss);
    }

    #[test]
    fn a_reload_keeps_the_input_header_list_and_is_held_to_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.rego"), GOOD).unwrap();
        std::fs::write(dir.path().join("t_test.rego"), TEST).unwrap();
        let (opts, targets, _audit) = setup(dir.path());
        let only = Arc::new(crate::policy::HeaderAllowlist::new([
            http::HeaderName::from_static("x-tenant"),
        ]));
        let listed = PolicySnapshot::clone(&targets.policy.load())
            .with_input_headers(Some(only.clone()))
            .unwrap();
        targets.policy.store(Arc::new(listed));
        let revision = targets.policy.load().revision.clone();

        let reads = |header: &str| {
            format!(
                "package t\nimport rego.v1\ndefault allow := false\n\
                 allow if input.attributes.request.http.headers[\"{header}\"] == \"a\"\n"
            )
        };
        std::fs::write(dir.path().join("t_test.rego"), "package t_test\n").unwrap();
        std::fs::write(dir.path().join("t.rego"), reads("x-other")).unwrap();
        let Outcome::Rejected(Error::HeaderNotShown { header, .. }) = reload_now(&opts, &targets)
        else {
            panic!("a policy reading an unlisted header was not refused");
        };
        assert_eq!(header, "x-other");
        assert_eq!(targets.policy.load().revision, revision);

        std::fs::write(dir.path().join("t.rego"), reads("x-tenant")).unwrap();
        assert!(matches!(
            reload_now(&opts, &targets),
            Outcome::Swapped { .. }
        ));
        assert_eq!(targets.policy.load().input_header_list(), Some(&only));
    }
}
