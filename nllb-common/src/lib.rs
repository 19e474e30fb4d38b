//! The map contract between the eBPF programs and the agent.
//!
//! Every map's name, key and value layout lives here and nowhere else. All
//! value types are `#[repr(C)]` with explicit padding fields so the layout is
//! the same on both sides, on 32- and 64-bit CPUs, and `bpftool map dump`
//! (BTF) shows named fields. Addresses and ports are stored in network byte
//! order, exactly as the kernel hands them to `cgroup/connect4|6` programs, so
//! the hot path never converts.
//!
//! Who writes what (one writer per element, so no update is ever lost):
//! - the agent writes the virtual-address maps, the service tables inside
//!   them and `NLLB_CONFIG`;
//! - the programs write `NLLB_MARKS`, `NLLB_MARK_CLOCK`, `NLLB_SOCKETS`, the counters and the
//!   event rings; the agent only deletes marks of backends it no longer
//!   publishes;
//! - `nllb trace` readers write `NLLB_TRACE_CTL`.
#![no_std]

pub mod events;
pub mod layout;

pub use events::{Event, EventKind, MarkCause};

/// Bumped whenever a map's layout changes; the agent refuses to adopt pins
/// from a different layout and swaps the programs over instead.
pub const LAYOUT_VERSION: u32 = 4;

/// Services the agent can publish.
pub const MAX_SERVICES: u32 = 256;
/// Backend slots a service table holds per address family. A backend may
/// fill several slots: that is how a weighted pick is published.
pub const MAX_BACKENDS: u32 = 64;
/// Per-(service, backend) counter slots, a pool shared by all services
/// (per CPU: 4096 × 32 bytes).
pub const MAX_STATS: u32 = 4096;
pub const MAX_VIPS: u32 = 1024;
/// Backends the kernel can hold a passive mark for.
pub const MAX_MARKS: u32 = MAX_STATS;
/// Bytes of each event ring (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 64 * 1024;
pub const TRACE_RING_BYTES: u32 = 1024 * 1024;

pub const FAMILY_V4: u16 = 2; // AF_INET
pub const FAMILY_V6: u16 = 10; // AF_INET6

pub mod maps {
    //! Map names: the eBPF side declares them with these names, the agent
    //! pins them under `<pin-path>/<name>` and `nllb status` reads them.
    pub const VIPS4: &str = "NLLB_VIPS4";
    pub const VIPS6: &str = "NLLB_VIPS6";
    /// Never read by a program: its BTF type ids let the agent create the
    /// per-publish service tables with field names for bpftool.
    pub const TABLE_PROTO: &str = "NLLB_TABLE_PROTO";
    pub const MARKS: &str = "NLLB_MARKS";
    pub const MARK_CLOCK: &str = "NLLB_MARK_CLOCK";
    pub const SOCKETS: &str = "NLLB_SOCKETS";
    pub const BACKEND_STATS: &str = "NLLB_BACKEND_STATS";
    pub const SERVICE_STATS: &str = "NLLB_SERVICE_STATS";
    pub const DATAPATH_STATS: &str = "NLLB_DATAPATH_STATS";
    pub const CONFIG: &str = "NLLB_CONFIG";
    pub const EVENTS: &str = "NLLB_EVENTS";
    pub const TRACE_CTL: &str = "NLLB_TRACE_CTL";
    pub const TRACE_EVENTS: &str = "NLLB_TRACE_EVENTS";
    pub const ALL: [&str; 13] = [
        VIPS4,
        VIPS6,
        TABLE_PROTO,
        MARKS,
        MARK_CLOCK,
        SOCKETS,
        BACKEND_STATS,
        SERVICE_STATS,
        DATAPATH_STATS,
        CONFIG,
        EVENTS,
        TRACE_CTL,
        TRACE_EVENTS,
    ];
}

pub mod programs {
    pub const CONNECT4: &str = "nllb_connect4";
    pub const CONNECT6: &str = "nllb_connect6";
    pub const GETPEERNAME4: &str = "nllb_getpeername4";
    pub const GETPEERNAME6: &str = "nllb_getpeername6";
    pub const SOCK_OPS: &str = "nllb_sock_ops";
    /// Empty programs at the same hooks: the benchmark's floor.
    pub const FLOOR_CONNECT4: &str = "nllb_floor_connect4";
    pub const FLOOR_SOCK_OPS: &str = "nllb_floor_sock_ops";
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

/// `ServiceTable.flags`: every backend is published because none is
/// healthy (panic mode).
pub const TABLE_FLAG_PANIC: u32 = 1;

/// One backend slot of a service table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendSlot {
    /// For IPv4 only `addr[0]` is used.
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    /// Index into `NLLB_BACKEND_STATS`.
    pub stat_id: u32,
    /// Retransmission timeout for the first SYN of a connect steered here;
    /// 0 leaves the kernel's default.
    pub syn_rto_ms: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns at which the agent last cleared this backend's
    /// passive mark (probes say it is back); marks older than this are void.
    pub cleared_ns: u64,
}

/// The whole state of one service, the value of the one-element array that
/// each virtual address maps to in `NLLB_VIPS4/6`.
///
/// Immutable once linked: the agent creates a new table for every publish and
/// swaps it in. A connect that looked the old one up keeps reading a complete,
/// unchanging table until it returns; the kernel frees a table only after an
/// RCU grace period (see `nllb-userspace/src/datapath/tables.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceTable {
    pub svc_id: u32,
    pub flags: u32,
    pub count4: u32,
    pub count6: u32,
    pub backends4: [BackendSlot; MAX_BACKENDS as usize],
    pub backends6: [BackendSlot; MAX_BACKENDS as usize],
}

