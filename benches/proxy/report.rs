//! The markdown report: one row per target and mode, then the ratios
//! issue 7 asks for, then those ratios against its targets.

use std::fmt::Write;
use std::process::Command;

use crate::targets::Target;
use crate::{Measured, Mode, Options, Results};

const PORTCULLIS: &str = "portcullis";
const AUDIT_OFF: &str = "portcullis-audit-off";
const UNCACHED: &str = "portcullis-uncached";
const TRACED: &str = "portcullis-traced";
const RELAY: &str = "relay";

/// What the numbers were measured on, taken before the run starts.
pub struct Machine {
    cpus: usize,
    model: String,
    load: String,
    date: String,
    commit: String,
    /// Which build of the sidecar is measured.
    binary: String,
    peers: Vec<String>,
}

impl Machine {
    pub fn now() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            model,
            load: load
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: output("git", &["rev-parse", "--short", "HEAD"]),
            binary: match std::env::var("PORTCULLIS_BENCH_BINARY") {
                Ok(p) if !p.is_empty() => format!("portcullis binary: {p}"),
                _ => "portcullis binary: cargo's release build".to_owned(),
            },
            peers: [("nginx", "-v"), ("haproxy", "-v")]
                .iter()
                .map(|(p, flag)| output(p, &[flag]))
                .filter(|v| !v.is_empty())
                .collect(),
        }
    }
}

/// The first line a command prints (nginx -v prints to stderr).
fn output(cmd: &str, args: &[&str]) -> String {
    let Some(exe) = crate::targets::find_exe(cmd) else {
        return String::new();
    };
    Command::new(exe)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

pub fn markdown(options: &Options, machine: &Machine, targets: &[Target], r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} run, {} on {}; {} CPUs ({}), load average {} at start; commit {}; {}; {}.\n",
        if options.quick { "Quick" } else { "Full" },
        machine.date,
        std::env::consts::ARCH,
        machine.cpus,
        machine.model,
        machine.load,
        machine.commit,
        machine.binary,
        if machine.peers.is_empty() {
            "no peers installed".to_owned()
        } else {
            machine.peers.join(", ")
        },
    );
    let offered: Vec<String> = r
        .offered
        .iter()
        .map(|(mode, rate)| format!("{} at {rate:.0} requests/s", mode_name(*mode)))
        .collect();
    let _ = writeln!(
        out,
        "{} round(s) of {:.1} s per target and mode, interleaved; {} worker(s) per proxy; \
         {} keep-alive connections; {}; {} new-connection loops.\n",
        options.rounds,
        options.seconds,
        options.workers,
        options.connections,
        offered.join(", "),
        options.handshake_workers,
    );
    out.push_str(&table(targets, r));
    out.push('\n');
    if !r.idle.is_empty() {
        out.push_str(&idle_table(targets, r));
        out.push('\n');
    }
    out.push_str(&ratios(targets, r));
    out.push('\n');
    out.push_str(&goals(targets, r));
    out
}

fn table(targets: &[Target], r: &Results) -> String {
    let mut out = String::from(
        "| target | mode | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 10k req | generator CPU s / 10k req | upstream CPU s / 10k req | machine idle % | idle RSS MB | peak RSS MB | errors |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for m in &r.measured {
        let t = &targets[m.target];
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {} |",
            t.name,
            mode_name(m.mode),
            median(&m.rates),
            percentile_ms(m, 50.0),
            percentile_ms(m, 99.0),
            percentile_ms(m, 99.9),
            cpu_per_10k(m),
            per_10k(m.generator_cpu, m),
            per_10k(m.upstream_cpu, m),
            100.0 * m.machine_idle as f64 / m.machine_total.max(1) as f64,
            mb(t.idle_rss),
            mb(m.peak_rss),
            m.total.errors,
        );
    }
    out
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::KeepAlive => "keep-alive",
        Mode::OpenLoop => "open loop",
        Mode::OpenLoopLight => "light open loop",
        Mode::NewConnections => "new conn",
    }
}

