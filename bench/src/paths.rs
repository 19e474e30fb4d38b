//! The ways a client can reach the controllers, started side by side so that
//! every workload can alternate between them within one run.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{
    backend::{BULK_PORT, ECHO_PORT},
    bpfstats,
    procstat::{self, Usage},
    proxies::{self, Proc},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathInfo {
    pub id: String,
    pub label: String,
    pub available: bool,
    /// Why it is missing, or how it differs from what its name promises.
    pub note: Option<String>,
}

pub struct PathUnderTest {
    pub info: PathInfo,
    pub api: SocketAddr,
    pub bulk: SocketAddr,
    /// The cgroup the client joins.
    pub cgroup: PathBuf,
    pub proc: Option<Proc>,
    /// The agent's pin path (nllb's eBPF paths): its maps, for the kernel figures.
    pub pin: Option<PathBuf>,
    /// Runs after the process is stopped (removing pins it left).
    pub cleanup: Option<Box<dyn FnOnce()>>,
}

impl Drop for PathUnderTest {
    fn drop(&mut self) {
        drop(self.proc.take());
        if let Some(c) = self.cleanup.take() {
            c();
        }
    }
}

impl PathUnderTest {
    pub fn unavailable(id: &str, label: &str, why: String) -> PathUnderTest {
        PathUnderTest {
            info: PathInfo {
                id: id.into(),
                label: label.into(),
                available: false,
                note: Some(why),
            },
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            bulk: SocketAddr::from(([127, 0, 0, 1], 0)),
            cgroup: PathBuf::new(),
            proc: None,
            pin: None,
            cleanup: None,
        }
    }

    /// CPU meter over the process and its children (nllb in Envoy mode runs
    /// Envoy as a child: the footprint is both).
    pub fn meter(&self) -> Option<TreeMeter> {
        self.proc.as_ref().map(|p| TreeMeter::start(p.pid()))
    }
}

pub fn direct(host: Ipv4Addr, cgroup: &Path) -> PathUnderTest {
    PathUnderTest {
        info: PathInfo {
            id: "direct".into(),
            label: "direct".into(),
            available: true,
            note: Some(format!(
                "straight to one controller ({host}:{ECHO_PORT}): the physical limit"
            )),
        },
        api: SocketAddr::from((host, ECHO_PORT)),
        bulk: SocketAddr::from((host, BULK_PORT)),
        cgroup: cgroup.to_path_buf(),
        proc: None,
        pin: None,
        cleanup: None,
    }
}

pub fn haproxy(
    dir: &Path,
    backends: &[Ipv4Addr],
    cgroup: &Path,
    cpu: Option<usize>,
    checks: bool,
) -> anyhow::Result<PathUnderTest> {
    let (api, bulk) = (proxies::free_port()?, proxies::free_port()?);
    let id = if checks { "haproxy-checks" } else { "haproxy" };
    let cfg = dir.join(format!("{id}.cfg"));
    std::fs::write(&cfg, proxies::haproxy_config(api, bulk, backends, checks))?;
    let log = dir.join(format!("{id}.log"));
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut p = Proc::spawn("haproxy", cmd, &log, cpu)?;
    let api = SocketAddr::from(([127, 0, 0, 1], api));
    p.wait_listening(api, &log)?;
    let version = Command::new("haproxy").arg("-v").output().ok().map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    });
    Ok(PathUnderTest {
        info: PathInfo {
            id: id.into(),
            label: if checks {
                "HAProxy, checks + redispatch"
            } else {
                "HAProxy"
            }
            .into(),
            available: true,
            note: Some(format!(
                "{}; mode tcp, roundrobin, 1 thread, {}",
                version.unwrap_or_default().trim(),
                if checks {
                    "TCP checks 500 ms / 250 ms / rise 2 / fall 2, redispatch"
                } else {
                    "no checks"
                }
            )),
        },
        api,
        bulk: SocketAddr::from(([127, 0, 0, 1], bulk)),
        cgroup: cgroup.to_path_buf(),
        proc: Some(p),
        pin: None,
        cleanup: None,
    })
}

