//! What a trace line needs beyond the kernel's record: service names (the
//! agent's status file), cgroup paths (the cgroup2 tree, whose directory
//! inode numbers are the cgroup ids), and for a mark, a recovery or an
//! abort, the process whose connect it was (from that socket's steer event).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nllb_common::TABLE_FLAG_PANIC;

use crate::{datapath::kernel::KernelMaps, status::AgentStatus};

/// A service as the kernel serves it, named by the agent if it is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: Option<String>,
    /// Every known backend is published because none is healthy.
    pub panic: bool,
}

/// Who made a connect, remembered from its steer event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub vip: Option<SocketAddr>,
}

/// Sockets remembered at most; the oldest half is forgotten beyond it.
const ORIGINS: usize = 65_536;
/// A cgroup id not found in the tree is looked for again after this long.
const CGROUP_RESCAN: Duration = Duration::from_secs(2);
/// Directories visited at most per scan of the cgroup tree.
const CGROUP_SCAN_LIMIT: usize = 100_000;

#[derive(Default)]
pub struct Names {
    services: BTreeMap<u32, ServiceInfo>,
    cgroup_root: Option<PathBuf>,
    cgroups: HashMap<u64, String>,
    scanned: Option<Instant>,
    origins: HashMap<u64, (u64, Origin)>,
    next_seq: u64,
}

impl Names {
    pub fn new() -> Names {
        Names { cgroup_root: crate::sys::cgroup2_mount().ok(), ..Default::default() }
    }

    /// Services from the kernel's tables, named from the status file.
    pub fn refresh_services(&mut self, kernel: &KernelMaps, run_dir: &Path) {
        let named: BTreeMap<u32, String> = AgentStatus::read(run_dir)
            .map(|s| s.services.into_iter().filter_map(|s| Some((s.id?, s.name))).collect())
            .unwrap_or_default();
        self.set_services(
            kernel
                .services()
                .into_iter()
                .map(|s| {
                    let id = s.table.svc_id;
                    (id, ServiceInfo { name: named.get(&id).cloned(), panic: s.table.flags & TABLE_FLAG_PANIC != 0 })
                })
                .collect(),
        );
    }

    pub fn set_services(&mut self, services: BTreeMap<u32, ServiceInfo>) {
        self.services = services;
    }

    pub fn service(&self, id: u32) -> Option<&ServiceInfo> {
        self.services.get(&id)
    }

    /// The id of the service called `name` (or whose id `name` is).
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|(_, s)| s.name.as_deref() == Some(name))
            .map(|(id, _)| *id)
            .or_else(|| name.parse().ok())
    }

    pub fn service_names(&self) -> Vec<String> {
        self.services.iter().map(|(id, s)| s.name.clone().unwrap_or_else(|| id.to_string())).collect()
    }

    /// The cgroup's path below the cgroup2 mount ("/" for its root).
    pub fn cgroup(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if !self.cgroups.contains_key(&id) && self.scanned.is_none_or(|t| t.elapsed() >= CGROUP_RESCAN) {
            self.scan_cgroups();
        }
        self.cgroups.get(&id).cloned()
    }

    fn scan_cgroups(&mut self) {
        self.scanned = Some(Instant::now());
        let Some(root) = &self.cgroup_root else { return };
        let mut stack = vec![root.clone()];
        let mut visited = 0;
        while let Some(dir) = stack.pop() {
            visited += 1;
            if visited > CGROUP_SCAN_LIMIT {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            let rel = dir.strip_prefix(root).map(|r| format!("/{}", r.display())).unwrap_or_default();
            self.cgroups.insert(meta.ino(), rel);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }

    pub fn remember(&mut self, cookie: u64, origin: Origin) {
        if cookie == 0 {
            return;
        }
        if self.origins.len() >= ORIGINS {
            let mut seqs: Vec<u64> = self.origins.values().map(|(seq, _)| *seq).collect();
            seqs.sort_unstable();
            let cut = seqs[seqs.len() / 2];
            self.origins.retain(|_, (seq, _)| *seq >= cut);
        }
        self.next_seq += 1;
        self.origins.insert(cookie, (self.next_seq, origin));
    }

    pub fn origin(&self, cookie: u64) -> Option<&Origin> {
        self.origins.get(&cookie).map(|(_, o)| o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_found_by_name_or_id() {
        let mut names = Names::default();
        names.set_services(BTreeMap::from([
            (0, ServiceInfo { name: Some("apiserver".into()), panic: false }),
            (4, ServiceInfo { name: None, panic: true }),
        ]));
        assert_eq!(names.service_id("apiserver"), Some(0));
        assert_eq!(names.service_id("4"), Some(4));
        assert_eq!(names.service_id("konnectivity"), None);
        assert_eq!(names.service_names(), ["apiserver", "4"]);
    }

    #[test]
    fn origins_stay_bounded_and_keep_the_newest() {
        let mut names = Names::default();
        let o = |pid| Origin { pid, comm: "c".into(), cgroup_id: 1, vip: None };
        for cookie in 1..=(ORIGINS as u64 + 10) {
            names.remember(cookie, o(cookie as u32));
        }
        assert!(names.origins.len() <= ORIGINS);
        assert_eq!(names.origin(ORIGINS as u64 + 10).map(|o| o.pid), Some(ORIGINS as u32 + 10));
        assert!(names.origin(1).is_none());
    }

    #[test]
    fn the_own_cgroup_is_found_by_its_id() {
        let mut names = Names::new();
        let Some(root) = names.cgroup_root.clone() else { return };
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        // "0::/some/path" is the cgroup2 line.
        let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else { return };
        let id = std::fs::metadata(root.join(path.trim_start_matches('/'))).unwrap().ino();
        assert_eq!(names.cgroup(id).as_deref(), Some(if path == "/" { "/" } else { path }));
    }
}
