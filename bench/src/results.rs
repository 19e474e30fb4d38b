//! The machine-readable results (`bench/results/latest.json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{bpfstats::ProgStats, loadgen::ClientResult, paths::PathInfo, procstat::Usage};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    /// Seconds since the epoch.
    pub generated_at: u64,
    pub quick: bool,
    pub machine: Machine,
    pub settings: Settings,
    pub paths: Vec<PathInfo>,
    pub workloads: Vec<WorkloadResult>,
    /// Connect program cost while the nllb eBPF path ran (deltas over all its runs).
    pub bpf: Vec<BpfCost>,
    pub footprint: Vec<Footprint>,
    pub failover: Vec<FailoverResult>,
    pub failover_note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_gib: f64,
    /// /proc/loadavg (1 min) when the run started and ended: other work on
    /// the machine, which the figures cannot separate out.
    #[serde(default)]
    pub load_start: f64,
    #[serde(default)]
    pub load_end: f64,
    /// How late a 1 ms sleep on the client core woke up (p50, p99, max, in
    /// ms) just before the run: how much other work delayed ours.
    #[serde(default)]
    pub wakeup_late_ms: [f64; 3],
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub run_ms: u64,
    pub rounds: usize,
    pub high_concurrency: usize,
    pub client_cpu: Option<usize>,
    pub proxy_cpu: Option<usize>,
    pub backend_cpu: Option<usize>,
    pub backends: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub id: String,
    pub title: String,
    /// Unit of `rate` in the client results ("conn/s", "req/s", "B/s").
    pub unit: String,
    /// Per path id.
    pub runs: BTreeMap<String, Measurement>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    /// Each figure is the median of that figure over the rounds (errors: the sum).
    pub client: ClientResult,
    /// Rate of every round, to show the spread.
    pub round_rates: Vec<f64>,
    /// The proxy (or agent) process tree during the round with the median rate.
    pub proxy: Option<Usage>,
    /// Client CPU + proxy CPU per operation, microseconds (median over rounds).
    pub cpu_us_per_op: f64,
    #[serde(default)]
    pub round_cpu_us_per_op: Vec<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BpfCost {
    pub name: String,
    pub attach_type: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
    /// ns per run within each client run that made at least 100 runs: on a
    /// busy machine cache misses and interrupts inflate some of them, and
    /// the spread shows by how much.
    #[serde(default)]
    pub per_measurement_ns: Vec<f64>,
}

impl From<&ProgStats> for BpfCost {
    fn from(p: &ProgStats) -> Self {
        BpfCost {
            name: p.name.clone(),
            attach_type: p.attach_type.clone(),
            run_cnt: p.run_cnt,
            run_time_ns: p.run_time_ns,
            ns_per_run: p.ns_per_run(),
            per_measurement_ns: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Footprint {
    pub path: String,
    pub idle: Usage,
    /// During the high-concurrency connect–request–response–close run.
    pub load: Option<Usage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailoverResult {
    pub path: String,
    pub label: String,
    /// What the configuration is (settings, stand-in or real).
    #[serde(default)]
    pub note: Option<String>,
    /// "rst" (server process gone, connects refused) or "blackhole" (all packets dropped).
    pub fault: String,
    pub rate: u32,
    pub timeout_ms: u64,
    pub attempts: u64,
    pub failed_before_fault: u64,
    pub failed_after_fault: u64,
    /// Start of the last failed attempt, relative to the fault (ms); `None` when none failed.
    pub last_failure_ms: Option<f64>,
    /// Whether the last second of the window was free of failures.
    pub recovered: bool,
    pub window_ms: u64,
    /// Failed attempts per 500 ms bucket from the start of the run.
    pub failures_per_500ms: Vec<u32>,
    pub fault_at_ms: f64,
}
