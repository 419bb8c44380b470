//! What the load generator is pointed at: each target is a separate
//! process (or the upstream itself, for the direct path), started once and
//! kept running for the whole run so measurements of different targets can
//! be interleaved.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procstat::ProcTree;

/// The sidecar measured: `PORTCULLIS_BENCH_BINARY` when set (scripts/pgo.sh's
/// profile-guided build, as scripts/bench.sh sets it), else cargo's release
/// build of this checkout.
pub fn portcullis_binary() -> PathBuf {
    std::env::var_os("PORTCULLIS_BENCH_BINARY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")))
}

pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// mTLS with the client SVID; the direct path is plain HTTP.
    pub tls: bool,
    pub procs: ProcTree,
    /// Resident memory once ready, before any load.
    pub idle_rss: u64,
    /// Connections it was configured to hold at most, where that is
    /// below what the idle mode opens.
    pub max_connections: Option<usize>,
    /// Sent a trace id of its own with every request.
    pub traced: bool,
    _process: Option<Stopper>,
}

impl Target {
    /// The upstream measured without anything in front of it. Its process
    /// belongs to the run, not to this target, so dropping it stops nothing.
    pub fn direct(upstream: &Stopper, addr: SocketAddr) -> Target {
        let procs = ProcTree::of(upstream.id());
        Target {
            name: "direct",
            addr,
            tls: false,
            idle_rss: procs.rss(),
            procs,
            max_connections: None,
            traced: false,
            _process: None,
        }
    }

    /// `child` is listening on `addr` and made of `processes` processes
    /// once ready (nginx forks its workers after binding); `None` if it
    /// is not ready in time (it is stopped then).
    pub fn started(
        name: &'static str,
        child: Child,
        addr: SocketAddr,
        processes: usize,
    ) -> Option<Target> {
        let stopper = Stopper(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let procs = loop {
            let procs = ProcTree::of(stopper.0.id());
            if procs.count() >= processes && TcpStream::connect(addr).is_ok() {
                break procs;
            }
            if Instant::now() > deadline {
                println!("{name}: not listening on {addr} after 30 s, skipped");
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Some(Target {
            name,
            addr,
            tls: true,
            idle_rss: procs.rss(),
            procs,
            max_connections: None,
            traced: false,
            _process: Some(stopper),
        })
    }
}

/// Starts a child that prints the address it bound as its first line on
/// stdout (the upstream and the relay, this binary re-executed).
pub fn spawn_announcing(mut command: Command, what: &str) -> (Child, SocketAddr) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start the {what}: {e}"));
    let stdout = child.stdout.take().expect("child stdout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .unwrap_or_else(|e| panic!("the {what}'s address: {e}"));
    let addr = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the {what} prints its address, not {line:?}"));
    (child, addr)
}

/// The child's side of [`spawn_announcing`]: binds a loopback port and
/// prints its address as the first line on stdout.
pub async fn bind_announced() -> tokio::net::TcpListener {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    println!("{addr}");
    std::io::Write::flush(&mut std::io::stdout()).expect("stdout");
    listener
}

/// A child process stopped with SIGTERM on drop, so nginx takes its
/// workers down with it (SIGKILL on the master would orphan them).
pub struct Stopper(pub Child);

impl Stopper {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Files every mTLS target shares: the dev CA's bundle and the payments
/// SVID as the server certificate.
pub struct Certs {
    pub set: portcullis::certs::DevSet,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Certs {
    pub fn write(dir: &Path) -> Certs {
        let set =
            portcullis::certs::write_dev_set(&dir.join("certs"), "pay.example").expect("dev certs");
        let (cert, key) = set.svid("payments").expect("payments SVID");
        let (server_cert, server_key) = (cert.to_owned(), key.to_owned());
        Certs {
            set,
            server_cert,
            server_key,
        }
    }
}

/// The real release binary with the shipped policies; `audit` is a file
/// path or /dev/null (auditing cannot be switched off: /dev/null keeps the
/// serialising and hashing and drops only the write). `policy` holds
/// further `[policy]` settings.
pub fn portcullis(
    name: &'static str,
    dir: &Path,
    certs: &Certs,
    upstream: SocketAddr,
    audit: &Path,
    policy: &str,
    workers: usize,
) -> Target {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).expect("target dir");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            r#"[inbound]
listen = "127.0.0.1:0"
upstream = "http://{upstream}"
drain_timeout_ms = 1000
workers = {workers}

[identity]
trust_domain = "pay.example"
cert = "{cert}"
key = "{key}"
bundle = "{bundle}"

[policy]
dir = "{policies}"
{policy}

[audit]
path = "{audit}"

[admin]
listen = "127.0.0.1:0"
"#,
            cert = certs.server_cert.display(),
            key = certs.server_key.display(),
            bundle = certs.set.bundle.display(),
            policies = policies.display(),
            audit = audit.display(),
        ),
    )
    .expect("write portcullis.toml");
    let log = dir.join("portcullis.log");
    // RUST_BACKTRACE off, as in a deployment: regorus builds `anyhow`
    // errors on its evaluation path, and with capture on every request
    // pays for a stack walk (libgcc's unwinder alone was 7% of the CPU
    // samples).
    // PORTCULLIS_BENCH_WRAP="heaptrack -o /tmp/ht" (or perf, valgrind...)
    // runs the sidecar under a profiler, with everything else unchanged.
    let wrap = std::env::var("PORTCULLIS_BENCH_WRAP").unwrap_or_default();
    let mut wrap = wrap.split_whitespace();
    let mut command = match wrap.next() {
        Some(tool) => {
            let mut c = Command::new(tool);
            c.args(wrap).arg(portcullis_binary());
            c
        }
        None => Command::new(portcullis_binary()),
    };
    let child = command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start portcullis");
    let (inbound, admin) = wait_ready_line(&log);
    assert!(readyz(admin), "{name}: /readyz is not 200, see {log:?}");
    Target::started(name, child, inbound, 1).expect("portcullis listening")
}

/// The log line app.rs prints once listening names both addresses.
fn wait_ready_line(log: &Path) -> (SocketAddr, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text.split("portcullis ready inbound=").nth(1) {
            let mut parts = rest.split_whitespace();
            let inbound = parts.next().and_then(|a| a.parse().ok());
            let admin = parts
                .next()
                .and_then(|a| a.trim_start_matches("admin=").parse().ok());
            if let (Some(inbound), Some(admin)) = (inbound, admin) {
                return (inbound, admin);
            }
        }
        assert!(Instant::now() < deadline, "portcullis not ready: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn readyz(admin: SocketAddr) -> bool {
    let Ok(mut tcp) = TcpStream::connect(admin) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let sent = tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    let mut reply = String::new();
    sent.is_ok() && tcp.read_to_string(&mut reply).is_ok() && reply.starts_with("HTTP/1.1 200")
}

/// A loopback port nobody is listening on, for peers that cannot report
/// the port they bound. Another process could take it before the peer
/// binds; the peer then fails to start and says so.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `name` on PATH, in the sbin directories Debian installs daemons to, or
/// in the virtualenv `scripts/bench.sh` installs a pip-packaged peer into
/// (`target/peers/NAME`: Envoy).
pub fn find_exe(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/peers")
        .join(name)
        .join("bin");
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), venv])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
