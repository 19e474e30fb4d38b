//! `nllb status`: what the kernel is doing right now, read from the pinned
//! maps, with names and health from the agent's status file.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use nllb_common::{FAM_IDX_V4, FAM_IDX_V6, MAX_BACKENDS, SERVICE_FLAG_PANIC, backend_index, service_key};
use serde::{Deserialize, Serialize};

use crate::datapath::{
    DatapathError,
    encoding::{slot_addr, vip4_addr, vip6_addr},
    pinned::Maps,
};

/// What the agent writes to `<run-dir>/status.json` on every change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub version: String,
    pub mode: String,
    pub pin_path: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub services: Vec<ServiceStatus>,
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
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelBackend {
    pub addr: SocketAddr,
    pub connects: u64,
    pub passive_failures: u32,
    pub passively_ejected_at_ns: Option<u64>,
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
    let maps = Maps::open(pin_path)?;
    let mut by_id: BTreeMap<u32, KernelService> = BTreeMap::new();
    let entry = |id: u32| -> KernelService {
        let name = agent.and_then(|a| a.services.iter().find(|s| s.id == Some(id)).map(|s| s.name.clone()));
        KernelService { id, name, listen: Vec::new(), backends: Vec::new(), panic: false, no_backend_refusals: 0 }
    };
    for (k, v) in maps.vips4.iter().filter_map(Result::ok) {
        by_id.entry(v.svc_id).or_insert_with(|| entry(v.svc_id)).listen.push(vip4_addr(&k));
    }
    for (k, v) in maps.vips6.iter().filter_map(Result::ok) {
        by_id.entry(v.svc_id).or_insert_with(|| entry(v.svc_id)).listen.push(vip6_addr(&k));
    }
    for svc in by_id.values_mut() {
        svc.listen.sort();
        svc.no_backend_refusals = Maps::sum(&maps.no_backend, svc.id);
        for fam in [FAM_IDX_V4, FAM_IDX_V6] {
            let Ok(state) = maps.services.get(&service_key(svc.id, fam), 0) else { continue };
            svc.panic |= state.flags & SERVICE_FLAG_PANIC != 0;
            for slot in 0..state.count.min(MAX_BACKENDS) {
                let Ok(b) = maps.backends.get(&backend_index(svc.id, fam, state.bank & 1, slot), 0) else {
                    continue;
                };
                let addr = slot_addr(&b);
                let mark = maps.passive.get(&crate::datapath::encoding::backend_key(addr), 0).ok();
                svc.backends.push(KernelBackend {
                    addr,
                    connects: Maps::sum(&maps.connect_stats, b.stat_id),
                    passive_failures: mark.map(|m| m.failures).unwrap_or(0),
                    passively_ejected_at_ns: mark.map(|m| m.failed_ns).filter(|n| *n != 0),
                });
            }
        }
    }
    Ok(by_id.into_values().collect())
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
                .map(|b| KernelBackend { addr: *b, connects: 0, passive_failures: 0, passively_ejected_at_ns: None })
                .collect(),
            panic: s.panic,
            no_backend_refusals: 0,
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
            let _ = writeln!(
                out,
                "  {:<28} connects {:>8}  {:<9} probe {:>8}  fails {:>2}  passive ejections {}",
                b.addr.to_string(),
                b.connects,
                verdict,
                latency,
                fails,
                b.passive_failures
            );
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
