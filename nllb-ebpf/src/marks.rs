//! Passive marks: the kernel's own record of backends whose steered connects
//! failed. Only the programs write `NLLB_MARKS`, always a whole element
//! through the update helper; the agent's "cleared" time lives in the
//! service table it publishes. With one writer per element no update is lost.
//!
//! A mark read while another CPU replaces it can be the previous one (the
//! hash recycles replaced elements at once); the worst outcome is one connect
//! deciding on a mark a few microseconds old.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use nllb_common::{BackendKey, BackendSlot, EventKind, MarkCause, PassiveMark};

use crate::{
    events,
    maps::{NLLB_MARKS, bump_datapath},
};

/// At most one event per backend in this interval: the agent's reaction to
/// the first (aborting every SYN_SENT socket to it) covers the rest, and the
/// aborts themselves come back as refusals.
const EVENT_INTERVAL_NS: u64 = 100_000_000;

/// When the backend's mark is in force, the time it was set.
#[inline(always)]
pub fn marked(slot: &BackendSlot, now: u64, hold_ns: u64) -> Option<u64> {
    let key = BackendKey { addr: slot.addr, port: slot.port, family: slot.family };
    // SAFETY: the value is copied out at once (see the module comment).
    let m = unsafe { NLLB_MARKS.get(&key) }.copied()?;
    let fence = if slot.cleared_ns > m.recovered_ns { slot.cleared_ns } else { m.recovered_ns };
    (m.failed_ns > fence && now.wrapping_sub(m.failed_ns) < hold_ns).then_some(m.failed_ns)
}

/// A steered connect to `key` failed.
#[inline(always)]
pub fn mark(key: &BackendKey, cause: MarkCause, cookie: u64, svc_id: u32) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: copied out at once.
    let prev = unsafe { NLLB_MARKS.get(key) }.copied().unwrap_or_default();
    let next = PassiveMark { failed_ns: now, recovered_ns: prev.recovered_ns, cause: cause as u32, _pad: 0 };
    if NLLB_MARKS.insert(key, &next, 0).is_err() {
        bump_datapath(|c| c.marks_full += 1);
    }
    if now.wrapping_sub(prev.failed_ns) >= EVENT_INTERVAL_NS {
        events::backend_event(EventKind::Mark, cause as u32, key, cookie, svc_id, now);
    }
}

/// A steered connect to `key` was established: a mark set before now no
/// longer counts. Only a marked backend is written to. `socket` gives the
/// connect's cookie and service id, for the event.
#[inline(always)]
pub fn recover(key: &BackendKey, socket: impl FnOnce() -> (u64, u32)) -> bool {
    // SAFETY: copied out at once.
    let Some(prev) = unsafe { NLLB_MARKS.get(key) }.copied() else {
        return false;
    };
    if prev.failed_ns <= prev.recovered_ns {
        return false;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let next = PassiveMark { recovered_ns: now, ..prev };
    let _ = NLLB_MARKS.insert(key, &next, 0);
    let (cookie, svc_id) = socket();
    events::backend_event(EventKind::Recover, 0, key, cookie, svc_id, now);
    true
}
