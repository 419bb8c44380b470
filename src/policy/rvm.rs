//! Deciding requests on regorus's compiled bytecode VM (the RVM) when, and
//! only when, it is proven to agree with the interpreter for this policy.
//!
//! The RVM needs roughly a third of the interpreter's instructions per
//! decision, but it is the younger engine and it has diverged: in 0.14.1 it
//! skips an `else` that follows a body whose `some` loop failed, which
//! flipped denies into undefined results on an earlier shape of the shipped
//! policy. A faster wrong answer is an authorization bypass, so every
//! snapshot proves agreement first: each input that the policy's own tests
//! feed to rules (`with input as ...`) is decided by both engines, and any
//! difference, or a policy the RVM cannot compile, keeps the interpreter.
//! The RVM cannot simply run the tests itself: its compiler refuses `with`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, Value};
use serde::{Deserialize, Serialize};

use super::{rules_by_module, Error, Sources};

/// Which engines a snapshot may decide with (`policy.evaluator`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EvaluatorMode {
    /// The RVM where it agrees with the interpreter on every test input,
    /// else the interpreter.
    #[default]
    Auto,
    /// Always the interpreter: the escape hatch should the RVM misbehave
    /// on traffic the tests did not cover.
    Interpreter,
}

/// The extension that records each `with input as` value during capture.
/// Its name cannot clash with a policy's: Rego has no `portcullis.` builtins.
const CAPTURE_FN: &str = "portcullis.capture_input";

/// Upper bound on VMs kept for reuse; more than the worker threads ever
/// hold at once, so it only bounds memory after a burst.
const MAX_IDLE_VMS: usize = 64;

/// A steps budget the time limit, not this count, is meant to enforce:
/// the RVM's default of 25,000 instructions refuses legitimate policies
/// with large data documents.
const MAX_INSTRUCTIONS: usize = 1 << 40;

/// A policy compiled to RVM bytecode, with a pool of VMs: a VM is mutable
/// while it runs and costly to build (register windows, rule cache), so
/// each evaluation borrows one instead of building it.
pub(crate) struct Rvm {
    compiled: CompiledPolicy,
    program: Arc<Program>,
    data: Value,
    timer: ExecutionTimerConfig,
    idle: Mutex<Vec<RegoVM>>,
}

impl std::fmt::Debug for Rvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rvm").finish_non_exhaustive()
    }
}

