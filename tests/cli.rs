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
    let certs = dir.path().join("certs");
    assert!(
        portcullis(&["certs", "dev", "--out", certs.to_str().unwrap()])
            .await
            .0
    );
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
async fn policy_test_runs_the_shipped_rego_tests() {
    let (ok, out, err) = portcullis(&["policy", "test", policies().to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("PASS"), "{out}");
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
