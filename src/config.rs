//! Configuration: one `Config`, read once from TOML, then overridden by
//! `PORTCULLIS_*` environment variables, then by command-line flags.
//!
//! Every override goes through [`Config::set`] with a dotted key
//! (`inbound.listen`), so the environment, the flags and the file all name a
//! setting the same way and an error always names the key a user can fix.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::HeaderAllowlist;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{key}: {path} does not exist or cannot be read: {source}")]
    MissingFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unknown setting {key} (from {origin})")]
    UnknownKey { key: String, origin: String },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub inbound: Inbound,
    #[serde(default)]
    pub identity: Identity,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub audit: Audit,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub rate_limit: crate::ratelimit::Config,
    /// Absent: no outbound listener, the app makes its own connections.
    #[serde(default)]
    pub outbound: Option<Outbound>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Inbound {
    pub listen: SocketAddr,
    /// `http://host:port` of the service on loopback.
    pub upstream: String,
    /// Threads serving the inbound listener, each a single-threaded
    /// runtime (src/proxy/workers.rs); 0: one per CPU the process may use.
    pub workers: usize,
    pub max_connections: usize,
    pub handshake_timeout_ms: u64,
    /// From the first byte of an HTTP/1.1 request head to its end.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/1.1 keep-alive between requests, HTTP/2 with no open stream).
    pub idle_timeout_ms: u64,
    pub upstream_connect_timeout_ms: u64,
    pub upstream_timeout_ms: u64,
    /// Consecutive upstream transport failures that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open before one probe is let through.
    pub breaker_cooldown_ms: u64,
    /// How long in-flight requests may run after SIGTERM.
    pub drain_timeout_ms: u64,
    pub max_header_list_bytes: usize,
    /// Larger request bodies get 413, counted while streaming.
    pub max_request_body_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    /// Streams opened and reset by the peer before they were served (the
    /// rapid-reset attack, CVE-2023-44487): GOAWAY past this many.
    pub h2_max_pending_accept_reset_streams: usize,
    /// Streams reset by the server for the peer's errors: GOAWAY past this
    /// many per connection.
    pub h2_max_local_error_reset_streams: usize,
}

impl Inbound {
    /// `workers`, with 0 resolved to the CPUs this process may use.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound {
            listen: SocketAddr::from(([0, 0, 0, 0], 15443)),
            upstream: "http://127.0.0.1:8080".into(),
            workers: 0,
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            upstream_connect_timeout_ms: 1_000,
            upstream_timeout_ms: 15_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 5_000,
            drain_timeout_ms: 20_000,
            max_header_list_bytes: 64 * 1024,
            max_request_body_bytes: 10 * 1024 * 1024,
            h2_max_concurrent_streams: 100,
            // hyper's own defaults, stated so that /config shows them.
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

/// `[outbound]`: the loopback listener the app calls with plain HTTP, and
/// where each host it names is reached over mTLS.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Outbound {
    /// Must be a loopback address: whatever reaches it leaves the pod
    /// under this workload's identity.
    pub listen: SocketAddr,
    /// TCP connect plus the mTLS handshake, per new connection.
    pub connect_timeout_ms: u64,
    /// From sending the request to the response head; 504 past it.
    pub request_timeout_ms: u64,
    /// Consecutive failures to reach a route that open its circuit.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// How long an unused pooled connection to a route is kept.
    pub idle_timeout_ms: u64,
    /// Connections from the app held open at once; more are closed at
    /// accept.
    pub max_connections: usize,
    /// An HTTP/1.1 request head not complete by then closes the connection.
    pub header_read_timeout_ms: u64,
    /// `[[outbound.route]]`.
    #[serde(rename = "route")]
    pub routes: Vec<OutboundRoute>,
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            connect_timeout_ms: 1_000,
            request_timeout_ms: 15_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 5_000,
            idle_timeout_ms: 30_000,
            max_connections: 1_024,
            header_read_timeout_ms: 10_000,
            routes: Vec::new(),
        }
    }
}

