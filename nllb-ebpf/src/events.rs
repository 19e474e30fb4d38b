//! Filling the event rings. `NLLB_EVENTS` (marks, recoveries) is always
//! written, and rarely; `NLLB_TRACE_EVENTS` only while a `nllb trace` reader
//! keeps `NLLB_TRACE_CTL.until_ns` in the future, so with no reader the
//! connect path pays one array read.

use aya_ebpf::{
    EbpfContext,
    btf_maps::RingBuf,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
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
    // Every field written here (no `Default`): see `emit`.
    let e = Event {
        ts_ns: now,
        pid_tgid: 0,
        cgroup_id: 0,
        cookie,
        kind: kind as u32,
        cause,
        svc_id,
        family: key.family,
        vip_port: 0,
        vip: [0; 4],
        backend: key.addr,
        backend_port: key.port,
        backend_family: key.family,
        skipped: [0; 4],
        skipped_port: 0,
        skipped_family: 0,
        comm: [0; 16],
    };
    emit(&NLLB_EVENTS, &e);
    if tracing() {
        emit(&NLLB_TRACE_EVENTS, &e);
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
    let none = BackendKey::default();
    let (kind, cause, backend, backend_port, backend_family, skipped) = match decision {
        Decision::Steer { slot, backend, cause, skipped } => {
            (EventKind::Steer, cause, backend, slot.port, dialed.family, skipped.unwrap_or(&none))
        }
        Decision::Refuse => (EventKind::Refuse, 0, [0; 4], 0, 0, &none),
    };
    // SAFETY: plain helper calls; the context pointer is valid.
    let (ts_ns, cgroup_id, cookie) =
        unsafe { (bpf_ktime_get_ns(), bpf_get_current_cgroup_id(), bpf_get_socket_cookie(ctx.as_ptr())) };
    let e = Event {
        ts_ns,
        pid_tgid: bpf_get_current_pid_tgid(),
        cgroup_id,
        cookie,
        kind: kind as u32,
        cause,
        svc_id,
        family: dialed.family,
        vip_port: dialed.port,
        vip: dialed.addr,
        backend,
        backend_port,
        backend_family,
        skipped: skipped.addr,
        skipped_port: skipped.port,
        skipped_family: skipped.family,
        comm: current_comm(),
    };
    emit(&NLLB_TRACE_EVENTS, &e);
}

/// The task's name. aya's wrapper zeroes a byte array, which this toolchain
/// turns into a memset call (see `emit`); two words are zeroed by two stores.
#[inline(always)]
fn current_comm() -> [u8; 16] {
    let mut words = [0u64; 2];
    // SAFETY: the helper writes at most 16 bytes into `words`.
    unsafe { bpf_get_current_comm(words.as_mut_ptr().cast(), 16) };
    // SAFETY: 16 bytes either way, any bit pattern is a valid [u8; 16].
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}

/// The record is built on the stack, every field written (a derived
/// `Default` becomes a memset call whose variable stack offsets the verifier
/// refuses without CAP_PERFMON), and copied in by the helper
/// (`bpf_ringbuf_output`) rather than written into reserved ring memory,
/// whose pointer the compiler may merge across call sites (also refused
/// without CAP_PERFMON). Copying 120 bytes costs nothing next to a connect.
#[inline(always)]
fn emit<const N: usize>(ring: &RingBuf<Event, N>, e: &Event) {
    if ring.output(e, 0).is_err() {
        bump_datapath(|c| c.events_lost += 1);
    }
}
