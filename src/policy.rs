//! Rego authorization: a policy directory compiled once into an immutable
//! [`PolicySnapshot`] that every worker thread evaluates requests against.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{Engine, Value};
use sha2::{Digest, Sha256};

pub mod cache;
pub mod decision;
pub mod input;
mod jwt;
pub mod reload;
mod rvm;
pub mod testing;

pub use cache::{CacheUse, DecisionCache};
pub use decision::Decision;
pub use input::{build_input, build_input_json, HeaderAllowlist, InputHeaders, RequestFacts};
pub use rvm::EvaluatorMode;
pub use testing::{run_tests, TestReport, TestResult};

/// The optional data document loaded beside the policies.
pub const DATA_FILE: &str = "data.json";

/// How many units of interpreter work pass between clock reads. Reading the
/// clock on every step would cost more than the small policies we expect;
/// 64 keeps the overshoot past the deadline to microseconds.
const TIMER_CHECK_INTERVAL: NonZeroU32 = NonZeroU32::MIN.saturating_add(63);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read policy directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("no *.rego files in {0}")]
    NoPolicies(PathBuf),
    /// `message` comes from regorus and normally carries `file:line:col`
    /// and a source excerpt; `path` is repeated so that it is always there.
    #[error("{path}: policy does not compile: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("{path}: invalid data document: {message}")]
    Data { path: PathBuf, message: String },
    #[error("query {query:?} does not name a rule in the loaded policies")]
    UnknownQuery { query: String },
    #[error("policy evaluation exceeded its {limit:?} time limit")]
    Timeout { limit: Duration },
    #[error("policy evaluation failed: {0}")]
    Eval(String),
    /// Raised only when tests are required: the set compiles but its own
    /// `test_` rules say it is wrong. `failures` names each as
    /// `rule (file:line): why`.
    #[error("{failed} of {total} policy tests failed: {failures}")]
    TestsFailed {
        failed: usize,
        total: usize,
        failures: String,
    },
    /// A header read by name that `policy.input_headers` does not list
    /// would always look absent to the policy: refused rather than left to
    /// deny (or allow) requests in a way its tests never showed.
    #[error(
        "the policy reads {path}, but policy.input_headers does not list {header:?}, \
         so the policy would never see it: add it to the list or stop reading it"
    )]
    HeaderNotShown { header: String, path: String },
    #[error("invalid policy decision: field `{field}`: {message}")]
    Decision {
        field: &'static str,
        message: String,
    },
}

/// One compiled, immutable generation of the policy directory.
///
/// Shared by all worker threads (behind an `ArcSwap`); evaluation takes
/// `&self`, so a reload never disturbs evaluations in flight.
#[derive(Debug, Clone)]
pub struct PolicySnapshot {
    /// Lowercase hex sha256 over the sorted input file names and contents.
    pub revision: String,
    /// Names of the loaded files (`*.rego` and `data.json`), sorted.
    pub files: Vec<String>,
    pub loaded_at: SystemTime,
    /// The rule whose value is the decision, e.g. `data.portcullis.authz.allow`.
    pub query: String,
    /// The rule that decides outbound requests; `None` allows every routed
    /// one.
    pub egress_query: Option<String>,
    eval_timeout: Duration,
    /// `"rvm"` or `"interpreter"`: which engine decides requests.
    pub evaluator: &'static str,
    /// Why that engine: the RVM's agreement with the interpreter on the
    /// policy's test inputs, or why it could not be used.
    pub evaluator_reason: String,
    /// Parsed, analysed and prepared once at load; each evaluation works on
    /// a clone, which shares the compiled policy and data by reference
    /// count, so requests never see each other's state. benches/policy_modes.rs
    /// measured this as fast as `CompiledPolicy::eval_with_input` (which
    /// only honours the process-wide timer) and a reused per-thread engine.
    /// It is also the reference the RVM is checked against.
    engine: Engine,
    /// Present only when proven to agree with `engine` (see `rvm`).
    rvm: Option<Arc<rvm::Rvm>>,
    /// Decisions of `query` already made by this snapshot, for inputs it
    /// cannot tell apart (see `cache`). Owned by the snapshot, so a reload
    /// starts empty and can never serve the old policy's decisions.
    decision_cache: Arc<DecisionCache>,
    /// The headers the policy is shown (`policy.input_headers`); `None`
    /// shows every one.
    input_headers: Option<Arc<HeaderAllowlist>>,
}

