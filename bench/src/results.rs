//! The machine-readable results (`bench/results/latest.json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    bpfstats::ProgStats, connects::LegResult, loadgen::ClientResult, paths::PathInfo,
    procstat::Usage,
};

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
    /// In-kernel cost per connect against the floor, latency of other
    /// connects, table at capacity, tracing off vs on.
    #[serde(default)]
    pub kernel: Option<KernelCost>,
    #[serde(default)]
    pub scale: Vec<ScalePoint>,
    /// Why a kernel or scale figure is missing.
    #[serde(default)]
    pub kernel_notes: Vec<String>,
    /// Wall time of the whole run, seconds.
    #[serde(default)]
    pub wall_s: f64,
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
    /// The directory the agents' run directories and the proxies' files
    /// were in, and whether it was a tmpfs (as /run is on a node).
    #[serde(default)]
    pub files_in: String,
    #[serde(default)]
    pub files_on_tmpfs: bool,
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
    /// The longest any attempt waited (to success, error or its timeout)
    /// among those in flight at the fault or started after it, ms.
    #[serde(default)]
    pub longest_wait_ms: f64,
    /// Whether the last second of the window was free of failures.
    pub recovered: bool,
    pub window_ms: u64,
    /// Failed attempts per 500 ms bucket from the start of the run.
    pub failures_per_500ms: Vec<u32>,
    pub fault_at_ms: f64,
}

/// One kind of connect, from one cgroup, in one interleaved run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CostCase {
    pub id: String,
    pub label: String,
    /// Connect attempts (each runs the connect hook once).
    pub connects: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// What each program attached to the cgroup ran during the run (deltas;
    /// only programs that ran). Empty while `kernel.bpf_stats_enabled` was off.
    pub programs: Vec<ProgStats>,
    /// socket + connect + getpeername + close, as the client timed it.
    pub latency: LegResult,
}

impl CostCase {
    /// All programs' run time per connect, ns.
    pub fn ns_per_connect(&self) -> f64 {
        let total: u64 = self.programs.iter().map(|p| p.run_time_ns).sum();
        if self.connects == 0 {
            0.0
        } else {
            total as f64 / self.connects as f64
        }
    }

    /// The program at this attach type (bpftool's name, e.g. "cgroup_inet4_connect").
    pub fn program(&self, attach_type: &str) -> Option<&ProgStats> {
        self.programs.iter().find(|p| p.attach_type == attach_type)
    }
}

/// In-kernel cost per connect and what it does to a connect's latency
/// (issue 12's goals), and tracing off vs on (issue 16).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KernelCost {
    /// Connect+close to a loopback listener from a cgroup without programs
    /// (twice: the A/A pair shows the noise), one with the floor and nllb's,
    /// interleaved, with run-time accounting off.
    pub latency: Vec<CostCase>,
    /// Whether `kernel.bpf_stats_enabled` was on anyway during `latency`.
    pub latency_stats_on: bool,
    /// Floor and nllb side by side: connects that are not to a virtual
    /// address, to a virtual address, and to one with many sockets held.
    pub cases: Vec<CostCase>,
    pub held: Option<Held>,
    /// nllb's connects to the virtual address with no trace reader and with
    /// one (runs alternate; summed per kind).
    pub tracing: Vec<CostCase>,
    /// Trace events the reader drained during the traced runs, and events
    /// the kernel dropped (ring full) meanwhile.
    pub trace_events: u64,
    pub trace_events_lost: u64,
    /// What could not be measured, and why.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Held {
    pub wanted: u64,
    /// Steered sockets held during the "full" rows.
    pub held: u64,
    /// Sockets held during the "plain" rows: as many, to the same sinks,
    /// connected directly (no per-socket state).
    #[serde(default)]
    pub unsteered: u64,
    pub first_error: Option<String>,
    /// Measurement connects the kernel steered but could not remember
    /// (`sockets_full`: no memory for the socket's storage).
    pub not_remembered: u64,
}

/// Per-connect cost with a given table size (scale curve).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScalePoint {
    /// "backends" (one service with n backends) or "services" (n services).
    pub axis: String,
    pub n: u32,
    pub case: CostCase,
}
