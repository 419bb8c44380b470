//! The real `portcullis` binary, driven the way operators and CI drive it:
//! `certs dev`, `config check`, `run` with curl presenting client
//! certificates, SIGTERM, `audit verify`, `policy test`, `demo`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use portcullis::demo::DemoService;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

async fn portcullis(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `certs dev` into `dir/certs`, returned.
async fn dev_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    assert!(
        portcullis(&["certs", "dev", "--out", certs.to_str().unwrap()])
            .await
            .0
    );
    certs
}

fn write_config(dir: &Path, certs: &Path, upstream: &str, extra: &str) -> PathBuf {
    let path = dir.join("portcullis.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[inbound]
listen = "127.0.0.1:0"
upstream = "{upstream}"
{extra}
[identity]
trust_domain = "pay.example"
cert = "{c}/payments-svid.pem"
key = "{c}/payments-svid.key"
bundle = "{c}/bundle.pem"

[policy]
dir = "{p}"

[audit]
path = "{a}"

[admin]
listen = "127.0.0.1:0"
"#,
            c = certs.display(),
            p = policies().display(),
            a = dir.join("audit.log").display(),
        ),
    )
    .unwrap();
    path
}

struct Curl {
    certs: PathBuf,
    port: u16,
}

impl Curl {
    /// Returns curl's exit status, the body and the HTTP status code.
    async fn call(&self, who: Option<&str>, args: &[&str], path: &str) -> (i32, String, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.certs.join("bundle.pem"))
            .arg("--resolve")
            .arg(format!("localhost:{}:127.0.0.1", self.port));
        if let Some(who) = who {
            cmd.arg("--cert")
                .arg(self.certs.join(format!("{who}-svid.pem")))
                .arg("--key")
                .arg(self.certs.join(format!("{who}-svid.key")));
        }
        cmd.args(args)
            .args(["-w", "\n%{http_code} %{http_version}"])
            .arg(format!("https://localhost:{}{path}", self.port));
        let out = cmd.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (
            out.status.code().unwrap_or(-1),
            body.to_owned(),
            status.to_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_client_certificates_against_the_running_binary() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (ok, _, err) = portcullis(&["certs", "dev", "--out", certs.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let service = DemoService::start().await.unwrap();
    let config = write_config(dir.path(), &certs, &format!("http://{}", service.addr), "");

    let mut child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // The readiness signal: the log line that names the bound addresses.
    let (inbound, admin) = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("portcullis exited before ready");
        if let Some(rest) = line.split("portcullis ready inbound=").nth(1) {
            let mut parts = rest.split_whitespace();
            let inbound: std::net::SocketAddr = parts.next().unwrap().parse().unwrap();
            let admin = parts
                .next()
                .unwrap()
                .trim_start_matches("admin=")
                .to_owned();
            break (inbound, admin);
        }
    };
    let logs = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push(l);
        }
        all
    });
    let curl = Curl {
        certs: certs.clone(),
        port: inbound.port(),
    };

    let (code, body, status) = curl
        .call(
            Some("checkout"),
            &[
                "--http1.1",
                "-X",
                "POST",
                "-H",
                "idempotency-key: k1",
                "-H",
                "x-spiffe-id: spiffe://pay.example/ns/finance/sa/reporting",
                "-d",
                "{}",
            ],
            "/v1/payments",
        )
        .await;
    assert_eq!((code, status.as_str()), (0, "200 1.1"), "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["caller"], "spiffe://pay.example/ns/shop/sa/checkout");

    let (code, body, status) = curl
        .call(Some("reporting"), &["--http2"], "/v1/reports/daily")
        .await;
    assert_eq!((code, status.as_str()), (0, "200 2"), "{body}");

    let (code, body, status) = curl
        .call(
            Some("frontend"),
            &["--http1.1", "-X", "POST"],
            "/v1/payments",
        )
        .await;
    assert_eq!((code, status.as_str()), (0, "403 1.1"));
    let denied: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        denied["reason"].as_str().unwrap().contains("frontend"),
        "{body}"
    );

    let (code, _, _) = curl.call(None, &[], "/v1/payments/p1").await;
    assert_ne!(code, 0, "a caller without a certificate must be refused");
    let (code, _, _) = curl.call(Some("intruder"), &[], "/v1/payments/p1").await;
    assert_ne!(code, 0, "a certificate from a rogue CA must be refused");
    assert_eq!(
        service.received().len(),
        2,
        "only the two allowed calls reach the service"
    );

    let scrape = Command::new("curl")
        .args(["-sS", &format!("http://{admin}/metrics")])
        .output()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&scrape.stdout);
    assert!(
        metrics.contains(r#"portcullis_requests_total{decision="allow",status="2xx"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"portcullis_requests_total{decision="deny",status="4xx"} 1"#));

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = child.wait().await.unwrap();
    assert!(status.success(), "SIGTERM must end in exit 0, got {status}");
    let logs = logs.await.unwrap().join("\n");
    assert!(logs.contains("SIGTERM"), "{logs}");

    let audit = dir.path().join("audit.log");
    let (ok, out, _) = portcullis(&["audit", "verify", audit.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds = |k: &str| events.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(kinds("request"), 3);
    assert_eq!(kinds("handshake_rejected"), 2);
    assert_eq!(kinds("startup"), 1);
    assert_eq!(kinds("shutdown"), 1);
    assert!(
        out.contains(&format!("{} events verified", events.len())),
        "{out}"
    );

    // Tampering is detected.
    std::fs::write(
        &audit,
        text.replacen("\"allowed\":false", "\"allowed\":true", 1),
    )
    .unwrap();
    let (ok, out, _) = portcullis(&["audit", "verify", audit.to_str().unwrap()]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("edited"), "{out}");
}

#[tokio::test]
async fn config_check_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path()).await;
    let cfg = |extra: &str, upstream: &str| write_config(dir.path(), &certs, upstream, extra);
    let check = |path: PathBuf| async move {
        portcullis(&["config", "check", "--config", path.to_str().unwrap()]).await
    };

    let (ok, out, err) = check(cfg("", "http://127.0.0.1:8080")).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("config ok") && out.contains("spiffe://pay.example/ns/pay/sa/payments"),
        "{out}"
    );

    let (ok, _, err) = check(cfg("upstreem = 1", "http://127.0.0.1:8080")).await;
    assert!(!ok && err.contains("upstreem"), "{err}");

    let (ok, _, err) = check(cfg("", "https://127.0.0.1:8080")).await;
    assert!(!ok && err.contains("inbound.upstream"), "{err}");

    let path = cfg("", "http://127.0.0.1:8080");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("payments-svid.key", "checkout-svid.key"),
    )
    .unwrap();
    let (ok, _, err) = check(path.clone()).await;
    assert!(
        !ok && err.contains("does not match") && err.contains("checkout-svid.key"),
        "{err}"
    );

    std::fs::write(&path, text.replace("payments-svid.pem", "missing.pem")).unwrap();
    let (ok, _, err) = check(path.clone()).await;
    assert!(
        !ok && err.contains("identity.cert") && err.contains("missing.pem"),
        "{err}"
    );

    // The environment overrides the file, without touching this process's env.
    let path = cfg("", "http://127.0.0.1:8080");
    let out = Command::new(BIN)
        .args(["config", "check", "--config", path.to_str().unwrap()])
        .env("PORTCULLIS_INBOUND_UPSTREAM", "http://10.0.0.7:8080")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("inbound.upstream") && err.contains("loopback"),
        "{err}"
    );
}