/// Each metric, Portcullis (audit on) divided by the others, Portcullis
/// with the decision cache off against nginx and against Envoy, whose RBAC
/// filter also decides every request afresh, and traced requests against
/// nginx.
fn ratios(targets: &[Target], r: &Results) -> String {
    let columns = [
        (PORTCULLIS, "nginx"),
        (PORTCULLIS, "haproxy"),
        (PORTCULLIS, "direct"),
        (PORTCULLIS, AUDIT_OFF),
        (UNCACHED, "nginx"),
        (PORTCULLIS, "envoy"),
        (UNCACHED, "envoy"),
        (TRACED, "nginx"),
        (PORTCULLIS, RELAY),
    ];
    type Metric = fn(&Measured) -> f64;
    // `None`: a rate, compared round by round (`paired`).
    let rows: [(&str, Mode, Option<Metric>); 9] = [
        ("keep-alive req/s", Mode::KeepAlive, None),
        ("keep-alive CPU / req", Mode::KeepAlive, Some(cpu_per_10k)),
        (
            "open-loop p50",
            Mode::OpenLoop,
            Some(|m| percentile_ms(m, 50.0)),
        ),
        (
            "open-loop p99",
            Mode::OpenLoop,
            Some(|m| percentile_ms(m, 99.0)),
        ),
        (
            "open-loop p99.9",
            Mode::OpenLoop,
            Some(|m| percentile_ms(m, 99.9)),
        ),
        (
            "light open-loop p99",
            Mode::OpenLoopLight,
            Some(|m| percentile_ms(m, 99.0)),
        ),
        ("new connections/s", Mode::NewConnections, None),
        (
            "CPU / new connection",
            Mode::NewConnections,
            Some(cpu_per_10k),
        ),
        (
            "peak RSS",
            Mode::NewConnections,
            Some(|m| m.peak_rss as f64),
        ),
    ];
    let mut out = String::from(
        "| metric | portcullis / nginx | portcullis / haproxy | portcullis / direct | audit on / audit off | uncached / nginx | portcullis / envoy | uncached / envoy | traced / nginx | portcullis / relay |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for (label, mode, metric) in rows {
        let _ = write!(out, "| {label} |");
        for (a, b) in columns {
            let ratio = find(targets, r, a, mode)
                .zip(find(targets, r, b, mode))
                .map(|(a, b)| match metric {
                    Some(metric) => metric(a) / metric(b),
                    None => paired(a, b).median,
                });
            match ratio {
                Some(x) if x.is_finite() => {
                    let _ = write!(out, " {x:.2} |");
                }
                _ => out.push_str(" – |"),
            }
        }
        out.push('\n');
    }
    out.push_str(
        "\nRates (req/s, new connections/s) are compared round by round: each figure \
         is the median of the rounds' ratios, both targets measured in the same round. \
         The goals table gives the lowest and highest round in parentheses.\n",
    );
    out
}

/// Issue 7's targets, each as measured in this run.
fn goals(targets: &[Target], r: &Results) -> String {
    let get = |name, mode| find(targets, r, name, mode);
    let p99 = |name| get(name, Mode::OpenLoop).map(|m| percentile_ms(m, 99.0));
    let rate_ratio = |a, b, mode| get(a, mode).zip(get(b, mode)).map(|(a, b)| paired(a, b));
    let keep_alive = |a, b| rate_ratio(a, b, Mode::KeepAlive);
    let idle = targets
        .iter()
        .find(|t| t.name == PORTCULLIS)
        .map(|t| mb(t.idle_rss));
    let rows = [
        (
            "keep-alive req/s, portcullis / nginx",
            keep_alive(PORTCULLIS, "nginx").map(Paired::value),
            "≥ 1.0",
            (|x| x >= 1.0) as fn(f64) -> bool,
        ),
        (
            "keep-alive req/s, portcullis-uncached (every request evaluated) / nginx",
            keep_alive(UNCACHED, "nginx").map(Paired::value),
            "≥ 1.0",
            |x| x >= 1.0,
        ),
        (
            "keep-alive req/s, portcullis-traced (a new trace id per request, `policy.input_headers` set) / nginx",
            keep_alive(TRACED, "nginx").map(Paired::value),
            "≥ 1.0",
            |x| x >= 1.0,
        ),
        (
            "open-loop p99 added vs direct, ms",
            p99(PORTCULLIS)
                .zip(p99("direct"))
                .map(|(a, b)| plain(a - b)),
            "≤ 0.5",
            |x| x <= 0.5,
        ),
        (
            "open-loop p99 added vs direct, portcullis-uncached, ms",
            p99(UNCACHED).zip(p99("direct")).map(|(a, b)| plain(a - b)),
            "≤ 0.5",
            |x| x <= 0.5,
        ),
        (
            "open-loop p99 added vs direct, relay (mTLS and a hop, nothing else: the floor), ms",
            p99(RELAY).zip(p99("direct")).map(|(a, b)| plain(a - b)),
            "≤ 0.5",
            |x| x <= 0.5,
        ),
        (
            "new connections/s, portcullis / nginx",
            rate_ratio(PORTCULLIS, "nginx", Mode::NewConnections).map(Paired::value),
            "≥ 1.0",
            |x| x >= 1.0,
        ),
        (
            "req/s lost to audit, 1 - on / off",
            keep_alive(PORTCULLIS, AUDIT_OFF).map(|p| {
                let lost = |x: f64| 1.0 - x;
                Paired {
                    median: lost(p.median),
                    low: lost(p.high),
                    high: lost(p.low),
                }
                .value()
            }),
            "≤ 0.10",
            |x| x <= 0.10,
        ),
        ("idle RSS, MB", idle.map(plain), "≤ 20", |x| x <= 20.0),
    ];
    let mut out = String::from("| issue 7 target | this run | goal | met |\n|---|--:|--:|---|\n");
    for (label, value, goal, met) in rows {
        let (value, verdict) = match value {
            Some((v, text)) => (text, if met(v) { "yes" } else { "no" }),
            None => ("–".to_owned(), "not measured"),
        };
        let _ = writeln!(out, "| {label} | {value} | {goal} | {verdict} |");
    }
    let per_connection = r
        .idle
        .iter()
        .find(|i| targets[i.target].name == PORTCULLIS)
        .map(|i| (i.held, kb_per_connection(i)));
    let _ = match per_connection {
        Some((held, kb)) => writeln!(
            out,
            "| RSS per idle keep-alive connection at {held} connections, KB | {kb:.1} | ≤ 30 | {} |",
            if kb <= 30.0 { "yes" } else { "no" }
        ),
        None => writeln!(
            out,
            "| RSS per idle keep-alive connection, KB | – | ≤ 30 | not measured |"
        ),
    };
    out
}

