//! How does Portcullis compare with the direct path and with the proxies a
//! user would pick instead? Issue 7, measured side by side in one run.
//!
//! Targets, each a separate process forwarding to one shared upstream
//! process: the upstream itself over plain HTTP (`direct`, the limit);
//! the real `portcullis` binary with the shipped policies and audit on a
//! file; the same with audit on /dev/null; nginx and haproxy terminating
//! mTLS and Envoy also authorizing (RBAC), when installed; and `relay`,
//! mTLS termination and a byte copy to the upstream with nothing else, the
//! floor any proxy stands on. Modes: (a) closed-loop keep-alive throughput,
//! (b) open-loop fixed-rate latency, at half of nginx's keep-alive rate
//! and at half of Portcullis' own, (c) new connections, one request each;
//! then the memory each target holds per idle keep-alive connection.
//! Runs on this machine drift a lot, so measurements of different targets
//! are interleaved round by round and the report is ratios.
//!
//! `scripts/bench.sh` (installs the peers, then `cargo bench --bench
//! proxy`). Without `--bench` (as under `cargo test --all-targets`) it
//! makes a quick smoke run that never fails on speed. Options after `--`:
//! `--quick`, `--seconds N`, `--rounds N`, `--connections N`,
//! `--rate R` (open-loop requests/s; default half of nginx's keep-alive
//! rate), `--modes keep-alive,open,light,new` (a subset), `--idle N` (idle
//! connections held for the memory measurement; 0 skips it), `--only
//! name,name` (just these targets, e.g. to profile one), `--workers N`
//! (worker threads or processes for every proxy alike; default 2, one per
//! core of this machine), `--out FILE`.

mod load;
mod peers;
mod procstat;
mod relay;
mod report;
mod targets;
mod upstream;

use std::path::{Path, PathBuf};
use std::time::Duration;

use load::{Client, Sample};
use procstat::{machine_ticks, ProcTree};
use targets::{Certs, Target};

fn main() {
    if std::env::args().any(|a| a == upstream::FLAG) {
        upstream::serve();
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == relay::FLAG) {
        relay::serve(&args[i + 1..]);
        return;
    }
    let options = Options::from_args();
    let machine = report::Machine::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::write(dir.path());
    let (upstream, upstream_addr) = upstream::spawn();

    // Only what `--only` names is started, so a profiler wrapped around
    // one target (PORTCULLIS_BENCH_WRAP) sees just that process.
    let wanted = |name: &str| {
        options
            .only
            .as_ref()
            .is_none_or(|only| only.iter().any(|n| n == name))
    };
    let portcullis = |name: &'static str, audit: &Path, policy: &str| {
        wanted(name).then(|| {
            targets::portcullis(
                name,
                dir.path(),
                &certs,
                upstream_addr,
                audit,
                policy,
                options.workers,
            )
        })
    };
    let mut targets: Vec<Target> = [
        wanted("direct").then(|| Target::direct(&upstream, upstream_addr)),
        portcullis("portcullis", &dir.path().join("audit.log"), ""),
        portcullis("portcullis-audit-off", Path::new("/dev/null"), ""),
        // Every request decided by the RVM, as for callers whose headers
        // differ per request (a unique traceparent): the generator repeats
        // one request, so with the cache every decision after the first is
        // a hit.
        portcullis(
            "portcullis-uncached",
            &dir.path().join("audit-uncached.log"),
            "decision_cache = 0",
        ),
        // Such callers again, with a trace id of their own on every
        // request, and the policy shown only the header it needs: the
        // trace id is then not in the decision cache's key.
        portcullis(
            "portcullis-traced",
            &dir.path().join("audit-traced.log"),
            "input_headers = [\"idempotency-key\"]",
        )
        .map(|mut t| {
            t.traced = true;
            t
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    let peers: [(&str, peers::Start); 3] = [
        ("nginx", peers::nginx),
        ("haproxy", peers::haproxy),
        ("envoy", peers::envoy),
    ];
    for (name, start) in peers {
        if wanted(name) {
            targets.extend(start(dir.path(), &certs, upstream_addr, options.workers));
        }
    }
    if wanted("relay") {
        targets.extend(relay::start(&certs, upstream_addr, options.workers));
    }

    // The generator gets the same two worker threads as every target.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let upstream_procs = ProcTree::single(upstream.id());
    let results = rt.block_on(run(&options, &targets, &certs, &upstream_procs));
    let report = report::markdown(&options, &machine, &targets, &results);
    println!("{report}");
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent).expect("results dir");
    }
    std::fs::write(&options.out, &report).expect("write results");
    println!("written to {}", options.out.display());
}