impl PolicySnapshot {
    /// Reads and compiles `dir`. Any problem refuses the whole snapshot, so
    /// the caller keeps serving with the previous one.
    pub fn load(dir: &Path, query: &str, eval_timeout: Duration) -> Result<Self, Error> {
        Self::load_checked(dir, query, eval_timeout, false, EvaluatorMode::Auto)
    }

    /// Like [`PolicySnapshot::load`], and with `require_tests_pass` also
    /// runs the set's own `test_` rules, refusing it if any fails. The tests
    /// run on the very bytes that were compiled (one read of the
    /// directory), so a file changing mid-reload cannot slip past them.
    pub fn load_checked(
        dir: &Path,
        query: &str,
        eval_timeout: Duration,
        require_tests_pass: bool,
        evaluator: EvaluatorMode,
    ) -> Result<Self, Error> {
        let sources = Sources::read(dir)?;
        let mut engine = sources.engine(eval_timeout)?;
        if require_tests_pass {
            let report = testing::run_on(&sources, None)?;
            if !report.all_passed() {
                return Err(Error::TestsFailed {
                    failed: report.failed,
                    total: report.results.len(),
                    failures: report.failure_summary(),
                });
            }
        }

        // Checked up front so that a typo in the configured query is
        // reported as such rather than as a generic compile failure.
        if !rules_by_module(&mut engine).iter().any(|r| r.path == query) {
            return Err(Error::UnknownQuery {
                query: query.to_owned(),
            });
        }
        // Compiling for the entry point prepares the engine (analysis,
        // scheduling, rule index) once, here, instead of on the first
        // request of every clone, and reports semantic errors at load time.
        // The RVM compiles from the same prepared policy.
        let compiled =
            engine
                .compile_with_entrypoint(&query.into())
                .map_err(|e| Error::Compile {
                    path: dir.to_owned(),
                    message: e.to_string(),
                })?;

        // Over every module, tests included: they are loaded into the same
        // engine, and the scan is meant to over-approximate.
        let analysis = cache::analyze(
            sources
                .files
                .iter()
                .filter(|f| f.name != DATA_FILE)
                .map(|f| (f.name.as_str(), f.contents.as_str())),
        );

        let choice = rvm::choose(
            &sources,
            &engine,
            compiled,
            query,
            timer(eval_timeout),
            evaluator,
        )?;

        Ok(PolicySnapshot {
            revision: sources.revision,
            files: sources.files.into_iter().map(|f| f.name).collect(),
            loaded_at: SystemTime::now(),
            query: query.to_owned(),
            egress_query: None,
            eval_timeout,
            evaluator: if choice.rvm.is_some() {
                "rvm"
            } else {
                "interpreter"
            },
            evaluator_reason: choice.reason,
            engine,
            rvm: choice.rvm.map(Arc::new),
            decision_cache: DecisionCache::new(analysis, cache::DEFAULT_CAPACITY),
            input_headers: None,
        })
    }

    /// Replaces the decision cache with an empty one of `capacity`
    /// decisions (`policy.decision_cache`); 0 turns caching off.
    pub fn with_decision_cache(mut self, capacity: usize) -> Self {
        self.decision_cache = DecisionCache::new(self.decision_cache.analysis().clone(), capacity);
        self
    }

    pub fn decision_cache(&self) -> &DecisionCache {
        &self.decision_cache
    }

    /// Shows the policy only the headers `only` names (`None`: every one).
    /// Refused when one of the policy's read paths names a header the list
    /// leaves out (`input.attributes.request.http.headers["x-tenant"]`). A
    /// name it takes from data, computes or reads through an alias is not
    /// seen here; its tests should cover it.
    pub fn with_input_headers(mut self, only: Option<Arc<HeaderAllowlist>>) -> Result<Self, Error> {
        if let Some(list) = &only {
            const HEADERS: &[&str] = &["input", "attributes", "request", "http", "headers"];
            for read in &self.decision_cache.analysis().reads {
                let under = read.len() > HEADERS.len()
                    && read.iter().zip(HEADERS).all(|(segment, h)| segment == h);
                let Some(header) = read.get(HEADERS.len()).filter(|_| under) else {
                    continue;
                };
                if !list.contains(header) {
                    return Err(Error::HeaderNotShown {
                        header: header.clone(),
                        path: cache::display_path(read),
                    });
                }
            }
        }
        self.input_headers = only;
        Ok(self)
    }

