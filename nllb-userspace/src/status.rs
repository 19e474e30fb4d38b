//! `nllb status`: what the kernel is doing right now, read from the pinned
//! maps, with names and health from the agent's status file.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use nllb_common::TABLE_FLAG_PANIC;
use serde::{Deserialize, Serialize};

use crate::datapath::{DatapathError, encoding::slot_addr, events::cause_name, kernel::KernelMaps};

/// What the agent writes to `<run-dir>/status.json` on every change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub version: String,
    pub mode: String,
    pub pin_path: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub services: Vec<ServiceStatus>,
    /// Per published backend: the SYN timeout in force and what it was
    /// derived from, and the connects aborted when it was marked.
    #[serde(default)]
    pub passive: Vec<PassiveStatus>,
    /// Per published (service, backend): nllb's established connections and
    /// the ones rebalancing moved (issue 17).
    #[serde(default)]
    pub rebalance: Vec<RebalanceStatus>,
    /// Per backend health, filled by the health monitor when enabled.
    #[serde(default)]
    pub health: serde_json::Value,
    /// Extra facts from optional components (Envoy supervisor, discovery).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
    pub updated_unix_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub id: Option<u32>,
    pub listen: Vec<SocketAddr>,
    pub known_backends: Vec<SocketAddr>,
    pub published_backends: Vec<SocketAddr>,
    pub panic: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PassiveStatus {
    pub backend: SocketAddr,
    pub syn_timeout_ms: Option<u64>,
    pub handshake_worst_ms: Option<f64>,
    pub syn_sent_aborted: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RebalanceStatus {
    pub service: String,
    pub backend: SocketAddr,
    /// At the last count (None: not counted yet).
    pub established: Option<u64>,
    /// Connections rebalancing ended here so they reconnect elsewhere.
    pub moves: u64,
    /// Slots in the service's table (more than 1: it draws reconnects).
    pub weight: u32,
}

pub const STATUS_FILE: &str = "status.json";

impl AgentStatus {
    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let tmp = run_dir.join(".status.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, run_dir.join(STATUS_FILE))
    }

    pub fn read(run_dir: &Path) -> Option<AgentStatus> {
        let text = std::fs::read(run_dir.join(STATUS_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// One service as the kernel sees it.
#[derive(Clone, Debug, Serialize)]
pub struct KernelService {
    pub id: u32,
    pub name: Option<String>,
    pub listen: Vec<SocketAddr>,
    pub backends: Vec<KernelBackend>,
    pub panic: bool,
    pub no_backend_refusals: u64,
    /// Connects that found every backend marked and took the oldest mark.
    pub all_marked_picks: u64,
    /// Id of the service's table map (`bpftool map dump id N`).
    pub table_map_id: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelBackend {
    pub addr: SocketAddr,
    /// Slots it fills in the table (more than 1: a weighted pick).
    pub slots: u32,
    pub connects: u64,
    /// Steered connects refused, given up or aborted before they connected.
    pub refused: u64,
    /// Steered connects whose first SYN was retransmitted.
    pub syn_timeouts: u64,
    /// SYN timeout the kernel gives connects steered here (None: the kernel's).
    pub syn_timeout_ms: Option<u32>,
    /// The kernel's mark keeps it out of the pick right now.
    pub passively_ejected: bool,
    pub last_mark_cause: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub agent_running: bool,
    pub agent: Option<AgentStatus>,
    pub pin_path: PathBuf,
    pub datapath_installed: bool,
    pub services: Vec<KernelService>,
}

pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Read the services the kernel serves from the pinned maps.
pub fn read_kernel(pin_path: &Path, agent: Option<&AgentStatus>) -> Result<Vec<KernelService>, DatapathError> {
    let kernel = KernelMaps::open(pin_path)?;
    let hold_ns = kernel.config().map_or(0, |c| c.eject_hold_ns());
    let marks: BTreeMap<SocketAddr, nllb_common::PassiveMark> = kernel.marks().into_iter().collect();
    let now = crate::sys::monotonic_ns();
    Ok(kernel
        .services()
        .into_iter()
        .map(|p| {
            let t = &p.table;
            let name = agent.and_then(|a| a.services.iter().find(|s| s.id == Some(t.svc_id)).map(|s| s.name.clone()));
            let counters = kernel.service_counters(t.svc_id);
            let mut backends: Vec<KernelBackend> = Vec::new();
            let slots = t.backends4.iter().take(t.count4 as usize).chain(t.backends6.iter().take(t.count6 as usize));
            for slot in slots {
                let addr = slot_addr(slot);
                if let Some(b) = backends.iter_mut().find(|b| b.addr == addr) {
                    b.slots += 1;
                    continue;
                }
                let c = kernel.backend_counters(slot.stat_id);
                let mark = marks.get(&addr);
                let ejected = mark.is_some_and(|m| {
                    m.failed_ns > slot.cleared_ns.max(m.recovered_ns) && now.saturating_sub(m.failed_ns) < hold_ns
                });
                backends.push(KernelBackend {
                    addr,
                    slots: 1,
                    connects: c.connects,
                    refused: c.refused,
                    syn_timeouts: c.syn_timeouts,
                    syn_timeout_ms: (slot.syn_rto_ms != 0).then_some(slot.syn_rto_ms),
                    passively_ejected: ejected,
                    last_mark_cause: mark.filter(|m| m.failed_ns != 0).map(|m| cause_name(m.cause)),
                });
            }
            KernelService {
                id: t.svc_id,
                name,
                listen: p.listen,
                backends,
                panic: t.flags & TABLE_FLAG_PANIC != 0,
                no_backend_refusals: counters.no_backend,
                all_marked_picks: counters.all_marked,
                table_map_id: Some(p.table_id),
            }
        })
        .collect())
}

pub fn report(pin_path: &Path, run_dir: &Path) -> StatusReport {
    let agent = AgentStatus::read(run_dir).filter(|a| a.pin_path == pin_path || a.pin_path.as_os_str().is_empty());
    let agent_running = agent.as_ref().is_some_and(|a| pid_alive(a.pid));
    let envoy_mode = agent.as_ref().is_some_and(|a| a.mode == "envoy");
    let services = if envoy_mode && agent_running {
        // No maps in Envoy mode: what the agent published is what Envoy serves.
        Ok(agent.as_ref().map(published_services).unwrap_or_default())
    } else {
        read_kernel(pin_path, agent.as_ref())
    };
    StatusReport {
        agent_running,
        datapath_installed: services.is_ok(),
        services: services.unwrap_or_default(),
        agent,
        pin_path: pin_path.to_path_buf(),
    }
}

fn published_services(a: &AgentStatus) -> Vec<KernelService> {
    a.services
        .iter()
        .enumerate()
        .map(|(i, s)| KernelService {
            id: s.id.unwrap_or(i as u32),
            name: Some(s.name.clone()),
            listen: s.listen.clone(),
            backends: s
                .published_backends
                .iter()
                .map(|b| KernelBackend {
                    addr: *b,
                    slots: 1,
                    connects: 0,
                    refused: 0,
                    syn_timeouts: 0,
                    syn_timeout_ms: None,
                    passively_ejected: false,
                    last_mark_cause: None,
                })
                .collect(),
            panic: s.panic,
            no_backend_refusals: 0,
            all_marked_picks: 0,
            table_map_id: None,
        })
        .collect()
}

/// Human-readable form.
pub fn render(r: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match (&r.agent, r.agent_running) {
        (Some(a), true) => {
            let _ = writeln!(out, "agent: running (pid {}, mode {}, version {})", a.pid, a.mode, a.version);
        }
        (Some(a), false) => {
            let _ = writeln!(out, "agent: NOT running (last pid {} has exited)", a.pid);
        }
        (None, _) => {
            let _ = writeln!(out, "agent: NOT running (no status file)");
        }
    }
    if r.agent.as_ref().is_some_and(|a| a.mode == "aside") && r.agent_running {
        let _ = writeln!(out, "datapath: none (mode aside: another process serves the virtual addresses, see below)");
    } else if r.agent.as_ref().is_some_and(|a| a.mode == "envoy") && r.agent_running {
        let _ = writeln!(out, "datapath: Envoy (supervised by the agent; per-backend counters need envoy.adminPort)");
    } else if !r.datapath_installed {
        let _ = writeln!(out, "datapath: no eBPF maps pinned at {}", r.pin_path.display());
    } else {
        let _ = writeln!(out, "datapath: eBPF, maps pinned at {}", r.pin_path.display());
    }
    for s in &r.services {
        let name = s.name.clone().unwrap_or_else(|| format!("service #{}", s.id));
        let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "\n{name}  listen {}{}\n  refused for lack of backends: {}",
            listen.join(", "),
            if s.panic { "  [PANIC MODE: all backends unhealthy, using all]" } else { "" },
            s.no_backend_refusals
        );
        let health = r.agent.as_ref().map(|a| &a.health);
        for b in &s.backends {
            let h = health.and_then(|h| h.get(b.addr.to_string()));
            let verdict = h
                .and_then(|h| h.get("healthy"))
                .and_then(|v| v.as_bool())
                .map(|ok| if ok { "healthy" } else { "UNHEALTHY" })
                .unwrap_or("-");
            let latency = h
                .and_then(|h| h.get("last_latency_ms"))
                .and_then(|v| v.as_f64())
                .map(|ms| format!("{ms:.1}ms"))
                .unwrap_or_else(|| "-".into());
            let fails = h.and_then(|h| h.get("consecutive_failures")).and_then(|v| v.as_u64()).unwrap_or(0);
            let passive_ejections = h.and_then(|h| h.get("passive_ejections")).and_then(|v| v.as_u64()).unwrap_or(0);
            let p = r.agent.as_ref().and_then(|a| a.passive.iter().find(|p| p.backend == b.addr));
            let handshake =
                p.and_then(|p| p.handshake_worst_ms).map(|ms| format!("{ms:.1}ms")).unwrap_or_else(|| "-".into());
            let syn = b.syn_timeout_ms.map(|ms| format!("{ms}ms")).unwrap_or_else(|| "kernel".into());
            let _ = writeln!(
                out,
                "  {:<28} connects {:>8}  {:<9} probe {:>8}  fails {:>2}  passive ejections {}{}",
                b.addr.to_string(),
                b.connects,
                verdict,
                latency,
                fails,
                passive_ejections,
                if b.passively_ejected { "  [MARKED by the kernel]" } else { "" },
            );
            let _ = writeln!(
                out,
                "  {:<28} syn timeout {:>6} (worst handshake {handshake})  refused {}  syn timeouts {}  aborted in SYN_SENT {}",
                "",
                syn,
                b.refused,
                b.syn_timeouts,
                p.map_or(0, |p| p.syn_sent_aborted),
            );
            let rebalance =
                r.agent.as_ref().and_then(|a| a.rebalance.iter().find(|x| x.service == name && x.backend == b.addr));
            if let Some(rb) = rebalance {
                let established = rb.established.map_or_else(|| "-".into(), |n| n.to_string());
                let _ = writeln!(out, "  {:<28} established {established}  rebalance moves {}", "", rb.moves);
            }
        }
        if s.backends.is_empty() {
            let _ = writeln!(out, "  (no backends published: connects are refused)");
        }
    }
    if let Some(a) = &r.agent {
        for (k, v) in &a.extra {
            match serde_json::from_value::<crate::envoy::EnvoyStatus>(v.clone()) {
                Ok(envoy) if k == "envoy" => {
                    let _ = writeln!(out, "\n{}", crate::envoy::render_status(&envoy));
                }
                _ if k == crate::stand_aside::STATUS_KEY => {
                    let _ = writeln!(out, "\n{}", crate::stand_aside::render_status(v));
                }
                _ => {
                    let _ = writeln!(out, "\n{k}: {v}");
                }
            }
        }
    }
    out
}
