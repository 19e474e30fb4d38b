//! Failover: an open-loop client through each path while one of the three
//! controllers fails, every path started fresh for every fault.
//!
//! - `rst`: the controller's server process is gone, connects are refused
//!   (a fast client: 200 connects/s, 1 s timeout).
//! - `blackhole`: the controller stops answering, no RST (nftables drops
//!   everything in its namespace); clients as client-go dials: 80 connects/s
//!   (eight clients at 10/s, as in issue 11) with 30 s timeouts, so a connect
//!   sent to the dead controller shows as a long wait, not as a failure.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nllb_tests::TestNet;

use crate::{
    backend::Backends,
    child, k0s,
    loadgen::{ClientResult, ClientSpec, Workload},
    nllb_paths::{self, Nllb},
    paths::{self, PathUnderTest},
    results::FailoverResult,
};

pub struct Fault {
    pub id: &'static str,
    pub rate: u32,
    pub timeout_ms: u64,
}

pub const FAULTS: [Fault; 2] = [
    Fault {
        id: "rst",
        rate: 200,
        timeout_ms: 1000,
    },
    Fault {
        id: "blackhole",
        rate: 80,
        timeout_ms: 30_000,
    },
];

/// Attempts before the fault.
const PRE_MS: u64 = 2000;
/// The controller that fails.
const VICTIM: usize = 1;

pub struct Cgroups<'a> {
    pub nllb: &'a Path,
    pub envoy: &'a Path,
    pub plain: &'a Path,
    pub k0s: &'a Path,
}

/// Every configuration under every fault; `only` as `--only` selects.
pub fn run_all(
    nllb: &Nllb<'_>,
    cg: &Cgroups<'_>,
    hosts: &TestNet,
    backends: &mut Backends,
    client_cpu: Option<usize>,
    only: Option<&[String]>,
) -> anyhow::Result<(Vec<FailoverResult>, Option<String>)> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    // Post-fault windows: nllb and HAProxy's checks settle within ~2 s,
    // k0s's Envoy checks need up to 5 × 5 s + the 1 s timeout.
    let configs: [(&str, u64); 5] = [
        (nllb_paths::EBPF_ID, 6000),
        (nllb_paths::ENVOY_ID, 6000),
        ("haproxy-checks", 6000),
        (k0s::ENVOY_ID, 30000),
        (k0s::IN_PLACE_ID, 6000),
    ];
    // k0s's Envoy in its steady state (see HealthPace::SteadyState).
    let k0s_steady = k0s::Setup {
        nllb,
        health: nllb_tests::k0s_nllb::HealthPace::SteadyState,
    };
    for (which, window) in configs {
        if only.is_some_and(|o| !o.iter().any(|o| which.starts_with(o.as_str()))) {
            continue;
        }
        for fault in &FAULTS {
            let tag = format!("fo-{which}-{}", fault.id);
            let path = match which {
                nllb_paths::EBPF_ID => nllb.ebpf_path(&tag, cg.nllb),
                nllb_paths::ENVOY_ID => nllb.envoy_path(&tag, cg.envoy),
                k0s::ENVOY_ID => k0s::envoy_path(&k0s_steady, &tag, cg.plain),
                k0s::IN_PLACE_ID => k0s::in_place_path(&k0s_steady, &tag, cg.k0s),
                _ => paths::haproxy(nllb.dir, nllb.backends, cg.plain, nllb.cpu, true)
                    .unwrap_or_else(|e| {
                        PathUnderTest::unavailable(
                            "haproxy-checks",
                            "HAProxy, checks + redispatch",
                            format!("{e:#}"),
                        )
                    }),
            };
            if !path.info.available {
                notes.push(format!(
                    "{which}: {}",
                    path.info.note.clone().unwrap_or_default()
                ));
                break;
            }
            eprintln!("== failover: {} / {}", path.info.label, fault.id);
            let r = one(&path, fault, window, hosts, backends, client_cpu);
            // Heal before the next scenario whatever happened.
            match fault.id {
                "rst" => backends.start_one(VICTIM)?,
                _ => hosts.hosts()[VICTIM].unblackhole(),
            }
            drop(path);
            let r = r?;
            eprintln!(
                "   {} failed after the fault, longest wait {:.0} ms, last failure at {} ms{}",
                r.failed_after_fault,
                r.longest_wait_ms,
                r.last_failure_ms.map_or("-".into(), |v| format!("{v:.0}")),
                if r.recovered {
                    ""
                } else {
                    " (NOT recovered within the window)"
                }
            );
            out.push(r);
        }
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    Ok((out, note))
}

fn one(
    p: &PathUnderTest,
    fault: &Fault,
    window_ms: u64,
    hosts: &TestNet,
    backends: &mut Backends,
    client_cpu: Option<usize>,
) -> anyhow::Result<FailoverResult> {
    let spec = ClientSpec {
        addr: p.api,
        workload: Workload::OpenLoop {
            rate: fault.rate,
            duration_ms: PRE_MS + window_ms,
            timeout_ms: fault.timeout_ms,
        },
        cgroup: Some(p.cgroup.clone()),
        cpu: client_cpu,
    };
    let client = std::thread::spawn(move || child::run::<_, ClientResult>("client", &spec));
    std::thread::sleep(Duration::from_millis(PRE_MS));
    let fault_at_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
    match fault.id {
        "rst" => backends.stop_one(VICTIM),
        _ => hosts.hosts()[VICTIM].blackhole(),
    }
    let r = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    Ok(summarize(p, fault, window_ms, fault_at_ms, &r))
}

fn summarize(
    p: &PathUnderTest,
    fault: &Fault,
    window_ms: u64,
    fault_at_ms: f64,
    r: &ClientResult,
) -> FailoverResult {
    let start = r.attempts.first().map_or(fault_at_ms, |a| a.t_ms);
    let end = r.attempts.last().map_or(fault_at_ms, |a| a.t_ms);
    let mut buckets = vec![0u32; ((end - start) / 500.0) as usize + 1];
    let (mut before, mut after, mut last) = (0, 0, None);
    for a in r.attempts.iter().filter(|a| !a.ok) {
        buckets[((a.t_ms - start) / 500.0) as usize] += 1;
        if a.t_ms < fault_at_ms {
            before += 1;
        } else {
            after += 1;
            last = Some(a.t_ms - fault_at_ms);
        }
    }
    // Every attempt still waiting when the fault came, or started after it.
    let longest_wait_ms = r
        .attempts
        .iter()
        .filter(|a| a.t_ms + a.latency_us as f64 / 1000.0 >= fault_at_ms)
        .map(|a| a.latency_us as f64 / 1000.0)
        .fold(0.0, f64::max);
    FailoverResult {
        path: p.info.id.clone(),
        label: p.info.label.clone(),
        note: p.info.note.clone(),
        fault: fault.id.into(),
        rate: fault.rate,
        timeout_ms: fault.timeout_ms,
        attempts: r.attempts.len() as u64,
        failed_before_fault: before,
        failed_after_fault: after,
        last_failure_ms: last,
        longest_wait_ms,
        recovered: last.is_none_or(|l| l + fault_at_ms < end - 1000.0),
        window_ms,
        failures_per_500ms: buckets,
        fault_at_ms: fault_at_ms - start,
    }
}
