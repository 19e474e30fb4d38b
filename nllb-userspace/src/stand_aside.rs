//! `--mode auto` on a node that already has a node-local load balancer.
//!
//! On a k0s worker with `nodeLocalLoadBalancing` enabled, k0s's Envoy
//! listens on the virtual addresses nllb is configured with (127.0.0.1:7443,
//! :7132). Where the eBPF datapath runs, nllb works *in front of* it: the
//! connect is rewritten before it reaches any listener, and Envoy sits idle
//! until nllb is removed. Where the eBPF datapath cannot run, `auto` would
//! fall back to an Envoy of its own, which cannot bind addresses that are
//! taken and would only fight the one that serves them. So `auto` stands
//! aside instead: it starts no Envoy, binds none of the virtual addresses,
//! says who serves them (pid and process name where it can see them, else
//! the socket's uid) in the log, in `nllb status` (mode `aside`) and in
//! `/metrics` (`nllb_datapath_mode{mode="aside"}`), and keeps running, so a
//! DaemonSet pod does not crash-loop. `--mode envoy` is unchanged: asked for
//! Envoy on a taken address, it fails naming the address.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Mode,
    datapath::{Datapath, DatapathError, DatapathKind},
    detect::{self, ModeError},
    model::Plan,
};

/// The key of this mode's section in the status file.
pub const STATUS_KEY: &str = "aside";

/// A TCP socket in LISTEN state in this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub uid: u32,
    pub inode: u64,
}

/// A virtual address and the process that serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedBy {
    pub vip: SocketAddr,
    /// The listening socket's own address (the VIP, or a wildcard).
    pub listener: SocketAddr,
    pub uid: u32,
    /// None when the process is not visible here (another pid namespace,
    /// or no permission to read its fds).
    pub pid: Option<u32>,
    pub process: Option<String>,
}

impl ServedBy {
    /// "envoy (pid 1234)", or "a process of uid 101 (pid not visible)".
    pub fn who(&self) -> String {
        match (&self.process, self.pid) {
            (Some(name), Some(pid)) => format!("{name} (pid {pid})"),
            (None, Some(pid)) => format!("pid {pid}"),
            _ => format!("a process of uid {} (pid not visible from here)", self.uid),
        }
    }
}

/// What `nllb status` and the status file show in this mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsideStatus {
    /// Why the eBPF datapath cannot run here.
    pub reason: String,
    pub served_by: Vec<ServedBy>,
    /// Virtual addresses of the config that nobody serves.
    pub not_served: Vec<SocketAddr>,
}

/// Every listening TCP socket of this network namespace, from
/// /proc/self/net/tcp and tcp6 through procfs (no connect, no bind: nothing
/// is disturbed).
pub fn listeners() -> Vec<Listener> {
    [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        // An address family the kernel lacks has no table.
        .flat_map(|t| t.unwrap_or_default())
        .filter(|e| e.state == procfs::net::TcpState::Listen)
        .map(|e| Listener { addr: e.local_address, uid: e.uid, inode: e.inode })
        .collect()
}

/// Whether a connect to `vip` lands on `listener`: same port and the same
/// address, or the wildcard of its family (`[::]` takes IPv4 too unless the
/// socket is v6-only, which /proc does not show; Linux defaults to dual).
pub fn reaches(vip: SocketAddr, listener: SocketAddr) -> bool {
    if vip.port() != listener.port() {
        return false;
    }
    let (v, l) = (vip.ip().to_canonical(), listener.ip().to_canonical());
    v == l || (l == IpAddr::V4(Ipv4Addr::UNSPECIFIED) && v.is_ipv4()) || l == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
}

/// Which of `vips` are served by a listener (and by whom), and which are not.
pub fn who_serves(vips: &[SocketAddr], listening: &[Listener]) -> (Vec<ServedBy>, Vec<SocketAddr>) {
    let mut served = Vec::new();
    let mut free = Vec::new();
    for vip in vips {
        match listening.iter().find(|l| reaches(*vip, l.addr)) {
            Some(l) => {
                let owner = socket_owner(l.inode);
                served.push(ServedBy {
                    vip: *vip,
                    listener: l.addr,
                    uid: l.uid,
                    pid: owner.as_ref().map(|o| o.0),
                    process: owner.map(|o| o.1),
                });
            }
            None => free.push(*vip),
        }
    }
    (served, free)
}

/// The process holding socket `inode` (lowest pid), by reading every
/// process's fd table: what `ss -p` does.
fn socket_owner(inode: u64) -> Option<(u32, String)> {
    let target = format!("socket:[{inode}]");
    let mut pids: Vec<u32> =
        std::fs::read_dir("/proc").ok()?.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    pids.into_iter().find_map(|pid| {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        let holds =
            fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == target.as_str()));
        holds.then(|| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, name.trim().to_string())
        })
    })
}

