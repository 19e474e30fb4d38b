//! Kernel features nllb uses, the first kernel that has each, and probes of
//! the running machine (what the version alone cannot tell: privileges,
//! mounts, kernel config, a real load and attach).
//!
//! Versions come from the kernel commits named in [`FEATURES`] (checked
//! against the BCC project's "BPF Features by Linux Kernel Version" table,
//! docs/kernel-versions.md, and the commits' merge windows).

use std::{
    fmt,
    fs,
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use serde::Serialize;

/// A kernel release, compared by (major, minor, patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> KernelVersion {
        KernelVersion { major, minor, patch: 0 }
    }

    /// "6.18.0-1-amd64", "5.10.0-28-cloud-amd64", "7.3.0-rc2" ...
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut nums = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
        let major = nums.next()?.parse().ok()?;
        let minor = nums.next()?.parse().ok()?;
        // "7.3-rc2" has no patch level; the rc number must not become one.
        let patch = release
            .split_once(&format!("{major}.{minor}."))
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or(0);
        Some(KernelVersion { major, minor, patch })
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The running kernel's release string (uname -r).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn running_kernel() -> Option<KernelVersion> {
    KernelVersion::parse(&kernel_release())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    CgroupConnect,
    CgroupGetpeername,
    CgroupBpfLink,
    NetnsCookieSockAddr,
    SockOps,
    SockOpsCallbacks,
    RingBuf,
    VmlinuxBtf,
    SockDiagDestroy,
    BpfSockDestroy,
}

/// What happens without a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Need {
    /// The eBPF datapath cannot run without it (Envoy mode instead).
    Required,
    /// The eBPF datapath runs with the named function turned off.
    Degrades,
    /// Not used today; listed so `nllb detect` shows where a node stands.
    Optional,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct FeatureInfo {
    pub feature: Feature,
    pub name: &'static str,
    pub min: KernelVersion,
    pub need: Need,
    /// What nllb uses it for, and what is lost without it.
    pub used_for: &'static str,
    /// Upstream commit that introduced it.
    pub commit: &'static str,
}