pub struct Options {
    pub quick: bool,
    pub seconds: f64,
    pub rounds: usize,
    pub connections: usize,
    /// Concurrent connect-request-close loops in mode (c).
    pub handshake_workers: usize,
    pub rate: Option<f64>,
    /// Keep-alive connections held open at once to measure memory per
    /// connection; 0 skips that measurement.
    pub idle: usize,
    /// The load modes to run, by their names in the report.
    pub modes: Vec<Mode>,
    /// `--only`: the names of the targets to keep.
    pub only: Option<Vec<String>>,
    /// Worker threads (Portcullis, haproxy) or processes (nginx) of every
    /// proxy.
    pub workers: usize,
    pub out: PathBuf,
}

/// The issue's 10,000 idle connections where the open-file limit leaves
/// room for them, else 9,000. haproxy, which needs two descriptors per
/// connection, holds what its `maxconn` allows under the limit
/// (`scripts/bench.sh` raises the limit when it may).
fn default_idle() -> usize {
    const ISSUE: usize = 10_000;
    if open_file_limit().is_some_and(|limit| limit >= ISSUE as u64 + 1_000) {
        ISSUE
    } else {
        9_000
    }
}

/// This process's soft limit on open files, which the targets inherit.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Options {
    fn from_args() -> Options {
        let args: Vec<String> = std::env::args().collect();
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(|v| v.parse::<f64>().expect("a number after the flag"))
        };
        let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
        let out = args
            .iter()
            .position(|a| a == "--out")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(if quick {
                    "target/bench/results-quick.md"
                } else {
                    "target/bench/results.md"
                })
            });
        Options {
            quick,
            seconds: value("--seconds").unwrap_or(if quick { 0.5 } else { 5.0 }),
            rounds: value("--rounds").map_or(if quick { 1 } else { 3 }, |r| r as usize),
            connections: value("--connections").map_or(32, |c| c as usize),
            handshake_workers: 16,
            rate: value("--rate"),
            idle: value("--idle").map_or(if quick { 100 } else { default_idle() }, |n| n as usize),
            modes: match args.iter().position(|a| a == "--modes") {
                Some(i) => {
                    let names = args.get(i + 1).map_or("", String::as_str);
                    Mode::ALL
                        .into_iter()
                        .filter(|m| names.split(',').any(|n| n == m.flag()))
                        .collect()
                }
                None => Mode::ALL.to_vec(),
            },
            only: args
                .iter()
                .position(|a| a == "--only")
                .and_then(|i| args.get(i + 1))
                .map(|names| names.split(',').map(str::to_owned).collect()),
            workers: value("--workers").map_or(2, |n| (n as usize).max(1)),
            out,
        }
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    /// At half of nginx's keep-alive rate: where issue 7 sets its latency
    /// target, so every target is offered the same load.
    OpenLoop,
    /// At half of Portcullis' own keep-alive rate: the latency it adds
    /// when it is not overloaded.
    OpenLoopLight,
    NewConnections,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::KeepAlive,
        Mode::OpenLoop,
        Mode::OpenLoopLight,
        Mode::NewConnections,
    ];

    /// How `--modes` names it.
    fn flag(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::OpenLoop => "open",
            Mode::OpenLoopLight => "light",
            Mode::NewConnections => "new",
        }
    }
}

