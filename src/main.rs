//! The `portcullis` command line.

// jemalloc rather than glibc's malloc: the audit writer frees on its own
// thread what the request workers allocated, which glibc mostly serves by
// locking the workers' arena, and glibc's fast bins get consolidated on every
// allocation above a kilobyte. Issue 7 measured 8% less CPU per proxied
// request and 1.6 KB less per idle connection (docs/performance.md).
// mimalloc was tried too: it doubled idle RSS.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compiled-in options, read once when it starts (its
/// `malloc_conf`; `_RJEM_MALLOC_CONF` in the environment still overrides
/// them). One arena instead of four per CPU: the sidecar has about ten
/// threads but only its inbound workers and the audit writer allocate much,
/// and each thread's cache serves them without the arena's locks. An arena
/// per thread cost 0.8 MB of idle RSS (issue 7's target is 20 MB) and saved
/// no CPU in the keep-alive bench.
///
/// Thread caches are garbage-collected every 4 MB allocated, not every
/// 64 KB: at the default, the collections and the refills after them were
/// 3.3% of a proxied request's instructions (callgrind, docs/performance.md);
/// idle RSS and RSS per idle connection were unchanged.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"narenas:1,tcache_gc_incr_bytes:4194304".as_ptr());

/// A C string pointer, as jemalloc declares `malloc_conf`.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a `'static`, immutable C string literal.
// Nothing writes through it, so threads sharing it (only jemalloc's
// start-up reads it) cannot race.
unsafe impl Sync for MallocConf {}

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use portcullis::{app, audit, certs, config::Config, demo, inject, policy};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Zero-trust sidecar: SPIFFE mTLS, Rego authorization, tamper-evident audit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run(RunArgs),
    /// Self-contained demo: dev certs, a payment service, the sidecar, calls.
    Demo,
    /// Work with Rego policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Certificates for local development.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Work with the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Add the sidecar to Kubernetes workloads (multi-document YAML).
    Inject {
        /// Manifest file; `-` reads standard input.
        #[arg(short = 'f', long = "filename", default_value = "-")]
        file: PathBuf,
        /// Sidecar image.
        #[arg(long)]
        image: Option<String>,
        /// Where the sidecar's SVID comes from.
        #[arg(long, value_enum, default_value = "cert-manager")]
        identity: inject::IdentitySource,
    },
}

#[derive(Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Overrides inbound.listen.
    #[arg(long)]
    listen: Option<String>,
    /// Overrides inbound.upstream.
    #[arg(long)]
    upstream: Option<String>,
    /// Overrides admin.listen.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Overrides policy.dir.
    #[arg(long)]
    policy_dir: Option<String>,
    /// Overrides audit.path.
    #[arg(long)]
    audit_path: Option<String>,
}

impl RunArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let flags: Vec<(&str, String)> = [
            ("inbound.listen", &self.listen),
            ("inbound.upstream", &self.upstream),
            ("admin.listen", &self.admin_listen),
            ("policy.dir", &self.policy_dir),
            ("audit.path", &self.audit_path),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect();
        let config = Config::load(&self.config, &|k| std::env::var(k).ok(), &flags)?;
        Ok(config)
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run the `test_` rules of the policies, like `opa test`.
    Test {
        /// Policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Print every test, not only failures.
        #[arg(short, long)]
        verbose: bool,
        /// Only tests whose name matches this regular expression.
        #[arg(long)]
        run: Option<String>,
    },
    /// Print the decision for one input document.
    Eval {
        /// Policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Input document (JSON); `-` reads standard input.
        #[arg(long)]
        input: PathBuf,
        /// Query to evaluate.
        #[arg(long, default_value = "data.portcullis.authz.allow")]
        query: String,
    },
    /// Print the input document the sidecar would build for a request, to
    /// write tests and `policy eval` inputs against the real shape.
    Input(InputArgs),
}

