//! A Rego test runner in the manner of `opa test`, which regorus lacks.
//! Security teams run it before shipping a policy; the reloader can run it
//! to refuse a policy whose own tests fail.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use regorus::Value;

use super::{rules_by_module, Error, Sources};

/// A single test must not hang the run; generous, since tests may build
/// larger inputs than production requests.
pub(super) const TEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// Full rule path, e.g. `data.portcullis.authz_test.test_x`.
    pub path: String,
    pub name: String,
    pub file: String,
    pub line: u32,
    pub passed: bool,
    /// Why it failed: `false`, `undefined`, another value, or the error.
    pub failure: Option<String>,
    pub duration: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestReport {
    /// In file order, then source order.
    pub results: Vec<TestResult>,
    pub passed: usize,
    pub failed: usize,
}

impl TestReport {
    pub fn all_passed(&self) -> bool {
        self.failed == 0
    }

    /// The failures on one line, `rule (file:line): why; ...`, for logs,
    /// audit events and `/policy`.
    pub fn failure_summary(&self) -> String {
        self.results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| {
                format!(
                    "{} ({}:{}): {}",
                    r.path,
                    r.file,
                    r.line,
                    r.failure.as_deref().unwrap_or("failed")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Loads `dir` as [`super::PolicySnapshot::load`] does and evaluates every
/// rule named `test_*` (optionally only those whose full path matches
/// `filter`). A test passes only when it evaluates to `true`.
pub fn run_tests(dir: &Path, filter: Option<&regex::Regex>) -> Result<TestReport, Error> {
    run_on(&Sources::read(dir)?, filter)
}

pub(super) fn run_on(
    sources: &Sources,
    filter: Option<&regex::Regex>,
) -> Result<TestReport, Error> {
    let mut engine = sources.engine(TEST_TIMEOUT)?;

    let mut seen = BTreeSet::new();
    let tests: Vec<_> = rules_by_module(&mut engine)
        .into_iter()
        .filter(|r| r.name.starts_with("test_"))
        .filter(|r| filter.is_none_or(|re| re.is_match(&r.path)))
        // A test may be defined incrementally over several bodies; it is
        // one test, reported at its first definition.
        .filter(|r| seen.insert(r.path.clone()))
        .collect();

    let mut report = TestReport::default();
    for test in tests {
        let started = Instant::now();
        // A fresh clone per test: no state from one test leaks into the next.
        let outcome = engine.clone().eval_rule(test.path.clone());
        let duration = started.elapsed();
        let failure = match outcome {
            Ok(Value::Bool(true)) => None,
            Ok(Value::Bool(false)) => Some("false".to_owned()),
            Ok(Value::Undefined) => Some("undefined".to_owned()),
            Ok(other) => Some(format!("not true: {other}")),
            Err(e) => Some(format!("error: {e:#}")),
        };
        if failure.is_none() {
            report.passed += 1;
        } else {
            report.failed += 1;
        }
        report.results.push(TestResult {
            path: test.path,
            name: test.name,
            file: test.file,
            line: test.line,
            passed: failure.is_none(),
            failure,
            duration,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            fs::write(dir.path().join(name), contents).unwrap();
        }
        dir
    }

    const POLICY: &str = "package t\nimport rego.v1\nallow if input.ok\n";
    const TESTS: &str = r#"package t_test
import rego.v1
import data.t

test_allows if t.allow with input as {"ok": true}

test_false if t.allow with input as {"ok": false}

test_undefined if data.t.nope

test_error if {
	x := {"a": 1}
	to_number("not a number") == x.a
}

test_value := 3

helper if true
"#;

    fn result<'a>(report: &'a TestReport, name: &str) -> &'a TestResult {
        report.results.iter().find(|r| r.name == name).unwrap()
    }

    #[test]
    fn reports_pass_and_each_kind_of_failure() {
        let dir = dir_with(&[("t.rego", POLICY), ("t_test.rego", TESTS)]);
        let report = run_tests(dir.path(), None).unwrap();
        assert_eq!(report.results.len(), 5, "{report:#?}");
        assert_eq!((report.passed, report.failed), (1, 4));
        assert!(!report.all_passed());

        let ok = result(&report, "test_allows");
        assert!(ok.passed);
        assert_eq!(ok.path, "data.t_test.test_allows");
        assert!(ok.file.ends_with("t_test.rego"), "{}", ok.file);
        assert_eq!(ok.line, 5);

        assert_eq!(
            result(&report, "test_false").failure.as_deref(),
            Some("undefined")
        );
        assert_eq!(result(&report, "test_false").line, 7);
        assert_eq!(
            result(&report, "test_undefined").failure.as_deref(),
            Some("undefined")
        );
        let err = result(&report, "test_error").failure.clone().unwrap();
        assert!(err.starts_with("error:"), "{err}");
        assert_eq!(
            result(&report, "test_value").failure.as_deref(),
            Some("not true: 3")
        );
    }

    #[test]
    fn explicit_false_is_failure() {
        let dir = dir_with(&[(
            "a.rego",
            "package a\nimport rego.v1\ntest_no := false\ntest_yes := true\n",
        )]);
        let report = run_tests(dir.path(), None).unwrap();
        assert_eq!((report.passed, report.failed), (1, 1));
        assert_eq!(result(&report, "test_no").failure.as_deref(), Some("false"));
    }

    #[test]
    fn filter_selects_by_full_path() {
        let dir = dir_with(&[("t.rego", POLICY), ("t_test.rego", TESTS)]);
        let re = regex::Regex::new("t_test\\.test_allow").unwrap();
        let report = run_tests(dir.path(), Some(&re)).unwrap();
        assert_eq!(report.results.len(), 1);
        assert!(report.all_passed());
    }

    #[test]
    fn incremental_test_counts_once() {
        let dir = dir_with(&[(
            "a.rego",
            "package a\nimport rego.v1\ntest_x if input.nope\ntest_x if true\n",
        )]);
        let report = run_tests(dir.path(), None).unwrap();
        assert_eq!(report.results.len(), 1);
        assert!(report.all_passed());
        assert_eq!(report.results[0].line, 3);
    }

    #[test]
    fn compile_error_refuses_run() {
        let dir = dir_with(&[("a.rego", "package a\ntest_x if {\n")]);
        let err = run_tests(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("a.rego"), "{err}");
    }
}