/// One target in one mode, over all rounds.
pub struct Measured {
    pub target: usize,
    pub mode: Mode,
    /// Merged over rounds: counts and the latency histogram.
    pub total: Sample,
    /// Requests/s of each round; the report shows the median.
    pub rates: Vec<f64>,
    pub cpu: Duration,
    /// What the load generator itself spent meanwhile: it shares the two
    /// cores with the target, so a costly client handshake caps the rate.
    pub generator_cpu: Duration,
    /// What the shared upstream spent meanwhile.
    pub upstream_cpu: Duration,
    /// The machine's idle and total CPU ticks over the measured windows:
    /// a target that leaves cores idle in a closed loop loses rate even at
    /// the same CPU per request.
    pub machine_idle: u64,
    pub machine_total: u64,
    /// `VmHWM` once this mode's rounds are done.
    pub peak_rss: u64,
}

/// Memory of one target holding many idle keep-alive connections.
pub struct Idle {
    pub target: usize,
    pub held: usize,
    pub failed: u64,
    pub rss_before: u64,
    pub rss_holding: u64,
}

pub struct Results {
    pub measured: Vec<Measured>,
    pub idle: Vec<Idle>,
    /// The rate each open-loop mode offered every target.
    pub offered: Vec<(Mode, f64)>,
}

async fn run(options: &Options, targets: &[Target], certs: &Certs, upstream: &ProcTree) -> Results {
    let tls = portcullis::demo::client_for(&certs.set, "checkout", &[b"http/1.1"])
        .expect("client SVID config");
    let fresh_tls = load::without_resumption(&tls);
    let keep_alive: Vec<Client> = targets
        .iter()
        .map(|t| Client::new(t.addr, t.tls.then(|| tls.clone())).traced(t.traced))
        .collect();
    let one_shot: Vec<Client> = targets
        .iter()
        .map(|t| Client::new(t.addr, t.tls.then(|| fresh_tls.clone())).traced(t.traced))
        .collect();
    let generator = ProcTree::single(std::process::id());
    check_roles(targets, certs, &keep_alive).await;

    let mut measured = Vec::new();
    let mut offered = Vec::new();
    for &mode in &options.modes {
        let rate = match mode {
            Mode::OpenLoop => options
                .rate
                .unwrap_or_else(|| half_rate_of(targets, &measured, "nginx")),
            Mode::OpenLoopLight => half_rate_of(targets, &measured, "portcullis"),
            _ => 0.0,
        };
        if rate > 0.0 {
            offered.push((mode, rate));
        }
        println!(
            "{mode:?}: {} round(s) x {} target(s)",
            options.rounds,
            targets.len()
        );
        let mut now: Vec<Measured> = (0..targets.len())
            .map(|target| Measured {
                target,
                mode,
                total: Sample::empty(),
                rates: Vec::new(),
                cpu: Duration::ZERO,
                generator_cpu: Duration::ZERO,
                upstream_cpu: Duration::ZERO,
                machine_idle: 0,
                machine_total: 0,
                peak_rss: 0,
            })
            .collect();
        for round in 0..options.rounds {
            // Rotate the order each round so no target always runs right
            // after the same neighbour or at the same point of the drift.
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let client = if mode == Mode::NewConnections {
                    &one_shot[i]
                } else {
                    &keep_alive[i]
                };
                if !options.quick {
                    measure(options, mode, client, rate, options.duration() / 5).await;
                }
                let (cpu_before, generator_before) = (targets[i].procs.cpu(), generator.cpu());
                let (upstream_before, machine_before) = (upstream.cpu(), machine_ticks());
                let sample = measure(options, mode, client, rate, options.duration()).await;
                now[i].cpu += targets[i].procs.cpu().saturating_sub(cpu_before);
                now[i].generator_cpu += generator.cpu().saturating_sub(generator_before);
                now[i].upstream_cpu += upstream.cpu().saturating_sub(upstream_before);
                if let (Some((idle0, total0)), Some((idle1, total1))) =
                    (machine_before, machine_ticks())
                {
                    now[i].machine_idle += idle1.saturating_sub(idle0);
                    now[i].machine_total += total1.saturating_sub(total0);
                }
                now[i].rates.push(sample.rate());
                println!(
                    "  round {round} {:<22} {:>9.0} req/s {:>5} errors",
                    targets[i].name,
                    sample.rate(),
                    sample.errors
                );
                now[i].total.merge(sample);
            }
        }
        for m in &mut now {
            m.peak_rss = targets[m.target].procs.peak_rss();
        }
        measured.extend(now);
    }
    let mut idle = Vec::new();
    if options.idle > 0 {
        println!("idle connections: {} per target", options.idle);
        for (target, client) in keep_alive.iter().enumerate() {
            idle.push(hold_idle(options, &targets[target], target, client).await);
        }
    }
    Results {
        measured,
        idle,
        offered,
    }
}