/// The table: one row per kernel feature, with the first release that has it.
pub const FEATURES: &[FeatureInfo] = &[
    // d74bad4e74ee "bpf: Hooks for sys_connect" (Andrey Ignatov), merged for
    // 4.17 with the sock_addr program type (4fbac77d2d09, "socket binding"
    // 4.17 in the BCC table).
    FeatureInfo {
        feature: Feature::CgroupConnect,
        name: "cgroup/connect4+6 (sock_addr)",
        min: KernelVersion::new(4, 17),
        need: Need::Required,
        used_for: "rewrites connects to a virtual address onto a controller",
        commit: "d74bad4e74ee",
    },
    // 1b66d253610c "bpf: Add get{peer,sock}name attach types for sock_addr"
    // (Daniel Borkmann, May 2020, merged for 5.8).
    FeatureInfo {
        feature: Feature::CgroupGetpeername,
        name: "cgroup/getpeername4+6",
        min: KernelVersion::new(5, 8),
        need: Need::Degrades,
        used_for: "getpeername() shows the virtual address; without it, the controller's address",
        commit: "1b66d253610c",
    },
    // af6eea57437a "bpf: Implement bpf_link-based cgroup BPF program
    // attachment" (Andrii Nakryiko, March 2020, merged for 5.7). aya uses
    // links from 5.7 on; the agent pins them so attachments survive restarts.
    FeatureInfo {
        feature: Feature::CgroupBpfLink,
        name: "bpf_link for cgroup programs",
        min: KernelVersion::new(5, 7),
        need: Need::Required,
        used_for: "pinned links keep the programs attached across agent restarts and let them coexist with others",
        commit: "af6eea57437a",
    },
    // f318903c0bf4 "bpf: Add netns cookie and enable it for bpf cgroup
    // hooks" (BPF_FUNC_get_netns_cookie: 5.7 in the BCC helper table).
    FeatureInfo {
        feature: Feature::NetnsCookieSockAddr,
        name: "bpf_get_netns_cookie in sock_addr",
        min: KernelVersion::new(5, 7),
        need: Need::Required,
        used_for: "hostNetworkOnly: only sockets of the host network namespace are rewritten",
        commit: "f318903c0bf4",
    },
    // 40304b2a1567 "BPF support for sock_ops" (4.13, BCC table).
    FeatureInfo {
        feature: Feature::SockOps,
        name: "cgroup sock_ops program",
        min: KernelVersion::new(4, 13),
        need: Need::Degrades,
        used_for: "passive ejection of controllers that refuse or time out connects",
        commit: "40304b2a1567",
    },
    // b13d88072172 "bpf: Adding helper function bpf_sock_ops_cb_flags_set"
    // (Lawrence Brakmo, 4.16 in the BCC helper table); the same series
    // added BPF_SOCK_OPS_RTO_CB and BPF_SOCK_OPS_STATE_CB.
    FeatureInfo {
        feature: Feature::SockOpsCallbacks,
        name: "sock_ops state/RTO callbacks",
        min: KernelVersion::new(4, 16),
        need: Need::Degrades,
        used_for: "sees a refused connect (SYN_SENT -> CLOSE) and the first SYN retransmit",
        commit: "b13d88072172",
    },
    // 457f44363a88 "bpf: Implement BPF ring buffer and verifier support for
    // it" (Andrii Nakryiko; BPF_MAP_TYPE_RINGBUF 5.8 in the BCC table).
    // aya-log-ebpf 0.2 declares AYA_LOGS as a ring buffer, so the object
    // does not load without it.
    FeatureInfo {
        feature: Feature::RingBuf,
        name: "BPF ring buffer (aya-log)",
        min: KernelVersion::new(5, 8),
        need: Need::Required,
        used_for: "log records from the eBPF programs; the object declares the map",
        commit: "457f44363a88",
    },
    // 341dfcf8d78e "btf: expose BTF info through sysfs" (/sys/kernel/btf,
    // August 2019, merged for 5.4); needs CONFIG_DEBUG_INFO_BTF, so probed.
    FeatureInfo {
        feature: Feature::VmlinuxBtf,
        name: "kernel BTF (/sys/kernel/btf/vmlinux)",
        min: KernelVersion::new(5, 4),
        need: Need::Optional,
        used_for: "CO-RE relocations; nllb's programs need none today",
        commit: "341dfcf8d78e",
    },
    // c1e64e298b8c "net: diag: Support destroying TCP sockets" (Lorenzo
    // Colitti, 4.5); needs CONFIG_INET_DIAG_DESTROY, so probed.
    FeatureInfo {
        feature: Feature::SockDiagDestroy,
        name: "sock_diag SOCK_DESTROY",
        min: KernelVersion::new(4, 5),
        need: Need::Optional,
        used_for: "closing established connections to a removed controller (ss -K)",
        commit: "c1e64e298b8c",
    },
    // 4ddbcb886268 "bpf: Add bpf_sock_destroy kfunc" (Aditi Ghag, merged
    // for 6.5).
    FeatureInfo {
        feature: Feature::BpfSockDestroy,
        name: "bpf_sock_destroy kfunc",
        min: KernelVersion::new(6, 5),
        need: Need::Optional,
        used_for: "closing sockets from a BPF iterator without CONFIG_INET_DIAG_DESTROY",
        commit: "4ddbcb886268",
    },
];

pub fn feature_info(f: Feature) -> &'static FeatureInfo {
    FEATURES.iter().find(|i| i.feature == f).expect("every feature has a row")
}

/// The oldest kernel the eBPF datapath can run on: the newest `Required` row.
pub fn min_ebpf_kernel() -> KernelVersion {
    FEATURES.iter().filter(|f| f.need == Need::Required).map(|f| f.min).max().expect("required rows")
}

/// Whether the kernel version has the feature (before any probe).
pub fn by_version(f: Feature, v: KernelVersion) -> bool {
    v >= feature_info(f).min
}

/// Features the running kernel lacks by version, with the warning the agent
/// logs for each (the eBPF loader turns those programs off).
pub fn missing_features(v: KernelVersion) -> Vec<&'static FeatureInfo> {
    FEATURES.iter().filter(|f| f.need != Need::Optional && v < f.min).collect()
}

// ---------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------

/// Effective capabilities of this process, from /proc/self/status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Privileges {
    pub euid: u32,
    /// CapEff as hex, e.g. "000001ffffffffff".
    pub cap_eff: String,
    pub cap_sys_admin: bool,
    pub cap_net_admin: bool,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    /// /proc/sys/kernel/unprivileged_bpf_disabled (matters without root).
    pub unprivileged_bpf_disabled: Option<u32>,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