#[derive(Args)]
struct InputArgs {
    #[arg(long, default_value = "GET")]
    method: String,
    /// Path with optional query string, as the caller sends it.
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header, `name: value`; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Show the policy only this header, as `policy.input_headers` does;
    /// repeatable. Without it every header is shown.
    #[arg(long = "input-header", value_name = "NAME")]
    input_headers: Vec<String>,
    /// The caller's SPIFFE ID, as its certificate would prove it.
    #[arg(long, default_value = "spiffe://pay.example/ns/shop/sa/checkout")]
    spiffe_id: String,
    /// The sidecar's own SPIFFE ID.
    #[arg(long, default_value = "spiffe://pay.example/ns/pay/sa/payments")]
    destination: String,
    #[arg(long, default_value = "localhost:15443")]
    host: String,
    #[arg(long, default_value = "HTTP/2")]
    protocol: String,
    #[arg(long, default_value = "127.0.0.1:51522")]
    source_address: std::net::SocketAddr,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a dev CA bundle and SVIDs for the workloads the shipped policy names.
    Dev {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "pay.example")]
        trust_domain: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit trail, across rotated files (any
    /// order: `audit.log*` works).
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The audit.hmac_key_file the trail was written with.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration, its certificates and its policies without starting.
    Check(RunArgs),
}