pub struct AgentOpts<'a> {
    pub nllb: &'a Path,
    pub dir: &'a Path,
    pub tag: &'a str,
    pub backends: &'a [Ipv4Addr],
    pub cgroup: &'a Path,
    pub api: SocketAddr,
    pub bulk: SocketAddr,
    /// Appended to the generated config (mode, health settings).
    pub extra_config: &'a str,
    pub cpu: Option<usize>,
    /// eBPF mode: ready once programs are attached; Envoy mode: once the
    /// virtual address accepts connects.
    pub ebpf: bool,
}

/// The real `nllb agent`, with its own pin path and directories.
pub fn nllb_agent(
    o: &AgentOpts<'_>,
    id: &str,
    label: &str,
    note: Option<String>,
) -> anyhow::Result<PathUnderTest> {
    let cfg = o.dir.join(format!("{}.yaml", o.tag));
    std::fs::write(
        &cfg,
        proxies::nllb_config(o.api, o.bulk, o.backends, o.extra_config),
    )?;
    let log = o.dir.join(format!("{}.log", o.tag));
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/nllb-bench-{}-{}",
        std::process::id(),
        o.tag
    ));
    let run_dir = o.dir.join(format!("{}-run", o.tag));
    let state_dir = o.dir.join(format!("{}-state", o.tag));
    let mut cmd = Command::new(o.nllb);
    cmd.arg("agent")
        .arg("--config")
        .arg(&cfg)
        .arg("--cgroup")
        .arg(o.cgroup)
        .arg("--pin-path")
        .arg(&pin);
    cmd.arg("--run-dir")
        .arg(&run_dir)
        .arg("--state-dir")
        .arg(&state_dir);
    // The agent leaves the datapath serving when it exits unless told
    // otherwise; a benchmark must leave nothing attached.
    if agent_has_flag(o.nllb, "--detach-on-exit") {
        cmd.arg("--detach-on-exit");
    }
    // Agents run side by side (ours and tests'): each its own metrics port.
    if agent_has_flag(o.nllb, "--metrics-addr") {
        cmd.args(["--metrics-addr", "127.0.0.1:0"]);
    }
    let uninstall = {
        let (nllb, pin, run_dir) = (o.nllb.to_path_buf(), pin.clone(), run_dir.clone());
        move || {
            let _ = Command::new(&nllb)
                .arg("uninstall")
                .arg("--pin-path")
                .arg(&pin)
                .arg("--run-dir")
                .arg(&run_dir)
                .output();
            let _ = std::fs::remove_dir_all(&pin);
        }
    };
    let p = Proc::spawn(id, cmd, &log, o.cpu)?;
    // The process goes into `path` at once: on an early return, its Drop
    // stops the agent first and only then removes what it left.
    let mut path = PathUnderTest {
        info: PathInfo {
            id: id.into(),
            label: label.into(),
            available: true,
            note,
        },
        api: o.api,
        bulk: o.bulk,
        cgroup: o.cgroup.to_path_buf(),
        proc: Some(p),
        pin: o.ebpf.then(|| pin.clone()),
        cleanup: Some(Box::new(uninstall)),
    };
    let p = path.proc.as_mut().expect("set above");
    let status_file = run_dir.join("status.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status: serde_json::Value = loop {
        p.check_alive(&log)?;
        if let Some(v) = std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            break v;
        }
        if Instant::now() > deadline {
            bail!(
                "nllb agent ({}) wrote no {} within 20 s; see {}",
                o.tag,
                status_file.display(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mode = status["mode"].as_str().unwrap_or("").to_string();
    let want = if o.ebpf { "ebpf" } else { "envoy" };
    if mode != want {
        bail!("asked for mode {want}, the agent runs mode {mode:?} (not supported in this build?)");
    }
    if o.ebpf {
        if !bpfstats::attached(o.cgroup)?
            .iter()
            .any(|p| p.attach_type.contains("inet4_connect"))
        {
            bail!(
                "agent is ready but no connect4 program is attached to {}",
                o.cgroup.display()
            );
        }
    } else {
        p.wait_listening(o.api, &log)?;
        if !bpfstats::attached(o.cgroup)?.is_empty() {
            bail!(
                "agent in Envoy mode attached BPF programs to {}: clients would bypass Envoy",
                o.cgroup.display()
            );
        }
    }
    // Health checks settle in a round or two; measure after that.
    std::thread::sleep(Duration::from_millis(1200));
    Ok(path)
}

fn agent_has_flag(nllb: &Path, flag: &str) -> bool {
    Command::new(nllb)
        .args(["agent", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// Whether `nllb agent` exists in this build and accepts `mode`.
pub fn agent_supports(nllb: &Path, needle: &str) -> anyhow::Result<()> {
    let out = Command::new(nllb)
        .args(["agent", "--help"])
        .output()
        .with_context(|| format!("running {}", nllb.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "`{} agent --help` failed: {}",
            nllb.display(),
            text.lines().next().unwrap_or("")
        );
    }
    if !needle.is_empty() && !text.contains(needle) {
        bail!("`nllb agent` in this build does not mention {needle:?}");
    }
    Ok(())
}

/// CPU of a process tree (the process plus its descendants at start and stop).
pub struct TreeMeter {
    pid: u32,
    cpu0: TreeCpu,
    t0: Instant,
}

pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in rd.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    all.extend(c.split_whitespace().filter_map(|s| s.parse::<u32>().ok()));
                }
            }
        }
        i += 1;
    }
    all
}