impl Privileges {
    pub fn probe() -> Privileges {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        let bits = u64::from_str_radix(&cap_eff, 16).unwrap_or(0);
        let has = |c: u32| bits & (1u64 << c) != 0;
        Privileges {
            euid: nix::unistd::geteuid().as_raw(),
            cap_sys_admin: has(CAP_SYS_ADMIN),
            cap_net_admin: has(CAP_NET_ADMIN),
            // Before 5.8 there is no CAP_BPF: CAP_SYS_ADMIN covers it.
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_eff,
            unprivileged_bpf_disabled: fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }
    }

    /// Loading and attaching cgroup programs needs CAP_SYS_ADMIN, or
    /// CAP_BPF + CAP_NET_ADMIN (+ CAP_PERFMON for some helpers) from 5.8.
    pub fn can_attach_cgroup_programs(&self) -> bool {
        self.cap_sys_admin || (self.cap_bpf && self.cap_net_admin)
    }
}

/// The `bpf()` syscall works: create (and close) a one-element array map.
pub fn probe_bpf_syscall() -> Result<(), String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate { map_type: BPF_MAP_TYPE_ARRAY, key_size: 4, value_size: 4, max_entries: 1 };
    // SAFETY: bpf(BPF_MAP_CREATE) reads `size` bytes of a valid attr; the
    // kernel zero-fills the rest of its union.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &attr as *const MapCreate, size_of::<MapCreate>() as u32)
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no bpf() syscall (CONFIG_BPF_SYSCALL off)".into(),
            Some(libc::EPERM) => format!("bpf() denied ({e}): run as root or with CAP_BPF/CAP_SYS_ADMIN"),
            _ => format!("bpf(BPF_MAP_CREATE) failed: {e}"),
        });
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

pub fn vmlinux_btf() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

/// `CONFIG_X` from /proc/config.gz is not readable without a gzip crate;
/// /boot/config-<release> is, and Debian ships it. None when unknown.
pub fn kernel_config(option: &str) -> Option<bool> {
    let text = fs::read_to_string(format!("/boot/config-{}", kernel_release())).ok()?;
    Some(text.lines().any(|l| l == format!("{option}=y") || l == format!("{option}=m")))
}

/// One program of the real eBPF object, loaded and attached (or not).
#[derive(Clone, Debug, Serialize)]
pub struct ProgramProbe {
    pub program: &'static str,
    pub attached: bool,
    /// Attached through a bpf_link (what the agent pins).
    pub bpf_link: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AttachProbe {
    /// The temporary cgroup the programs were attached to (removed since).
    pub cgroup: PathBuf,
    /// The whole object failed to load (maps or BTF), before any program.
    pub load_error: Option<String>,
    pub programs: Vec<ProgramProbe>,
    /// Every loaded program came out JIT-compiled (false: some run in the
    /// interpreter); None when none loaded. See [`crate::platform`].
    pub jited: Option<bool>,
}

impl AttachProbe {
    pub fn attached(&self, program: &str) -> bool {
        self.programs.iter().any(|p| p.program == program && p.attached && p.bpf_link)
    }

    /// The agent's requirement: both rewrite hooks, through bpf_links.
    pub fn rewrite_works(&self) -> bool {
        self.load_error.is_none()
            && self.attached(nllb_common::programs::CONNECT4)
            && self.attached(nllb_common::programs::CONNECT6)
    }

    pub fn first_error(&self) -> Option<String> {
        self.load_error.clone().or_else(|| {
            self.programs.iter().find(|p| !p.attached || !p.bpf_link).map(|p| {
                format!("{}: {}", p.program, p.error.clone().unwrap_or_else(|| "attached without a bpf_link".into()))
            })
        })
    }
}

/// A uniquely named child cgroup, removed on drop.
struct ProbeCgroup(PathBuf);

impl ProbeCgroup {
    fn create(parent: &Path) -> io::Result<ProbeCgroup> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let p = parent.join(format!("nllb-probe-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&p)?;
        Ok(ProbeCgroup(p))
    }
}

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        // A cgroup directory is removed with rmdir, never recursively.
        if let Err(e) = fs::remove_dir(&self.0) {
            tracing::warn!(cgroup = %self.0.display(), error = %e, "could not remove the probe cgroup");
        }
    }
}

