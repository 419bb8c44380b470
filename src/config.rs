//! Configuration: one `Config`, read once from TOML, then overridden by
//! `PORTCULLIS_*` environment variables, then by command-line flags.
//!
//! Every override goes through [`Config::set`] with a dotted key
//! (`inbound.listen`), so the environment, the flags and the file all name a
//! setting the same way and an error always names the key a user can fix.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Inbound {
    pub listen: SocketAddr,
    /// `http://host:port` of the service on loopback.
    pub upstream: String,
    pub max_connections: usize,
    pub handshake_timeout_ms: u64,
    pub header_read_timeout_ms: u64,
    pub upstream_connect_timeout_ms: u64,
    pub upstream_timeout_ms: u64,
    /// How long in-flight requests may run after SIGTERM.
    pub drain_timeout_ms: u64,
    pub max_header_list_bytes: usize,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound {
            listen: SocketAddr::from(([0, 0, 0, 0], 15443)),
            upstream: "http://127.0.0.1:8080".into(),
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            upstream_connect_timeout_ms: 1_000,
            upstream_timeout_ms: 15_000,
            drain_timeout_ms: 20_000,
            max_header_list_bytes: 64 * 1024,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Identity {
    pub trust_domain: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    pub workload_api: Option<String>,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            trust_domain: String::new(),
            cert: "/var/run/portcullis/svid.pem".into(),
            key: "/var/run/portcullis/svid.key".into(),
            bundle: "/var/run/portcullis/bundle.pem".into(),
            workload_api: None,
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
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            path: "-".into(),
            queue_capacity: 8192,
        }
    }
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

/// The settings an environment variable or flag may override, with the
/// environment variable that carries each.
pub const OVERRIDABLE: &[&str] = &[
    "inbound.listen",
    "inbound.upstream",
    "inbound.max_connections",
    "inbound.drain_timeout_ms",
    "identity.trust_domain",
    "identity.cert",
    "identity.key",
    "identity.bundle",
    "identity.workload_api",
    "policy.dir",
    "policy.query",
    "policy.mode",
    "audit.path",
    "admin.listen",
];

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
            "inbound.max_connections" => {
                self.inbound.max_connections = usize::try_from(number(value)?)
                    .map_err(|e| invalid(format!("{value:?} is too large: {e}")))?
            }
            "inbound.drain_timeout_ms" => self.inbound.drain_timeout_ms = number(value)?,
            "identity.trust_domain" => self.identity.trust_domain = value.into(),
            "identity.cert" => self.identity.cert = value.into(),
            "identity.key" => self.identity.key = value.into(),
            "identity.bundle" => self.identity.bundle = value.into(),
            "identity.workload_api" => self.identity.workload_api = Some(value.into()),
            "policy.dir" => self.policy.dir = value.into(),
            "policy.query" => self.policy.query = value.into(),
            "policy.mode" => {
                self.policy.mode = match value {
                    "enforce" => PolicyMode::Enforce,
                    "dry_run" => PolicyMode::DryRun,
                    _ => return Err(invalid(format!("{value:?} is not enforce or dry_run"))),
                }
            }
            "audit.path" => self.audit.path = value.into(),
            "admin.listen" => self.admin.listen = addr(value)?,
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
            (
                "inbound.upstream_connect_timeout_ms",
                self.inbound.upstream_connect_timeout_ms,
            ),
            (
                "inbound.upstream_timeout_ms",
                self.inbound.upstream_timeout_ms,
            ),
            ("policy.eval_timeout_ms", self.policy.eval_timeout_ms),
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
        if self.identity.trust_domain.is_empty() {
            return Err(Error::Invalid {
                key: "identity.trust_domain".into(),
                message: "is required (the trust domain of this workload, e.g. \"pay.example\")"
                    .into(),
            });
        }
        if let Some(api) = &self.identity.workload_api {
            return Err(Error::Invalid {
                key: "identity.workload_api".into(),
                message: format!(
                    "{api:?}: the SPIFFE Workload API source is not available in this build yet; \
                     use identity.cert, identity.key and identity.bundle"
                ),
            });
        }
        for (key, path) in [
            ("identity.cert", &self.identity.cert),
            ("identity.key", &self.identity.key),
            ("identity.bundle", &self.identity.bundle),
        ] {
            std::fs::File::open(path).map_err(|source| Error::MissingFile {
                key: key.into(),
                path: path.clone(),
                source,
            })?;
        }
        std::fs::read_dir(&self.policy.dir).map_err(|source| Error::MissingFile {
            key: "policy.dir".into(),
            path: self.policy.dir.clone(),
            source,
        })?;
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

    pub fn upstream(&self) -> Result<SocketAddr, Error> {
        upstream_addr(&self.inbound.upstream)
    }

    pub fn timeout(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// The effective configuration as `/config` and the startup log show it.
    /// Paths are not secret; key material never lives in the config.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
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
    fn every_overridable_key_is_settable() {
        let mut c = Config::default();
        for key in OVERRIDABLE {
            let value = if *key == "policy.mode" {
                "dry_run"
            } else if key.ends_with("listen") {
                "127.0.0.1:9"
            } else if key.ends_with("_ms") || key.ends_with("connections") {
                "5"
            } else {
                "x"
            };
            c.set(key, value, "test").unwrap();
        }
        assert!(c.set("inbound.nope", "1", "test").is_err());
    }
}