#[tokio::test]
async fn config_check_refuses_a_policy_reading_a_header_input_headers_leaves_out() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path()).await;
    let path = write_config(dir.path(), &certs, "http://127.0.0.1:8080", "");
    let text = std::fs::read_to_string(&path).unwrap();
    let with = |policy_dir: &Path| {
        let dir_line = format!("dir = \"{}\"", policies().display());
        std::fs::write(
            &path,
            text.replace(
                &dir_line,
                &format!(
                    "dir = \"{}\"\ninput_headers = [\"idempotency-key\"]",
                    policy_dir.display()
                ),
            ),
        )
        .unwrap();
    };
    let check =
        || async { portcullis(&["config", "check", "--config", path.to_str().unwrap()]).await };

    // The shipped policy takes the header names it needs from data: loaded.
    with(&policies());
    let (ok, out, err) = check().await;
    assert!(ok && out.contains("config ok"), "{err}");

    let tenant = dir.path().join("tenant");
    std::fs::create_dir(&tenant).unwrap();
    std::fs::write(
        tenant.join("authz.rego"),
        "package portcullis.authz\nimport rego.v1\ndefault allow := false\n\
         allow if input.attributes.request.http.headers[\"x-tenant\"] == \"shop\"\n",
    )
    .unwrap();
    with(&tenant);
    let (ok, _, err) = check().await;
    assert!(
        !ok && err.contains("x-tenant") && err.contains("policy.input_headers"),
        "{err}"
    );
}