impl Default for ServiceTable {
    fn default() -> Self {
        ServiceTable {
            svc_id: 0,
            flags: 0,
            count4: 0,
            count6: 0,
            backends4: [BackendSlot::default(); MAX_BACKENDS as usize],
            backends6: [BackendSlot::default(); MAX_BACKENDS as usize],
        }
    }
}

/// Key of `NLLB_MARKS`: a backend as a socket sees it (remote address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// Value of `NLLB_MARKS`, written only by the programs, always as a whole
/// element (so concurrent writers never tear it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PassiveMark {
    /// CLOCK_MONOTONIC ns of the last failure of a steered connect.
    pub failed_ns: u64,
    /// CLOCK_MONOTONIC ns of the last steered connect that was established.
    pub recovered_ns: u64,
    /// `MarkCause` of the last failure.
    pub cause: u32,
    pub _pad: u32,
}

/// Single entry of `NLLB_MARK_CLOCK`: when the newest passive mark was set.
/// A connect reads it before any `NLLB_MARKS` lookup: while no mark was set
/// within the eject hold, none can be in force, and the lookups (a call and
/// a hash of the backend per slot tried) are skipped. Written only by the
/// programs, as a plain store of the time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MarkClock {
    /// CLOCK_MONOTONIC ns; 0: no mark since the maps were created.
    pub newest_ns: u64,
}

/// Value of `NLLB_SOCKETS` (socket-local storage, `BPF_MAP_TYPE_SK_STORAGE`:
/// the key is the socket itself): what nllb did with one live socket.
/// Written by connect4/6, freed by the kernel with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    /// The socket's cookie, for events and `nllb trace`: 0 as the programs
    /// write it (a helper call per connect saved); the agent's reaper fills
    /// it in from sock_diag, which reports every socket's cookie.
    pub cookie: u64,
    /// CLOCK_MONOTONIC ns of the connect.
    pub created_ns: u64,
    /// The virtual address dialed (v4 in `vip[0]`), as the application
    /// passed it (an IPv4-mapped IPv6 address stays mapped).
    pub vip: [u32; 4],
    /// The backend the connect was sent to, as the socket sees it.
    pub backend: [u32; 4],
    pub vip_port: u16,
    pub backend_port: u16,
    /// Family of the socket (`vip` and `backend` are in this family).
    pub family: u16,
    pub _pad: u16,
    pub svc_id: u32,
    pub stat_id: u32,
    /// The SYN retransmission timeout given to this socket, in jiffies
    /// (0: the kernel's default); TIMEOUT_INIT must answer the same every
    /// time it is asked for one connection.
    pub syn_rto_jiffies: u32,
    pub _pad2: u32,
}

/// Per-CPU counters of one (service, backend) pair, `NLLB_BACKEND_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendCounters {
    pub connects: u64,
    /// Steered connects refused (RST), given up or aborted in SYN_SENT.
    pub refused: u64,
    /// Steered connects whose SYN had to be retransmitted.
    pub syn_timeouts: u64,
    /// Steered connects established.
    pub established: u64,
}

/// Per-CPU counters of one service, `NLLB_SERVICE_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Connects refused because the service had no backend.
    pub no_backend: u64,
    /// Connects that found every tried backend marked and took the one
    /// whose mark is oldest.
    pub all_marked: u64,
}

/// Per-CPU counters of the whole datapath, `NLLB_DATAPATH_STATS[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathCounters {
    /// Steered connects not remembered: the kernel could not allocate the
    /// socket's storage in `NLLB_SOCKETS` (memory pressure).
    pub sockets_full: u64,
    /// Events dropped because a ring was full.
    pub events_lost: u64,
    /// Marks not recorded because `NLLB_MARKS` was full.
    pub marks_full: u64,
    /// Steered connects whose SYN timed out and whose `TCP_SYNCNT` the kernel
    /// then refused from BPF: their SYN retries are the system's.
    pub syncnt_refused: u64,
}

pub const CONFIG_FLAG_ALL_NETNS: u32 = 1;
pub const CONFIG_FLAG_PASSIVE: u32 = 2;

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
    /// `TCP_SYNCNT` for steered sockets (0 leaves the system's
    /// `tcp_syn_retries`): with a short first RTO the kernel gives up on a
    /// silent backend by itself within a few RTOs, agent or not.
    pub syn_retries: u32,
    /// The kernel's CONFIG_HZ, to turn `syn_rto_ms` into jiffies.
    pub hz: u32,
    pub _pad: u32,
}

impl DatapathConfig {
    /// `eject_hold_ms` on the `bpf_ktime_get_ns` scale.
    #[inline(always)]
    pub fn eject_hold_ns(&self) -> u64 {
        u64::from(self.eject_hold_ms) * 1_000_000
    }
}

/// Single entry of `NLLB_TRACE_CTL`: trace events are emitted while
/// `bpf_ktime_get_ns() < until_ns`. A reader refreshes it every second, so a
/// reader that dies stops the events within a few seconds by itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceControl {
    pub until_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no pointers, so every bit pattern is valid.
    unsafe impl aya::Pod for Vip4Key {}
    unsafe impl aya::Pod for Vip6Key {}
    unsafe impl aya::Pod for BackendSlot {}
    unsafe impl aya::Pod for ServiceTable {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for PassiveMark {}
    unsafe impl aya::Pod for MarkClock {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for BackendCounters {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for DatapathCounters {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for TraceControl {}
    unsafe impl aya::Pod for Event {}
}