/// One `[[outbound.route]]`: a `Host` the app may call, where it lives and
/// who must answer. Exactly one of `server_id`, `server_id_prefix` and
/// `server_trust_domain` says who.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutboundRoute {
    /// Matched against `Host` / `:authority` without its port,
    /// case-insensitively.
    pub host: String,
    /// `ip:port` or `dns-name:port`; a name is resolved for every new
    /// connection.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
    /// Ends in `/`: matches every ID below that path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_trust_domain: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Identity {
    pub trust_domain: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    pub workload_api: Option<String>,
    /// `/readyz` fails once the own SVID has less than this left, so that
    /// Kubernetes stops routing here before the identity actually lapses.
    #[serde(with = "duration_text")]
    pub min_remaining: Duration,
    /// How often the certificate files are checked for changes.
    pub watch_interval_ms: u64,
    /// Other trust domains whose workloads may call in, each with its bundle file.
    pub federation: BTreeMap<String, PathBuf>,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            trust_domain: String::new(),
            cert: "/var/run/portcullis/svid.pem".into(),
            key: "/var/run/portcullis/svid.key".into(),
            bundle: "/var/run/portcullis/bundle.pem".into(),
            workload_api: None,
            min_remaining: Duration::from_secs(5 * 60),
            watch_interval_ms: 1_000,
            federation: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub dir: PathBuf,
    pub query: String,
    pub eval_timeout_ms: u64,
    pub mode: PolicyMode,
    /// A set whose own `test_` rules fail is refused, at startup and on
    /// reload.
    pub require_tests_pass: bool,
    /// How often `dir` is checked for changes; 0 turns hot reload off.
    pub reload_interval_ms: u64,
    /// JSON and form request bodies up to this size are parsed into the
    /// input's `parsed_body`; 0 (the default) never reads bodies.
    pub max_body_bytes: u64,
    /// `auto` decides on regorus's RVM when it agrees with the interpreter
    /// on every input of the policy's tests; `interpreter` never uses it.
    pub evaluator: crate::policy::EvaluatorMode,
    /// The rule that decides outbound requests (`[outbound]`); unset, every
    /// routed request is allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_query: Option<String>,
    /// How many decisions the policy decision cache keeps; 0 turns it off.
    /// Only policies whose decisions cannot depend on per-request fields
    /// are cached (docs/policies.md, "Decision cache").
    pub decision_cache: u64,
    /// The request headers the policy is shown, as Envoy ext_authz's
    /// `allowed_headers`; unset shows every one. Set it when callers send
    /// a header unique to each request (a trace id) that the policy never
    /// needs: the decision cache then keys on the listed headers only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_headers: Option<Vec<String>>,
}

/// Above this `policy.decision_cache` is refused: each entry holds a key
/// and a decision (hundreds of bytes to a few KiB), so more would be a
/// memory surprise rather than a speed-up.
pub const MAX_DECISION_CACHE: u64 = 1_000_000;

impl Policy {
    /// `decision_cache` as the cache takes it; [`Config::validate`] has
    /// bounded it.
    pub fn decision_cache_capacity(&self) -> usize {
        usize::try_from(self.decision_cache.min(MAX_DECISION_CACHE)).unwrap_or(usize::MAX)
    }

    /// `input_headers` as the policy takes it, names lowercased as the
    /// input document has them; [`Config::validate`] has refused a name
    /// that is not a header name.
    pub fn input_header_list(&self) -> Option<HeaderAllowlist> {
        let names = self.input_headers.as_ref()?;
        Some(HeaderAllowlist::new(names.iter().filter_map(|n| {
            http::HeaderName::from_bytes(n.as_bytes()).ok()
        })))
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            dir: "policies".into(),
            query: "data.portcullis.authz.allow".into(),
            eval_timeout_ms: 100,
            mode: PolicyMode::Enforce,
            require_tests_pass: true,
            reload_interval_ms: 1_000,
            max_body_bytes: 0,
            evaluator: crate::policy::EvaluatorMode::Auto,
            egress_query: None,
            decision_cache: crate::policy::cache::DEFAULT_CAPACITY as u64,
            input_headers: None,
        }
    }
}

/// `dry_run` evaluates and audits every decision but forwards denied
/// requests too: how security teams roll a new policy out.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    #[default]
    Enforce,
    DryRun,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// `-` writes to stdout, the Kubernetes log pipeline.
    pub path: String,
    /// Events waiting for the writer. A request reserves its slot before it
    /// is forwarded, so a full queue turns requests away rather than losing
    /// their records.
    pub queue_capacity: usize,
    /// What a full queue or a failing writer does to new requests.
    pub on_full: OnFull,
    pub fsync: Fsync,
    /// Rotate the file once it reaches this many bytes; 0 never rotates.
    pub max_bytes: u64,
    /// Rotated files kept beside the current one (`path.1` ... `path.N`).
    pub keep_files: usize,
    /// With a key, line hashes are HMAC-SHA256: whoever can edit the file
    /// but cannot read the key cannot forge a consistent chain.
    pub hmac_key_file: Option<PathBuf>,
    /// Headers whose values are never written, besides authorization,
    /// proxy-authorization, cookie, set-cookie and x-api-key.
    pub redact_headers: Vec<String>,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            path: "-".into(),
            queue_capacity: 8192,
            on_full: OnFull::FailClosed,
            fsync: Fsync::Interval,
            max_bytes: 0,
            keep_files: 10,
            hmac_key_file: None,
            redact_headers: Vec::new(),
        }
    }
}