/// Refuses to measure a target that does not do the work the report says
/// it does. Every target must answer the bench's request with a 200. The
/// ones that authorize (Portcullis, Envoy's RBAC) must refuse it to the
/// reporting workload, whose SVID chains to the same bundle but which the
/// shipped policy does not let read payments. The ones that only verify
/// the chain (nginx, haproxy, the relay) must let it through. A peer set up
/// wrongly would otherwise be measured doing less than it claims.
async fn check_roles(targets: &[Target], certs: &Certs, clients: &[Client]) {
    let other = portcullis::demo::client_for(&certs.set, "reporting", &[b"http/1.1"])
        .expect("reporting SVID config");
    for (target, client) in targets.iter().zip(clients) {
        let allowed = client.status().await;
        assert!(
            matches!(allowed, Ok(http::StatusCode::OK)),
            "{}: the bench's request got {allowed:?}, not a 200",
            target.name
        );
        if !target.tls {
            continue;
        }
        let denied = Client::new(target.addr, Some(other.clone())).status().await;
        let authorizes = target.name.starts_with("portcullis") || target.name == "envoy";
        let want = if authorizes {
            http::StatusCode::FORBIDDEN
        } else {
            http::StatusCode::OK
        };
        assert!(
            matches!(&denied, Ok(status) if *status == want),
            "{}: the reporting workload's request got {denied:?}, expected {want}",
            target.name
        );
    }
}

async fn hold_idle(options: &Options, target: &Target, index: usize, client: &Client) -> Idle {
    let rss_before = target.procs.rss();
    // A little under a connection limit: a few of its slots may still be
    // held by the connections of the modes before.
    let n = target.max_connections.map_or(options.idle, |max| {
        options.idle.min(max.saturating_sub(100))
    });
    let (held, failed) = load::idle_connections(client, n, 64).await;
    // Let the target finish whatever the last requests started.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_holding = target.procs.rss();
    println!(
        "  {:<22} {} held, {failed} failed, RSS {:.1} -> {:.1} MB",
        target.name,
        held.len(),
        rss_before as f64 / 1048576.0,
        rss_holding as f64 / 1048576.0
    );
    Idle {
        target: index,
        held: held.len(),
        failed,
        rss_before,
        rss_holding,
    }
}

async fn measure(
    options: &Options,
    mode: Mode,
    client: &Client,
    rate: f64,
    duration: Duration,
) -> Sample {
    match mode {
        Mode::KeepAlive => load::closed_loop(client, options.connections, duration).await,
        Mode::OpenLoop | Mode::OpenLoopLight => {
            load::open_loop(client, options.connections, rate, duration).await
        }
        Mode::NewConnections => {
            load::new_connections(client, options.handshake_workers, duration).await
        }
    }
}

/// Half of `name`'s keep-alive rate in this run; without that target
/// (nginx not installed), half of the slowest mTLS target's.
fn half_rate_of(targets: &[Target], measured: &[Measured], name: &str) -> f64 {
    let keep_alive = |m: &&Measured| m.mode == Mode::KeepAlive;
    let named = measured
        .iter()
        .filter(keep_alive)
        .find(|m| targets[m.target].name == name);
    let slowest_mtls = measured
        .iter()
        .filter(keep_alive)
        .filter(|m| targets[m.target].tls)
        .min_by(|a, b| report::median(&a.rates).total_cmp(&report::median(&b.rates)));
    named
        .or(slowest_mtls)
        .map_or(1000.0, |m| (report::median(&m.rates) / 2.0).max(10.0))
}
