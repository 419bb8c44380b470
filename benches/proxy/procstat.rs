//! CPU time and memory of a target, read from /proc.
//!
//! A target may be several processes (nginx: a master and its workers), so
//! every figure is summed over the process and its children. Children's
//! CPU is not in the parent's utime/stime until they are reaped, which
//! never happens during a run.

use std::time::Duration;

/// The processes that make up one target.
#[derive(Clone, Debug)]
pub struct ProcTree {
    pids: Vec<u32>,
    tick: f64,
}

impl ProcTree {
    /// `root` and its direct children, as they are now: call it once the
    /// target is ready, when nginx has forked its workers.
    pub fn of(root: u32) -> ProcTree {
        let mut pids = vec![root];
        pids.extend(children(root));
        ProcTree {
            pids,
            tick: clock_tick(),
        }
    }

    /// `pid` alone: the bench process, whose children are the targets.
    pub fn single(pid: u32) -> ProcTree {
        ProcTree {
            pids: vec![pid],
            tick: clock_tick(),
        }
    }

    /// How many processes: nginx is ready once its workers exist.
    pub fn count(&self) -> usize {
        self.pids.len()
    }

    /// User + system CPU time used so far.
    pub fn cpu(&self) -> Duration {
        let ticks: u64 = self.pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
        Duration::from_secs_f64(ticks as f64 * self.tick)
    }

    /// Resident memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        self.status_kb("VmRSS:") * 1024
    }

    /// The high-water mark of resident memory (`VmHWM`), in bytes. Summed
    /// over processes, so for nginx it can exceed what was ever resident
    /// at one instant; the peaks are close to simultaneous under load.
    pub fn peak_rss(&self) -> u64 {
        self.status_kb("VmHWM:") * 1024
    }

    fn status_kb(&self, field: &str) -> u64 {
        self.pids
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum()
    }
}

/// The whole machine's idle and total CPU time so far, in clock ticks
/// summed over CPUs (the first line of /proc/stat; idle includes iowait).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .map(|f| f.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal; guest time is
    // already inside user and nice.
    let idle = fields.get(3)? + fields.get(4)?;
    let total = fields.iter().take(8).sum();
    Some((idle, total))
}

/// Fields after the command name, which is in parentheses and may itself
/// contain spaces or parentheses.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime (fields 14 and 15 of stat; 12 and 13 after the name).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // Field 4 of stat is the parent pid (index 1 after the name).
            stat_fields(*pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// Seconds per clock tick; Linux has used 100 Hz for years, `getconf`
/// says for sure without linking libc.
fn clock_tick() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|hz| *hz > 0.0)
        .map_or(0.01, |hz| 1.0 / hz)
}
