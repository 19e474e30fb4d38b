//! The in-kernel datapath: loads the programs, pins maps and links under
//! the pin path, attaches to the target cgroup, and publishes plans.

use std::{
    fs,
    os::fd::AsFd as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use std::sync::Arc;

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};
use nllb_common::{CONFIG_FLAG_ALL_NETNS, CONFIG_FLAG_PASSIVE, DatapathConfig, maps, programs};

use super::{
    BackendCounters, Datapath, DatapathError, DatapathKind, DatapathSnapshot, KernelCounters, MarkSnapshot,
    ServiceSnapshot, bpf_sys,
    events::{EventReader, cause_name},
    kernel::KernelMaps,
    pins::{self, PinnedMaps},
    reaper::Reaper,
    tables::Tables,
};
use crate::{model::Plan, sys};

#[derive(Clone, Debug)]
pub struct EbpfOptions {
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub host_network_only: bool,
    pub passive: bool,
    pub eject_hold: Duration,
    /// `TCP_SYNCNT` for steered sockets; 0 keeps the system's.
    pub syn_retries: u32,
}

/// Programs in attach order, the rewrite hooks last: everything that reads
/// what connect4/6 remember is in place before anything is steered. The
/// rewrite hooks are required; without the others the datapath still steers
/// (with a warning).
pub const PROGRAMS: [(&str, bool); 5] = [
    (programs::SOCK_OPS, false),
    (programs::GETPEERNAME4, false),
    (programs::GETPEERNAME6, false),
    (programs::CONNECT4, true),
    (programs::CONNECT6, true),
];

pub struct EbpfDatapath {
    ebpf: Ebpf,
    kernel: KernelMaps,
    tables: Tables,
    opts: EbpfOptions,
    /// Names of optional programs the kernel refused.
    pub missing: Vec<&'static str>,
    created_pin_dir: bool,
    reaper: Arc<Reaper>,
}

fn link_pin(pin_path: &Path, prog: &str) -> PathBuf {
    pin_path.join(format!("link_{prog}"))
}

impl EbpfDatapath {
    /// Load, publish `plan`, then attach: no connect ever sees the programs
    /// before the maps are filled. A datapath an earlier agent left pinned is
    /// taken over without a moment when the hooks run no program: same map
    /// layout, its maps are adopted as they are; another layout, new maps are
    /// filled beside them; either way the running links are switched to the
    /// new programs with BPF_LINK_UPDATE.
    pub fn install(opts: EbpfOptions, plan: &Plan) -> Result<EbpfDatapath, DatapathError> {
        if !sys::is_cgroup2_dir(&opts.cgroup) {
            return Err(DatapathError::Cgroup {
                path: opts.cgroup.display().to_string(),
                source: std::io::Error::other("not a directory on a cgroup2 filesystem"),
            });
        }
        sys::raise_memlock();
        sys::ensure_bpffs(&opts.pin_path)?;
        let created_pin_dir = !opts.pin_path.exists();
        fs::create_dir_all(&opts.pin_path)?;
        // Whoever can write the backend map can redirect the node's API
        // traffic: root only.
        fs::set_permissions(&opts.pin_path, fs::Permissions::from_mode(0o700))?;

        let pinned = pins::inspect(&opts.pin_path);
        match &pinned {
            PinnedMaps::Absent => {}
            PinnedMaps::Compatible => {
                tracing::info!(pin_path = %opts.pin_path.display(), "adopting the pinned datapath")
            }
            PinnedMaps::Incompatible(why) => {
                tracing::warn!(pin_path = %opts.pin_path.display(), reason = %why, "replacing a pinned datapath of another layout")
            }
        }
        let result = Self::load_and_attach(opts.clone(), plan, &pinned, created_pin_dir);
        if result.is_err() && created_pin_dir {
            let _ = remove_pins(&opts.pin_path);
        }
        if result.is_ok() {
            restrict_pins(&opts.pin_path)?;
        }
        result.map_err(explain_permission)
    }