    /// `map` as this snapshot shows it to the policy.
    pub fn input_headers<'a>(&'a self, map: &'a http::HeaderMap) -> InputHeaders<'a> {
        InputHeaders::new(map, self.input_headers.as_deref())
    }

    /// The list `policy.input_headers` set, kept across reloads.
    pub fn input_header_list(&self) -> Option<&Arc<HeaderAllowlist>> {
        self.input_headers.as_ref()
    }

    /// Adds the outbound decision rule, refused like `query` when the set
    /// does not define it, so a reload cannot silently drop it.
    pub fn with_egress_query(mut self, egress_query: Option<&str>) -> Result<Self, Error> {
        let Some(query) = egress_query else {
            return Ok(self);
        };
        if !rules_by_module(&mut self.engine)
            .iter()
            .any(|r| r.path == query)
        {
            return Err(Error::UnknownQuery {
                query: query.to_owned(),
            });
        }
        self.egress_query = Some(query.to_owned());
        Ok(self)
    }

    /// Decides one request, from the decision cache when an earlier request
    /// the policy cannot tell apart was decided; [`Decision::cache`] says
    /// which. Errors (including timeouts) are the caller's to turn into a
    /// deny: this layer never guesses a decision, and never caches an
    /// error.
    pub fn evaluate(&self, input: Value) -> Result<Decision, Error> {
        let key = self.decision_cache.key(&input);
        self.decide(key, || input)
    }

    /// Decides one inbound request. On a decision cache hit the input
    /// document is never built: the key is made from the fields the policy
    /// reads.
    pub fn evaluate_request(
        &self,
        facts: &RequestFacts,
        body: Option<input::BodyFacts>,
    ) -> Result<Decision, Error> {
        let key = match body {
            None => self.decision_cache.key_for(facts),
            Some(_) => None,
        };
        match key {
            Some(key) => self.decide(Some(key), || self.decision_cache.document(facts)),
            // A body, caching off, or a read only the whole document can
            // answer: `evaluate` keys (or not) from the document.
            None => {
                let mut document = self.decision_cache.document(facts);
                if let Some(body) = body {
                    input::add_body(&mut document, body.kind, body.complete, body.truncated);
                }
                self.evaluate(document)
            }
        }
    }

    /// Looks `key` up, else evaluates the input `make` builds and stores
    /// the decision under `key`. No key: evaluated and not stored.
    fn decide(
        &self,
        key: Option<Vec<u8>>,
        make: impl FnOnce() -> Value,
    ) -> Result<Decision, Error> {
        let Some(key) = key else {
            return self.evaluate_uncached(make());
        };
        if let Some(mut hit) = self.decision_cache.get(&key) {
            hit.cache = CacheUse::Hit;
            return Ok(hit);
        }
        let mut decision = self.evaluate_uncached(make())?;
        self.decision_cache.insert(key, &decision);
        decision.cache = CacheUse::Miss;
        Ok(decision)
    }

    fn evaluate_uncached(&self, input: Value) -> Result<Decision, Error> {
        match &self.rvm {
            Some(rvm) => {
                let value = rvm
                    .eval(input)
                    .map_err(|e| eval_error(e, self.eval_timeout))?;
                Decision::from_value(&value)
            }
            None => self.evaluate_rule(&self.query, input),
        }
    }

    /// Decides one outbound request with `egress_query`; `None` when none
    /// is configured (every routed request is allowed).
    pub fn evaluate_egress(&self, input: Value) -> Option<Result<Decision, Error>> {
        let query = self.egress_query.as_deref()?;
        Some(self.evaluate_rule(query, input))
    }

    /// On the interpreter: the RVM is only proven for `query`.
    fn evaluate_rule(&self, query: &str, input: Value) -> Result<Decision, Error> {
        let mut engine = self.engine.clone();
        engine.set_input(input);
        let value = engine
            .eval_rule(query.to_owned())
            .map_err(|e| eval_error(e, self.eval_timeout))?;
        Decision::from_value(&value)
    }
}

fn timer(limit: Duration) -> ExecutionTimerConfig {
    ExecutionTimerConfig {
        limit,
        check_interval: TIMER_CHECK_INTERVAL,
    }
}

/// Maps a regorus error to ours, singling out the time limit so it can be
/// counted separately from policy bugs.
fn eval_error(e: anyhow::Error, limit: Duration) -> Error {
    let timed_out = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<regorus::LimitError>(),
            Some(regorus::LimitError::TimeLimitExceeded { .. })
        ) || matches!(
            cause.downcast_ref::<regorus::rvm::vm::VmError>(),
            Some(regorus::rvm::vm::VmError::TimeLimitExceeded { .. })
        )
    }) || e.to_string().contains("exceeded time limit");
    if timed_out {
        Error::Timeout { limit }
    } else {
        Error::Eval(format!("{e:#}"))
    }
}