fn vips(plan: &Plan) -> Vec<SocketAddr> {
    plan.services.iter().flat_map(|s| s.listen.iter().copied()).collect()
}

/// What the agent runs.
pub enum Selected {
    Mode(Mode),
    Aside(StandAside),
}

/// [`detect::select_mode`], except that `auto` on a node whose virtual
/// addresses are already served either works in front of that server (eBPF
/// usable: said in the log) or stands aside (eBPF unusable) instead of
/// starting a second Envoy.
pub fn select_datapath(
    requested: Mode,
    cgroup: &Path,
    envoy_binary: Option<&Path>,
    plan: &Plan,
) -> Result<Selected, ModeError> {
    let vips = vips(plan);
    let taken: Vec<Listener> = listeners().into_iter().filter(|l| vips.iter().any(|v| reaches(*v, l.addr))).collect();
    if requested != Mode::Auto || taken.is_empty() {
        return detect::select_mode(requested, cgroup, envoy_binary).map(Selected::Mode);
    }
    let (served, not_served) = who_serves(&vips, &taken);
    let report = detect::detect_with(Some(cgroup), envoy_binary);
    if report.ebpf_usable() {
        for s in &served {
            tracing::info!(
                vip = %s.vip,
                served_by = %s.who(),
                cgroup = %cgroup.display(),
                "in place: this address is also served by another process; connects from processes in the cgroup \
                 reach the controllers directly, the rest keep going to it (and all of them do after `nllb uninstall`)"
            );
        }
        tracing::info!(mode = "ebpf", reason = %report.reason, "datapath selected");
        return Ok(Selected::Mode(Mode::Ebpf));
    }
    let reason = report.ebpf_blocker().unwrap_or_default();
    let aside = StandAside::new(AsideStatus { reason, served_by: served, not_served }, vips);
    aside.log_decision();
    Ok(Selected::Aside(aside))
}

/// The datapath of a node that is served by someone else: installs
/// nothing, binds nothing, and keeps an eye on who serves.
pub struct StandAside {
    /// Behind a lock because `status_extra` (`&self`) refreshes it.
    status: Mutex<AsideStatus>,
    /// The virtual addresses of the last plan.
    vips: Vec<SocketAddr>,
}

impl StandAside {
    pub fn new(status: AsideStatus, vips: Vec<SocketAddr>) -> StandAside {
        StandAside { status: Mutex::new(status), vips }
    }

    fn log_decision(&self) {
        let s = self.status.lock().expect("aside status");
        for by in &s.served_by {
            tracing::warn!(
                vip = %by.vip,
                served_by = %by.who(),
                listener = %by.listener,
                "standing aside: the eBPF datapath cannot run here and this virtual address is already served; \
                 nllb starts no Envoy and binds nothing"
            );
        }
        for vip in &s.not_served {
            tracing::warn!(%vip, "standing aside: this virtual address is served by nobody (not bound by nllb either)");
        }
        tracing::warn!(
            reason = %s.reason,
            "mode aside: nllb is not in the data path on this node; fix the reason (or remove the other load \
             balancer) and restart nllb to take over"
        );
    }

    /// Look again (cheap: two /proc files; owners only when the set changed).
    fn refresh(&self) -> AsideStatus {
        let mut s = self.status.lock().expect("aside status");
        let listening = listeners();
        let now: BTreeSet<(SocketAddr, SocketAddr)> = self
            .vips
            .iter()
            .filter_map(|v| listening.iter().find(|l| reaches(*v, l.addr)).map(|l| (*v, l.addr)))
            .collect();
        let before: BTreeSet<(SocketAddr, SocketAddr)> = s.served_by.iter().map(|b| (b.vip, b.listener)).collect();
        if now != before {
            let (served, not_served) = who_serves(&self.vips, &listening);
            if served.is_empty() {
                tracing::error!(
                    "standing aside, but nothing serves the virtual addresses any more: restart nllb so that it \
                     takes over (it would run Envoy)"
                );
            } else {
                tracing::warn!(served_by = ?served.iter().map(ServedBy::who).collect::<Vec<_>>(), "who serves the virtual addresses changed");
            }
            s.served_by = served;
            s.not_served = not_served;
        }
        s.clone()
    }
}