    fn load_and_attach(
        opts: EbpfOptions,
        plan: &Plan,
        pinned: &PinnedMaps,
        created_pin_dir: bool,
    ) -> Result<EbpfDatapath, DatapathError> {
        let replacing = matches!(pinned, PinnedMaps::Incompatible(_));
        let mut loader = EbpfLoader::new();
        if !replacing {
            for name in maps::ALL {
                loader.map_pin_path(name, opts.pin_path.join(name));
            }
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT).map_err(DatapathError::Load)?;
        if replacing {
            // Pinned beside the old maps now, renamed over them once the
            // programs that use them are live.
            for name in maps::ALL {
                let map =
                    ebpf.map(name).ok_or_else(|| DatapathError::Other(format!("eBPF object has no map {name}")))?;
                let staged = staged_pin(&opts.pin_path, name);
                let _ = fs::remove_file(&staged);
                map.pin(&staged).map_err(|source| DatapathError::Pin { path: staged.display().to_string(), source })?;
            }
        }
        let mut kernel = KernelMaps::take(&mut ebpf, &opts.pin_path)?;
        let config = DatapathConfig {
            host_netns_cookie: sys::netns_cookie().unwrap_or(0),
            flags: if opts.host_network_only { 0 } else { CONFIG_FLAG_ALL_NETNS }
                | if opts.passive { CONFIG_FLAG_PASSIVE } else { 0 },
            eject_hold_ms: opts.eject_hold.as_millis().min(u128::from(u32::MAX)) as u32,
            layout_version: pins::layout_version(),
            syn_retries: opts.syn_retries,
            hz: sys::kernel_hz(),
            _pad: 0,
        };
        kernel.set_config(config)?;
        let mut tables =
            if *pinned == PinnedMaps::Compatible { Tables::recover(&kernel, plan) } else { Tables::default() };
        tables.apply(&mut kernel, plan)?;
        let reaper = Arc::new(Reaper::new(kernel.sockets_handle()?));

        let cgroup = fs::File::open(&opts.cgroup)
            .map_err(|source| DatapathError::Cgroup { path: opts.cgroup.display().to_string(), source })?;
        let cgroup_id = bpf_sys::cgroup_id(&opts.cgroup)?;
        let mut missing = Vec::new();
        for (name, required) in PROGRAMS {
            let pin = link_pin(&opts.pin_path, name);
            match install_program(&mut ebpf, name, &cgroup, cgroup_id, &pin) {
                Ok(how) => {
                    tracing::debug!(program = name, how, "program installed");
                }
                Err(e) if !required => {
                    tracing::warn!(program = name, error = %e, "kernel refused an optional program; continuing without it");
                    let _ = fs::remove_file(&pin);
                    missing.push(name);
                }
                Err(e) => return Err(e),
            }
        }
        if replacing {
            for name in maps::ALL {
                fs::rename(staged_pin(&opts.pin_path, name), opts.pin_path.join(name))?;
            }
        }
        detach_retired_links(&opts.pin_path);
        tracing::info!(
            cgroup = %opts.cgroup.display(),
            pin_path = %opts.pin_path.display(),
            "eBPF datapath attached"
        );
        Ok(EbpfDatapath { ebpf, kernel, tables, opts, missing, created_pin_dir, reaper })
    }
}

/// Links an earlier build pinned for a program this build no longer has
/// (layout 2's `nllb_sock_release`): they would keep running the old
/// program on the old maps. Detached once the new programs are live.
fn detach_retired_links(pin_path: &Path) {
    let Ok(entries) = fs::read_dir(pin_path) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(program) = name.strip_prefix("link_") else { continue };
        if PROGRAMS.iter().any(|(p, _)| *p == program) {
            continue;
        }
        if let Ok(link) = bpf_sys::obj_get(&entry.path()) {
            let _ = bpf_sys::link_detach(link.as_fd());
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => tracing::info!(link = %name, "detached the link of a program this build no longer has"),
            Err(e) => tracing::warn!(link = %name, error = %e, "cannot remove a retired link pin"),
        }
    }
}

