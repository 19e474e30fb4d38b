//! One benchmark run: controllers in namespaces, every path started side by
//! side, workloads alternating between paths round by round (so a noisy
//! neighbour hits all paths alike), then footprint and failover.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use nllb_tests::{TestCgroup, TestNet};

use crate::{
    backend::Backends,
    bpfstats::{self, ProgStats},
    k0s,
    loadgen::{ClientResult, ClientSpec, Workload},
    paths::{self, AgentOpts, PathUnderTest},
    proxies::{self, EnvoyHealth, K0S_HEALTH},
    results::*,
};

pub struct Options {
    pub quick: bool,
    pub nllb_bin: Option<PathBuf>,
    pub envoy_bin: Option<PathBuf>,
    pub pin: bool,
    pub failover: bool,
    pub only: Option<Vec<String>>,
    pub high_concurrency: usize,
}

/// nllb's default health settings, for the Envoy stand-in of nllb's Envoy mode.
const NLLB_DEFAULT_HEALTH: EnvoyHealth = EnvoyHealth {
    interval_ms: 500,
    timeout_ms: 250,
    healthy: 2,
    unhealthy: 2,
};

pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(opts: &Options) -> anyhow::Result<Results> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark creates network namespaces and cgroups: run it as root");
    }
    let (client_cpu, proxy_cpu, backend_cpu) = pins(opts.pin);
    let load_start = loadavg();
    let wakeup_late_ms = wakeup_lateness(client_cpu);
    let run_ms = if opts.quick { 700 } else { 1000 };
    let rounds = if opts.quick { 2 } else { 7 };
    let tmp = TempDir(std::env::temp_dir().join(format!("nllb-bench-{}", std::process::id())));
    std::fs::create_dir_all(&tmp.0)?;
    let dir = tmp.0.as_path();

    eprintln!("== setting up 3 controllers in network namespaces");
    let hosts = TestNet::new(3);
    let addrs: Vec<Ipv4Addr> = hosts
        .hosts()
        .iter()
        .map(|h| match h.v4 {
            std::net::IpAddr::V4(a) => a,
            other => unreachable!("TestHost::v4 is IPv4, got {other}"),
        })
        .collect();
    let mut backends = Backends::start(hosts.hosts(), backend_cpu)?;
    let plain_cg = TestCgroup::new();
    let nllb_cg = TestCgroup::new();
    // nllb in Envoy mode gets a cgroup of its own: if a build wrongly
    // attached eBPF programs there, no other path's clients would be affected.
    let envoy_cg = TestCgroup::new();
    // nllb in place over k0s's Envoy: its own agent, so its own cgroup.
    let k0s_cg = TestCgroup::new();
    let nllb_bin = find_nllb(opts.nllb_bin.as_deref());
    let envoy_bin = proxies::find_envoy(opts.envoy_bin.as_deref());
    let vip_api = SocketAddr::from(([127, 0, 0, 1], 7443));
    let vip_bulk = SocketAddr::from(([127, 0, 0, 1], 7444));

    eprintln!("== starting paths");
    let mut paths: Vec<PathUnderTest> = Vec::new();
    paths.push(paths::direct(addrs[0], plain_cg.path()));
    paths.push(start_nllb_ebpf(
        &nllb_bin,
        dir,
        "ebpf",
        &addrs,
        nllb_cg.path(),
        vip_api,
        vip_bulk,
        proxy_cpu,
    ));
    paths.push(start_envoy_mode(
        &nllb_bin,
        envoy_bin.as_deref(),
        dir,
        &addrs,
        envoy_cg.path(),
        proxy_cpu,
        None,
    ));
    paths.push(
        paths::haproxy(dir, &addrs, plain_cg.path(), proxy_cpu, false)
            .unwrap_or_else(|e| PathUnderTest::unavailable("haproxy", "HAProxy", format!("{e:#}"))),
    );
    let k0s = k0s::Setup {
        envoy: envoy_bin.as_deref(),
        dir,
        backends: &addrs,
        cpu: proxy_cpu,
        health: nllb_tests::k0s_nllb::HealthPace::AsK0s,
    };
    paths.push(k0s::envoy_path(&k0s, "k0s-envoy", plain_cg.path()));
    paths.push(k0s::in_place_path(
        &k0s,
        &nllb_bin,
        "k0s-inplace",
        k0s_cg.path(),
    ));
    if let Some(only) = &opts.only {
        paths.retain(|p| {
            only.iter().any(|o| {
                o == &p.info.id
                    || (o == "envoy" && p.info.id.starts_with("envoy"))
                    || (o == "nllb" && p.info.id.starts_with("nllb"))
                    || k0s::selected(o, &p.info.id)
            })
        });
    }
    for p in &paths {
        let state = if p.info.available {
            "ok"
        } else {
            "UNAVAILABLE"
        };
        eprintln!(
            "   {:<12} {state}  {}",
            p.info.id,
            p.info.note.as_deref().unwrap_or("")
        );
    }

    // One short burst through every path before measuring: resolves ARP,
    // warms caches and turns a broken path into a clear message now rather
    // than zeros in the tables.
    for p in paths.iter_mut().filter(|p| p.info.available) {
        let spec = ClientSpec {
            addr: p.api,
            workload: Workload::Crr {
                concurrency: 1,
                duration_ms: 200,
            },
            cgroup: Some(p.cgroup.clone()),
            cpu: client_cpu,
        };
        match run_client(&spec) {
            Ok(r) if r.ops > 0 => {}
            Ok(r) => {
                p.info.available = false;
                p.info.note = Some(format!(
                    "warm-up failed: {} ok, {} errors ({})",
                    r.ops,
                    r.errors,
                    r.first_error.unwrap_or_default()
                ));
            }
            Err(e) => {
                p.info.available = false;
                p.info.note = Some(format!("warm-up failed: {e:#}"));
            }
        }
    }

    eprintln!("== idle footprint");
    let meters: Vec<_> = paths.iter().map(|p| p.meter()).collect();
    std::thread::sleep(Duration::from_millis(if opts.quick { 1000 } else { 3000 }));
    let mut footprint: Vec<Footprint> = paths
        .iter()
        .zip(&meters)
        .filter_map(|(p, m)| {
            m.as_ref().map(|m| Footprint {
                path: p.info.id.clone(),
                idle: m.stop(),
                load: None,
            })
        })
        .collect();

    let c = opts.high_concurrency;
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
        let mut per_path: BTreeMap<String, Vec<(ClientResult, Option<crate::procstat::Usage>)>> =
            BTreeMap::new();
        let live: Vec<&PathUnderTest> = paths.iter().filter(|p| p.info.available).collect();
        for round in 0..rounds {
            // Each round starts with a different path, so periodic
            // interference cannot keep landing on the same one.
            for k in 0..live.len() {
                let p = live[(round + k) % live.len()];
                let addr = if *bulk { p.bulk } else { p.api };
                let bpf_before = if p.info.id == "nllb" {
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
                let r = match run_client(&spec) {
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
                    for a in &after {
                        if let Some(b) = before.iter().find(|b| b.id == a.id) {
                            let d = a.since(b);
                            let t = bpf_totals.entry(a.attach_type.clone()).or_insert_with(|| {
                                ProgStats {
                                    run_cnt: 0,
                                    run_time_ns: 0,
                                    ..d.clone()
                                }
                            });
                            t.run_cnt += d.run_cnt;
                            t.run_time_ns += d.run_time_ns;
                            if d.run_cnt >= 100 {
                                bpf_each
                                    .entry(a.attach_type.clone())
                                    .or_default()
                                    .push(d.ns_per_run());
                            }
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
            let cpu_per_op = |(r, u): &(ClientResult, Option<crate::procstat::Usage>)| {
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
            if id == &format!("crr_c{c}") {
                if let (Some(f), Some(u)) = (footprint.iter_mut().find(|f| f.path == path), &proxy)
                {
                    f.load = Some(u.clone());
                }
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
    let infos = paths.iter().map(|p| p.info.clone()).collect();
    // Failover starts fresh instances of each path: stop these first so two
    // agents never attach to the same cgroup.
    drop(paths);

    let (failover, failover_note) = if opts.failover {
        match failover_all(
            opts,
            dir,
            &addrs,
            &hosts,
            &mut backends,
            &nllb_bin,
            envoy_bin.as_deref(),
            nllb_cg.path(),
            envoy_cg.path(),
            plain_cg.path(),
            client_cpu,
            proxy_cpu,
        ) {
            Ok(r) => r,
            Err(e) => (Vec::new(), Some(format!("failover run failed: {e:#}"))),
        }
    } else {
        (
            Vec::new(),
            Some("skipped (--quick or --no-failover)".into()),
        )
    };

    Ok(Results {
        generated_at: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        quick: opts.quick,
        machine: Machine {
            load_start,
            load_end: loadavg(),
            wakeup_late_ms,
            ..machine()
        },
        settings: Settings {
            run_ms,
            rounds,
            high_concurrency: c,
            client_cpu,
            proxy_cpu,
            backend_cpu,
            backends: addrs.iter().map(|a| a.to_string()).collect(),
        },
        paths: infos,
        workloads: results,
        bpf: bpf_totals
            .iter()
            .map(|(k, v)| BpfCost {
                per_measurement_ns: bpf_each.remove(k).unwrap_or_default(),
                ..BpfCost::from(v)
            })
            .collect(),
        footprint,
        failover,
        failover_note,
    })
}

fn median(v: &[f64]) -> f64 {
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

/// Client and proxy share core 0 (the "worker node"), backends get core 1
/// (the "controllers"): a proxy's cost then shows up where it would in a
/// cluster, as CPU taken from the node's own workload.
fn pins(pin: bool) -> (Option<usize>, Option<usize>, Option<usize>) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !pin || n < 2 {
        (None, None, None)
    } else {
        (Some(0), Some(0), Some(1))
    }
}

fn run_client(spec: &ClientSpec) -> anyhow::Result<ClientResult> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .arg("client")
        .arg("--spec")
        .arg(serde_json::to_string(spec)?)
        .output()?;
    if !out.status.success() {
        bail!(
            "client exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing client output")
}

/// `--nllb-bin`, env NLLB_BIN, or the workspace's release build (built now
/// if missing or stale).
fn find_nllb(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NLLB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    eprintln!("== building the nllb binary (cargo build --release -p nllb-userspace --bin nllb)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "nllb-userspace",
            "--bin",
            "nllb",
        ])
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !st.success() {
        return Err("cargo build of the nllb binary failed (is bpf-linker on PATH? run `cargo xtask setup`)".into());
    }
    Ok(target.join("release/nllb"))
}

#[allow(clippy::too_many_arguments)]
fn start_nllb_ebpf(
    nllb: &Result<PathBuf, String>,
    dir: &Path,
    tag: &str,
    addrs: &[Ipv4Addr],
    cgroup: &Path,
    api: SocketAddr,
    bulk: SocketAddr,
    cpu: Option<usize>,
) -> PathUnderTest {
    let label = "nllb (eBPF)";
    let r = (|| {
        let bin = nllb.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        paths::agent_supports(bin, "--cgroup")?;
        let o = AgentOpts {
            nllb: bin,
            dir,
            tag,
            backends: addrs,
            cgroup,
            api,
            bulk,
            extra_config: "mode: ebpf\n",
            cpu,
            ebpf: true,
        };
        paths::nllb_agent(
            &o,
            "nllb",
            label,
            Some(format!(
                "real `nllb agent`, default settings, virtual address {api}"
            )),
        )
    })();
    r.unwrap_or_else(|e| PathUnderTest::unavailable("nllb", label, format!("{e:#}")))
}

/// nllb's Envoy mode when the agent has it; otherwise a static Envoy with
/// nllb's default health settings, labelled as a stand-in.
fn start_envoy_mode(
    nllb: &Result<PathBuf, String>,
    envoy: Option<&Path>,
    dir: &Path,
    addrs: &[Ipv4Addr],
    cgroup: &Path,
    cpu: Option<usize>,
    health: Option<&str>,
) -> PathUnderTest {
    let Some(envoy) = envoy else {
        return PathUnderTest::unavailable(
            "envoy",
            "Envoy",
            "no Envoy binary (venv ~/.cache/nllb/envoy-venv, PATH, --envoy-bin)".into(),
        );
    };
    let via_agent = (|| {
        let bin = nllb.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        paths::agent_supports(bin, "--cgroup")?;
        let (api, bulk) = (
            SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?)),
            SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?)),
        );
        let extra = format!(
            "mode: envoy\nenvoy:\n  binary: \"{}\"\n{}",
            envoy.display(),
            health.unwrap_or("")
        );
        let o = AgentOpts {
            nllb: bin,
            dir,
            tag: "envoy-mode",
            backends: addrs,
            cgroup,
            api,
            bulk,
            extra_config: &extra,
            cpu,
            ebpf: false,
        };
        paths::nllb_agent(
            &o,
            "nllb-envoy",
            "nllb (Envoy mode)",
            Some(
                "real `nllb agent` in Envoy mode, default settings; CPU/RSS are agent + Envoy"
                    .into(),
            ),
        )
    })();
    match via_agent {
        Ok(p) => p,
        Err(e) => {
            eprintln!("   nllb Envoy mode unavailable ({e:#}); using a static Envoy as a stand-in");
            paths::envoy_static(
                "envoy",
                "Envoy (static stand-in)",
                &format!("stand-in for nllb's Envoy mode (not available in this build: {e}): Envoy 1 worker, static tcp_proxy, RANDOM, nllb default TCP checks"),
                envoy,
                dir,
                addrs,
                Some(&NLLB_DEFAULT_HEALTH),
                cgroup,
                cpu,
            )
            .unwrap_or_else(|e| PathUnderTest::unavailable("envoy", "Envoy", format!("{e:#}")))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn failover_all(
    opts: &Options,
    dir: &Path,
    addrs: &[Ipv4Addr],
    hosts: &TestNet,
    backends: &mut Backends,
    nllb: &Result<PathBuf, String>,
    envoy: Option<&Path>,
    nllb_cg: &Path,
    envoy_cg: &Path,
    plain_cg: &Path,
    client_cpu: Option<usize>,
    proxy_cpu: Option<usize>,
) -> anyhow::Result<(Vec<FailoverResult>, Option<String>)> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    // Configurations: (which, post-fault window).
    // Windows: nllb's defaults and HAProxy's checks settle within ~2 s, k0s's
    // Envoy checks need up to 5 × 5 s + the 1 s timeout.
    let configs: [(&str, u64); 6] = [
        ("nllb", 6000),
        ("nllb-envoy", 6000),
        ("envoy-k0s", 30000),
        ("haproxy-checks", 6000),
        (k0s::ENVOY_ID, 30000),
        (k0s::IN_PLACE_ID, 6000),
    ];
    // k0s's Envoy in its steady state (see HealthPace::SteadyState).
    let k0s_steady = k0s::Setup {
        envoy,
        dir,
        backends: addrs,
        cpu: proxy_cpu,
        health: nllb_tests::k0s_nllb::HealthPace::SteadyState,
    };
    for (which, window) in configs {
        if let Some(only) = &opts.only {
            if !only.iter().any(|o| which.starts_with(o.as_str())) {
                continue;
            }
        }
        for fault in ["rst", "blackhole"] {
            let tag = format!("fo-{which}-{fault}");
            let path = match which {
                "nllb" => start_nllb_ebpf(nllb, dir, &tag, addrs, nllb_cg, SocketAddr::from(([127, 0, 0, 1], 7443)), SocketAddr::from(([127, 0, 0, 1], 7444)), proxy_cpu),
                "nllb-envoy" => start_envoy_mode(nllb, envoy, dir, addrs, envoy_cg, proxy_cpu, None),
                k0s::ENVOY_ID => k0s::envoy_path(&k0s_steady, &tag, plain_cg),
                k0s::IN_PLACE_ID => k0s::in_place_path(&k0s_steady, nllb, &tag, nllb_cg),
                "haproxy-checks" => paths::haproxy(dir, addrs, plain_cg, proxy_cpu, true)
                    .unwrap_or_else(|e| PathUnderTest::unavailable("haproxy-checks", "HAProxy, checks + redispatch", format!("{e:#}"))),
                _ => match envoy {
                    Some(e) => paths::envoy_static(
                        "envoy-k0s",
                        "Envoy, k0s settings",
                        "static Envoy as k0s configures it: RANDOM, connect_timeout 0.25 s, TCP check 5 s / 1 s / 3 / 5 \
                         (no_traffic_interval set to 5 s to measure the steady state; k0s keeps Envoy's 60 s default, \
                         which slows detection in the first minute after Envoy starts)",
                        e,
                        dir,
                        addrs,
                        Some(&K0S_HEALTH),
                        envoy_cg,
                        proxy_cpu,
                    )
                    .unwrap_or_else(|e| PathUnderTest::unavailable("envoy-k0s", "Envoy, k0s settings", format!("{e:#}"))),
                    None => PathUnderTest::unavailable("envoy-k0s", "Envoy, k0s settings", "no Envoy binary".into()),
                },
            };
            if !path.info.available {
                notes.push(format!(
                    "{which}: {}",
                    path.info.note.clone().unwrap_or_default()
                ));
                break;
            }
            eprintln!("== failover: {} / {fault}", path.info.label);
            let r = failover_one(&path, fault, window, hosts, backends, client_cpu);
            // Heal before the next scenario whatever happened.
            match fault {
                "rst" => backends.start_one(1)?,
                _ => hosts.hosts()[1].unblackhole(),
            }
            drop(path);
            let r = r?;
            eprintln!(
                "   {} failed after the fault, last failure at {} ms{}",
                r.failed_after_fault,
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

const FAILOVER_RATE: u32 = 200;
const FAILOVER_TIMEOUT_MS: u64 = 1000;
const FAILOVER_PRE_MS: u64 = 2000;

fn failover_one(
    p: &PathUnderTest,
    fault: &str,
    window_ms: u64,
    hosts: &TestNet,
    backends: &mut Backends,
    client_cpu: Option<usize>,
) -> anyhow::Result<FailoverResult> {
    let spec = ClientSpec {
        addr: p.api,
        workload: Workload::OpenLoop {
            rate: FAILOVER_RATE,
            duration_ms: FAILOVER_PRE_MS + window_ms,
            timeout_ms: FAILOVER_TIMEOUT_MS,
        },
        cgroup: Some(p.cgroup.clone()),
        cpu: client_cpu,
    };
    let client = std::thread::spawn(move || run_client(&spec));
    std::thread::sleep(Duration::from_millis(FAILOVER_PRE_MS));
    let fault_at_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() * 1000.0;
    match fault {
        "rst" => backends.stop_one(1),
        _ => hosts.hosts()[1].blackhole(),
    }
    let r = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    Ok(summarize_failover(p, fault, window_ms, fault_at_ms, &r))
}

fn summarize_failover(
    p: &PathUnderTest,
    fault: &str,
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
    FailoverResult {
        path: p.info.id.clone(),
        label: p.info.label.clone(),
        note: p.info.note.clone(),
        fault: fault.into(),
        rate: FAILOVER_RATE,
        timeout_ms: FAILOVER_TIMEOUT_MS,
        attempts: r.attempts.len() as u64,
        failed_before_fault: before,
        failed_after_fault: after,
        last_failure_ms: last,
        recovered: last.is_none_or(|l| l + fault_at_ms < end - 1000.0),
        window_ms,
        failures_per_500ms: buckets,
        fault_at_ms: fault_at_ms - start,
    }
}

/// Lateness of 1 ms sleeps over one second on `cpu`, at our priority:
/// (p50, p99, max) in ms. On an idle machine all three are well under 1 ms.
fn wakeup_lateness(cpu: Option<usize>) -> [f64; 3] {
    std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            let _ = crate::loadgen::pin_current(cpu);
        }
        let end = std::time::Instant::now() + Duration::from_secs(1);
        let mut late = Vec::new();
        while std::time::Instant::now() < end {
            let t = std::time::Instant::now();
            std::thread::sleep(Duration::from_millis(1));
            late.push((t.elapsed().as_secs_f64() - 0.001).max(0.0) * 1000.0);
        }
        late.sort_by(f64::total_cmp);
        let q = |f: f64| late[((late.len() - 1) as f64 * f) as usize];
        [q(0.5), q(0.99), q(1.0)]
    })
    .join()
    .unwrap_or([0.0; 3])
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        mem_gib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0),
        load_start: 0.0,
        load_end: 0.0,
        wakeup_late_ms: [0.0; 3],
    }
}
