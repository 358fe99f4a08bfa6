//! Looking at a running gateway from outside, as an operator would: its HTTP
//! endpoints, the figures in its `/metrics`, its process (memory, CPU) and
//! stopping it with SIGTERM. The black-box tests and the end-to-end bench
//! share these, so what they measure is read the same way.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// A minimal HTTP/1.0 GET to `127.0.0.1:port`: status and body; `None`
/// when nothing answers (within 5 s) or the answer is not HTTP.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    get(&format!("127.0.0.1:{port}"), path)
}

/// [`http_get`] to `host:port`.
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// The value of an unlabelled counter or gauge in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Cumulative bucket counts (upper bound in seconds, count) of a histogram.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The q-quantile, in ms, of the observations between two snapshots of a
/// histogram, interpolated linearly inside its bucket (as Prometheus'
/// `histogram_quantile` does).
pub fn quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, n)| *n);
            (le, n - was)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &delta {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0 * 1e3);
            }
            let share = if n > lower.1 {
                (rank - lower.1) / (n - lower.1)
            } else {
                1.0
            };
            return Some((lower.0 + (le - lower.0) * share) * 1e3);
        }
        lower = (le, n);
    }
    None
}

/// What a process holds and has used, from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessFigures {
    /// Resident memory now (VmRSS), in KiB.
    pub rss_kib: u64,
    /// Peak resident memory so far (VmHWM), in KiB.
    pub peak_rss_kib: u64,
    /// User + system CPU time so far, in seconds.
    pub cpu_secs: f64,
}

/// The figures of process `pid`; `None` once it is gone.
pub fn process(pid: u32) -> Option<ProcessFigures> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (_, _, own, _) = stat_ticks(pid)?;
    Some(ProcessFigures {
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        cpu_secs: own / clock_ticks(),
    })
}

/// CPU seconds of the children `pid` has reaped so far (with theirs): what
/// a finished child process cost, read from its parent.
pub fn reaped_cpu_secs(pid: u32) -> f64 {
    stat_ticks(pid).map_or(0.0, |(_, _, _, reaped)| reaped) / clock_ticks()
}

/// [`parse_stat`] of `/proc/<pid>/stat`.
fn stat_ticks(pid: u32) -> Option<(u32, u32, f64, f64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The `(pid, ppid, own CPU ticks, reaped children's CPU ticks)` of a
/// `/proc/<pid>/stat` line: the fields after the command name (which may
/// hold spaces) in parentheses; utime, stime, cutime and cstime are fields
/// 14 to 17 of the line.
fn parse_stat(stat: &str) -> Option<(u32, u32, f64, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    let ppid = fields.get(1)?.parse().ok()?;
    Some((pid, ppid, tick(11) + tick(12), tick(13) + tick(14)))
}

/// CPU seconds used by process `root` and all its descendants, alive or
/// reaped (a reaped child's time is in its parent's `cutime`/`cstime`): a
/// database server's whole cost, backends that came and went included.
pub fn tree_cpu_secs(root: u32) -> f64 {
    let mut all = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let path = entry.path().join("stat");
            if let Some(t) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| parse_stat(&s))
            {
                all.push(t);
            }
        }
    }
    let mut tree = vec![root];
    let mut ticks = 0.0;
    let mut i = 0;
    while let Some(&pid) = tree.get(i) {
        i += 1;
        for &(p, parent, own, reaped) in &all {
            if p == pid {
                ticks += own + reaped;
            }
            if parent == pid && p != pid {
                tree.push(p);
            }
        }
    }
    ticks / clock_ticks()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when unknown).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Sends SIGTERM and waits up to `within` for the exit; its status, or
/// `None` when it had not exited by then (it is then killed and reaped).
pub fn terminate(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    signal(child, "-TERM", within)
}

/// [`terminate`] with SIGINT (what `perf record` takes to write its file).
pub fn interrupt(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    signal(child, "-INT", within)
}

fn signal(child: &mut Child, signal: &str, within: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let status = wait_exit(child, within);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// Waits up to `within` for `child` to exit; its status, or `None` when it
/// still runs.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    poll(within, || child.try_wait().ok().flatten())
}

/// Calls `check` every 20 ms until it gives a value or `within` has passed
/// (`None` then), blocking the thread.
pub fn poll<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_counts_its_reaped_children() {
        let me = std::process::id();
        // A child that burns CPU, then is reaped: its time moves into this
        // process's cutime/cstime, which the tree counts.
        let before = tree_cpu_secs(me);
        let status = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let after = tree_cpu_secs(me);
        assert!(after > before, "{before} -> {after}");
        assert!(after >= process(me).map_or(0.0, |f| f.cpu_secs));
    }

    #[test]
    fn figures_are_read_from_prometheus_text() {
        let text = "# HELP x\nedge_a_total 12\nedge_a_total_other 3\nedge_h_bucket{le=\"0.1\"} 4\nedge_h_bucket{le=\"+Inf\"} 9\n";
        assert_eq!(metric(text, "edge_a_total"), Some(12.0));
        assert_eq!(metric(text, "edge_b"), None);
        assert_eq!(
            buckets(text, "edge_h"),
            vec![(0.1, 4.0), (f64::INFINITY, 9.0)]
        );
    }

    #[test]
    fn this_process_has_figures() {
        let me = process(std::process::id()).unwrap_or_default();
        assert!(me.rss_kib > 0 && me.peak_rss_kib >= me.rss_kib);
    }
}
