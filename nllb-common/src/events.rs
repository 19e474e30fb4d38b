//! Records the programs put on the event rings.
//!
//! `NLLB_EVENTS` carries what the agent must react to (marks and
//! recoveries, rare); `NLLB_TRACE_EVENTS` carries every decision while a
//! `nllb trace` reader is attached. Both hold `Event`s.

/// What happened. Stored as `u32` in `Event.kind`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A connect to a virtual address was sent to `backend`; `cause` is a
    /// `STEER_*` value, `skipped` the first marked backend passed over.
    Steer = 1,
    /// A connect to a virtual address was refused: no backend published.
    Refuse = 2,
    /// A steered connect to `backend` failed: passive mark; `cause` is a
    /// `MarkCause`.
    Mark = 3,
    /// A steered connect to a marked `backend` was established: the mark no
    /// longer counts.
    Recover = 4,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<EventKind> {
        match v {
            1 => Some(EventKind::Steer),
            2 => Some(EventKind::Refuse),
            3 => Some(EventKind::Mark),
            4 => Some(EventKind::Recover),
            _ => None,
        }
    }
}

/// Why a backend was marked. Stored as `u32` in `Event.cause` and
/// `PassiveMark.cause`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkCause {
    /// RST to the SYN, or the kernel gave up or aborted the connect.
    Refused = 1,
    /// The SYN had to be retransmitted.
    SynTimeout = 2,
}

impl MarkCause {
    pub const fn from_u32(v: u32) -> Option<MarkCause> {
        match v {
            1 => Some(MarkCause::Refused),
            2 => Some(MarkCause::SynTimeout),
            _ => None,
        }
    }
}

/// `Event.cause` of a `Steer` event.
pub const STEER_FIRST_PICK: u32 = 0;
/// The random pick was marked; the next unmarked slot was taken.
pub const STEER_SKIPPED_MARKED: u32 = 1;
/// Every backend was marked; the one whose mark is oldest was taken.
pub const STEER_ALL_MARKED: u32 = 2;

/// One record on an event ring. Addresses as in `SockState` (network
/// order, v4 in `[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// CLOCK_MONOTONIC ns.
    pub ts_ns: u64,
    /// `bpf_get_current_pid_tgid()` of the process that connected (0 where
    /// the event does not come from a process, e.g. a SYN timer).
    pub pid_tgid: u64,
    pub cgroup_id: u64,
    pub cookie: u64,
    pub kind: u32,
    pub cause: u32,
    pub svc_id: u32,
    pub family: u16,
    pub vip_port: u16,
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    pub backend_port: u16,
    pub backend_family: u16,
    pub skipped: [u32; 4],
    pub skipped_port: u16,
    pub skipped_family: u16,
    pub comm: [u8; 16],
}
