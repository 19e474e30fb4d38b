//! The map contract between the eBPF programs and the agent.
//!
//! Every map's name, key and value layout lives here and nowhere else. All
//! value types are `#[repr(C)]` with explicit padding fields so the layout is
//! the same on both sides and `bpftool map dump` (BTF) shows named fields.
//! Addresses and ports are stored in network byte order, exactly as the
//! kernel hands them to `cgroup/connect4|6` programs, so the hot path never
//! converts.
#![no_std]

pub mod layout;

/// Bumped whenever a map's layout changes; the agent refuses to adopt pins
/// from a different layout.
pub const LAYOUT_VERSION: u32 = 1;

pub const MAX_SERVICES: u32 = 32;
/// Backends one service can publish per address family.
pub const MAX_BACKENDS: u32 = 16;
/// Slots tried after the random pick when the picked backend is passively
/// ejected. Constant so the verifier sees a bounded, unrolled loop and every
/// connect costs the same; 4 covers every backend of a typical 3-controller
/// control plane.
pub const MAX_PICK_ATTEMPTS: u32 = 4;
/// Per-(service, backend) connect counters.
pub const MAX_STATS: u32 = MAX_SERVICES * MAX_BACKENDS * 2;
/// Rewritten sockets remembered for getpeername (LRU).
pub const MAX_SOCKETS: u32 = 65536;
pub const MAX_VIPS: u32 = 128;

pub const FAMILY_V4: u16 = 2; // AF_INET
pub const FAMILY_V6: u16 = 10; // AF_INET6

/// Index of a service's backend table for one family.
pub const FAM_IDX_V4: u32 = 0;
pub const FAM_IDX_V6: u32 = 1;

pub mod maps {
    //! Map names: the eBPF side declares them with these names, the agent
    //! pins them under `<pin-path>/<name>` and `nllb status` reads them.
    pub const VIPS4: &str = "NLLB_VIPS4";
    pub const VIPS6: &str = "NLLB_VIPS6";
    pub const SERVICES: &str = "NLLB_SERVICES";
    pub const BACKENDS: &str = "NLLB_BACKENDS";
    pub const CONNECT_STATS: &str = "NLLB_CONNECT_STATS";
    pub const NO_BACKEND_STATS: &str = "NLLB_NOBACKEND";
    pub const SOCKETS: &str = "NLLB_SOCKETS";
    pub const PASSIVE: &str = "NLLB_PASSIVE";
    pub const CONFIG: &str = "NLLB_CONFIG";
    pub const ALL: [&str; 9] = [
        VIPS4,
        VIPS6,
        SERVICES,
        BACKENDS,
        CONNECT_STATS,
        NO_BACKEND_STATS,
        SOCKETS,
        PASSIVE,
        CONFIG,
    ];
}

pub mod programs {
    pub const CONNECT4: &str = "nllb_connect4";
    pub const CONNECT6: &str = "nllb_connect6";
    pub const GETPEERNAME4: &str = "nllb_getpeername4";
    pub const GETPEERNAME6: &str = "nllb_getpeername6";
    pub const SOCK_OPS: &str = "nllb_sock_ops";
}

/// Key of `NLLB_VIPS4`: an IPv4 virtual address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Vip4Key {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Key of `NLLB_VIPS6`: an IPv6 virtual address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Vip6Key {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of both VIP maps: which service a virtual address belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipValue {
    pub svc_id: u32,
}

/// Key of `NLLB_SERVICES`: `svc_id * 2 + family index`.
pub const fn service_key(svc_id: u32, fam_idx: u32) -> u32 {
    svc_id * 2 + fam_idx
}

pub const SERVICE_FLAG_PANIC: u32 = 1;

/// Value of `NLLB_SERVICES`: which of the two banks of backend slots is live
/// and how many slots it holds.
///
/// The agent never edits a live bank. It fills the other bank, then replaces
/// this value in one hash-map update (the kernel swaps the element pointer
/// under RCU, so a reader sees the old value or the new one, never a mix).
/// See `nllb-userspace/src/datapath/backend_table.rs` for the full scheme.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceState {
    pub bank: u32,
    pub count: u32,
    pub flags: u32,
    pub generation: u32,
}

/// Index into `NLLB_BACKENDS` (an array).
pub const fn backend_index(svc_id: u32, fam_idx: u32, bank: u32, slot: u32) -> u32 {
    ((service_key(svc_id, fam_idx) * 2 + bank) * MAX_BACKENDS) + slot
}
pub const BACKEND_SLOTS: u32 = MAX_SERVICES * 2 * 2 * MAX_BACKENDS;

/// One backend slot: where a connect is sent, and which counter it bumps.
/// For IPv4 only `addr[0]` is used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendSlot {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub stat_id: u32,
}

/// Value of `NLLB_SOCKETS` (keyed by socket cookie): the virtual address a
/// rewritten socket dialed, for getpeername and for socket destroy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub svc_id: u32,
}

/// Key of `NLLB_PASSIVE`: a backend as seen by sock_ops (remote address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// Value of `NLLB_PASSIVE`. The agent inserts a zeroed entry for every
/// published backend (so sock_ops only watches our backends); sock_ops sets
/// `failed_ns` when a connect to it is refused or its SYN times out.
/// connect4/6 skip a backend whose `failed_ns` is within the hold time;
/// the agent clears it once probes confirm the backend is back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PassiveMark {
    pub failed_ns: u64,
    pub failures: u32,
    pub _pad: u32,
}

pub const CONFIG_FLAG_ALL_NETNS: u32 = 1;
pub const CONFIG_FLAG_PASSIVE: u32 = 2;
pub const CONFIG_FLAG_SET_RETVAL: u32 = 4;

/// Single entry of `NLLB_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// Network namespace cookie whose sockets are rewritten when
    /// `CONFIG_FLAG_ALL_NETNS` is off; 0 means the initial namespace.
    pub host_netns_cookie: u64,
    pub flags: u32,
    /// How long a passive mark ejects a backend without the agent's word.
    pub eject_hold_ms: u32,
    pub layout_version: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no pointers, so every bit pattern is valid.
    unsafe impl aya::Pod for Vip4Key {}
    unsafe impl aya::Pod for Vip6Key {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for ServiceState {}
    unsafe impl aya::Pod for BackendSlot {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for PassiveMark {}
    unsafe impl aya::Pod for DatapathConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Vip4Key>(), 8);
        assert_eq!(size_of::<Vip6Key>(), 20);
        assert_eq!(size_of::<ServiceState>(), 16);
        assert_eq!(size_of::<BackendSlot>(), 24);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<BackendKey>(), 20);
        assert_eq!(size_of::<PassiveMark>(), 16);
        assert_eq!(size_of::<DatapathConfig>(), 24);
    }

    #[test]
    fn backend_indices_do_not_overlap() {
        let last = backend_index(MAX_SERVICES - 1, FAM_IDX_V6, 1, MAX_BACKENDS - 1);
        assert_eq!(last, BACKEND_SLOTS - 1);
        assert_eq!(backend_index(0, 0, 1, 0), MAX_BACKENDS);
        assert_eq!(backend_index(0, 1, 0, 0), 2 * MAX_BACKENDS);
        assert_eq!(backend_index(1, 0, 0, 0), 4 * MAX_BACKENDS);
    }
}
