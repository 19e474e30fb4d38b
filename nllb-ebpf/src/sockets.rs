//! The sockets nllb steered: a `SockState` in the socket's own BPF storage
//! (`BPF_MAP_TYPE_SK_STORAGE`), created at connect and freed by the kernel
//! with the socket. So it lives exactly as long as the socket, however many
//! connects come after, with no capacity to run out of and no program at
//! close; a socket nllb never steered carries none, and a lookup for it is a
//! NULL check. The agent reads it back through sock_diag
//! (`INET_DIAG_REQ_SK_BPF_STORAGES`), which is how it tells nllb's sockets
//! to a backend from anyone else's without scanning anything.
//!
//! A preallocated hash keyed by cookie (the previous design) was cheaper per
//! insert while it had room, but once full every insert failed at ~3.7 us
//! and getpeername answered the backend for every socket beyond it.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::generated::bpf_sk_storage_get,
    programs::{SockAddrContext, SockOpsContext},
};
use nllb_common::{BackendSlot, CONFIG_FLAG_PASSIVE, DatapathConfig, SockState};

use crate::{
    connect::Dialed,
    maps::{NLLB_SOCKETS, bump_datapath},
};

#[inline(always)]
pub fn remember(
    ctx: &SockAddrContext,
    dialed: &Dialed,
    backend: [u32; 4],
    slot: &BackendSlot,
    svc_id: u32,
    cfg: &DatapathConfig,
    now: u64,
) {
    let passive = cfg.flags & CONFIG_FLAG_PASSIVE != 0;
    let state = SockState {
        // Left 0: sock_diag reports every socket's cookie to the agent, and
        // sock_ops reads it only when it sets a mark, so no connect pays the
        // helper (~100 ns on a host with SRSO mitigations).
        cookie: 0,
        created_ns: now,
        vip: dialed.addr,
        backend,
        vip_port: dialed.port,
        backend_port: slot.port,
        family: dialed.family,
        _pad: 0,
        svc_id,
        stat_id: slot.stat_id,
        syn_rto_jiffies: if passive { ms_to_jiffies(slot.syn_rto_ms, cfg.hz) } else { 0 },
        _pad2: 0,
    };
    // SAFETY: the context's socket is valid for the helper.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // An earlier connect of the same socket (a retry after a failure) left
    // its storage: the get then returns it unchanged, so write either way.
    match storage(sk.cast(), BPF_SK_STORAGE_GET_F_CREATE.into()) {
        // SAFETY: the kernel's storage for this socket, valid for the run;
        // the socket is locked during connect.
        Some(p) => unsafe { *p = state },
        None => bump_datapath(|c| c.sockets_full += 1),
    }
}

/// Rounded up, so a short timeout never becomes 0 (the kernel's default).
#[inline(always)]
fn ms_to_jiffies(ms: u32, hz: u32) -> u32 {
    if ms == 0 || hz == 0 {
        return 0;
    }
    let j = (u64::from(ms) * u64::from(hz)).div_ceil(1000);
    if j > u64::from(u32::MAX) { u32::MAX } else { j as u32 }
}

/// This socket's storage; with `F_CREATE`, zeroed storage is made if none
/// exists (NULL only when the kernel cannot allocate it).
#[inline(always)]
fn storage(sk: *mut c_void, flags: u64) -> Option<*mut SockState> {
    if sk.is_null() {
        return None;
    }
    let map = core::ptr::from_ref(&NLLB_SOCKETS).cast_mut().cast::<c_void>();
    // SAFETY: a map of this object and a socket pointer the kernel gave us.
    let p = unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) };
    (!p.is_null()).then_some(p.cast::<SockState>())
}

#[inline(always)]
fn lookup(sk: *mut c_void) -> Option<SockState> {
    // SAFETY: valid for the run, copied out at once.
    storage(sk, 0).map(|p| unsafe { *p })
}

/// The state of a steered socket, seen from sock_ops (a request socket or a
/// time-wait socket has no full socket: NULL, nothing steered).
#[inline(always)]
pub fn of_sock_ops(ctx: &SockOpsContext) -> Option<SockState> {
    // SAFETY: ctx.ops is valid for the program's run.
    lookup(unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast())
}

/// The state of a steered socket, seen from getpeername.
#[inline(always)]
pub fn of_sock_addr(ctx: &SockAddrContext) -> Option<SockState> {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    lookup(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }.cast())
}
