//! The closed-loop workloads (connect–request–close, request–response,
//! bulk) through every path, alternating between paths round by round so
//! that a noisy neighbour hits all of them alike.

use std::collections::BTreeMap;

use crate::{
    bpfstats::{self, ProgStats},
    child,
    loadgen::{ClientResult, ClientSpec, Workload},
    nllb_paths,
    paths::PathUnderTest,
    procstat::Usage,
    results::{BpfCost, Footprint, Measurement, WorkloadResult},
};

pub struct Settings {
    pub run_ms: u64,
    pub rounds: usize,
    /// Concurrency of the "high" runs.
    pub c: usize,
    pub client_cpu: Option<usize>,
}

/// Runs every workload through every available path; fills in each
/// path's footprint under load (the high-concurrency connect run).
pub fn run(
    paths: &[PathUnderTest],
    s: &Settings,
    footprint: &mut [Footprint],
) -> anyhow::Result<(Vec<WorkloadResult>, Vec<BpfCost>)> {
    let (run_ms, rounds, c, client_cpu) = (s.run_ms, s.rounds, s.c, s.client_cpu);
    let workloads: Vec<(String, String, String, Workload, bool)> = vec![
        (
            "crr_c1".into(),
            "connect–request–response–close, concurrency 1".into(),
            "conn/s".into(),
            Workload::Crr {
                concurrency: 1,
                duration_ms: run_ms,
            },
            false,
        ),
        (
            format!("crr_c{c}"),
            format!("connect–request–response–close, concurrency {c}"),
            "conn/s".into(),
            Workload::Crr {
                concurrency: c,
                duration_ms: run_ms,
            },
            false,
        ),
        (
            "rr_c1".into(),
            "request–response, 1 persistent connection".into(),
            "req/s".into(),
            Workload::Rr {
                concurrency: 1,
                duration_ms: run_ms,
            },
            false,
        ),
        (
            format!("rr_c{c}"),
            format!("request–response, {c} persistent connections"),
            "req/s".into(),
            Workload::Rr {
                concurrency: c,
                duration_ms: run_ms,
            },
            false,
        ),
        (
            "bulk".into(),
            "bulk download, 1 connection".into(),
            "B/s".into(),
            Workload::Bulk {
                duration_ms: run_ms,
            },
            true,
        ),
    ];

    // Run time accounting only while we measure (it costs every BPF program
    // on the machine two clock reads per run); restored on drop.
    let stats_guard = match bpfstats::StatsEnabled::new() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("warning: no BPF run-time stats: {e:#}");
            None
        }
    };
    let mut bpf_totals: BTreeMap<String, ProgStats> = BTreeMap::new();
    let mut bpf_each: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut results = Vec::new();
    for (id, title, unit, w, bulk) in &workloads {
        eprintln!("== {title}");
        let mut per_path: BTreeMap<String, Vec<(ClientResult, Option<Usage>)>> = BTreeMap::new();
        let live: Vec<&PathUnderTest> = paths.iter().filter(|p| p.info.available).collect();
        for round in 0..rounds {
            // Each round starts with a different path, so periodic
            // interference cannot keep landing on the same one.
            for k in 0..live.len() {
                let p = live[(round + k) % live.len()];
                let addr = if *bulk { p.bulk } else { p.api };
                let bpf_before = if p.info.id == nllb_paths::EBPF_ID {
                    bpfstats::attached(&p.cgroup).ok()
                } else {
                    None
                };
                let meter = p.meter();
                let spec = ClientSpec {
                    addr,
                    workload: w.clone(),
                    cgroup: Some(p.cgroup.clone()),
                    cpu: client_cpu,
                };
                let r = match child::run::<_, ClientResult>("client", &spec) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("   {:<12} client failed: {e:#}", p.info.id);
                        continue;
                    }
                };
                let usage = meter.map(|m| m.stop());
                if let (Some(before), Ok(after)) = (
                    bpf_before,
                    bpfstats::attached(&p.cgroup).map_err(|e| eprintln!("warning: bpftool: {e:#}")),
                ) {
                    for d in bpfstats::delta(&before, &after) {
                        let t =
                            bpf_totals
                                .entry(d.attach_type.clone())
                                .or_insert_with(|| ProgStats {
                                    run_cnt: 0,
                                    run_time_ns: 0,
                                    ..d.clone()
                                });
                        t.run_cnt += d.run_cnt;
                        t.run_time_ns += d.run_time_ns;
                        if d.run_cnt >= 100 {
                            bpf_each
                                .entry(d.attach_type.clone())
                                .or_default()
                                .push(d.ns_per_run());
                        }
                    }
                }
                let shown = if *bulk {
                    format!("{:.2} Gbit/s", r.gbit_s)
                } else {
                    format!("{:.0} {unit}, p99 {:.0} µs", r.rate, r.p99_us)
                };
                let errs = if r.errors > 0 {
                    format!(
                        "  {} errors ({})",
                        r.errors,
                        r.first_error.as_deref().unwrap_or("")
                    )
                } else {
                    String::new()
                };
                eprintln!("   {:<12} {shown}{errs}", p.info.id);
                per_path
                    .entry(p.info.id.clone())
                    .or_default()
                    .push((r, usage));
            }
        }
        let mut runs = BTreeMap::new();
        for (path, rs) in per_path {
            let cpu_per_op = |(r, u): &(ClientResult, Option<Usage>)| {
                let cpu = r.cpu_user_s + r.cpu_sys_s + u.as_ref().map_or(0.0, |u| u.cpu_s);
                let ops = if *bulk {
                    r.bytes as f64 / 65536.0
                } else {
                    r.ops as f64
                };
                if ops > 0.0 { cpu * 1e6 / ops } else { 0.0 }
            };
            let round_rates: Vec<f64> = rs.iter().map(|(r, _)| r.rate).collect();
            let round_cpu: Vec<f64> = rs.iter().map(cpu_per_op).collect();
            let client = median_result(rs.iter().map(|(r, _)| r));
            // The proxy's usage of the round whose rate is the median one.
            let mut by_rate: Vec<_> = rs.iter().collect();
            by_rate.sort_by(|a, b| a.0.rate.total_cmp(&b.0.rate));
            let proxy = by_rate[by_rate.len() / 2].1.clone();
            if id == &format!("crr_c{c}")
                && let (Some(f), Some(u)) = (footprint.iter_mut().find(|f| f.path == path), &proxy)
            {
                f.load = Some(u.clone());
            }
            runs.insert(
                path,
                Measurement {
                    client,
                    cpu_us_per_op: median(&round_cpu),
                    round_rates,
                    round_cpu_us_per_op: round_cpu,
                    proxy,
                },
            );
        }
        results.push(WorkloadResult {
            id: id.clone(),
            title: title.clone(),
            unit: unit.clone(),
            runs,
        });
    }
    drop(stats_guard);
    Ok((
        results,
        bpf_totals
            .iter()
            .map(|(k, v)| BpfCost {
                per_measurement_ns: bpf_each.remove(k).unwrap_or_default(),
                ..BpfCost::from(v)
            })
            .collect(),
    ))
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Every figure is the median of that figure over the rounds, taken on its
/// own: on a shared machine a stall hits one round's rate and another
/// round's p99, and per-figure medians drop both.
fn median_result<'a>(rs: impl Iterator<Item = &'a ClientResult> + Clone) -> ClientResult {
    let m = |f: fn(&ClientResult) -> f64| median(&rs.clone().map(f).collect::<Vec<_>>());
    ClientResult {
        ops: m(|r| r.ops as f64) as u64,
        errors: rs.clone().map(|r| r.errors).sum(),
        first_error: rs.clone().find_map(|r| r.first_error.clone()),
        elapsed_s: m(|r| r.elapsed_s),
        rate: m(|r| r.rate),
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        mean_us: m(|r| r.mean_us),
        bytes: m(|r| r.bytes as f64) as u64,
        gbit_s: m(|r| r.gbit_s),
        cpu_user_s: m(|r| r.cpu_user_s),
        cpu_sys_s: m(|r| r.cpu_sys_s),
        attempts: Vec::new(),
    }
}