/// Load the real programs ([`crate::EBPF_OBJECT`]) and attach each to a
/// fresh child of `parent` (a cgroup v2 directory), then detach, unload and
/// remove the child. No process is in the child, so no connect anywhere is
/// affected. Where no child can be made, the probe attaches to `parent`
/// itself for a moment, with empty maps (no connect is rewritten).
pub fn probe_attach(parent: &Path) -> Result<AttachProbe, String> {
    use aya::{
        EbpfLoader,
        programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
    };
    use nllb_common::programs as p;

    if !crate::sys::is_cgroup2_dir(parent) {
        return Err(format!("{} is not a cgroup v2 directory", parent.display()));
    }
    // A read-only view of the cgroup tree (the DaemonSet mounts it so) has
    // no room for a child: probe on the target itself then. The probe's
    // maps are its own and empty, so its programs let every connect proceed.
    let cg = match ProbeCgroup::create(parent) {
        Ok(cg) => Some(cg),
        Err(e) => {
            tracing::debug!(cgroup = %parent.display(), error = %e, "no probe child cgroup; probing on the target");
            None
        }
    };
    let target = cg.as_ref().map(|c| c.0.clone()).unwrap_or_else(|| parent.to_path_buf());
    let mut report = AttachProbe { cgroup: target.clone(), load_error: None, programs: Vec::new(), jited: None };
    crate::sys::raise_memlock();
    let mut ebpf = match EbpfLoader::new().load(crate::EBPF_OBJECT) {
        Ok(e) => e,
        Err(e) => {
            report.load_error = Some(crate::errors::chain(&e));
            return Ok(report);
        }
    };
    let cgroup_fd = fs::File::open(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    // Links live until the end of this function: dropping them detaches.
    let mut links: Vec<FdLink> = Vec::new();
    for name in [p::CONNECT4, p::CONNECT6, p::GETPEERNAME4, p::GETPEERNAME6, p::SOCK_OPS] {
        let Some(prog) = ebpf.program_mut(name) else {
            report.programs.push(ProgramProbe {
                program: name,
                attached: false,
                bpf_link: false,
                error: Some("not in the eBPF object".into()),
            });
            continue;
        };
        let result: Result<Result<FdLink, String>, aya::programs::ProgramError> = if name == p::SOCK_OPS {
            (|| {
                let prog: &mut SockOps = prog.try_into()?;
                prog.load()?;
                let id = prog.attach(&cgroup_fd, CgroupAttachMode::Single)?;
                Ok(FdLink::try_from(prog.take_link(id)?).map_err(|e| e.to_string()))
            })()
        } else {
            (|| {
                let prog: &mut CgroupSockAddr = prog.try_into()?;
                prog.load()?;
                let id = prog.attach(&cgroup_fd, CgroupAttachMode::Single)?;
                Ok(FdLink::try_from(prog.take_link(id)?).map_err(|e| e.to_string()))
            })()
        };
        report.programs.push(match result {
            Ok(Ok(link)) => {
                links.push(link);
                ProgramProbe { program: name, attached: true, bpf_link: true, error: None }
            }
            Ok(Err(e)) => ProgramProbe { program: name, attached: true, bpf_link: false, error: Some(e) },
            Err(e) => ProgramProbe { program: name, attached: false, bpf_link: false, error: Some(crate::errors::chain(&e)) },
        });
    }
    report.jited = crate::platform::programs_jited(&ebpf);
    drop(links);
    drop(ebpf);
    drop(cg);
    Ok(report)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(KernelVersion::parse("6.18.0-1-amd64"), Some(KernelVersion { major: 6, minor: 18, patch: 0 }));
        assert_eq!(KernelVersion::parse("5.10.209-1"), Some(KernelVersion { major: 5, minor: 10, patch: 209 }));
        assert_eq!(KernelVersion::parse("7.3-rc2"), Some(KernelVersion { major: 7, minor: 3, patch: 0 }));
        assert_eq!(KernelVersion::parse("garbage"), None);
    }

    #[test]
    fn table_answers_by_version() {
        let v5_4 = KernelVersion::parse("5.4.0").unwrap();
        let v5_10 = KernelVersion::parse("5.10.0").unwrap();
        assert!(!by_version(Feature::CgroupGetpeername, v5_4));
        assert!(by_version(Feature::CgroupGetpeername, v5_10));
        assert!(!by_version(Feature::BpfSockDestroy, v5_10));
        assert!(by_version(Feature::BpfSockDestroy, KernelVersion::new(6, 12)));
        assert_eq!(min_ebpf_kernel(), KernelVersion::new(5, 8));
        assert!(missing_features(v5_10).is_empty());
        let old: Vec<_> = missing_features(v5_4).iter().map(|f| f.feature).collect();
        assert!(old.contains(&Feature::CgroupBpfLink) && old.contains(&Feature::RingBuf), "{old:?}");
    }
}