#[tokio::test]
async fn config_check_reports_outbound_and_names_a_bad_route() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path()).await;
    let path = write_config(dir.path(), &certs, "http://127.0.0.1:8080", "");
    let base = std::fs::read_to_string(&path).unwrap();
    let check = |outbound: String| {
        std::fs::write(&path, format!("{base}{outbound}")).unwrap();
        let path = path.clone();
        async move { portcullis(&["config", "check", "--config", path.to_str().unwrap()]).await }
    };
    let route = r#"
[[outbound.route]]
host = "ledger.pay.svc"
address = "127.0.0.1:15443"
server_id = "spiffe://pay.example/ns/ledger/sa/ledger"
"#;
    let (ok, out, err) = check(format!("[outbound]\nlisten = \"127.0.0.1:15001\"\n{route}")).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("outbound on 127.0.0.1:15001 with 1 route(s)"),
        "{out}"
    );

    let (ok, _, err) = check(format!("[outbound]\nlisten = \"0.0.0.0:15001\"\n{route}")).await;
    assert!(
        !ok && err.contains("outbound.listen") && err.contains("loopback"),
        "{err}"
    );

    let bad = route.replace("server_id", "server_id_prefix");
    let (ok, _, err) = check(bad).await;
    assert!(
        !ok && err.contains(r#"outbound.route[0] (host "ledger.pay.svc")"#)
            && err.contains("server_id_prefix"),
        "{err}"
    );
}

#[tokio::test]
async fn policy_test_runs_the_shipped_rego_tests() {
    let (ok, out, err) = portcullis(&["policy", "test", policies().to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("PASS"), "{out}");
}

/// jemalloc reads the options compiled into main.rs when the process
/// starts and only warns on stderr about one it does not know: a typo there
/// would silently drop the tuning.
#[tokio::test]
async fn the_allocator_accepts_its_compiled_in_options() {
    let out = Command::new(BIN)
        .arg("--version")
        .env_remove("_RJEM_MALLOC_CONF")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("<jemalloc>"), "{err}");
}

#[tokio::test]
async fn demo_runs_end_to_end() {
    let (ok, out, err) = portcullis(&["demo"]).await;
    assert!(ok, "demo failed:\n{out}\n{err}");
    assert!(out.contains("ALLOWED 200"), "{out}");
    assert!(out.contains("REFUSED 403"), "{out}");
    assert!(out.contains("REFUSED at the TLS handshake"), "{out}");
    assert!(out.contains("audit hash chain verified"), "{out}");
    assert!(out.contains("portcullis_requests_total"), "{out}");
}

