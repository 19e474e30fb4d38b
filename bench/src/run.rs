//! One benchmark run: controllers in namespaces, every path started side by
//! side, the closed-loop workloads (alternating between paths), nllb's
//! in-kernel cost against the floor and as the tables grow, footprint, then
//! failover with fresh instances of each path.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::bail;
use nllb_tests::{TestCgroup, TestNet};

use crate::{
    backend::{Backends, ECHO_PORT},
    child, failover, k0s, kernel_cost,
    loadgen::{ClientResult, ClientSpec, Workload},
    nllb_paths::{self, Nllb},
    paths::{self, PathUnderTest},
    proxies,
    results::*,
    scale, workloads,
};

pub struct Options {
    pub quick: bool,
    pub nllb_bin: Option<PathBuf>,
    pub envoy_bin: Option<PathBuf>,
    pub pin: bool,
    pub failover: bool,
    /// The in-kernel cost and scale sections.
    pub kernel: bool,
    pub only: Option<Vec<String>>,
    pub high_concurrency: usize,
}

/// A path's id and how to start it (only if `--only` selects it).
type Starter<'a> = (&'a str, Box<dyn Fn() -> PathUnderTest + 'a>);

pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the agents' run directories (and the proxies' files) go: on a
/// node that is /run, a tmpfs, which the agent's status file is written to
/// every second; on a disk filesystem each write and rename costs an idle
/// agent ~10-20% more CPU (AMD EPYC VM, ext4 /tmp against /dev/shm, three
/// alternating 20 s runs), which no node pays.
fn runtime_base() -> PathBuf {
    ["/run", "/dev/shm"]
        .into_iter()
        .find(|p| is_tmpfs(Path::new(p)))
        .map_or_else(std::env::temp_dir, PathBuf::from)
}

fn is_tmpfs(p: &Path) -> bool {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    statfs(p).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC)
}

