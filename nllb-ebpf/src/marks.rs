//! Passive marks: the kernel's own record of backends whose steered connects
//! failed. Only the programs write `NLLB_MARKS`, always a whole element
//! through the update helper; the agent's "cleared" time lives in the
//! service table it publishes. With one writer per element no update is lost.
//!
//! A mark read while another CPU replaces it can be the previous one (the
//! hash recycles replaced elements at once); the worst outcome is one connect
//! deciding on a mark a few microseconds old.
//!
//! `NLLB_MARK_CLOCK` holds when the newest mark was set, so that the common
//! case (no backend failed within the eject hold) costs a read of one array
//! element instead of a hash lookup per slot: on a Zen 3 host with the SRSO
//! mitigation that lookup was ~450 ns of a ~2.5 us connect4. It is written
//! before the mark with plain stores and no barrier: a connect that reads it
//! a moment too early, or sees the stores out of order, decides as if it
//! had run a moment before the failure, which it nearly did. Two CPUs that
//! mark at once may leave the older of their two times: the skip then starts
//! that many nanoseconds early, out of a hold of seconds.

use core::ptr::write_volatile;

use aya_ebpf::helpers::bpf_ktime_get_ns;
use nllb_common::{BackendKey, BackendSlot, EventKind, MarkCause, PassiveMark};

use crate::{
    events,
    maps::{NLLB_MARK_CLOCK, NLLB_MARKS, bump_datapath},
};

/// At most one event per backend in this interval: the agent's reaction to
/// the first (aborting every SYN_SENT socket to it) covers the rest, and the
/// aborts themselves come back as refusals.
const EVENT_INTERVAL_NS: u64 = 100_000_000;

/// Whether any mark can be in force at `now`: one was set within `hold_ns`
/// (or at a time this CPU's clock has not reached yet).
#[inline(always)]
pub fn any_recent(now: u64, hold_ns: u64) -> bool {
    let Some(clock) = NLLB_MARK_CLOCK.get(0) else {
        // Not reachable with the maps this object declares; never skip.
        return true;
    };
    let newest = clock.newest_ns;
    newest != 0 && (newest >= now || now - newest < hold_ns)
}

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
    if let Some(clock) = NLLB_MARK_CLOCK.get_ptr_mut(0) {
        // SAFETY: the map's one element, valid for the run; see the module
        // comment for why a plain store suffices.
        unsafe { write_volatile(&raw mut (*clock).newest_ns, now) };
    }
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
/// longer counts. Only a marked backend is written to, and only a mark set
/// within `hold_ns` is looked for (an older one is out of force already).
/// `socket` gives the connect's cookie and service id, for the event.
#[inline(always)]
pub fn recover(key: &BackendKey, hold_ns: u64, socket: impl FnOnce() -> (u64, u32)) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if !any_recent(now, hold_ns) {
        return false;
    }
    // SAFETY: copied out at once.
    let Some(prev) = unsafe { NLLB_MARKS.get(key) }.copied() else {
        return false;
    };
    if prev.failed_ns <= prev.recovered_ns {
        return false;
    }
    let next = PassiveMark { recovered_ns: now, ..prev };
    let _ = NLLB_MARKS.insert(key, &next, 0);
    let (cookie, svc_id) = socket();
    events::backend_event(EventKind::Recover, 0, key, cookie, svc_id, now);
    true
}