struct SourceFile {
    name: String,
    path: PathBuf,
    contents: String,
}

/// The files of one policy directory, read once so that the revision and
/// the compiled engine are guaranteed to describe the same bytes.
struct Sources {
    files: Vec<SourceFile>,
    revision: String,
}

impl Sources {
    fn read(dir: &Path) -> Result<Self, Error> {
        let read_dir_err = |source| Error::ReadDir {
            path: dir.to_owned(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
            let entry = entry.map_err(read_dir_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".rego") || name == DATA_FILE) {
                continue;
            }
            // Follows symlinks: Kubernetes ConfigMap files are symlinks into
            // the `..data` directory.
            let is_file = std::fs::metadata(entry.path())
                .map(|m| m.is_file())
                .map_err(|source| Error::ReadFile {
                    path: entry.path(),
                    source,
                })?;
            if is_file {
                names.push(name);
            }
        }
        names.sort();
        if !names.iter().any(|n| n.ends_with(".rego")) {
            return Err(Error::NoPolicies(dir.to_owned()));
        }

        let mut files = Vec::with_capacity(names.len());
        let mut hasher = Sha256::new();
        for name in names {
            let path = dir.join(&name);
            let bytes = std::fs::read(&path).map_err(|source| Error::ReadFile {
                path: path.clone(),
                source,
            })?;
            // Length-prefixed so that moving bytes between a name and a
            // file, or between files, always changes the revision.
            hasher.update((name.len() as u64).to_be_bytes());
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(&bytes);
            let contents =
                String::from_utf8(bytes).map_err(|_| Error::NotUtf8 { path: path.clone() })?;
            files.push(SourceFile {
                name,
                path,
                contents,
            });
        }
        Ok(Sources {
            files,
            revision: hex::encode(hasher.finalize()),
        })
    }

    fn engine(&self, eval_timeout: Duration) -> Result<Engine, Error> {
        let mut engine = Engine::new();
        engine.set_execution_timer_config(timer(eval_timeout));
        jwt::register(&mut engine).map_err(|e| Error::Eval(format!("{e:#}")))?;
        for f in &self.files {
            if f.name == DATA_FILE {
                let data = Value::from_json_str(&f.contents).map_err(|e| Error::Data {
                    path: f.path.clone(),
                    message: e.to_string(),
                })?;
                if !matches!(data, Value::Object(_)) {
                    return Err(Error::Data {
                        path: f.path.clone(),
                        message: "the top level must be an object".to_owned(),
                    });
                }
                engine.add_data(data).map_err(|e| Error::Data {
                    path: f.path.clone(),
                    message: e.to_string(),
                })?;
            } else {
                engine
                    .add_policy(f.path.display().to_string(), f.contents.clone())
                    .map_err(|e| Error::Compile {
                        path: f.path.clone(),
                        message: e.to_string(),
                    })?;
            }
        }
        Ok(engine)
    }
}

impl Sources {
    /// The same files with some contents replaced, keyed by the path
    /// regorus knows them by. The revision is kept: this is the same set,
    /// instrumented.
    fn rewritten(&self, replacements: &std::collections::BTreeMap<String, String>) -> Sources {
        let files = self
            .files
            .iter()
            .map(|f| SourceFile {
                name: f.name.clone(),
                path: f.path.clone(),
                contents: replacements
                    .get(&f.path.display().to_string())
                    .cloned()
                    .unwrap_or_else(|| f.contents.clone()),
            })
            .collect();
        Sources {
            files,
            revision: self.revision.clone(),
        }
    }
}

/// A rule as written in a module: where it is and its full `data.` path.
#[derive(Debug, Clone)]
pub(crate) struct DeclaredRule {
    pub(crate) path: String,
    pub(crate) name: String,
    pub(crate) file: String,
    pub(crate) line: u32,
}