async fn portcullis_stdin(args: &[&str], stdin: &str) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn policy_test_verbose_lists_each_pass_and_run_filters() {
    let dir = policies();
    let dir = dir.to_str().unwrap();
    let (ok, out, _) = portcullis(&["policy", "test", dir, "-v"]).await;
    assert!(ok, "{out}");
    let passes = out.lines().filter(|l| l.starts_with("PASS data.")).count();
    assert!(passes > 10, "{out}");
    assert!(out.contains(&format!("PASS: {passes}/{passes}")), "{out}");

    let (ok, out, _) = portcullis(&["policy", "test", dir, "-v", "--run", "trust_domain"]).await;
    assert!(ok, "{out}");
    let selected = out.lines().filter(|l| l.starts_with("PASS data.")).count();
    assert!(selected >= 1 && selected < passes, "{out}");
    assert!(out
        .lines()
        .filter(|l| l.starts_with("PASS data."))
        .all(|l| l.contains("trust_domain")));

    let (ok, _, err) = portcullis(&["policy", "test", dir, "--run", "("]).await;
    assert!(!ok && err.contains("--run"), "{err}");
}

#[tokio::test]
async fn policy_test_fails_with_locations_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.rego"),
        "package p\nimport rego.v1\nallow if input.ok\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p_test.rego"),
        "package p_test\nimport rego.v1\n\ntest_ok if data.p.allow with input as {\"ok\": true}\n\ntest_wrong if data.p.allow with input as {\"ok\": false}\n",
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, out, _) = portcullis(&["policy", "test", d]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL data.p_test.test_wrong at ") && out.contains("p_test.rego:6: undefined"),
        "{out}"
    );
    assert!(!out.contains("PASS data."), "passes only with -v: {out}");
    assert!(out.contains("FAIL: 1/2 failed"), "{out}");

    std::fs::write(dir.path().join("p.rego"), "package p\nallow if {\n").unwrap();
    let (ok, out, err) = portcullis(&["policy", "test", d]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("p.rego:"), "{err}");
}

#[tokio::test]
async fn policy_input_then_eval_from_stdin() {
    let (ok, input, err) = portcullis(&[
        "policy",
        "input",
        "--method",
        "POST",
        "--path",
        "/v1/./payments?x=1",
        "-H",
        "Idempotency-Key: k-1",
        "-H",
        "x-spiffe-id: spiffe://forged/x",
        "--spiffe-id",
        "spiffe://pay.example/ns/shop/sa/checkout",
    ])
    .await;
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&input).unwrap();
    let http = &doc["attributes"]["request"]["http"];
    assert_eq!(http["path"], "/v1/payments?x=1");
    assert_eq!(http["headers"]["idempotency-key"], "k-1");
    assert!(http["headers"].get("x-spiffe-id").is_none());
    assert_eq!(doc["parsed_path"], serde_json::json!(["v1", "payments"]));
    assert_eq!(doc["source"]["trust_domain"], "pay.example");

    let dir = policies();
    let (ok, out, err) = portcullis_stdin(
        &["policy", "eval", dir.to_str().unwrap(), "--input", "-"],
        &input,
    )
    .await;
    assert!(ok, "{err}");
    let decision: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(decision["allowed"], true, "{out}");
    assert!(decision["eval_time_us"].is_u64(), "{out}");
    assert_eq!(decision["policy_revision"].as_str().unwrap().len(), 64);
    assert!(err.contains("evaluated in"), "{err}");

    let (ok, _, err) = portcullis(&["policy", "input", "--path", "/a/%2F/b"]).await;
    assert!(!ok && err.contains("400"), "{err}");

    // As the sidecar shows them under `policy.input_headers`.
    let (ok, input, err) = portcullis(&[
        "policy",
        "input",
        "-H",
        "Idempotency-Key: k-1",
        "-H",
        "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "--input-header",
        "idempotency-key",
    ])
    .await;
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&input).unwrap();
    assert_eq!(
        doc["attributes"]["request"]["http"]["headers"],
        serde_json::json!({"idempotency-key": "k-1"})
    );
    let (ok, _, err) = portcullis(&["policy", "input", "--input-header", "a b"]).await;
    assert!(!ok && err.contains("--input-header"), "{err}");
}