pub fn run(opts: &Options) -> anyhow::Result<Results> {
    require_root()?;
    let started = Instant::now();
    let (client_cpu, proxy_cpu, backend_cpu) = pins(opts.pin);
    let load_start = loadavg();
    let wakeup_late_ms = wakeup_lateness(client_cpu);
    let settings = workloads::Settings {
        run_ms: if opts.quick { 700 } else { 1000 },
        rounds: if opts.quick { 2 } else { 7 },
        c: opts.high_concurrency,
        client_cpu,
    };
    let tmp = TempDir(runtime_base().join(format!("nllb-bench-{}", std::process::id())));
    std::fs::create_dir_all(&tmp.0)?;
    let dir = tmp.0.as_path();

    eprintln!("== setting up 3 controllers in network namespaces");
    let hosts = TestNet::new(3);
    let addrs: Vec<Ipv4Addr> = hosts
        .hosts()
        .iter()
        .map(|h| match h.v4 {
            IpAddr::V4(a) => a,
            other => unreachable!("TestHost::v4 is IPv4, got {other}"),
        })
        .collect();
    let mut backends = Backends::start(hosts.hosts(), backend_cpu)?;
    let plain_cg = TestCgroup::new();
    let nllb_cg = TestCgroup::new();
    // nllb in Envoy mode gets a cgroup of its own (see Nllb::envoy_path).
    let envoy_cg = TestCgroup::new();
    // nllb in place over k0s's Envoy: its own agent, so its own cgroup.
    let k0s_cg = TestCgroup::new();
    let nllb_bin = nllb_paths::find_bin(opts.nllb_bin.as_deref());
    let envoy_bin = proxies::find_envoy(opts.envoy_bin.as_deref());
    let nllb = Nllb {
        bin: &nllb_bin,
        envoy: envoy_bin.as_deref(),
        dir,
        backends: &addrs,
        cpu: proxy_cpu,
    };
    let selected = |id: &str| {
        opts.only.as_ref().is_none_or(|only| {
            only.iter().any(|o| {
                o == id
                    || (o == "nllb" && id.starts_with("nllb"))
                    || (o == "envoy" && id == nllb_paths::ENVOY_ID)
                    || k0s::selected(o, id)
            })
        })
    };

    eprintln!("== starting paths");
    let k0s = k0s::Setup {
        nllb: &nllb,
        health: nllb_tests::k0s_nllb::HealthPace::AsK0s,
    };
    let starters: Vec<Starter<'_>> = vec![
        (
            "direct",
            Box::new(|| paths::direct(addrs[0], plain_cg.path())),
        ),
        (
            nllb_paths::EBPF_ID,
            Box::new(|| nllb.ebpf_path("ebpf", nllb_cg.path())),
        ),
        (
            nllb_paths::ENVOY_ID,
            Box::new(|| nllb.envoy_path("envoy-mode", envoy_cg.path())),
        ),
        (
            "haproxy",
            Box::new(|| {
                paths::haproxy(dir, &addrs, plain_cg.path(), proxy_cpu, false).unwrap_or_else(|e| {
                    PathUnderTest::unavailable("haproxy", "HAProxy", format!("{e:#}"))
                })
            }),
        ),
        (
            k0s::ENVOY_ID,
            Box::new(|| k0s::envoy_path(&k0s, "k0s-envoy", plain_cg.path())),
        ),
        (
            k0s::IN_PLACE_ID,
            Box::new(|| k0s::in_place_path(&k0s, "k0s-inplace", k0s_cg.path())),
        ),
    ];
    let mut paths: Vec<PathUnderTest> = starters
        .iter()
        .filter(|(id, _)| selected(id))
        .map(|(_, start)| start())
        .collect();
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
    // Started before the warm-up so that its own start is over when the
    // idle window opens.
    let pace_cg = TestCgroup::new();
    let pace =
        selected(nllb_paths::EBPF_ID).then(|| nllb.k0s_pace_path("k0s-pace", pace_cg.path()));
    warm_up(&mut paths, client_cpu);

    eprintln!("== idle footprint");
    let idle: Vec<&PathUnderTest> = paths.iter().chain(pace.iter()).collect();
    let meters: Vec<_> = idle.iter().map(|p| p.meter()).collect();
    // Two of k0s's 5 s check rounds: a window shorter than the check
    // interval would see some paths' checks or none by chance.
    std::thread::sleep(Duration::from_millis(if opts.quick {
        1000
    } else {
        10_000
    }));
    let mut footprint: Vec<Footprint> = idle
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
    // Its agent stops here: the workloads are the default rows' alone.
    let pace_info = pace.map(|p| p.info.clone());

    let (results, bpf) = workloads::run(&paths, &settings, &mut footprint)?;

    let mut kernel_notes = Vec::new();
    let (mut kernel, mut scale) = (None, Vec::new());
    if opts.kernel {
        let ebpf = paths
            .iter()
            .find(|p| p.info.id == nllb_paths::EBPF_ID && p.info.available);
        match ebpf.and_then(|p| p.pin.as_deref().map(|pin| (p, pin))) {
            Some((p, pin)) => {
                let other = backends.loopback_sink()?;
                let sinks = kernel_cost::held_sinks(&mut backends)?;
                let setup = kernel_cost::Setup {
                    nllb_cg: &p.cgroup,
                    pin,
                    vip: p.api,
                    backend: SocketAddr::from((addrs[0], ECHO_PORT)),
                    other,
                    sinks,
                    plain_cg: plain_cg.path(),
                    client_cpu,
                    reader_cpu: backend_cpu,
                    quick: opts.quick,
                };
                match kernel_cost::measure(&setup) {
                    Ok(k) => kernel = Some(k),
                    Err(e) => kernel_notes.push(format!("in-kernel cost: not measured: {e:#}")),
                }
            }
            None => kernel_notes
                .push("in-kernel cost: not measured: the nllb (eBPF) path is not running".into()),
        }
        eprintln!("== scale: per-connect cost from 1 to 64 backends, 1 to 256 services");
        match scale::measure(&hosts.hosts()[0], client_cpu, opts.quick) {
            Ok(s) => scale = s,
            Err(e) => kernel_notes.push(format!("scale: not measured: {e:#}")),
        }
    } else {
        kernel_notes.push("in-kernel cost and scale: skipped (--no-kernel)".into());
    }

    let infos = paths
        .iter()
        .map(|p| p.info.clone())
        .chain(pace_info)
        .collect();
    // Failover starts fresh instances of each path: stop these first so two
    // agents never attach to the same cgroup.
    drop(paths);

    let (failover, failover_note) = if opts.failover {
        let cg = failover::Cgroups {
            nllb: nllb_cg.path(),
            envoy: envoy_cg.path(),
            plain: plain_cg.path(),
            k0s: k0s_cg.path(),
        };
        failover::run_all(
            &nllb,
            &cg,
            &hosts,
            &mut backends,
            client_cpu,
            opts.only.as_deref(),
        )
        .unwrap_or_else(|e| (Vec::new(), Some(format!("failover run failed: {e:#}"))))
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
            run_ms: settings.run_ms,
            rounds: settings.rounds,
            high_concurrency: settings.c,
            client_cpu,
            proxy_cpu,
            backend_cpu,
            backends: addrs.iter().map(|a| a.to_string()).collect(),
            files_in: dir.display().to_string(),
            files_on_tmpfs: is_tmpfs(dir),
        },
        paths: infos,
        workloads: results,
        bpf,
        footprint,
        failover,
        failover_note,
        kernel,
        scale,
        kernel_notes,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// One short burst through every path before measuring: resolves ARP,
/// warms caches and turns a broken path into a clear message now rather
/// than zeros in the tables.
fn warm_up(paths: &mut [PathUnderTest], client_cpu: Option<usize>) {
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
        let why = match child::run::<_, ClientResult>("client", &spec) {
            Ok(r) if r.ops > 0 => continue,
            Ok(r) => {
                format!(
                    "warm-up failed: {} ok, {} errors ({})",
                    r.ops,
                    r.errors,
                    r.first_error.unwrap_or_default()
                )
            }
            Err(e) => format!("warm-up failed: {e:#}"),
        };
        p.info.available = false;
        p.info.note = Some(why);
    }
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark creates network namespaces and cgroups: run it as root");
    }
    Ok(())
}

/// `nllb-bench scale`: one simulated controller and the scale section,
/// pinned as in a full run.
pub fn scale_only(quick: bool) -> anyhow::Result<()> {
    require_root()?;
    let (client_cpu, _, backend_cpu) = pins(true);
    let hosts = TestNet::new(1);
    let _backends = Backends::start(hosts.hosts(), backend_cpu)?;
    scale::measure(&hosts.hosts()[0], client_cpu, quick)?;
    Ok(())
}

/// `nllb-bench held`: the held-sockets rows of the in-kernel cost alone.
pub fn held_only(quick: bool) -> anyhow::Result<()> {
    require_root()?;
    let (client_cpu, _, backend_cpu) = pins(true);
    let hosts = TestNet::new(1);
    let mut backends = Backends::start(hosts.hosts(), backend_cpu)?;
    let sinks = kernel_cost::held_sinks(&mut backends)?;
    kernel_cost::held_only(&sinks, client_cpu, quick)
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
