//! Run time of the programs nllb attached to the bench cgroup, from the
//! kernel's own accounting (`kernel.bpf_stats_enabled`).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::netns::run;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run-time accounting on and restores the previous
/// value on drop (it costs two clock reads per program run, machine-wide).
pub struct StatsEnabled {
    prev: String,
}

impl StatsEnabled {
    pub fn new() -> anyhow::Result<StatsEnabled> {
        let prev = std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
        std::fs::write(SYSCTL, "1").with_context(|| format!("writing {SYSCTL}: run as root"))?;
        Ok(StatsEnabled {
            prev: prev.trim().to_string(),
        })
    }

    /// Whether the accounting is on now (someone else may have turned it on).
    pub fn is_on() -> bool {
        std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() != "0")
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.prev) {
            eprintln!("warning: could not restore {SYSCTL} to {}: {e}", self.prev);
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgStats {
    pub id: u64,
    pub name: String,
    pub attach_type: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl ProgStats {
    pub fn ns_per_run(&self) -> f64 {
        if self.run_cnt == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &ProgStats) -> ProgStats {
        ProgStats {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(before.run_cnt),
            ..self.clone()
        }
    }
}

/// Programs attached directly to `cgroup`, with their counters. Selecting by
/// attachment rather than by name keeps other nllb agents on the machine
/// (tests running in parallel) out of the figures.
pub fn attached(cgroup: &Path) -> anyhow::Result<Vec<ProgStats>> {
    let out = run(
        "bpftool",
        &["cgroup", "show", &cgroup.to_string_lossy(), "--json"],
    )?;
    let list: Vec<serde_json::Value> = if out.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&out)?
    };
    let mut progs = Vec::new();
    for p in list {
        let id = p["id"]
            .as_u64()
            .context("bpftool cgroup show: entry without id")?;
        let info: serde_json::Value = serde_json::from_str(&run(
            "bpftool",
            &["prog", "show", "id", &id.to_string(), "--json"],
        )?)?;
        progs.push(ProgStats {
            id,
            name: full_name(p["name"].as_str().unwrap_or_default()),
            attach_type: p["attach_type"].as_str().unwrap_or_default().to_string(),
            run_time_ns: info["run_time_ns"].as_u64().unwrap_or(0),
            run_cnt: info["run_cnt"].as_u64().unwrap_or(0),
        });
    }
    Ok(progs)
}

/// The kernel keeps 15 characters of a program's name: give nllb's back in full.
fn full_name(short: &str) -> String {
    use nllb_common::programs::*;
    [
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
        SOCK_OPS,
        FLOOR_CONNECT4,
        FLOOR_SOCK_OPS,
    ]
    .into_iter()
    .find(|full| !short.is_empty() && full.starts_with(short))
    .unwrap_or(short)
    .to_string()
}

/// What each program in `after` ran since `before` (same program ids);
/// programs that did not run are left out.
pub fn delta(before: &[ProgStats], after: &[ProgStats]) -> Vec<ProgStats> {
    after
        .iter()
        .filter_map(|a| before.iter().find(|b| b.id == a.id).map(|b| a.since(b)))
        .filter(|d| d.run_cnt > 0)
        .collect()
}
