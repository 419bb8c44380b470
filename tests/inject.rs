//! Golden tests of `portcullis inject` on one example of each workload kind
//! (k8s/examples), through the real binary: the output must equal the
//! checked-in golden file, and injecting the output again must change
//! nothing. `UPDATE_GOLDEN=1 cargo test --test inject` rewrites the goldens
//! after an intended change (then review the diff).

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const IMAGE: &str = "ghcr.io/portcullis-proxy/portcullis:test";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

fn inject(file: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["inject", "-f"])
        .arg(file)
        .args(["--image", IMAGE])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_golden(example: &str, extra: &[&str], golden_name: &str) {
    let input = root().join("k8s/examples").join(example);
    let golden = root().join("tests/golden/inject").join(golden_name);
    let (ok, out, err) = inject(&input, extra);
    assert!(ok, "{example}: {err}");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &out).unwrap();
    }
    let want = std::fs::read_to_string(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", golden.display()));
    assert_eq!(out, want, "{example} differs from {}", golden.display());

    let dir = tempfile::tempdir().unwrap();
    let again_in = dir.path().join("once.yaml");
    std::fs::write(&again_in, &out).unwrap();
    let (ok, again, err) = inject(&again_in, extra);
    assert!(ok, "{err}");
    assert_eq!(again, out, "{example}: injecting twice changed the output");
}

#[test]
fn deployment() {
    check_golden("deployment.yaml", &[], "deployment.yaml");
}

#[test]
fn deployment_with_spire() {
    check_golden(
        "deployment.yaml",
        &["--identity", "spire"],
        "deployment-spire.yaml",
    );
}

#[test]
fn statefulset() {
    check_golden("statefulset.yaml", &[], "statefulset.yaml");
}

#[test]
fn daemonset() {
    check_golden("daemonset.yaml", &[], "daemonset.yaml");
}

#[test]
fn job() {
    check_golden("job.yaml", &[], "job.yaml");
}

#[test]
fn pod() {
    check_golden("pod.yaml", &[], "pod.yaml");
}

#[test]
fn list_with_one_opted_out_item() {
    check_golden("list.yaml", &[], "list.yaml");
    let out = std::fs::read_to_string(root().join("tests/golden/inject/list.yaml")).unwrap();
    assert_eq!(out.matches("restartPolicy: Always").count(), 1, "{out}");
}

#[test]
fn opted_out_workload_is_unchanged() {
    check_golden("opted-out.yaml", &[], "opted-out.yaml");
    let out = std::fs::read_to_string(root().join("tests/golden/inject/opted-out.yaml")).unwrap();
    assert!(!out.contains("restartPolicy: Always"), "{out}");
}

#[test]
fn invalid_yaml_is_refused_naming_document_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: Service\n---\nkind: Deployment\nspec:\n  template: [\n",
    )
    .unwrap();
    let (ok, out, err) = inject(&bad, &[]);
    assert!(!ok);
    assert!(
        out.is_empty(),
        "nothing may be printed for a bad stream: {out}"
    );
    assert!(
        err.contains("bad.yaml") && err.contains("document 2") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn stdin_works() {
    let mut child = Command::new(BIN)
        .args(["inject", "-f", "-", "--image", IMAGE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(root().join("k8s/examples/pod.yaml")).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let want = std::fs::read_to_string(root().join("tests/golden/inject/pod.yaml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
}
