//! CPU and memory of a process, read from /proc (proxies and the agent are
//! other processes, so getrusage cannot see them).

use serde::Serialize;

/// CPU time of each live thread of `pid`, ns (`/proc/PID/task/TID/schedstat`,
/// the scheduler's own sum; utime/stime in `/proc/PID/stat` come in 10 ms
/// ticks, which for an agent using ~1 ms a second moved a 1 s round's CPU per
/// connection by 0 or ~0.85 us, 2% of a connect). Empty if unreadable.
pub fn thread_cpu_ns(pid: u32) -> Vec<(u32, u64)> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            Some((tid, text.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// utime + stime of `pid` in seconds (10 ms ticks).
pub fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|t| t as f64 / clk_tck())
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Usage {
    pub cpu_s: f64,
    /// Share of one core over the interval, in percent.
    pub cpu_pct: f64,
    pub rss_kib: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let stat = "1234 (envoy (main) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn reads_own_usage() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(cpu_s(std::process::id()).is_some());
        let me = std::process::id();
        let threads = thread_cpu_ns(me);
        let main = threads.iter().find(|(tid, _)| *tid == me);
        assert!(
            main.is_some_and(|(_, ns)| *ns > 0),
            "no CPU time for the main thread in {threads:?}"
        );
    }
}