impl Datapath for StandAside {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Aside
    }

    /// Nothing to install: the plan only decides which addresses to watch.
    fn apply(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        self.vips = vips(plan);
        Ok(())
    }

    fn snapshot(&self) -> crate::datapath::DatapathSnapshot {
        crate::datapath::DatapathSnapshot { aside: serde_json::to_value(self.refresh()).ok(), ..Default::default() }
    }

    fn shutdown(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }
}

/// `nllb status`: in mode aside the node counts as served (exit 0) while
/// another process serves the virtual addresses; nllb's own datapath is not
/// installed (`datapath_installed: false`).
pub fn node_served(r: &crate::status::StatusReport) -> bool {
    r.agent.as_ref().is_some_and(|a| {
        a.mode == STATUS_KEY
            && a.extra.get(STATUS_KEY).and_then(|v| v["served_by"].as_array()).is_some_and(|s| !s.is_empty())
    })
}

/// `nllb status` lines for this mode (the status file's `extra.aside`).
pub fn render_status(v: &serde_json::Value) -> String {
    let Ok(s) = serde_json::from_value::<AsideStatus>(v.clone()) else { return format!("aside: {v}\n") };
    let mut out = format!(
        "standing aside: the eBPF datapath cannot run here ({}); nllb starts no Envoy and binds none of its \
         virtual addresses\n",
        s.reason
    );
    for b in &s.served_by {
        out.push_str(&format!(
            "  {:<24} served by {} (listener {}, uid {})\n",
            b.vip.to_string(),
            b.who(),
            b.listener,
            b.uid
        ));
    }
    for vip in &s.not_served {
        out.push_str(&format!("  {:<24} served by nobody\n", vip.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_and_a_connected_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (_s, peer) = l.accept().unwrap();
        let all = listeners();
        let me = nix::unistd::geteuid().as_raw();
        assert!(all.iter().any(|x| x.addr == addr && x.uid == me), "{all:?}");
        assert!(all.iter().all(|x| x.addr != peer), "a connected socket is not a listener: {all:?}");
    }

    #[test]
    fn a_vip_is_reached_by_its_own_address_or_a_wildcard_on_the_same_port() {
        let v4: SocketAddr = "127.0.0.1:7443".parse().unwrap();
        let v6: SocketAddr = "[::1]:7443".parse().unwrap();
        assert!(reaches(v4, v4));
        assert!(reaches(v4, "0.0.0.0:7443".parse().unwrap()));
        assert!(reaches(v4, "[::]:7443".parse().unwrap()));
        assert!(reaches(v6, "[::]:7443".parse().unwrap()));
        assert!(reaches(v4, "[::ffff:127.0.0.1]:7443".parse().unwrap()));
        assert!(!reaches(v6, "0.0.0.0:7443".parse().unwrap()));
        assert!(!reaches(v6, v4));
        assert!(!reaches(v4, "127.0.0.1:7444".parse().unwrap()));
        assert!(!reaches(v4, "127.0.0.2:7443".parse().unwrap()));
    }

    #[test]
    fn this_process_is_named_as_the_server_of_its_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let vip = l.local_addr().unwrap();
        let other: SocketAddr = format!("[::1]:{}", vip.port()).parse().unwrap();
        let (served, free) = who_serves(&[vip, other], &listeners());
        assert_eq!(free, vec![other]);
        assert_eq!(served.len(), 1, "{served:?}");
        assert_eq!(served[0].pid, Some(std::process::id()));
        assert!(served[0].who().contains(&format!("pid {}", std::process::id())), "{}", served[0].who());
        let text = render_status(
            &serde_json::to_value(AsideStatus { reason: "r".into(), served_by: served, not_served: free }).unwrap(),
        );
        assert!(text.contains("served by nobody") && text.contains(&vip.to_string()), "{text}");
    }
}