/// Each thread's CPU ns over the tree; where the kernel keeps no per-thread
/// schedstat, the processes' 10 ms ticks.
fn tree_cpu(pid: u32) -> TreeCpu {
    let procs = tree(pid);
    let threads: HashMap<u32, u64> = procs
        .iter()
        .flat_map(|&p| procstat::thread_cpu_ns(p))
        .collect();
    if threads.is_empty() {
        TreeCpu::Ticks(procs.into_iter().filter_map(procstat::cpu_s).sum())
    } else {
        TreeCpu::Threads(threads)
    }
}

enum TreeCpu {
    Threads(HashMap<u32, u64>),
    Ticks(f64),
}

impl TreeCpu {
    /// Seconds from `before` to `self`: per thread, so a thread that exits
    /// meanwhile loses only its time in the interval, and one started
    /// meanwhile counts from 0.
    fn since(&self, before: &TreeCpu) -> f64 {
        match (self, before) {
            (TreeCpu::Threads(now), TreeCpu::Threads(then)) => {
                let ns: u64 = now
                    .iter()
                    .map(|(tid, ns)| ns.saturating_sub(then.get(tid).copied().unwrap_or(0)))
                    .sum();
                ns as f64 / 1e9
            }
            (TreeCpu::Ticks(now), TreeCpu::Ticks(then)) => (now - then).max(0.0),
            _ => 0.0,
        }
    }
}

pub fn tree_rss(pid: u32) -> u64 {
    tree(pid).into_iter().filter_map(procstat::rss_kib).sum()
}

impl TreeMeter {
    pub fn start(pid: u32) -> TreeMeter {
        TreeMeter {
            pid,
            cpu0: tree_cpu(pid),
            t0: Instant::now(),
        }
    }
    pub fn stop(&self) -> Usage {
        let cpu = tree_cpu(self.pid).since(&self.cpu0);
        let wall = self.t0.elapsed().as_secs_f64().max(1e-9);
        Usage {
            cpu_s: cpu,
            cpu_pct: 100.0 * cpu / wall,
            rss_kib: tree_rss(self.pid),
        }
    }
}