fn idle_table(targets: &[Target], r: &Results) -> String {
    let mut out = String::from(
        "| target | idle keep-alive connections held | failed | RSS before MB | RSS holding them MB | KB per connection |\n\
         |---|--:|--:|--:|--:|--:|\n",
    );
    for i in &r.idle {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            targets[i.target].name,
            i.held,
            i.failed,
            mb(i.rss_before),
            mb(i.rss_holding),
            kb_per_connection(i),
        );
    }
    out
}

fn kb_per_connection(i: &crate::Idle) -> f64 {
    i.rss_holding.saturating_sub(i.rss_before) as f64 / 1024.0 / i.held.max(1) as f64
}

fn find<'a>(targets: &[Target], r: &'a Results, name: &str, mode: Mode) -> Option<&'a Measured> {
    r.measured
        .iter()
        .find(|m| m.mode == mode && targets[m.target].name == name)
}

/// One target's rate over another's, round by round. Both ran in the same
/// round, within a minute of each other, so the machine's slow drift (rates
/// on this shared machine move by a quarter over a run) cancels out of each
/// round's ratio; the median of those is the figure, the extremes its spread.
#[derive(Clone, Copy)]
struct Paired {
    median: f64,
    low: f64,
    high: f64,
}

impl Paired {
    /// The figure for the goals table, and its text with the spread.
    fn value(self) -> (f64, String) {
        (
            self.median,
            format!("{:.2} ({:.2}–{:.2})", self.median, self.low, self.high),
        )
    }
}

fn paired(a: &Measured, b: &Measured) -> Paired {
    let ratios: Vec<f64> = a
        .rates
        .iter()
        .zip(&b.rates)
        .map(|(a, b)| a / b.max(1e-9))
        .collect();
    Paired {
        median: median(&ratios),
        low: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        high: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

fn plain(x: f64) -> (f64, String) {
    (x, format!("{x:.2}"))
}

pub fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn percentile_ms(m: &Measured, q: f64) -> f64 {
    if m.total.latency_us.is_empty() {
        return f64::NAN;
    }
    m.total.latency_us.value_at_quantile(q / 100.0) as f64 / 1000.0
}

/// CPU seconds the target's processes used per 10,000 completed requests.
fn cpu_per_10k(m: &Measured) -> f64 {
    per_10k(m.cpu, m)
}

fn per_10k(cpu: std::time::Duration, m: &Measured) -> f64 {
    cpu.as_secs_f64() / (m.total.requests.max(1) as f64) * 10_000.0
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