/// `audit.on_full`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Refuse new requests (503) while the writer is behind or failing: no
    /// decision without a record.
    #[default]
    FailClosed,
    /// Serve them; count every event dropped and record a `gap`.
    FailOpen,
}

/// `audit.fsync`: when written lines are forced to disk.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    Never,
    /// At most once a second while events are written, and at shutdown.
    #[default]
    Interval,
    /// After every batch the writer takes from the queue.
    Always,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub listen: SocketAddr,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: SocketAddr::from(([127, 0, 0, 1], 15000)),
        }
    }
}

/// Beyond this, `inbound.workers` is a typo: each worker is a thread with a
/// runtime of its own.
const MAX_WORKERS: usize = 256;

/// The settings an environment variable or flag may override, with the
/// environment variable that carries each.
pub const OVERRIDABLE: &[&str] = &[
    "inbound.listen",
    "inbound.upstream",
    "inbound.workers",
    "inbound.max_connections",
    "inbound.drain_timeout_ms",
    "inbound.idle_timeout_ms",
    "identity.trust_domain",
    "identity.cert",
    "identity.key",
    "identity.bundle",
    "identity.workload_api",
    "identity.min_remaining",
    "policy.dir",
    "policy.query",
    "policy.mode",
    "policy.evaluator",
    "policy.egress_query",
    "policy.decision_cache",
    "audit.path",
    "admin.listen",
    "outbound.listen",
];

/// Read by [`Config::load`] through its environment closure, never directly.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

/// `inbound.listen` -> `PORTCULLIS_INBOUND_LISTEN`.
pub fn env_var_for(key: &str) -> String {
    format!("PORTCULLIS_{}", key.replace('.', "_").to_uppercase())
}

