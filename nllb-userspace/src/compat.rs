//! Kernel features nllb uses and the first kernel that has each (this
//! file, the table `nllb detect` and the agent consult), plus probes of the
//! running machine for what the version alone cannot tell:
//!
//! - [`privileges`]: the process's capabilities and whether `bpf()` works;
//! - [`attach_probe`]: the real programs loaded and attached to a
//!   throw-away child cgroup.
//!
//! Versions come from the kernel commits named in [`FEATURES`] (checked
//! against the BCC project's "BPF Features by Linux Kernel Version" table,
//! docs/kernel-versions.md, and the commits' merge windows).

mod attach_probe;
mod privileges;

use std::{fmt, fs, path::Path};

use serde::Serialize;

pub use attach_probe::{AttachProbe, ProgramProbe, probe_attach};
pub use privileges::{Privileges, probe_bpf_syscall};

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
    SkStorage,
    MapInMapGracePeriod,
    SockOpsTimeoutInit,
    SetsockoptSyncnt,
}

/// What happens without a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Need {
    /// The eBPF datapath cannot run without it (Envoy mode instead).
    Required,
    /// The eBPF datapath runs with the named function turned off.
    Degrades,
    /// Read when the kernel has it; nothing nllb does is lost without it.
    UsedIfPresent,
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
    FeatureInfo {
        feature: Feature::RingBuf,
        name: "BPF ring buffer",
        min: KernelVersion::new(5, 8),
        need: Need::Required,
        used_for: "the kernel tells the agent of a passive mark at once (and `nllb trace` every decision); the object declares the rings",
        commit: "457f44363a88",
    },
    // 6ac99e8f23d4 "bpf: Introduce bpf sk local storage" (Martin KaFai Lau,
    // 5.2) made the map; which release first let cgroup/connect4 and
    // sock_ops call bpf_sk_storage_get is not pinned down here, so the row
    // says what the kernel matrix proves: every kernel from 5.10 (the oldest
    // it can fetch) loads the programs. Older kernels fail the load and the
    // agent runs Envoy, as for any refused required program.
    FeatureInfo {
        feature: Feature::SkStorage,
        name: "socket storage (SK_STORAGE) in connect4/6 and sock_ops",
        min: KernelVersion::new(5, 10),
        need: Need::Required,
        used_for: "remembers what nllb did with each steered socket for exactly its lifetime (getpeername, passive \
                   health, socket destroy); sock_diag reports it back",
        commit: "6ac99e8f23d4",
    },
    // 1ae80cf31938 "bpf: wait for running BPF programs when updating
    // map-in-map" (Daniel Colascione, 4.20): a map-of-maps update returns
    // after an RCU grace period. Inner maps are freed after one by
    // themselves only from 6.8 (Hou Tao's "bpf: Defer the free of inner map
    // when necessary"); the agent holds the old table until the update
    // returned, so both are covered.
    FeatureInfo {
        feature: Feature::MapInMapGracePeriod,
        name: "map-of-maps updates wait for a grace period",
        min: KernelVersion::new(4, 20),
        need: Need::Required,
        used_for: "a service's backends are swapped whole: no connect ever reads a half-published or removed set",
        commit: "1ae80cf31938",
    },
    // 8550f328f45d "bpf: Support for per connection SYN/SYN-ACK RTOs"
    // (Lawrence Brakmo, 4.13, with sock_ops itself).
    FeatureInfo {
        feature: Feature::SockOpsTimeoutInit,
        name: "sock_ops TIMEOUT_INIT",
        min: KernelVersion::new(4, 13),
        need: Need::Degrades,
        used_for: "a steered connect's first SYN is retransmitted after a few handshake times, not 1 s",
        commit: "8550f328f45d",
    },
    // The kernel refuses options bpf_setsockopt does not know at run time,
    // not at load time: the datapath counts refusals (`nllb status`,
    // syncnt_refused), so the matrix shows which kernels take it.
    FeatureInfo {
        feature: Feature::SetsockoptSyncnt,
        name: "bpf_setsockopt(TCP_SYNCNT) in sock_ops",
        min: KernelVersion::new(5, 10),
        need: Need::Degrades,
        used_for: "the kernel gives up on a silent controller within a few SYN timeouts by itself, agent or not",
        commit: "run-time check",
    },
    // 341dfcf8d78e "btf: expose BTF info through sysfs" (/sys/kernel/btf,
    // August 2019, merged for 5.4); needs CONFIG_DEBUG_INFO_BTF, so probed.
    FeatureInfo {
        feature: Feature::VmlinuxBtf,
        name: "kernel BTF (/sys/kernel/btf/vmlinux)",
        min: KernelVersion::new(5, 4),
        need: Need::UsedIfPresent,
        used_for: "aya reads it when loading, for CO-RE relocations; nllb's programs need none, so they load without it",
        commit: "341dfcf8d78e",
    },
    // c1e64e298b8c "net: diag: Support destroying TCP sockets" (Lorenzo
    // Colitti, 4.5); needs CONFIG_INET_DIAG_DESTROY, so probed.
    FeatureInfo {
        feature: Feature::SockDiagDestroy,
        name: "sock_diag SOCK_DESTROY",
        min: KernelVersion::new(4, 5),
        need: Need::Degrades,
        used_for: "closes nllb's established connections to a removed or ejected controller \
                   (health.destroyOnRemove/destroyOnEject, like ss -K); without it they last until the peer closes them",
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
    FEATURES.iter().filter(|f| matches!(f.need, Need::Required | Need::Degrades) && v < f.min).collect()
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
        assert_eq!(min_ebpf_kernel(), KernelVersion::new(5, 10), "socket storage in connect4 and sock_ops");
        assert!(missing_features(v5_10).is_empty());
        let old: Vec<_> = missing_features(v5_4).iter().map(|f| f.feature).collect();
        assert!(old.contains(&Feature::CgroupBpfLink) && old.contains(&Feature::RingBuf), "{old:?}");
    }
}