/// Pins (maps and links) are root-only, also ones an earlier agent or an
/// operator left with looser modes.
fn restrict_pins(pin_path: &Path) -> Result<(), DatapathError> {
    for entry in fs::read_dir(pin_path)?.flatten() {
        if entry.file_type()?.is_dir() {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o700))?;
            restrict_pins(&entry.path())?;
        } else {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// EPERM from the bpf syscall means a missing capability (or, before 5.11,
/// a memlock limit): say which ones the agent needs.
fn explain_permission(e: DatapathError) -> DatapathError {
    let text = crate::errors::chain(&e);
    if text.contains("Operation not permitted") || text.contains("Permission denied") {
        DatapathError::Other(format!(
            "{text}; the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (plus CAP_SYS_RESOURCE before Linux 5.11), see docs/deploy.md"
        ))
    } else {
        e
    }
}

fn staged_pin(pin_path: &Path, name: &str) -> PathBuf {
    pin_path.join(format!("staged_{name}"))
}

/// Make `name` run on the cgroup behind the link pinned at `pin`: switch an
/// existing link on that cgroup to the new program in place, or attach a
/// new link and pin it (replacing a link on another cgroup).
fn install_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    cgroup_id: u64,
    pin: &Path,
) -> Result<&'static str, DatapathError> {
    load(ebpf, name)?;
    if let Ok(link) = bpf_sys::obj_get(pin)
        && bpf_sys::link_cgroup_id(link.as_fd()).ok() == Some(cgroup_id)
    {
        let prog_fd = program_fd(ebpf, name)?;
        match bpf_sys::link_update(link.as_fd(), prog_fd) {
            Ok(()) => return Ok("link updated in place"),
            Err(e) => {
                tracing::warn!(program = name, error = %e, "link update failed; attaching a new link")
            }
        }
    }
    // A new link runs beside the old one until the old pin is replaced;
    // both rewrite identically and a rewritten connect is no longer to a
    // virtual address, so the overlap is harmless.
    let link = attach(ebpf, name, cgroup)?;
    // bpffs does not allow dots in names.
    let staged = pin.with_file_name(format!("staged_{name}"));
    let _ = fs::remove_file(&staged);
    link.pin(&staged).map_err(|source| DatapathError::Pin { path: staged.display().to_string(), source })?;
    fs::rename(&staged, pin)?;
    Ok("attached")
}

/// Loads `name` and attaches it to `cgroup` through a bpf_link (what the
/// agent pins, and what `nllb detect` probes with).
pub(crate) fn load_and_attach(ebpf: &mut Ebpf, name: &'static str, cgroup: &fs::File) -> Result<FdLink, DatapathError> {
    load(ebpf, name)?;
    attach(ebpf, name, cgroup)
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or_else(|| DatapathError::Other(format!("eBPF object has no program {name}")))
}

fn load(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DatapathError> {
    let perr = |source| DatapathError::Program { name, source };
    let prog = program_mut(ebpf, name)?;
    if name == programs::SOCK_OPS {
        let p: &mut SockOps = prog.try_into().map_err(perr)?;
        p.load().map_err(perr)
    } else {
        let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
        p.load().map_err(perr)
    }
}

fn program_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<std::os::fd::BorrowedFd<'a>, DatapathError> {
    let perr = |source| DatapathError::Program { name, source };
    let prog = ebpf.program(name).ok_or_else(|| DatapathError::Other(format!("eBPF object has no program {name}")))?;
    Ok(prog.fd().map_err(perr)?.as_fd())
}