impl Config {
    /// Reads the file, then applies the environment (through `env`, so tests
    /// never touch the process environment), then the flag overrides.
    pub fn load(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &[(&str, String)],
    ) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::from_toml(&text, path)?;
        // The SPIFFE-standard way to point a workload at its agent; an
        // explicit identity.workload_api (file or PORTCULLIS_*) wins.
        if config.identity.workload_api.is_none() {
            if let Some(socket) = env(SPIFFE_ENDPOINT_SOCKET) {
                config.set("identity.workload_api", &socket, SPIFFE_ENDPOINT_SOCKET)?;
            }
        }
        for key in OVERRIDABLE {
            if let Some(value) = env(&env_var_for(key)) {
                config.set(key, &value, &env_var_for(key))?;
            }
        }
        for (key, value) in flags {
            config.set(key, value, "command-line flag")?;
        }
        Ok(config)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Config, Error> {
        // toml's message already names the unknown or mistyped key and its line.
        toml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<(), Error> {
        let invalid = |message: String| Error::Invalid {
            key: format!("{key} (from {origin})"),
            message,
        };
        let addr = |v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| invalid(format!("{v:?} is not an address like 127.0.0.1:15000: {e}")))
        };
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|e| invalid(format!("{v:?} is not a number: {e}")))
        };
        match key {
            "inbound.listen" => self.inbound.listen = addr(value)?,
            "inbound.upstream" => self.inbound.upstream = value.into(),
            "inbound.workers" => {
                self.inbound.workers = usize::try_from(number(value)?)
                    .map_err(|e| invalid(format!("{value:?} is too large: {e}")))?
            }
            "inbound.max_connections" => {
                self.inbound.max_connections = usize::try_from(number(value)?)
                    .map_err(|e| invalid(format!("{value:?} is too large: {e}")))?
            }
            "inbound.drain_timeout_ms" => self.inbound.drain_timeout_ms = number(value)?,
            "inbound.idle_timeout_ms" => self.inbound.idle_timeout_ms = number(value)?,
            "identity.trust_domain" => self.identity.trust_domain = value.into(),
            "identity.cert" => self.identity.cert = value.into(),
            "identity.key" => self.identity.key = value.into(),
            "identity.bundle" => self.identity.bundle = value.into(),
            "identity.workload_api" => self.identity.workload_api = Some(value.into()),
            "identity.min_remaining" => {
                self.identity.min_remaining = duration_text::parse(value).map_err(invalid)?
            }
            "policy.dir" => self.policy.dir = value.into(),
            "policy.query" => self.policy.query = value.into(),
            "policy.mode" => {
                self.policy.mode = match value {
                    "enforce" => PolicyMode::Enforce,
                    "dry_run" => PolicyMode::DryRun,
                    _ => return Err(invalid(format!("{value:?} is not enforce or dry_run"))),
                }
            }
            "policy.evaluator" => {
                self.policy.evaluator = match value {
                    "auto" => crate::policy::EvaluatorMode::Auto,
                    "interpreter" => crate::policy::EvaluatorMode::Interpreter,
                    _ => return Err(invalid(format!("{value:?} is not auto or interpreter"))),
                }
            }
            "policy.egress_query" => self.policy.egress_query = Some(value.into()),
            "policy.decision_cache" => self.policy.decision_cache = number(value)?,
            "audit.path" => self.audit.path = value.into(),
            "admin.listen" => self.admin.listen = addr(value)?,
            "outbound.listen" => {
                self.outbound.get_or_insert_with(Outbound::default).listen = addr(value)?
            }
            _ => {
                return Err(Error::UnknownKey {
                    key: key.into(),
                    origin: origin.into(),
                })
            }
        }
        Ok(())
    }

    /// Checks everything that can be checked without loading certificates or
    /// policies: values in range, the upstream URL, files present.
    pub fn validate(&self) -> Result<(), Error> {
        upstream_addr(&self.inbound.upstream)?;
        if let Some(outbound) = &self.outbound {
            self.validate_outbound(outbound)?;
        }
        let positive = [
            (
                "inbound.max_connections",
                self.inbound.max_connections as u64,
            ),
            (
                "inbound.handshake_timeout_ms",
                self.inbound.handshake_timeout_ms,
            ),
            (
                "inbound.header_read_timeout_ms",
                self.inbound.header_read_timeout_ms,
            ),
            ("inbound.idle_timeout_ms", self.inbound.idle_timeout_ms),
            (
                "inbound.h2_max_concurrent_streams",
                u64::from(self.inbound.h2_max_concurrent_streams),
            ),
            (
                "inbound.upstream_connect_timeout_ms",
                self.inbound.upstream_connect_timeout_ms,
            ),
            (
                "inbound.upstream_timeout_ms",
                self.inbound.upstream_timeout_ms,
            ),
            ("policy.eval_timeout_ms", self.policy.eval_timeout_ms),
            (
                "identity.watch_interval_ms",
                self.identity.watch_interval_ms,
            ),
            ("audit.queue_capacity", self.audit.queue_capacity as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::Invalid {
                    key: key.into(),
                    message: "must be greater than zero".into(),
                });
            }
        }
        let bounded = [
            (
                "inbound.workers",
                self.inbound.workers as u64,
                MAX_WORKERS as u64,
                "0 means one per CPU",
            ),
            (
                "policy.decision_cache",
                self.policy.decision_cache,
                MAX_DECISION_CACHE,
                "0 turns the cache off",
            ),
        ];
        for (key, value, max, zero) in bounded {
            if value > max {
                return Err(Error::Invalid {
                    key: key.into(),
                    message: format!("{value} is more than the maximum of {max} ({zero})"),
                });
            }
        }
        for name in self.policy.input_headers.iter().flatten() {
            if let Err(e) = http::HeaderName::from_bytes(name.as_bytes()) {
                return Err(Error::Invalid {
                    key: "policy.input_headers".into(),
                    message: format!("{name:?} is not a header name: {e}"),
                });
            }
        }
        if self.identity.trust_domain.is_empty() {
            return Err(Error::Invalid {
                key: "identity.trust_domain".into(),
                message: "is required (the trust domain of this workload, e.g. \"pay.example\")"
                    .into(),
            });
        }
        let mut files = vec![
            ("identity.cert".to_string(), &self.identity.cert),
            ("identity.key".to_string(), &self.identity.key),
            ("identity.bundle".to_string(), &self.identity.bundle),
        ];
        if let Some(api) = &self.identity.workload_api {
            if !(api.starts_with("unix:") || api.starts_with("tcp:")) {
                return Err(Error::Invalid {
                    key: "identity.workload_api".into(),
                    message: format!(
                        "{api:?} is not a Workload API address like unix:///run/spire/sockets/agent.sock"
                    ),
                });
            }
            if !self.identity.federation.is_empty() {
                return Err(Error::Invalid {
                    key: "identity.federation".into(),
                    message: "federated bundles come from the Workload API when \
                              identity.workload_api is set"
                        .into(),
                });
            }
            // The agent supplies SVID and bundles; the files are not used.
            files.clear();
        }
        let federation = self
            .identity
            .federation
            .iter()
            .map(|(td, path)| (format!("identity.federation.{td:?}"), path));
        for (key, path) in files.into_iter().chain(federation) {
            std::fs::File::open(path).map_err(|source| Error::MissingFile {
                key,
                path: path.clone(),
                source,
            })?;
        }
        if self
            .identity
            .federation
            .contains_key(&self.identity.trust_domain)
        {
            return Err(Error::Invalid {
                key: format!("identity.federation.{:?}", self.identity.trust_domain),
                message:
                    "is this sidecar's own trust domain; its anchors belong in identity.bundle"
                        .into(),
            });
        }
        std::fs::read_dir(&self.policy.dir).map_err(|source| Error::MissingFile {
            key: "policy.dir".into(),
            path: self.policy.dir.clone(),
            source,
        })?;
        if self.audit.keep_files == 0 {
            return Err(Error::Invalid {
                key: "audit.keep_files".into(),
                message: "must be at least 1: rotation must never delete the current trail".into(),
            });
        }
        if let Some(key) = &self.audit.hmac_key_file {
            std::fs::File::open(key).map_err(|source| Error::MissingFile {
                key: "audit.hmac_key_file".into(),
                path: key.clone(),
                source,
            })?;
        }
        if self.audit.path != "-" {
            let parent = Path::new(&self.audit.path)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::read_dir(parent).map_err(|source| Error::MissingFile {
                key: "audit.path".into(),
                path: parent.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    fn validate_outbound(&self, outbound: &Outbound) -> Result<(), Error> {
        if !outbound.listen.ip().is_loopback() {
            return Err(Error::Invalid {
                key: "outbound.listen".into(),
                message: format!(
                    "{} is not a loopback address: anything that can reach the outbound \
                     listener speaks with this workload's identity, so only the pod may",
                    outbound.listen
                ),
            });
        }
        for (key, value) in [
            ("outbound.connect_timeout_ms", outbound.connect_timeout_ms),
            ("outbound.request_timeout_ms", outbound.request_timeout_ms),
            (
                "outbound.header_read_timeout_ms",
                outbound.header_read_timeout_ms,
            ),
            ("outbound.max_connections", outbound.max_connections as u64),
        ] {
            if value == 0 {
                return Err(Error::Invalid {
                    key: key.into(),
                    message: "must be greater than zero".into(),
                });
            }
        }
        // With the Workload API the federated bundles arrive at run time, so
        // only the file source can say up front which domains are trusted.
        let known: Option<Vec<&str>> = self.identity.workload_api.is_none().then(|| {
            std::iter::once(self.identity.trust_domain.as_str())
                .chain(self.identity.federation.keys().map(String::as_str))
                .collect()
        });
        crate::outbound::route::parse_all(&outbound.routes, known.as_deref())?;
        Ok(())
    }

    pub fn upstream(&self) -> Result<SocketAddr, Error> {
        upstream_addr(&self.inbound.upstream)
    }

    /// The effective configuration as `/config` and the startup log show it.
    /// Paths are not secret; key material never lives in the config.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Durations written the way operators write them: `90s`, `5m`, `1h`.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(text: &str) -> Result<Duration, String> {
        let bad = || format!("{text:?} is not a duration like 90s, 5m or 1h");
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        number
            .checked_mul(scale)
            .map(Duration::from_secs)
            .ok_or_else(bad)
    }

    pub fn format(d: &Duration) -> String {
        let secs = d.as_secs();
        if secs.is_multiple_of(3600) && secs > 0 {
            format!("{}h", secs / 3600)
        } else if secs.is_multiple_of(60) && secs > 0 {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The upstream must be `http://IP:port` on loopback: the sidecar's whole
/// promise is that the service is reachable only through it.
fn upstream_addr(url: &str) -> Result<SocketAddr, Error> {
    let invalid = |message: String| Error::Invalid {
        key: "inbound.upstream".into(),
        message: format!("{url:?} {message}"),
    };
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        invalid("must start with http:// (plain HTTP to the local service)".into())
    })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(invalid(
            "must be http://host:port with no path, query or user info".into(),
        ));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| invalid("must name a port, as in http://127.0.0.1:8080".into()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| invalid(format!("has an invalid port {port:?}")))?;
    if port == 0 {
        return Err(invalid("has port 0".into()));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if host == "localhost" {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse().map_err(|_| {
            invalid("must name a loopback IP address (127.0.0.1 or [::1]) or localhost".into())
        })?
    };
    if !ip.is_loopback() {
        return Err(invalid(
            "is not on loopback: the service must only be reachable through the sidecar".into(),
        ));
    }
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn design_example_parses() {
        let c = parse(
            r#"
            [inbound]
            listen   = "0.0.0.0:15443"
            upstream = "http://127.0.0.1:8080"
            [identity]
            trust_domain = "pay.example"
            cert   = "certs-dev/checkout-svid.pem"
            key    = "certs-dev/checkout-svid.key"
            bundle = "certs-dev/bundle.pem"
            [policy]
            dir   = "policies"
            query = "data.portcullis.authz.allow"
            [audit]
            path = "-"
            [admin]
            listen = "127.0.0.1:15000"
            "#,
        )
        .unwrap();
        assert_eq!(c.identity.trust_domain, "pay.example");
        assert_eq!(c.upstream().unwrap(), "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn policy_lifecycle_keys() {
        let c = parse("[policy]\nmode = \"dry_run\"\nrequire_tests_pass = false\nreload_interval_ms = 0\nmax_body_bytes = 4096\n").unwrap();
        assert_eq!(c.policy.mode, PolicyMode::DryRun);
        assert!(!c.policy.require_tests_pass);
        assert_eq!(
            (c.policy.reload_interval_ms, c.policy.max_body_bytes),
            (0, 4096)
        );
        let d = parse("").unwrap();
        assert_eq!(d.policy.mode, PolicyMode::Enforce);
        assert!(d.policy.require_tests_pass);
        let err = parse("[policy]\nmode = \"audit\"\n").unwrap_err();
        assert!(err.to_string().contains("mode"), "{err}");
        let mut c = Config::default();
        assert!(c.set("policy.mode", "nope", "test").is_err());
        c.set("policy.mode", "dry_run", "test").unwrap();
        assert_eq!(c.policy.mode, PolicyMode::DryRun);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[inbound]\nlisten = \"127.0.0.1:1\"\nupstreem = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("upstreem"), "{err}");
        let err = parse("[polcy]\ndir = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("polcy"), "{err}");
    }

    #[test]
    fn upstream_must_be_loopback_http_host_port() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:80",
            "http://[::1]:9000/",
        ] {
            assert!(upstream_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://127.0.0.1:8080",
            "127.0.0.1:8080",
            "http://127.0.0.1",
            "http://127.0.0.1:0",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:8080/api",
            "http://user@127.0.0.1:8080",
            "http://10.0.0.7:8080",
            "http://payments:8080",
        ] {
            let err = upstream_addr(bad).unwrap_err().to_string();
            assert!(err.starts_with("inbound.upstream"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[inbound]\nlisten = \"127.0.0.1:1\"\n[audit]\npath = \"a.log\"\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "PORTCULLIS_INBOUND_LISTEN" => Some("127.0.0.1:2".to_string()),
            "PORTCULLIS_AUDIT_PATH" => Some("b.log".to_string()),
            _ => None,
        };
        let c = Config::load(&path, &env, &[("audit.path", "c.log".into())]).unwrap();
        assert_eq!(c.inbound.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(c.audit.path, "c.log");
        assert_eq!(c.policy.dir, PathBuf::from("policies"));

        let bad = |k: &str| (k == "PORTCULLIS_ADMIN_LISTEN").then(|| "nope".to_string());
        let err = Config::load(&path, &bad, &[]).unwrap_err().to_string();
        assert!(
            err.contains("admin.listen") && err.contains("PORTCULLIS_ADMIN_LISTEN"),
            "{err}"
        );
    }

    #[test]
    fn validate_names_missing_files_and_keys() {
        let mut c = Config::default();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("identity.trust_domain"), "{err}");
        c.identity.trust_domain = "pay.example".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("identity.cert") && err.contains("/var/run/portcullis/svid.pem"),
            "{err}"
        );
        c.inbound.upstream = "http://10.1.2.3:80".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("inbound.upstream"));
    }

    #[test]
    fn audit_keys_parse_and_default_to_fail_closed() {
        let c = parse("[audit]\npath = \"a.log\"\n").unwrap();
        assert_eq!(c.audit.on_full, OnFull::FailClosed);
        let c = parse(
            "[audit]\non_full = \"fail_open\"\nfsync = \"always\"\nmax_bytes = 1000\n\
             keep_files = 3\nhmac_key_file = \"k\"\nredact_headers = [\"x-token\"]\n",
        )
        .unwrap();
        assert_eq!(c.audit.on_full, OnFull::FailOpen);
        assert_eq!(c.audit.fsync, Fsync::Always);
        assert_eq!(c.audit.keep_files, 3);
        let err = parse("[audit]\non_full = \"sometimes\"\n").unwrap_err();
        assert!(err.to_string().contains("on_full"), "{err}");
    }

    #[test]
    fn every_overridable_key_is_settable() {
        let mut c = Config::default();
        for key in OVERRIDABLE {
            let value = if *key == "policy.mode" {
                "dry_run"
            } else if *key == "policy.evaluator" {
                "interpreter"
            } else if key.ends_with("listen") {
                "127.0.0.1:9"
            } else if key.ends_with("min_remaining") {
                "90s"
            } else if key.ends_with("_ms")
                || key.ends_with("connections")
                || key.ends_with("workers")
                || key.ends_with("decision_cache")
            {
                "5"
            } else {
                "x"
            };
            c.set(key, value, "test").unwrap();
        }
        assert!(c.set("inbound.nope", "1", "test").is_err());
    }

    #[test]
    fn workers_default_to_the_cpus_and_are_bounded() {
        let mut c = Config::default();
        assert_eq!(c.inbound.workers, 0);
        assert!(c.inbound.worker_threads() >= 1);
        c.set("inbound.workers", "3", "PORTCULLIS_INBOUND_WORKERS")
            .unwrap();
        assert_eq!(c.inbound.worker_threads(), 3);
        c.inbound.workers = MAX_WORKERS + 1;
        match c.validate() {
            Err(Error::Invalid { key, message }) => {
                assert_eq!(key, "inbound.workers");
                assert!(message.contains("0 means one per CPU"), "{message}");
            }
            other => panic!("expected inbound.workers to be refused, got {other:?}"),
        }
    }

    #[test]
    fn decision_cache_has_a_default_a_bound_and_an_env_override() {
        assert_eq!(Config::default().policy.decision_cache, 10_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[policy]\ndecision_cache = 0\n").unwrap();
        let c = Config::load(&path, &|_| None, &[]).unwrap();
        assert_eq!(c.policy.decision_cache_capacity(), 0);
        let env = |k: &str| (k == "PORTCULLIS_POLICY_DECISION_CACHE").then(|| "250".to_string());
        let c = Config::load(&path, &env, &[]).unwrap();
        assert_eq!(c.policy.decision_cache, 250);
        let bad = |k: &str| (k == "PORTCULLIS_POLICY_DECISION_CACHE").then(|| "lots".to_string());
        let err = Config::load(&path, &bad, &[]).unwrap_err().to_string();
        assert!(err.contains("policy.decision_cache"), "{err}");

        let mut c = Config::default();
        c.policy.decision_cache = MAX_DECISION_CACHE + 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("policy.decision_cache"), "{err}");
        assert_eq!(
            c.policy.decision_cache_capacity(),
            usize::try_from(MAX_DECISION_CACHE).unwrap()
        );
    }

    #[test]
    fn input_headers_are_unset_by_default_lowercased_and_checked() {
        assert_eq!(Config::default().policy.input_header_list(), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[policy]\ninput_headers = [\"Idempotency-Key\", \"content-type\"]\n",
        )
        .unwrap();
        let c = Config::load(&path, &|_| None, &[]).unwrap();
        let list = c.policy.input_header_list().unwrap();
        let names: Vec<&str> = list.names().iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "idempotency-key"]);

        let mut c = Config::default();
        c.policy.input_headers = Some(vec!["content-type".into(), "bad header".into()]);
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("policy.input_headers") && err.contains("\"bad header\""),
            "{err}"
        );
    }

    #[test]
    fn idle_timeout_has_a_default_and_an_env_override() {
        assert_eq!(Config::default().inbound.idle_timeout_ms, 60_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[inbound]\nidle_timeout_ms = 5000\n").unwrap();
        let c = Config::load(&path, &|_| None, &[]).unwrap();
        assert_eq!(c.inbound.idle_timeout_ms, 5000);
        let env = |k: &str| (k == "PORTCULLIS_INBOUND_IDLE_TIMEOUT_MS").then(|| "750".to_string());
        let c = Config::load(&path, &env, &[]).unwrap();
        assert_eq!(c.inbound.idle_timeout_ms, 750);
    }

    #[test]
    fn identity_lifecycle_keys() {
        let c = parse(
            r#"
            [identity]
            trust_domain = "pay.example"
            min_remaining = "10m"
            watch_interval_ms = 250
            [identity.federation]
            "partner.example" = "partner-bundle.pem"
            "#,
        )
        .unwrap();
        assert_eq!(c.identity.min_remaining, Duration::from_secs(600));
        assert_eq!(c.identity.watch_interval_ms, 250);
        assert_eq!(
            c.identity.federation["partner.example"],
            PathBuf::from("partner-bundle.pem")
        );
        assert_eq!(
            Config::default().identity.min_remaining,
            Duration::from_secs(300)
        );
        let err = parse("[identity]\nmin_remaining = \"5 minutes\"\n").unwrap_err();
        assert!(err.to_string().contains("min_remaining"), "{err}");
        for (text, secs) in [("90s", 90), ("5m", 300), ("1h", 3600), ("0s", 0)] {
            assert_eq!(duration_text::parse(text).unwrap().as_secs(), secs);
        }
        for bad in ["", "5", "m", "5d", "-5m", "1.5h"] {
            assert!(duration_text::parse(bad).is_err(), "{bad}");
        }
        let json = c.redacted();
        assert_eq!(json["identity"]["min_remaining"], "10m");
    }

    #[test]
    fn spiffe_endpoint_socket_selects_the_workload_api() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[identity]\ntrust_domain = \"pay.example\"\n").unwrap();
        let agent = |k: &str| {
            (k == SPIFFE_ENDPOINT_SOCKET).then(|| "unix:///run/spire/agent.sock".to_string())
        };
        let c = Config::load(&path, &agent, &[]).unwrap();
        assert_eq!(
            c.identity.workload_api.as_deref(),
            Some("unix:///run/spire/agent.sock")
        );
        // An explicit setting wins over the SPIFFE default.
        let both = |k: &str| match k {
            SPIFFE_ENDPOINT_SOCKET => Some("unix:///a.sock".to_string()),
            "PORTCULLIS_IDENTITY_WORKLOAD_API" => Some("unix:///b.sock".to_string()),
            _ => None,
        };
        let c = Config::load(&path, &both, &[]).unwrap();
        assert_eq!(c.identity.workload_api.as_deref(), Some("unix:///b.sock"));
        std::fs::write(
            &path,
            "[identity]\ntrust_domain = \"pay.example\"\nworkload_api = \"unix:///c.sock\"\n",
        )
        .unwrap();
        let c = Config::load(&path, &agent, &[]).unwrap();
        assert_eq!(c.identity.workload_api.as_deref(), Some("unix:///c.sock"));
    }

    #[test]
    fn outbound_section_parses_with_routes() {
        let c = parse(
            r#"
            [outbound]
            listen = "127.0.0.1:15001"
            [[outbound.route]]
            host = "ledger.pay.svc"
            address = "10.0.3.7:15443"
            server_id = "spiffe://pay.example/ns/ledger/sa/ledger"
            [[outbound.route]]
            host = "fraud.pay.svc"
            address = "fraud.pay.svc:15443"
            server_id_prefix = "spiffe://pay.example/ns/fraud/"
            "#,
        )
        .unwrap();
        let o = c.outbound.as_ref().unwrap();
        assert_eq!(o.routes.len(), 2);
        assert_eq!(o.connect_timeout_ms, 1_000);
        assert_eq!(
            o.routes[1].server_id_prefix.as_deref(),
            Some("spiffe://pay.example/ns/fraud/")
        );
        assert!(parse("").unwrap().outbound.is_none());
        let err = parse("[[outbound.route]]\nhost = \"x\"\naddress = \"a:1\"\nserver = \"s\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("server"), "{err}");
    }

    #[test]
    fn outbound_example_config_parses() {
        let c = parse(include_str!("../portcullis.outbound.example.toml")).unwrap();
        let o = c.outbound.unwrap();
        let specs =
            crate::outbound::route::parse_all(&o.routes, Some(&["pay.example", "bank.example"]))
                .unwrap();
        assert_eq!(specs.len(), 3);
    }

    #[test]
    fn outbound_listen_must_be_loopback() {
        let mut c = Config::default();
        c.set("outbound.listen", "0.0.0.0:15001", "test").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("outbound.listen") && err.contains("loopback"),
            "{err}"
        );
        c.set("outbound.listen", "10.0.0.7:15001", "test").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("outbound.listen"));
        // Loopback passes this check; validation goes on to the next key.
        c.set("outbound.listen", "[::1]:15001", "test").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(!err.contains("outbound"), "{err}");
    }

    #[test]
    fn outbound_route_errors_name_the_route() {
        let mut c = parse(
            r#"
            [identity]
            trust_domain = "pay.example"
            [[outbound.route]]
            host = "ledger.pay.svc"
            address = "10.0.3.7:15443"
            server_id = "spiffe://pay.example/ns/ledger/sa/ledger"
            [[outbound.route]]
            host = "bank.pay.svc"
            address = "bank:443"
            server_id = "spiffe://bank.example/sa/connector"
            "#,
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("outbound.route[1] (host \"bank.pay.svc\")")
                && err.contains("bank.example"),
            "{err}"
        );
        // Federated, the bank's domain is known.
        c.identity
            .federation
            .insert("bank.example".into(), "bank.pem".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(!err.contains("outbound"), "{err}");
        let o = c.outbound.as_mut().unwrap();
        o.routes[0].address = "10.0.3.7".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("outbound.route[0] (host \"ledger.pay.svc\")")
                && err.contains("address"),
            "{err}"
        );
    }

    #[test]
    fn workload_api_address_is_checked() {
        let mut c = Config::default();
        c.identity.trust_domain = "pay.example".into();
        c.identity.workload_api = Some("/run/spire/agent.sock".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("identity.workload_api"), "{err}");
    }
}