fn main() -> ExitCode {
    // regorus builds `anyhow` errors on its evaluation path, and with
    // RUST_BACKTRACE=1 (often left set while debugging) each one captures a
    // stack trace: decisions ran ~40% slower in benches/policy_modes.rs.
    // RUST_LIB_BACKTRACE governs only library-captured traces, so panics keep
    // theirs. Set before any thread exists, so nothing reads it concurrently.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    // The demo prints its own story; info logs would bury it.
    init_logging(if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info"
    });
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let config = args.load()?;
            runtime()?.block_on(run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Inject {
            file,
            image,
            identity,
        } => {
            let input = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let mut opts = inject::Options {
                identity,
                ..inject::Options::default()
            };
            if let Some(image) = image {
                opts.image = image;
            }
            let out =
                inject::inject(&input, &opts).with_context(|| format!("{}", file.display()))?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            runtime()?.block_on(demo::run())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check(args)) => {
            let config = args.load()?;
            let (identity, policy) = runtime()?.block_on(app::check(&config))?;
            let outbound = config
                .outbound
                .as_ref()
                .map(|o| {
                    format!(
                        ", outbound on {} with {} route(s)",
                        o.listen,
                        o.routes.len()
                    )
                })
                .unwrap_or_default();
            println!(
                "config ok: {} as {} (SVID valid until {}), policy revision {} ({}){outbound}",
                args.config.display(),
                identity.spiffe_id,
                audit::timestamp(identity.not_after),
                policy.revision,
                policy.files.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Dev { out, trust_domain }) => {
            let set = certs::write_dev_set(&out, &trust_domain)?;
            println!("wrote dev CA bundle {}", set.bundle.display());
            for (name, cert, _) in set.svids() {
                println!("wrote SVID {name}: {}", cert.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify { files, key_file }) => {
            let hasher = match &key_file {
                Some(k) => audit::Hasher::Hmac(audit::read_key(k)?),
                None => audit::Hasher::Sha256,
            };
            let names = files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            match audit::verify_files(&files, &hasher) {
                Ok(v) => {
                    println!(
                        "{names}: {} events verified (seq {}..{}), hash chain intact ({})",
                        v.events,
                        v.first_seq,
                        v.last_seq,
                        hasher.name()
                    );
                    if let Some(from) = &v.continues_from {
                        println!(
                            "note: the trail continues from an earlier file not given (prev {from})"
                        );
                    }
                    for gap in &v.gaps {
                        let at = match &gap.file {
                            Some(f) => format!("{}:{}", f.display(), gap.line),
                            None => gap.line.to_string(),
                        };
                        println!(
                            "gap: {at}: {} event(s) could not be written, {} request(s) were refused unrecorded",
                            gap.lost, gap.refused
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(audit::VerifyFilesError::Broken(b)) => {
                    let at = match &b.file {
                        Some(f) => format!("{}:{}", f.display(), b.line),
                        None => b.line.to_string(),
                    };
                    println!("{at}: chain broken: {}", b.why);
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Policy(PolicyCommand::Test { dir, verbose, run }) => {
            let filter = run
                .map(|r| regex::Regex::new(&r))
                .transpose()
                .context("--run is not a valid regular expression")?;
            let report = policy::testing::run_tests(&dir, filter.as_ref())?;
            print_report(&report, verbose);
            Ok(if report.all_passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Policy(PolicyCommand::Eval { dir, input, query }) => {
            let text = if input.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
            } else {
                std::fs::read_to_string(&input)
                    .with_context(|| format!("cannot read {}", input.display()))?
            };
            let value = regorus::Value::from_json_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", input.display()))?;
            let snapshot =
                policy::PolicySnapshot::load(&dir, &query, std::time::Duration::from_secs(5))?;
            let started = std::time::Instant::now();
            let decision = snapshot.evaluate(value)?;
            let took = started.elapsed();
            let mut out = decision.to_json();
            out["policy_revision"] = snapshot.revision.clone().into();
            out["eval_time_us"] = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).into();
            println!("{}", serde_json::to_string_pretty(&out)?);
            eprintln!("evaluated in {took:?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Input(args)) => print_input(args),
    }
}

/// The input document for a request described by flags, built by the same
/// code (path normalisation included) the sidecar runs.
fn print_input(args: InputArgs) -> anyhow::Result<ExitCode> {
    let (raw_path, query) = match args.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (args.path.as_str(), None),
    };
    let path = portcullis::proxy::path::normalize(raw_path).map_err(|e| {
        anyhow::anyhow!("--path {raw_path:?}: the sidecar would refuse it with 400: {e}")
    })?;
    let id = portcullis::identity::SpiffeId::parse(&args.spiffe_id)
        .map_err(|e| anyhow::anyhow!("--spiffe-id: {e}"))?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?}: expected `name: value`"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("--header {h:?}: invalid name"))?;
        let value = http::HeaderValue::from_str(value.trim())
            .with_context(|| format!("--header {h:?}: invalid value"))?;
        headers.append(name, value);
    }
    // As on the data path: the caller cannot choose the identity headers.
    headers.remove(portcullis::proxy::XFCC);
    headers.remove(portcullis::proxy::X_SPIFFE_ID);
    let mut only = Vec::new();
    for name in &args.input_headers {
        only.push(
            http::HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("--input-header {name:?}: not a header name"))?,
        );
    }
    let only = (!only.is_empty()).then(|| policy::HeaderAllowlist::new(only));
    let facts = policy::RequestFacts {
        request_id: "00000000-0000-0000-0000-000000000000",
        method: &args.method,
        path: &path,
        query,
        host: &args.host,
        scheme: "https",
        protocol: &args.protocol,
        headers: policy::InputHeaders::new(&headers, only.as_ref()),
        source_spiffe_id: id.as_str(),
        source_trust_domain: id.trust_domain(),
        source_path: id.path(),
        source_addr: args.source_address,
        destination_spiffe_id: &args.destination,
        time: std::time::SystemTime::now(),
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&policy::build_input_json(&facts))?
    );
    Ok(ExitCode::SUCCESS)
}

/// `opa test` style: failures always, passes with -v, then a summary line.
fn print_report(report: &policy::testing::TestReport, verbose: bool) {
    for t in &report.results {
        if t.passed && verbose {
            println!("PASS {} ({:?})", t.path, t.duration);
        } else if !t.passed {
            println!(
                "FAIL {} at {}:{}: {}",
                t.path,
                t.file,
                t.line,
                t.failure.as_deref().unwrap_or("failed")
            );
        }
    }
    let total = report.passed + report.failed;
    if report.failed == 0 {
        println!("PASS: {}/{total}", report.passed);
    } else {
        println!("FAIL: {}/{total} failed", report.failed);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let running = app::start(config).await?;
    wait_for_signal().await?;
    if !running.shutdown().await {
        bail!("drain deadline passed with requests still in flight");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Logs go to stderr (stdout carries the audit trail when audit.path is
/// `-`). `PORTCULLIS_LOG` filters, `PORTCULLIS_LOG_FORMAT=json` for log
/// pipelines.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if std::env::var("PORTCULLIS_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
