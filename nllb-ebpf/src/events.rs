//! Filling the event rings. `NLLB_EVENTS` (marks, recoveries) is always
//! written, and rarely; `NLLB_TRACE_EVENTS` only while a `nllb trace` reader
//! keeps `NLLB_TRACE_CTL.until_ns` in the future, so with no reader the
//! connect path pays one array read.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::bpf_get_current_cgroup_id,
    },
    maps::ring_buf::RingBufEntry,
    programs::SockAddrContext,
};
use nllb_common::{BackendKey, BackendSlot, Event, EventKind};

use crate::{
    connect::Dialed,
    maps::{NLLB_EVENTS, NLLB_TRACE_CTL, NLLB_TRACE_EVENTS, bump_datapath},
};

#[inline(always)]
pub fn tracing() -> bool {
    match NLLB_TRACE_CTL.get(0) {
        // SAFETY: plain helper call.
        Some(ctl) if ctl.until_ns != 0 => (unsafe { bpf_ktime_get_ns() }) < ctl.until_ns,
        _ => false,
    }
}

/// A mark or a recovery of `key`: to the agent, and to a tracer if any.
#[inline(always)]
pub fn backend_event(kind: EventKind, cause: u32, key: &BackendKey, cookie: u64, svc_id: u32, now: u64) {
    let fill = |e: &mut Event| {
        e.ts_ns = now;
        e.kind = kind as u32;
        e.cause = cause;
        e.cookie = cookie;
        e.svc_id = svc_id;
        e.backend = key.addr;
        e.backend_port = key.port;
        e.backend_family = key.family;
    };
    emit(NLLB_EVENTS.reserve(0), fill);
    if tracing() {
        emit(NLLB_TRACE_EVENTS.reserve(0), fill);
    }
}

pub enum Decision<'a> {
    Steer { slot: &'a BackendSlot, backend: [u32; 4], cause: u32, skipped: Option<&'a BackendKey> },
    Refuse,
}

/// A connect to a virtual address, for a tracer (callers check `tracing()`
/// first where the decision is on the hot path).
#[inline(always)]
pub fn trace_decision(ctx: &SockAddrContext, svc_id: u32, dialed: &Dialed, decision: Decision<'_>) {
    if !tracing() {
        return;
    }
    emit(NLLB_TRACE_EVENTS.reserve(0), |e| {
        e.pid_tgid = bpf_get_current_pid_tgid();
        // SAFETY: plain helper calls; the context pointer is valid.
        unsafe {
            e.ts_ns = bpf_ktime_get_ns();
            e.cgroup_id = bpf_get_current_cgroup_id();
            e.cookie = bpf_get_socket_cookie(ctx.as_ptr());
        }
        if let Ok(comm) = bpf_get_current_comm() {
            e.comm = comm;
        }
        e.svc_id = svc_id;
        e.family = dialed.family;
        e.vip = dialed.addr;
        e.vip_port = dialed.port;
        match decision {
            Decision::Steer { slot, backend, cause, skipped } => {
                e.kind = EventKind::Steer as u32;
                e.cause = cause;
                e.backend = backend;
                e.backend_port = slot.port;
                e.backend_family = dialed.family;
                if let Some(s) = skipped {
                    e.skipped = s.addr;
                    e.skipped_port = s.port;
                    e.skipped_family = s.family;
                }
            }
            Decision::Refuse => e.kind = EventKind::Refuse as u32,
        }
    });
}

#[inline(always)]
fn emit(entry: Option<RingBufEntry<Event>>, fill: impl FnOnce(&mut Event)) {
    let Some(mut entry) = entry else {
        bump_datapath(|c| c.events_lost += 1);
        return;
    };
    let mut e = Event::default();
    fill(&mut e);
    entry.write(e);
    entry.submit(0);
}