/// Every rule head of every module, in file order. regorus offers no rule
/// listing, so the name is read from the start of the rule's source text,
/// which is always the rule's name for non-default rules.
pub(crate) fn rules_by_module(engine: &mut Engine) -> Vec<DeclaredRule> {
    let packages = engine.get_packages().unwrap_or_default();
    let mut rules = Vec::new();
    for (module, package) in engine.get_modules().iter().zip(packages) {
        for rule in &module.policy {
            let span = rule.span();
            let text = span.text();
            let text = text.strip_prefix("default").map_or(text, str::trim_start);
            let name: String = text
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                continue;
            }
            rules.push(DeclaredRule {
                path: format!("{package}.{name}"),
                name,
                file: span.source.get_path().clone(),
                line: span.line,
            });
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            fs::write(dir.path().join(name), contents).unwrap();
        }
        dir
    }

    const SIMPLE: &str = "package t\nimport rego.v1\ndefault allow := false\nallow if input.ok\n";

    #[test]
    fn snapshot_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<PolicySnapshot>();
    }

    #[test]
    fn an_allowlist_refuses_a_policy_reading_a_header_it_leaves_out() {
        let reads = |header_read: &str| {
            format!(
                "package t\nimport rego.v1\ndefault allow := false\n\
                 allow if {header_read} == \"a\"\n"
            )
        };
        let list = |names: &[&'static str]| {
            Some(Arc::new(HeaderAllowlist::new(
                names.iter().map(|n| http::HeaderName::from_static(n)),
            )))
        };
        let load = |text: &str| {
            let dir = dir_with(&[("a.rego", text)]);
            PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap()
        };
        let by_name = load(&reads(
            r#"input.attributes.request.http.headers["x-tenant"]"#,
        ));
        let err = by_name
            .clone()
            .with_input_headers(list(&["idempotency-key"]))
            .unwrap_err();
        assert!(matches!(&err, Error::HeaderNotShown { header, .. } if header == "x-tenant"));
        let text = err.to_string();
        assert!(
            text.contains(r#"input.attributes.request.http.headers["x-tenant"]"#)
                && text.contains("policy.input_headers"),
            "{text}"
        );
        // Listed, or no list at all: loaded.
        let listed = by_name
            .clone()
            .with_input_headers(list(&["x-tenant"]))
            .unwrap();
        assert!(listed.input_header_list().is_some());
        assert!(by_name.with_input_headers(None).is_ok());
        // A name the policy takes from elsewhere cannot be checked, and is
        // not refused; neither is a read of some other field.
        let dynamic = load(&reads(
            "input.attributes.request.http.headers[input.attributes.request.http.method]",
        ));
        assert!(dynamic.with_input_headers(list(&[])).is_ok());
        let method = load(&reads("input.attributes.request.http.method"));
        assert!(method.with_input_headers(list(&[])).is_ok());
    }

    #[test]
    fn loads_and_evaluates_boolean_policy() {
        let dir = dir_with(&[("a.rego", SIMPLE), ("README.md", "ignored")]);
        let snap = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap();
        assert_eq!(snap.files, vec!["a.rego"]);
        assert_eq!(snap.query, "data.t.allow");
        assert_eq!(snap.revision.len(), 64);
        assert!(snap
            .revision
            .chars()
            .all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        let yes = snap
            .evaluate(Value::from_json_str(r#"{"ok": true}"#).unwrap())
            .unwrap();
        assert!(yes.allowed);
        let no = snap.evaluate(Value::new_object()).unwrap();
        assert!(!no.allowed);
    }

    #[test]
    fn revision_covers_names_contents_and_data() {
        let rev = |files: &[(&str, &str)]| {
            let d = dir_with(files);
            PolicySnapshot::load(d.path(), "data.t.allow", TIMEOUT)
                .unwrap()
                .revision
        };
        let base = rev(&[("a.rego", SIMPLE)]);
        assert_eq!(base, rev(&[("a.rego", SIMPLE)]));
        assert_ne!(base, rev(&[("b.rego", SIMPLE)]));
        assert_ne!(base, rev(&[("a.rego", &format!("{SIMPLE}\n"))]));
        assert_ne!(base, rev(&[("a.rego", SIMPLE), ("data.json", "{}")]));
    }

    #[test]
    fn data_json_is_visible_to_policy() {
        let dir = dir_with(&[
            (
                "p.rego",
                "package t\nimport rego.v1\nallow if input.user in data.users\n",
            ),
            ("data.json", r#"{"users": ["alice"]}"#),
        ]);
        let snap = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap();
        assert_eq!(snap.files, vec!["data.json", "p.rego"]);
        let alice = Value::from_json_str(r#"{"user": "alice"}"#).unwrap();
        assert!(snap.evaluate(alice).unwrap().allowed);
        let bob = Value::from_json_str(r#"{"user": "bob"}"#).unwrap();
        let d = snap.evaluate(bob).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.reason.as_deref(), Some(decision::UNDEFINED_REASON));
    }

    #[test]
    fn parse_error_names_file_and_line() {
        let dir = dir_with(&[
            ("good.rego", SIMPLE),
            (
                "bad.rego",
                "package u\nimport rego.v1\n\nx if {\n  input.a ==\n}\n",
            ),
        ]);
        let err = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Compile { .. }), "{msg}");
        assert!(msg.contains("bad.rego:6:"), "{msg}");
    }

    #[test]
    fn semantic_error_is_refused() {
        let dir = dir_with(&[(
            "a.rego",
            "package t\nimport rego.v1\nallow if {\n  x > 1\n}\n",
        )]);
        let err = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap_err();
        assert!(err.to_string().contains("a.rego"), "{err}");
    }

    #[test]
    fn unknown_function_fails_closed_at_evaluation() {
        // regorus resolves functions lazily, so this loads (OPA would refuse
        // it); what matters is that it can never produce an allow.
        let dir = dir_with(&[(
            "a.rego",
            "package t\nimport rego.v1\nallow if no_such_function(input)\n",
        )]);
        match PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT) {
            Err(err) => assert!(err.to_string().contains("a.rego"), "{err}"),
            Ok(snap) => assert!(snap.evaluate(Value::new_object()).is_err()),
        }
    }

    #[test]
    fn bad_data_json_names_file() {
        let dir = dir_with(&[("a.rego", SIMPLE), ("data.json", "{not json")]);
        let err = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap_err();
        assert!(matches!(err, Error::Data { .. }));
        assert!(err.to_string().contains("data.json"), "{err}");
        let dir = dir_with(&[("a.rego", SIMPLE), ("data.json", "[1]")]);
        let err = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap_err();
        assert!(matches!(err, Error::Data { .. }));
    }

    #[test]
    fn empty_dir_is_error() {
        let dir = dir_with(&[("data.json", "{}")]);
        let err = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap_err();
        assert!(matches!(err, Error::NoPolicies(_)), "{err}");
        let err =
            PolicySnapshot::load(&dir.path().join("missing"), "data.t.allow", TIMEOUT).unwrap_err();
        assert!(matches!(err, Error::ReadDir { .. }), "{err}");
    }

    #[test]
    fn rego_files_in_subdirectories_are_not_loaded() {
        let dir = dir_with(&[("a.rego", SIMPLE)]);
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b.rego"), "not rego at all").unwrap();
        let snap = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap();
        assert_eq!(snap.files, vec!["a.rego"]);
    }

    #[test]
    fn unknown_query_is_error() {
        let dir = dir_with(&[("a.rego", SIMPLE)]);
        for q in ["data.t.alow", "data.x.allow", "allow", "data.t"] {
            let err = PolicySnapshot::load(dir.path(), q, TIMEOUT).unwrap_err();
            assert!(matches!(err, Error::UnknownQuery { .. }), "{q}: {err}");
        }
    }

    #[test]
    fn evaluation_error_is_err() {
        let dir = dir_with(&[(
            "a.rego",
            "package t\nimport rego.v1\nallow := x if { x := input.a }\nallow := y if { y := input.b }\n",
        )]);
        let snap = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap();
        // Two complete-rule definitions with different values: a conflict.
        let err = snap
            .evaluate(Value::from_json_str(r#"{"a": true, "b": false}"#).unwrap())
            .unwrap_err();
        assert!(matches!(err, Error::Eval(_)), "{err}");
    }

    #[test]
    fn wrong_decision_shape_is_err() {
        let dir = dir_with(&[(
            "a.rego",
            "package t\nimport rego.v1\nallow := {\"allowed\": \"yes\"}\n",
        )]);
        let snap = PolicySnapshot::load(dir.path(), "data.t.allow", TIMEOUT).unwrap();
        let err = snap.evaluate(Value::new_object()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Decision {
                    field: "allowed",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn slow_policy_times_out() {
        let dir = dir_with(&[(
            "a.rego",
            "package t\nimport rego.v1\nallow if {\n  some x in numbers.range(1, 5000)\n  some y in numbers.range(1, 5000)\n  x * y < 0\n}\n",
        )]);
        let limit = Duration::from_millis(20);
        let snap = PolicySnapshot::load(dir.path(), "data.t.allow", limit).unwrap();
        let started = std::time::Instant::now();
        let err = snap.evaluate(Value::new_object()).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
