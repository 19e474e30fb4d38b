//! What this process may do: its effective capabilities, and whether the
//! `bpf()` syscall works at all.

use serde::Serialize;

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
        let bits = procfs::process::Process::myself().and_then(|p| p.status()).map(|s| s.capeff).unwrap_or(0);
        let has = |c: u32| bits & (1u64 << c) != 0;
        Privileges {
            euid: nix::unistd::geteuid().as_raw(),
            cap_sys_admin: has(CAP_SYS_ADMIN),
            cap_net_admin: has(CAP_NET_ADMIN),
            // Before 5.8 there is no CAP_BPF: CAP_SYS_ADMIN covers it.
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_eff: format!("{bits:016x}"),
            unprivileged_bpf_disabled: std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
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

/// The `bpf()` syscall works: aya's probe creates (and closes) an array map.
pub fn probe_bpf_syscall() -> Result<(), String> {
    match aya::sys::is_map_supported(aya::maps::MapType::Array) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the kernel refused an array map (bpf() is restricted)".into()),
        Err(e) => Err(match e.io_error.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no bpf() syscall (CONFIG_BPF_SYSCALL off)".into(),
            Some(libc::EPERM) => {
                format!("bpf() denied ({}): run as root or with CAP_BPF/CAP_SYS_ADMIN", e.io_error)
            }
            _ => format!("bpf(BPF_MAP_CREATE) failed: {}", e.io_error),
        }),
    }
}