impl Rvm {
    fn compile(
        engine: &Engine,
        compiled: CompiledPolicy,
        query: &str,
        timer: ExecutionTimerConfig,
    ) -> Result<Self, String> {
        let program =
            Compiler::compile_from_policy(&compiled, &[query]).map_err(|e| format!("{e:#}"))?;
        Ok(Rvm {
            compiled,
            program,
            data: engine.get_data(),
            timer,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn new_vm(&self) -> Result<RegoVM, anyhow::Error> {
        let mut vm = RegoVM::new_with_policy(self.compiled.clone());
        vm.load_program(self.program.clone());
        vm.set_data(self.data.clone())?;
        vm.set_execution_timer_config(Some(self.timer));
        vm.set_max_instructions(MAX_INSTRUCTIONS);
        Ok(vm)
    }

    pub(crate) fn eval(&self, input: Value) -> Result<Value, anyhow::Error> {
        // A poisoned lock only means another evaluation panicked while
        // pushing or popping; the Vec itself is intact.
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut vm = match pooled {
            Some(vm) => vm,
            None => self.new_vm()?,
        };
        vm.set_input(input);
        let result = vm.execute();
        // A VM that failed (time limit, error) may hold half-run state; it
        // is dropped rather than reused.
        if result.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE_VMS {
                idle.push(vm);
            }
        }
        Ok(result?)
    }
}

/// The engine a snapshot decides with, and why.
pub(crate) struct Choice {
    pub(crate) rvm: Option<Rvm>,
    pub(crate) reason: String,
}

/// Picks the engine for `query` over `sources`, whose interpreter form is
/// `engine` and whose prepared form for `query` is `compiled`.
pub(crate) fn choose(
    sources: &Sources,
    engine: &Engine,
    compiled: CompiledPolicy,
    query: &str,
    timer: ExecutionTimerConfig,
    mode: EvaluatorMode,
) -> Result<Choice, Error> {
    let interpreter = |reason: String| Ok(Choice { rvm: None, reason });
    if mode == EvaluatorMode::Interpreter {
        return interpreter("policy.evaluator = \"interpreter\"".to_owned());
    }
    let rvm = match Rvm::compile(engine, compiled, query, timer) {
        Ok(rvm) => rvm,
        Err(e) => return interpreter(format!("the RVM cannot compile this policy: {e}")),
    };
    let Some(inputs) = capture_test_inputs(sources, engine)? else {
        return interpreter(
            "the policy tests' `with input` modifiers could not be instrumented".to_owned(),
        );
    };
    if inputs.is_empty() {
        return interpreter(
            "no policy test evaluates a rule `with input as ...`, so the RVM could not be \
             checked against the interpreter"
                .to_owned(),
        );
    }
    for (test, input) in &inputs {
        let mut reference = engine.clone();
        reference.set_input(input.clone());
        let want = reference.eval_rule(query.to_owned());
        let got = rvm.eval(input.clone());
        let agree = match (&want, &got) {
            (Ok(w), Ok(g)) => w == g,
            // Both fail: both deny with a policy error. The texts differ
            // between engines, so only the failing is compared.
            (Err(_), Err(_)) => true,
            _ => false,
        };
        if !agree {
            return interpreter(format!(
                "the RVM disagrees with the interpreter on the input of {test}: \
                 interpreter {}, RVM {}",
                outcome(&want),
                outcome(&got)
            ));
        }
    }
    let tests: std::collections::BTreeSet<_> = inputs.iter().map(|(t, _)| t).collect();
    Ok(Choice {
        rvm: Some(rvm),
        reason: format!(
            "the RVM agrees with the interpreter on all {} inputs of {} policy tests",
            inputs.len(),
            tests.len()
        ),
    })
}

fn outcome(r: &Result<Value, anyhow::Error>) -> String {
    match r {
        Ok(v) => v.to_string(),
        Err(e) => format!("error ({e})"),
    }
}

/// Runs every `test_` rule with each `with input as E` rewritten to
/// `with input as portcullis.capture_input(E)`, and returns the distinct
/// values the tests fed in, each with the first test that used it.
/// `None` when the modifiers' source positions cannot be rewritten.
/// `engine` is `sources` already parsed; only its modules are read.
fn capture_test_inputs(
    sources: &Sources,
    engine: &Engine,
) -> Result<Option<Vec<(String, Value)>>, Error> {
    let mut replacements = BTreeMap::new();
    for (path, (text, ranges)) in input_with_edits(&mut engine.clone()) {
        let Some(wrapped) = wrap_ranges(&text, &ranges) else {
            return Ok(None);
        };
        replacements.insert(path, wrapped);
    }
    let rewritten = sources.rewritten(&replacements);

    let captured: Arc<Mutex<Vec<Value>>> = Arc::default();
    let mut engine = rewritten.engine(super::testing::TEST_TIMEOUT)?;
    let sink = captured.clone();
    engine
        .add_extension(
            CAPTURE_FN.into(),
            1,
            Box::new(move |mut args: Vec<Value>| {
                let value = args.pop().unwrap_or(Value::Undefined);
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(value.clone());
                Ok(value)
            }),
        )
        .map_err(|e| Error::Eval(format!("{e:#}")))?;

    let mut seen = std::collections::BTreeSet::new();
    let mut inputs = Vec::new();
    let mut tests: Vec<String> = rules_by_module(&mut engine)
        .into_iter()
        .filter(|r| r.name.starts_with("test_"))
        .map(|r| r.path)
        .collect();
    tests.dedup();
    for test in tests {
        // Outcomes do not matter here: a failing test's inputs are still
        // inputs the engines must agree on.
        let _ = engine.clone().eval_rule(test.clone());
        let batch = std::mem::take(&mut *captured.lock().unwrap_or_else(|e| e.into_inner()));
        for value in batch {
            if seen.insert(value.clone()) {
                inputs.push((test.clone(), value));
            }
        }
    }
    Ok(Some(inputs))
}

/// Per file: the text regorus parsed, and the byte ranges in it of every
/// `as` expression of a `with input` modifier in a rule body.
type Edits = BTreeMap<String, (String, Vec<(usize, usize)>)>;

fn input_with_edits(engine: &mut Engine) -> Edits {
    let mut edits = Edits::new();
    for module in engine.get_modules() {
        for rule in &module.policy {
            let regorus::unstable::Rule::Spec { bodies, .. } = rule.as_ref() else {
                continue;
            };
            for body in bodies {
                for stmt in &body.query.stmts {
                    for with in &stmt.with_mods {
                        if with.refr.span().text() != "input" {
                            continue;
                        }
                        let span = with.r#as.span();
                        edits
                            .entry(span.source.get_path().clone())
                            .or_insert_with(|| (span.source.contents().to_owned(), Vec::new()))
                            .1
                            .push((span.start as usize, span.end as usize));
                    }
                }
            }
        }
    }
    edits
}

/// `text` with each range wrapped in a call to the capture function.
pub(super) fn wrap_ranges(text: &str, ranges: &[(usize, usize)]) -> Option<String> {
    let mut ranges = ranges.to_vec();
    ranges.sort_unstable();
    let mut out = String::with_capacity(text.len() + ranges.len() * 32);
    let mut at = 0;
    for (start, end) in ranges {
        // Overlapping or out-of-range spans would produce a different
        // program; refuse rather than guess.
        if start < at || end < start {
            return None;
        }
        out.push_str(text.get(at..start)?);
        out.push_str(CAPTURE_FN);
        out.push('(');
        out.push_str(text.get(start..end)?);
        out.push(')');
        at = end;
    }
    out.push_str(text.get(at..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySnapshot;
    use std::time::Duration;

    const QUERY: &str = "data.t.allow";

    fn load(files: &[(&str, &str)], mode: EvaluatorMode) -> PolicySnapshot {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        PolicySnapshot::load_checked(dir.path(), QUERY, Duration::from_secs(1), true, mode).unwrap()
    }

    fn decide(snap: &PolicySnapshot, input: &str) -> (bool, Option<String>) {
        let d = snap.evaluate(Value::from_json_str(input).unwrap()).unwrap();
        (d.allowed, d.reason)
    }

    const POLICY: &str = r#"package t
import rego.v1
default allow := {"allowed": false, "reason": "default"}
allow := {"allowed": true, "reason": "listed"} if input.user in data.users
"#;

    const TESTS: &str = r#"package t_test
import rego.v1
test_alice if data.t.allow.allowed with input as {"user": "alice"}
test_mallory if not data.t.allow.allowed with input as {"user": "mallory"}
"#;

    #[test]
    fn verified_policy_runs_on_the_rvm() {
        let files = [
            ("p.rego", POLICY),
            ("p_test.rego", TESTS),
            ("data.json", r#"{"users": ["alice"]}"#),
        ];
        let snap = load(&files, EvaluatorMode::Auto);
        assert_eq!(snap.evaluator, "rvm", "{}", snap.evaluator_reason);
        assert!(
            snap.evaluator_reason
                .contains("all 2 inputs of 2 policy tests"),
            "{}",
            snap.evaluator_reason
        );
        assert_eq!(
            decide(&snap, r#"{"user": "alice"}"#),
            (true, Some("listed".into()))
        );
        assert_eq!(
            decide(&snap, r#"{"user": "bob"}"#),
            (false, Some("default".into()))
        );
        // Many evaluations through the pool give the same answers.
        for _ in 0..100 {
            assert!(decide(&snap, r#"{"user": "alice"}"#).0);
            assert!(!decide(&snap, r#"{}"#).0);
        }

        let interp = load(&files, EvaluatorMode::Interpreter);
        assert_eq!(interp.evaluator, "interpreter");
        assert!(interp.evaluator_reason.contains("policy.evaluator"));
    }

    /// regorus 0.14.1's RVM skips an `else` after a body whose `some`
    /// failed; the policy's own test exposes it, so the interpreter decides.
    #[test]
    fn disagreement_on_a_test_input_keeps_the_interpreter() {
        let policy = r#"package t
import rego.v1
default allow := {"allowed": false, "reason": "default"}
allow := {"allowed": true, "reason": "found"} if {
	some x in input.xs
	x == 2
} else := {"allowed": false, "reason": "not found"}
"#;
        let tests = r#"package t_test
import rego.v1
test_else if data.t.allow.reason == "not found" with input as {"xs": [1]}
"#;
        let snap = load(
            &[("p.rego", policy), ("p_test.rego", tests)],
            EvaluatorMode::Auto,
        );
        assert_eq!(snap.evaluator, "interpreter");
        assert!(
            snap.evaluator_reason.contains("disagrees")
                && snap.evaluator_reason.contains("data.t_test.test_else"),
            "{}",
            snap.evaluator_reason
        );
        assert_eq!(
            decide(&snap, r#"{"xs": [1]}"#),
            (false, Some("not found".into()))
        );
    }

    /// `io.jwt.*` are interpreter extensions Portcullis adds; the RVM has
    /// no such builtins, so such a policy stays on the interpreter.
    #[test]
    fn interpreter_only_extensions_keep_the_interpreter() {
        let policy = r#"package t
import rego.v1
default allow := false
allow if {
	[_, payload, _] := io.jwt.decode(input.token)
	payload.sub == "alice"
}
"#;
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";
        let tests = format!(
            "package t_test\nimport rego.v1\ntest_alice if data.t.allow with input as {{\"token\": \"{token}\"}}\n"
        );
        let snap = load(
            &[("p.rego", policy), ("p_test.rego", &tests)],
            EvaluatorMode::Auto,
        );
        assert_eq!(snap.evaluator, "interpreter", "{}", snap.evaluator_reason);
        let input = format!(r#"{{"token": "{token}"}}"#);
        assert!(
            snap.evaluate(Value::from_json_str(&input).unwrap())
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn without_test_inputs_the_interpreter_decides() {
        let snap = load(&[("p.rego", POLICY)], EvaluatorMode::Auto);
        assert_eq!(snap.evaluator, "interpreter");
        assert!(
            snap.evaluator_reason.contains("no policy test"),
            "{}",
            snap.evaluator_reason
        );
    }

    #[test]
    fn time_limit_applies_on_the_rvm() {
        let policy = r#"package t
import rego.v1
default allow := false
allow if count([x | some x in numbers.range(1, input.n)]) > 0
"#;
        let tests = r#"package t_test
import rego.v1
test_small if data.t.allow with input as {"n": 3}
"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.rego"), policy).unwrap();
        std::fs::write(dir.path().join("p_test.rego"), tests).unwrap();
        let snap = PolicySnapshot::load_checked(
            dir.path(),
            QUERY,
            Duration::from_millis(20),
            true,
            EvaluatorMode::Auto,
        )
        .unwrap();
        assert_eq!(snap.evaluator, "rvm", "{}", snap.evaluator_reason);
        let err = snap
            .evaluate(Value::from_json_str(r#"{"n": 100000000}"#).unwrap())
            .unwrap_err();
        assert!(matches!(err, crate::policy::Error::Timeout { .. }), "{err}");
        // The pool is not poisoned by the failed run.
        assert!(
            snap.evaluate(Value::from_json_str(r#"{"n": 2}"#).unwrap())
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn wraps_ranges_in_order() {
        let text = "a with input as {\"x\": 1}; b with input as y";
        let first = text.find('{').unwrap();
        let second = text.rfind('y').unwrap();
        let out = wrap_ranges(text, &[(second, second + 1), (first, first + 8)]).unwrap();
        assert_eq!(
            out,
            "a with input as portcullis.capture_input({\"x\": 1}); \
             b with input as portcullis.capture_input(y)"
        );
        assert_eq!(wrap_ranges(text, &[(3, 2)]), None);
        assert_eq!(wrap_ranges(text, &[(0, 4), (2, 6)]), None);
        assert_eq!(wrap_ranges(text, &[(0, 400)]), None);
    }
}