// bpf_link-based cgroup attachments always coexist with other programs
// (the kernel rejects any attach flag on them), so `Single` here still lets
// other agents' programs run in the same cgroup.
fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup: &fs::File) -> Result<FdLink, DatapathError> {
    let perr = |source| DatapathError::Program { name, source };
    let prog = program_mut(ebpf, name)?;
    if name == programs::SOCK_OPS {
        let p: &mut SockOps = prog.try_into().map_err(perr)?;
        let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(perr)?;
        let link = p.take_link(id).map_err(perr)?;
        FdLink::try_from(link).map_err(|e| DatapathError::Other(format!("{name}: no bpf_link: {e}")))
    } else {
        let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
        let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(perr)?;
        let link = p.take_link(id).map_err(perr)?;
        FdLink::try_from(link).map_err(|e| DatapathError::Other(format!("{name}: no bpf_link: {e}")))
    }
}

/// Detach every pinned link and remove every pin under `pin_path`.
/// Removing the last reference to a bpf_link detaches its program.
pub fn remove_pins(pin_path: &Path) -> Result<usize, DatapathError> {
    let mut removed = 0;
    let Ok(entries) = fs::read_dir(pin_path) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == super::kernel::TABLES_DIR {
            for table in fs::read_dir(entry.path())?.flatten() {
                fs::remove_file(table.path())?;
                removed += 1;
            }
            fs::remove_dir(entry.path())?;
            continue;
        }
        let ours = name.starts_with("link_") || name.starts_with("staged_") || maps::ALL.contains(&name.as_str());
        if ours {
            if name.starts_with("link_")
                && let Ok(link) = bpf_sys::obj_get(&entry.path())
                && let Err(e) = bpf_sys::link_detach(link.as_fd())
            {
                tracing::debug!(link = %name, error = %e, "explicit detach failed; unpinning detaches it");
            }
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    match fs::remove_dir(pin_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %pin_path.display(), error = %e, "pin directory not removed (not empty?)");
        }
    }
    Ok(removed)
}

impl Datapath for EbpfDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Ebpf
    }

    fn apply(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        self.tables.apply(&mut self.kernel, plan)
    }

    fn snapshot(&self) -> DatapathSnapshot {
        let ids = self.tables.ids();
        let services = self
            .tables
            .stat_ids()
            .into_iter()
            .map(|(name, stats)| {
                let id = ids.get(&name).copied();
                let counters = id.map(|i| self.kernel.service_counters(i)).unwrap_or_default();
                ServiceSnapshot {
                    id,
                    backends: stats
                        .into_iter()
                        .map(|(addr, stat_id)| {
                            let c = self.kernel.backend_counters(stat_id);
                            (
                                addr,
                                BackendCounters {
                                    connects: c.connects,
                                    refused: c.refused,
                                    syn_timeouts: c.syn_timeouts,
                                },
                            )
                        })
                        .collect(),
                    no_backend: counters.no_backend,
                    all_marked: counters.all_marked,
                    name,
                }
            })
            .collect();
        let marks = self
            .kernel
            .marks()
            .into_iter()
            .map(|(backend, m)| MarkSnapshot {
                backend,
                failed_ns: m.failed_ns,
                recovered_ns: m.recovered_ns,
                cause: cause_name(m.cause),
            })
            .collect();
        let c = self.kernel.datapath_counters();
        DatapathSnapshot {
            services,
            marks,
            kernel: Some(KernelCounters {
                sockets_full: c.sockets_full,
                events_lost: c.events_lost,
                marks_full: c.marks_full,
                syncnt_refused: c.syncnt_refused,
                missing_programs: self.missing.clone(),
            }),
            envoy: None,
            aside: None,
        }
    }

    fn take_events(&mut self) -> Option<EventReader> {
        let map = self.ebpf.take_map(maps::EVENTS)?;
        match EventReader::new(map, maps::EVENTS) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the kernel's event ring; passive marks reach the agent only through probes");
                None
            }
        }
    }

    fn reaper(&self) -> Option<Arc<Reaper>> {
        Some(self.reaper.clone())
    }

    fn shutdown(&mut self) -> Result<(), DatapathError> {
        let removed = remove_pins(&self.opts.pin_path)?;
        tracing::info!(pins = removed, created_dir = self.created_pin_dir, "eBPF datapath detached and unpinned");
        Ok(())
    }
}
